"""The FastAPI application: routes, the gate (API key, readiness), error shapes, start-up and drain.

Start-up order (lifespan): the app starts listening at once with /health answering 503; `warm_up`
(building the matmul kernels, ~2 s for the default model on a CPU) runs on a worker thread; then
the engine thread starts and /health turns 200. Shutdown (lifespan end, after uvicorn has waited for
in-flight responses) stops the engine, letting whatever is still running finish.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI

from qatserve.server import errors, llamacpp_routes, metrics, openai_routes, slot_routes
from qatserve.server.gate import Gate
from qatserve.server.state import ServerState

log = logging.getLogger("qatserve.server")


async def _start(state: ServerState, warm_up: Callable[[], None] | None,
                 on_ready: Callable[[ServerState], None] | None,
                 on_fatal: Callable[[BaseException], None] | None) -> None:
    try:
        if warm_up is not None:
            await asyncio.to_thread(warm_up)
        state.aengine.start()
    except Exception as e:  # the server cannot serve: say why on /health and let the launcher exit
        state.fatal = f"start-up failed: {type(e).__name__}: {e}"
        log.error(state.fatal)
        if on_fatal is not None:
            on_fatal(e)
        return
    state.ready = True
    if on_ready is not None:
        on_ready(state)


def create_app(state: ServerState, warm_up: Callable[[], None] | None = None,
               on_ready: Callable[[ServerState], None] | None = None,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The ASGI app serving `state`'s model; the engine thread starts inside the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        starting = asyncio.create_task(_start(state, warm_up, on_ready, on_fatal))
        try:
            yield
        finally:
            if not starting.done():
                starting.cancel()
            if state.aengine.running:
                await asyncio.to_thread(state.aengine.shutdown, True, state.config.shutdown_timeout)

    # No /docs or /openapi.json: the request schemas are validated by hand-written rules, and an
    # unauthenticated schema endpoint is one more thing to guard.
    app = FastAPI(title="qatserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qs = state
    app.state.metrics = metrics.registry_for(state)
    errors.install(app)
    app.include_router(openai_routes.router)
    app.include_router(llamacpp_routes.router)
    app.include_router(slot_routes.router)
    app.include_router(metrics.router)
    app.add_middleware(Gate, state=state)
    return app
