"""uvicorn's h11 protocol with a request-header deadline (slow-loris).

uvicorn times out idle keep-alive connections only after a response, and any byte received cancels
that timer; a client that opens a connection and sends its headers one byte every few seconds would
hold it forever. Here a connection must complete a request's headers within `timeout_keep_alive`
seconds of opening, or of its previous response; otherwise it is closed. A request in progress
(e.g. a long SSE stream) is never affected.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    _guard: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._guard is not None:
            self._guard.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
        # The cycle at arming time: a new request replaces self.cycle, which disarms the deadline.
        self._guard = self.loop.call_later(self.timeout_keep_alive, self._expire, self.cycle)

    def _expire(self, cycle) -> None:
        in_progress = self.cycle is not None and not self.cycle.response_complete
        if self.cycle is cycle and not in_progress and not self.transport.is_closing():
            self.transport.close()
