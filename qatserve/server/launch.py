"""`qatserve serve`: bind, load, listen, warm up, serve; drain on SIGTERM.

Order, chosen so every expected start-up failure is one stderr line and a non-zero exit before
anything listens (faults 1-13: a bad model file never gets a listening server):
  1. flags -> ServerConfig / EngineConfig (RequestError);
  2. bind the socket, not yet listening (port in use -> ServerError);
  3. memory-map and build the model (GGUFError / ModelError), allocate the engine's KV cache;
  4. listen, /health 503; build every matmul kernel on a worker thread; start the engine; /health 200
     and the "listening" line with the seconds from process start to ready.
The figure is what a user waits for: process start until /health says 200 and the first request
runs at full speed (kernels built), measured from the kernel's process start time (/proc).
"""

from __future__ import annotations

import os
import socket
import sys
import time

_T_IMPORT = time.perf_counter()


def seconds_since_process_start() -> float:
    """Wall seconds since this process was created (Linux /proc; else since this module's import)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime in clock ticks
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _T_IMPORT


def _say(message: str) -> None:
    print(f"qatserve: {message}", file=sys.stderr, flush=True)


def _say_safely(message: str) -> None:
    # From a signal handler: the signal may have interrupted a write to stderr (reentrant call).
    try:
        _say(message)
    except RuntimeError:
        pass


def bind(host: str, port: int) -> socket.socket:
    """A bound, not yet listening, TCP socket for host:port (port 0 picks a free one)."""
    from qatserve.server.errors import ServerError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ServerError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted server reuse a port whose old connections are in TIME_WAIT; Linux still
        # refuses a port that another socket is listening on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _prepare_kernels(model) -> None:
    from qatserve.quant.linear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()


def serve(args) -> int:
    """Run the server until SIGTERM/SIGINT; the exit code."""
    from qatserve.server.state import ServerConfig

    t_entry = seconds_since_process_start()
    cfg = ServerConfig(host=args.host, port=args.port, api_key=args.api_key, alias=args.alias,
                       body_limit=args.body_limit, timeout=args.timeout, shutdown_timeout=args.shutdown_timeout,
                       verbose=args.verbose)
    engine_cfg = _engine_config(args)
    sock = bind(cfg.host, cfg.port)
    try:
        state, phases = _load(args, cfg, engine_cfg)
    except BaseException:
        sock.close()
        raise
    phases = {"process_to_serve": round(t_entry, 3), **phases}
    port = sock.getsockname()[1]
    url = f"http://{cfg.host if ':' not in cfg.host else '[' + cfg.host + ']'}:{port}"
    return _run(state, sock, url, phases)


def _engine_config(args):
    from qatserve.engine.engine import EngineConfig
    from qatserve.engine.kv_cache import KVCacheOptions

    kv = KVCacheOptions(args.cache_type_k, args.cache_type_v, rotate=not args.no_kv_rotation,
                        prefix_cache=not args.no_cache_prompt)
    return EngineConfig(n_ctx=args.ctx_size, n_slots=args.parallel, max_batch_tokens=args.batch_size,
                        max_queue=args.max_queue, kv=kv)


def _load(args, cfg, engine_cfg):
    t0 = time.perf_counter()
    from qatserve.default_model import default_model_path
    from qatserve.engine.engine import Engine
    from qatserve.engine.loader import load_model_file
    from qatserve.errors import RequestError
    from qatserve.quant.linear import set_cpu_threads
    from qatserve.server.state import ServerState

    set_cpu_threads(args.threads or os.cpu_count() or 1)
    t1 = time.perf_counter()
    path = args.model or default_model_path()
    loaded = load_model_file(path)
    if loaded.tokenizer is None:
        loaded.gguf.close()
        raise RequestError(f"{path}: the file has no tokenizer (tokenizer.ggml.*), so it cannot serve text")
    t2 = time.perf_counter()
    engine = Engine(loaded.model, loaded.tokenizer, engine_cfg)
    t3 = time.perf_counter()
    _say(f"loaded {loaded.path.name} ({loaded.config.arch}, {loaded.config.n_layer} layers) in "
         f"{loaded.load_seconds:.2f} s; {engine_cfg.n_slots} slot(s) of {engine.n_ctx_slot} tokens, "
         f"KV {engine_cfg.kv.type_k}/{engine_cfg.kv.type_v}")
    phases = {"imports": round(t1 - t0, 3), "load": round(t2 - t1, 3), "engine": round(t3 - t2, 3)}
    return ServerState(loaded, engine, cfg), phases


def _run(state, sock, url: str, phases: dict) -> int:
    import uvicorn

    from qatserve.server.app import create_app
    from qatserve.server.http_guard import GuardedH11Protocol

    cfg = state.config
    server = None

    def warm_up() -> None:
        t = time.perf_counter()
        _prepare_kernels(state.loaded.model)
        phases["kernels"] = round(time.perf_counter() - t, 3)

    def on_ready(st) -> None:
        phases["ready"] = round(seconds_since_process_start(), 3)
        # CPU seconds of the whole process so far: start-up is nearly serial, so on an idle machine the
        # wall figure is close to this; on a busy one the wall figure grows and this one does not.
        phases["cpu"] = round(time.process_time(), 3)
        st.startup.update(phases)
        python = phases["process_to_serve"] + phases["imports"]
        known = python + phases["load"] + phases["engine"] + phases.get("kernels", 0.0)
        _say(f"listening on {url} (load-to-listening {phases['ready']:.2f} s from process start, "
             f"{phases['cpu']:.2f} s of CPU: "
             f"python and imports {python:.2f} s, model {phases['load']:.2f} s, KV cache {phases['engine']:.2f} s, "
             f"kernels {phases.get('kernels', 0):.2f} s, HTTP server {phases['ready'] - known:.2f} s)")

    def on_fatal(exc: BaseException) -> None:
        _say(f"error: start-up failed: {type(exc).__name__}: {exc}")
        server.exit_code = 1
        server.should_exit = True

    app = create_app(state, warm_up=warm_up, on_ready=on_ready, on_fatal=on_fatal)
    config = uvicorn.Config(
        app, http=GuardedH11Protocol, loop="asyncio", lifespan="on", ws="none",
        log_level="info" if cfg.verbose else "warning", access_log=cfg.verbose,
        timeout_keep_alive=max(1, round(cfg.timeout)),
        # uvicorn's own cut-off, a backstop behind ours (which aborts with a final error frame).
        timeout_graceful_shutdown=round(cfg.shutdown_timeout + 5))
    server = _server_class()(config, state)
    _say(f"serving on {url}; /health answers 503 until the model is ready")
    server.run(sockets=[sock])
    if server.exit_code == 0:
        _say("stopped")
    return server.exit_code


def _server_class():
    # Defined on demand: uvicorn is imported only after the model has loaded.
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with qatserve's signal policy: the first SIGTERM/SIGINT stops admitting new
        generations (503), lets in-flight ones finish for up to --shutdown-timeout seconds, then aborts
        the rest (their streams end with an error frame); a second signal exits at once. Exit code 0
        after a drain (uvicorn would re-raise the signal and die of it)."""

        def __init__(self, config, state):
            super().__init__(config)
            self.state = state
            self.exit_code = 0

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                self.force_exit = True
                self.exit_code = self.exit_code or 1
                return
            self.should_exit = True
            st = self.state
            st.draining = True
            st.aengine.stop_accepting()
            _say_safely(f"signal {sig}: draining {len(st.live)} request(s), up to {st.config.shutdown_timeout:g} s")
            if st.loop is not None:
                st.loop.call_soon_threadsafe(st.loop.call_later, st.config.shutdown_timeout, self._abort_rest)

        def _abort_rest(self) -> None:
            if self.state.live:
                _say_safely(f"shutdown timeout: aborting {len(self.state.live)} request(s)")
            for handle in list(self.state.live):
                handle.abort()

    return Server
