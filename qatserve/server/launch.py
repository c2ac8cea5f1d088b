"""`qatserve serve`: bind, load, listen, warm up, serve; drain on SIGTERM.

Order, chosen so every expected start-up failure is one stderr line and a non-zero exit before
anything listens (faults 1-13: a bad model file never gets a listening server):
  1. flags -> ServerConfig / EngineConfig (RequestError);
  2. bind the socket, not yet listening (port in use -> ServerError);
  3. memory-map and check the GGUF (GGUFError) before torch is imported, and queue the kernels of the
     output head and of every matrix no layer fuses for a worker thread; build the model (ModelError) and
     start the other (fused) kernels on a worker thread; build the tokenizer, allocate the KV cache;
  4. listen, /health 503; wait for the kernels; start the engine; /health 200 and the "listening" line
     with the seconds from process start to ready.
The kernel builds overlap the Python work (imports, tokenizer, HTTP stack) because onnxruntime and
numpy release the GIL; nothing is deferred past ready.
The figure is what a user waits for: process start until /health says 200 and the first request
runs at full speed (kernels built), measured from the kernel's process start time (/proc).

Where the time goes (default model, -t 2, the 2-core machine, main-thread CPU seconds; README has the
wall figures): interpreter and CLI parser 0.3 (numpy and gguf imports), `import torch` 1.4-1.8,
GGUF header 0.15 and tokenizer 0.3 (the 262k-string vocabulary), model 0.05, FastAPI + our routes
and uvicorn 0.6 (FastAPI's import alone 0.4: pydantic builds its OpenAPI models), KV cache 0.01.
All of it holds the GIL, so it is serial whatever the threads. Tried and measured, not kept:
importing torch on one thread while another imports FastAPI, uvicorn, prometheus-client and jinja2
(2.9-3.3 s wall against 2.4-2.8 s one after the other: the GIL serialises them, and the hand-offs cost);
dlopen'ing libtorch_cpu.so through ctypes on a second thread ahead of `import
torch` (saves ~0.45 s of main-thread CPU in a bare `import torch`, but in the server every other
library load waits on the dynamic loader's lock, holding the GIL: no gain over 5 paired starts).
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
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        from qatserve.server.errors import ServerError  # fastapi with it: imported on failure only here

        raise ServerError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted server reuse a port whose old connections are in TIME_WAIT; Linux still
        # refuses a port that another socket is listening on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        from qatserve.server.errors import ServerError

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
    from qatserve.quant.kernels import cpu

    t_entry = seconds_since_process_start()
    # Before torch and the HTTP stack are imported: the port and the model file fail fast, and the
    # kernels build on a worker thread while those imports hold the interpreter.
    sock = bind(args.host, args.port)
    gguf = None
    try:
        gguf = _open_model(args)
        t_open = seconds_since_process_start()
        from qatserve.server.state import ServerConfig

        cfg = ServerConfig(host=args.host, port=args.port, api_key=args.api_key, alias=args.alias,
                           body_limit=args.body_limit, timeout=args.timeout, shutdown_timeout=args.shutdown_timeout,
                           verbose=args.verbose, slot_save_path=args.slot_save_path)
        engine_cfg = _engine_config(args)
        state, phases, kernels = _load(args, cfg, engine_cfg, gguf, t_open)
    except BaseException:
        cpu.drop_early()
        if gguf is not None:
            gguf.close()
        sock.close()
        raise
    phases = {"process_to_serve": round(t_entry, 3), "open": round(t_open - t_entry, 3), **phases}
    port = sock.getsockname()[1]
    url = f"http://{cfg.host if ':' not in cfg.host else '[' + cfg.host + ']'}:{port}"
    return _run(state, sock, url, phases, kernels)


def _engine_config(args):
    from qatserve.engine.engine import EngineConfig
    from qatserve.engine.kv_cache import KVCacheOptions

    kv = KVCacheOptions(args.cache_type_k, args.cache_type_v, rotate=not args.no_kv_rotation,
                        prefix_cache=not args.no_cache_prompt)
    return EngineConfig(n_ctx=args.ctx_size, n_slots=args.parallel, max_batch_tokens=args.batch_size,
                        max_queue=args.max_queue, kv=kv, spec=getattr(args, "speculative", None),
                        keep_slots=args.slot_save_path is not None)


# Matrices that no model here fuses with another (q|k|v and gate|up are concatenated into one kernel,
# so theirs can only be built once the model exists): queued for the early kernel thread after the head.
_EARLY_MATRICES = ("attn_output.weight", "ffn_down.weight")


def _open_model(args):
    """The model file mapped and checked (GGUFError), and kernels queued for a worker thread that builds
    them while torch is imported (quant/kernels/cpu.py, build_early): first the output head's (the
    biggest matrix: half the default model's kernel work), then every block's attention output and FFN
    down projection; the model's layers take them. The head is `output.weight`, or the token embeddings
    when the file ties them; a model that uses a tensor otherwise just builds its own kernel."""
    from qatserve.default_model import default_model_path
    from qatserve.formats.gguf_reader import open_gguf
    from qatserve.quant.kernels import cpu

    gguf = open_gguf(args.model or default_model_path())
    threads = args.threads or os.cpu_count() or 1
    head = "output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"
    names = [head] + [n for n in gguf.tensors if n.startswith("blk.") and n.endswith(_EARLY_MATRICES)]
    for name in names:
        info = gguf.tensors.get(name)
        if info is not None and info.ggml_type in cpu.SUPPORTED and len(info.ne) == 2:
            big = info.ne[0] * info.ne[1] >= cpu.BIG_MATRIX  # as QuantLinear.prepare picks its threads
            cpu.build_early(gguf.tensor_bytes(name), info.ggml_type, info.ne[0], info.ne[1],
                            threads=threads if big else 1)
    return gguf


def _load(args, cfg, engine_cfg, gguf, t_open: float):
    from qatserve.engine.engine import Engine
    from qatserve.engine.loader import load_model_file
    from qatserve.errors import RequestError
    from qatserve.quant.background import KernelBuild
    from qatserve.quant.linear import set_cpu_threads
    from qatserve.server.state import ServerState

    set_cpu_threads(args.threads or os.cpu_count() or 1)
    t1 = seconds_since_process_start()
    kernels: list[KernelBuild] = []  # started as soon as the model exists, beside the tokenizer and the rest
    try:
        loaded = load_model_file(gguf, on_model=lambda model: kernels.append(KernelBuild(model)),
                                 device=getattr(args, "device", "auto"))
        if loaded.tokenizer is None:
            raise RequestError(f"{gguf.path}: the file has no tokenizer (tokenizer.ggml.*), so it cannot serve text")
        t2 = seconds_since_process_start()
        engine = Engine(loaded.model, loaded.tokenizer, engine_cfg)
    except BaseException:
        for k in kernels:
            k.cancel()
        raise
    t3 = seconds_since_process_start()
    _say(f"loaded {loaded.path.name} ({loaded.config.arch}, {loaded.config.n_layer} layers) in "
         f"{loaded.load_seconds:.2f} s; {engine_cfg.n_slots} slot(s) of {engine.n_ctx_slot} tokens, "
         f"KV {engine_cfg.kv.type_k}/{engine_cfg.kv.type_v}"
         + (f"; drafting with {engine.spec.cfg.type}" if engine.spec is not None else ""))
    phases = {"imports": round(t1 - t_open, 3), "load": round(t2 - t1, 3), "engine": round(t3 - t2, 3)}
    return ServerState(loaded, engine, cfg), phases, kernels[0]


def _run(state, sock, url: str, phases: dict, kernels) -> int:
    t_http = seconds_since_process_start()
    import uvicorn

    from qatserve.quant.kernels import cpu
    from qatserve.server.app import create_app
    from qatserve.server.http_guard import GuardedH11Protocol

    cfg = state.config
    server = None

    def warm_up() -> None:
        # Runs once the socket listens: the HTTP stack's start-up ran beside the kernel build.
        t = seconds_since_process_start()
        phases["http"] = round(t - t_http, 3)
        phases["kernels"] = round(kernels.wait(), 3)
        _prepare_kernels(state.loaded.model)  # nothing left unless a layer was added after the build started
        cpu.drop_early()  # an early kernel no layer took (a model that uses its head otherwise)
        phases["kernel_wait"] = round(seconds_since_process_start() - t, 3)

    def on_ready(st) -> None:
        phases["ready"] = round(seconds_since_process_start(), 3)
        # CPU seconds of the whole process so far (every thread), and of this (the main) thread, which
        # carries the serial part: on an idle 2-core machine the wall figure is close to the main thread's
        # CPU plus the wait for the kernels; on a busy one the wall figure grows and these hardly do.
        phases["cpu"] = round(time.process_time(), 3)
        phases["cpu_main"] = round(time.thread_time(), 3)
        st.startup.update(phases)
        python = phases["process_to_serve"] + phases["imports"]
        model = phases["open"] + phases["load"]
        # The phases in order add up to the figure; the kernels were built on a worker thread beside the
        # model's tokenizer, the KV cache and the HTTP server, and the wait is what was left of them.
        _say(f"listening on {url} (load-to-listening {phases['ready']:.2f} s from process start, "
             f"{phases['cpu']:.2f} s of CPU, {phases['cpu_main']:.2f} s on the main thread: "
             f"python and imports {python:.2f} s, model {model:.2f} s, KV cache {phases['engine']:.2f} s, "
             f"HTTP server {phases.get('http', 0):.2f} s, waiting for kernels {phases.get('kernel_wait', 0):.2f} s; "
             f"kernels built beside these in {phases.get('kernels', 0):.2f} s)")

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
