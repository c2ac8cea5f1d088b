"""What every route shares: the model, the engine, readiness, live requests and server counters."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from qatserve.engine.async_engine import AsyncEngine, RequestHandle
from qatserve.engine.engine import Engine
from qatserve.engine.loader import LoadedModel
from qatserve.engine.request import GenerationResult
from qatserve.formats.chat_template import CHATML, default_template


@dataclass(frozen=True)
class ServerConfig:
    """Server-side settings (the engine's are EngineConfig)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    alias: str | None = None  # the model id clients see (default: the file name)
    body_limit: int = 8 << 20  # bytes of one request body
    timeout: float = 30.0  # s: idle keep-alive, request headers, request body
    shutdown_timeout: float = 30.0  # s: SIGTERM drains this long, then aborts what is left
    verbose: bool = False
    slot_save_path: str | None = None  # directory of slot files (POST /slots/ID?action=...); None = disabled


@dataclass
class Counters:
    """Server-side totals for /metrics, added when a request ends (the engine counts steps and tokens)."""

    requests: dict[str, int] = field(default_factory=dict)  # by finish reason
    rejected: dict[str, int] = field(default_factory=dict)  # by HTTP status
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    predicted_tokens: int = 0
    predicted_seconds: float = 0.0

    def finished(self, result: GenerationResult) -> None:
        t = result.timings
        self.requests[result.finish_reason] = self.requests.get(result.finish_reason, 0) + 1
        self.prompt_tokens += t.prompt_n
        self.prompt_seconds += t.prompt_ms / 1000
        self.predicted_tokens += t.predicted_n
        self.predicted_seconds += t.predicted_ms / 1000

    def rejected_with(self, status: int) -> None:
        self.rejected[str(status)] = self.rejected.get(str(status), 0) + 1


class ServerState:
    def __init__(self, loaded: LoadedModel, engine: Engine, config: ServerConfig):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.engine = engine
        self.aengine = AsyncEngine(engine)
        self.config = config
        path = Path(loaded.path)
        self.model_id = config.alias or path.name
        # Names a request's "model" may use: the id, the file name with or without .gguf, the path.
        self.model_names = {self.model_id, path.name, path.stem, str(path)}
        self.created = int(time.time())
        arch = loaded.config.arch
        self.chat_template = self.tokenizer.chat_template or default_template(arch) or CHATML
        self.ready = False
        self.draining = False
        self.fatal: str | None = None  # why the server cannot serve (warm-up failed)
        self.live: set[RequestHandle] = set()  # submitted, not yet released
        self.pending = 0  # submits on their way to the engine thread
        self.counters = Counters()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.startup: dict[str, float] = {}  # seconds per start-up phase, for /props and the log
        self.slot_identity = None  # engine.slot_file.CacheIdentity, computed at the first slot save/restore

    @property
    def n_ctx_slot(self) -> int:
        return self.engine.n_ctx_slot

    def health(self) -> tuple[int, str]:
        """(HTTP status, message) for /health: 200 only when a request would be served now."""
        if self.fatal is not None:
            return 503, self.fatal
        if self.aengine.error is not None or (self.ready and not self.aengine.running):
            return 503, "engine failed"
        if self.draining:
            return 503, "shutting down"
        if not self.ready:
            return 503, "Loading model"
        return 200, "ok"


def state_of(request) -> ServerState:
    """The ServerState of the app serving `request` (set by app.create_app)."""
    return request.app.state.qs
