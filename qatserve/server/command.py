"""The `qatserve serve` flags (llama-server's names) and their checks. Imports nothing heavy: the
parser is built for every qatserve command."""

from __future__ import annotations

import argparse
import os

from qatserve.errors import RequestError


def add_parser(sub) -> None:
    s = sub.add_parser(
        "serve", help="OpenAI- and llama.cpp-compatible HTTP server",
        description="Serve a GGUF model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, "
        "/completion, /tokenize, /detokenize, /health, /slots, /props, /metrics.")
    s.add_argument("-m", "--model", metavar="MODEL.gguf", help="GGUF model file (default: embedded Gemma 3 270M)")
    s.add_argument("-a", "--alias", metavar="NAME", help="model id reported to clients (default: the file name)")
    g = s.add_argument_group("engine")
    g.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="KV context in tokens, shared by the slots (default 4096; 0 = the model's trained context)")
    g.add_argument("-np", "--parallel", type=int, default=1, help="parallel slots (default 1)")
    g.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per engine step (default 512)")
    g.add_argument("-ctk", "--cache-type-k", default="f16", metavar="T", help="K cache type: f32, f16, bf16, q8_0, q4_0 (default f16)")
    g.add_argument("-ctv", "--cache-type-v", default="f16", metavar="T", help="V cache type (default f16)")
    g.add_argument("--no-kv-rotation", action="store_true", help="store quantised K/V without the Hadamard rotation")
    g.add_argument("--no-cache-prompt", "--no-prefix-cache", dest="no_cache_prompt", action="store_true",
                   help="disable the prefix cache (reuse of KV blocks between requests sharing a prompt prefix)")
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--device", default="auto", metavar="D",
                   help="auto (the CUDA GPU when present), cpu or cuda (default auto)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a free slot; beyond that 429 (default 64)")
    h = s.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    h.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    h.add_argument("--api-key", default=os.environ.get("QATSERVE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $QATSERVE_API_KEY; unset = no key)")
    h.add_argument("--timeout", type=float, default=30.0, metavar="SEC",
                   help="close a connection idle, or slow to send its request headers or body, for SEC (default 30)")
    h.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SEC",
                   help="on SIGTERM, let in-flight requests finish for up to SEC, then abort them (default 30)")
    h.add_argument("--body-limit", type=int, default=8 << 20, metavar="BYTES",
                   help="largest request body accepted; larger ones get 413 (default 8 MiB)")
    h.add_argument("-v", "--verbose", action="store_true", help="uvicorn's info and access logs")
    h.add_argument("--slot-save-path", metavar="DIR", default=None,
                   help="directory for POST /slots/ID?action=save|restore|erase (llama.cpp's slot files; "
                        "disabled without it); idle slots then keep their last prompt's KV for reuse")
    from qatserve.engine.speculative.flags import add_speculative_args  # the same group as `qatserve run`

    add_speculative_args(s)


def check(args: argparse.Namespace) -> None:
    """Flag values argparse cannot check by type; RequestError names the flag. Sets `args.speculative`
    (a SpeculativeConfig or None) so a bad speculative flag or path fails before anything binds."""
    rules = [
        (0 <= args.port <= 65535, f"--port must be in 0..65535, got {args.port}"),
        (args.threads is None or args.threads >= 1, f"--threads must be at least 1, got {args.threads}"),
        (args.ctx_size >= 0, f"--ctx-size must be >= 0, got {args.ctx_size}"),
        (args.timeout > 0, f"--timeout must be > 0, got {args.timeout}"),
        (args.shutdown_timeout >= 0, f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}"),
        (args.body_limit >= 1024, f"--body-limit must be at least 1024 bytes, got {args.body_limit}"),
        (args.api_key is None or args.api_key.strip() != "", "--api-key must not be empty"),
    ]
    for ok, message in rules:
        if not ok:
            raise RequestError(message)
    if args.slot_save_path is not None:
        if not os.path.isdir(args.slot_save_path):
            raise RequestError(f"--slot-save-path {args.slot_save_path}: not a directory")
        args.slot_save_path = os.path.realpath(args.slot_save_path)  # files are named relative to this
    from qatserve.engine.speculative.flags import speculative_config_from_args

    args.speculative = speculative_config_from_args(args)
    for flag, path in (("--assistant", args.assistant), ("-md", args.draft_model)):
        # Checked here, before the target loads (seconds); what is wrong inside the file is found when
        # the drafter binds to the target, still before the server listens.
        if path is not None and not os.path.isfile(path):
            raise RequestError(f"{flag} {path}: no such file")


def run(args: argparse.Namespace) -> int:
    from qatserve.server.launch import serve

    check(args)
    return serve(args)
