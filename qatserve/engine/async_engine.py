"""AsyncEngine: the engine on its own thread, for asyncio callers (the HTTP server).

The engine is single-threaded; this wrapper owns it. Callers hand it work through an inbox of closures
that the engine thread runs between steps (submit, abort), so a request joins or leaves at the next
step boundary and a cancelled request's slot is free within one step. Tokens come back through an
asyncio.Queue per request, filled with loop.call_soon_threadsafe.

    handle = await aengine.submit(prompt_ids, params)   # raises RequestError / QueueFull at once
    async for out in handle:                            # TokenOut items
        ...
    handle.result                                       # GenerationResult once the stream ended
    handle.abort()                                      # e.g. the client went away
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from typing import Callable

from qatserve.engine.engine import Engine
from qatserve.engine.request import GenerationResult, Request, TokenOut
from qatserve.engine.sampler import SamplingParams
from qatserve.errors import RequestError


class EngineStopped(RequestError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class RequestHandle:
    """The caller's side of one request: an async iterator of TokenOut, then `result`."""

    def __init__(self, owner: "AsyncEngine", loop: asyncio.AbstractEventLoop):
        self._owner = owner
        self._loop = loop
        self._queue: asyncio.Queue[TokenOut | None] = asyncio.Queue()
        self.request: Request | None = None
        self.result: GenerationResult | None = None

    @property
    def id(self) -> str:
        return self.request.id if self.request else ""

    def _listener(self, req: Request, out: TokenOut | None) -> None:  # engine thread
        if out is None:
            self.result = req.result
        self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenOut:
        out = await self._queue.get()
        if out is None:
            raise StopAsyncIteration
        return out

    async def wait(self) -> GenerationResult:
        """Consume the rest of the stream and return the result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    def abort(self) -> None:
        if self.request is not None and self.result is None:
            self._owner.abort(self.request.id)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qatserve-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _call(self, fn: Callable[[], None]) -> None:
        self._inbox.append(fn)
        self._wake.set()

    def _loop(self) -> None:
        try:
            while True:
                while self._inbox:
                    self._inbox.popleft()()
                if self.engine.has_work():
                    self.engine.step()
                    continue
                if self._stop:
                    return
                self._wake.wait()
                self._wake.clear()
        except BaseException as e:  # a bug: fail every request instead of hanging their streams
            self.error = e
            for r in list(self.engine.requests.values()):
                try:
                    self.engine.abort(r.id)
                except Exception:
                    pass
            raise

    async def submit(self, prompt: list[int], params: SamplingParams | None = None,
                     request_id: str | None = None, **options) -> RequestHandle:
        """Queue a request; validation errors (RequestError, QueueFull) are raised here. `options`: the
        rest of Engine.add_request's keywords (slot, speculative)."""
        if not self._accepting or self.error is not None or not self.running:
            raise EngineStopped("server is shutting down" if self.error is None else "engine failed")
        loop = asyncio.get_running_loop()
        handle = RequestHandle(self, loop)
        done: concurrent.futures.Future = concurrent.futures.Future()

        def add() -> None:
            if not done.set_running_or_notify_cancel():  # the caller was cancelled meanwhile
                return
            try:
                req = self.engine.add_request(prompt, params, request_id, **options)
                req.listener = handle._listener
                handle.request = req
                done.set_result(req)
            except BaseException as e:
                done.set_exception(e)

        self._call(add)
        await asyncio.wrap_future(done)
        return handle

    async def call(self, fn: Callable[[Engine], object]) -> object:
        """Run fn(engine) on the engine thread between two steps (so it never races a step); its result,
        or its exception raised here. For work on the engine's state that is not a request (slot save)."""
        if self.error is not None or not self.running:
            raise EngineStopped("engine failed" if self.error is not None else "the engine is not running")
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(fn(self.engine))
            except BaseException as e:
                done.set_exception(e)

        self._call(run)
        fut = asyncio.wrap_future(done)
        while True:  # an engine thread that died would never run `run`: look every quarter second
            try:
                return await asyncio.wait_for(asyncio.shield(fut), 0.25)
            except asyncio.TimeoutError:
                if not self.running:
                    done.cancel()
                    raise EngineStopped("engine failed") from None

    def abort(self, request_id: str) -> None:
        self._call(lambda: self.engine.abort(request_id))

    def stop_accepting(self) -> None:
        self._accepting = False

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, let in-flight ones finish, else cancel them; join the thread."""
        self._accepting = False
        if not drain:
            def cancel_all() -> None:
                for r in list(self.engine.requests.values()):
                    self.engine.abort(r.id)
            self._call(cancel_all)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def in_flight(self) -> int:
        return len(self.engine.requests)
