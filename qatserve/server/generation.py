"""One engine request as a route drives it: submit, consume, and abort when the client goes away.

A request is aborted (its slot and KV blocks freed at the engine's next step boundary) when:
the client disconnects while a non-streaming answer is computed (`collect` watches the ASGI receive
channel), the client disconnects mid-stream (Starlette cancels the stream; `stream`'s finally
aborts), the route's task is cancelled (shutdown timeout), or the server drains past its timeout.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from starlette.requests import Request

from qatserve.engine.async_engine import RequestHandle
from qatserve.engine.request import GenerationResult, TokenOut
from qatserve.engine.sampler import SamplingParams
from qatserve.server.errors import APIError, from_engine, unavailable
from qatserve.server.state import ServerState

_ENGINE_POLL = 0.25  # s between checks that the engine thread is alive while a submit is pending


async def submit(state: ServerState, prompt: list[int], params: SamplingParams, request_id: str,
                 **options) -> RequestHandle:
    """Queue the request; APIError 400 (bad prompt), 429 (queue full) or 503 (stopping) at once.
    `options`: the engine's per-request keywords (sampling.engine_options)."""
    if state.draining:
        raise unavailable("server is shutting down")
    # Admission is counted here, on the event loop, because the engine only fills slots at its next
    # step: a burst arriving between two steps would otherwise all look like it fits.
    cfg = state.engine.config
    active = state.pending + sum(h.result is None for h in state.live)
    if active >= cfg.n_slots + cfg.max_queue:
        state.counters.rejected_with(429)
        raise APIError(429, f"server busy: {cfg.n_slots} slot(s) and {cfg.max_queue} queue place(s) taken; "
                       "retry later", code="queue_full", headers={"Retry-After": "1"})
    state.pending += 1
    task = asyncio.ensure_future(state.aengine.submit(prompt, params, request_id, **options))
    try:
        # asyncio.wait never cancels `task`: cancelling a submit in flight would cancel the future the
        # engine thread is about to complete. The engine thread runs the submit between steps; if it
        # has died, nothing ever would, so the thread is checked while we wait.
        while not task.done():
            await asyncio.wait({task}, timeout=_ENGINE_POLL)
            if not task.done() and not state.aengine.running:
                raise APIError(500, "the engine has stopped", code="engine_failed")
        handle = task.result()
    except APIError:
        raise
    except asyncio.CancelledError:  # the route was cancelled: abort the request once it exists
        task.add_done_callback(_abort_orphan)
        raise
    except Exception as e:
        err = from_engine(e)
        state.counters.rejected_with(err.status)
        raise err from None
    finally:
        state.pending -= 1
    state.live.add(handle)
    return handle


def _abort_orphan(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().abort()


def release(state: ServerState, handle: RequestHandle) -> None:
    """Abort the request if it is still running and stop tracking it (idempotent)."""
    if handle.result is None:
        handle.abort()
        if handle in state.live:  # counted now: the engine's final result arrives after we stop looking
            state.counters.requests["abort"] = state.counters.requests.get("abort", 0) + 1
            state.live.discard(handle)
    _finish(state, handle)


def _finish(state: ServerState, handle: RequestHandle) -> None:
    if handle in state.live:
        state.live.discard(handle)
        if handle.result is not None:
            state.counters.finished(handle.result)


def end_error(state: ServerState, result: GenerationResult) -> APIError | None:
    """Why a request ended without finishing, as the error its client gets; None when it finished."""
    if result.finish_reason != "abort":
        return None
    if state.aengine.error is not None:
        return APIError(500, "the engine failed while generating; the request was aborted", code="engine_failed")
    return unavailable("the server is shutting down; the request was aborted")


async def _client_gone(request: Request) -> None:
    # The body has been read, so the next ASGI message is http.disconnect, sent when the client
    # closes the connection (uvicorn also sends it once the response is complete; by then we are done).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(state: ServerState, request: Request, handle: RequestHandle) -> tuple[list[TokenOut], GenerationResult] | None:
    """Run the request to its end; None when the client went away first (the request is aborted).
    Raises the APIError of a request that ended without finishing (end_error)."""
    outs: list[TokenOut] = []

    async def consume() -> None:
        async for out in handle:
            outs.append(out)

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            handle.abort()
            await work
            return None
        work.result()
        assert handle.result is not None
        if err := end_error(state, handle.result):
            raise err
        return outs, handle.result
    finally:
        watch.cancel()
        if handle.result is None:  # the route itself was cancelled (e.g. the shutdown cut-off)
            work.cancel()
        release(state, handle)


async def stream(state: ServerState, handle: RequestHandle) -> AsyncIterator[TokenOut]:
    """The request's tokens as they come; closing or cancelling the iterator aborts the request."""
    try:
        async for out in handle:
            yield out
    finally:
        release(state, handle)
