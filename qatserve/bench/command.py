"""`qatserve bench`: flags, their checks, and the run (imports nothing heavy until it runs)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from qatserve.bench import REF_GEN, REF_PROMPT
from qatserve.errors import RequestError

MIN_PROMPT = 64  # the fixed parts of the bench prompt (BOS, salt line, instruction) need ~45 tokens
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench", help="benchmark server lanes (KV types, drafters, slots) through real HTTP, beside llama.cpp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Starts `qatserve serve` once per lane (and run), times it to /health 200, then sends real\n"
        "/completion requests: prefill, decode, a normalised wall time, N concurrent requests, draft acceptance.\n"
        "Prints a markdown table on stdout; progress on stderr.\n\n"
        "LANE: settings joined by commas, e.g.  f16   ctk=q8_0,ctv=q8_0   lookup   lookup,draft-max=4\n"
        "  a K/V type (f32 f16 bf16 q8_0 q4_0) | ctk=T | ctv=T | kv=T | lookup | assistant=PATH | md=PATH |\n"
        "  draft-max=N|auto | draft-min=N | draft-p-min=P | ngram=N | np=N (slots, default 2) | rot=off")
    b.add_argument("lanes", nargs="*", metavar="LANE", help="lanes to run (default: f16)")
    b.add_argument("-m", "--model", metavar="MODEL.gguf", help="GGUF model file (default: embedded Gemma 3 270M)")
    b.add_argument("-p", "--n-prompt", type=int, default=REF_PROMPT, metavar="N",
                   help=f"prompt tokens per request (default {REF_PROMPT})")
    b.add_argument("-n", "--n-gen", type=int, default=REF_GEN, metavar="N",
                   help=f"tokens generated per request (default {REF_GEN}; smaller for a quick run)")
    b.add_argument("-t", "--threads", type=int, default=None, help="CPU threads of both servers (default: theirs)")
    b.add_argument("-r", "--repetitions", type=int, default=1, metavar="N",
                   help="runs per lane and server; the table shows the median and min–max (default 1)")
    b.add_argument("--peer", metavar="llama-server=PATH",
                   help="also run llama.cpp's llama-server binary at PATH with equivalent flags; adds its row "
                        "and the ratio row")
    b.add_argument("--sweep", metavar="draft-max=1..8",
                   help="block-size table: the first drafting lane (else lookup) at each draft-max")
    b.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="write the figures as a plot (matplotlib)")
    b.add_argument("--startup-timeout", type=float, default=300.0, metavar="SEC",
                   help="give up on a server not answering /health 200 within SEC (default 300)")


def _parse_peer(text: str) -> Path:
    kind, eq, path = text.partition("=")
    if not eq or kind.strip() != "llama-server":
        raise RequestError(f"--peer {text!r}: expected llama-server=PATH (the only peer today)")
    p = Path(path.strip()).expanduser()
    if not p.is_file():
        raise RequestError(f"--peer: {p}: no such file")
    if not os.access(p, os.X_OK):
        raise RequestError(f"--peer: {p}: not executable")
    return p


def _check_output(flag: str, path: str | None) -> None:
    """Fail before the run, not after it, when an output file cannot be written."""
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise RequestError(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise RequestError(f"{flag} {path}: the folder {parent} is not writable")


def _command_text(args: argparse.Namespace) -> str:
    parts = ["qatserve", "bench"]
    if args.model:
        parts += ["-m", args.model]
    for flag, value, default in (("-t", args.threads, None), ("-p", args.n_prompt, REF_PROMPT),
                                 ("-n", args.n_gen, REF_GEN), ("-r", args.repetitions, 1)):
        if value != default:
            parts += [flag, str(value)]
    parts += args.lanes or ["f16"]
    for flag in ("peer", "sweep"):
        if getattr(args, flag):
            parts += [f"--{flag}", getattr(args, flag)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from qatserve.bench.lanes import parse_lanes, parse_sweep

    rules = [(args.n_prompt >= MIN_PROMPT, f"--n-prompt must be at least {MIN_PROMPT}, got {args.n_prompt}"),
             (args.n_gen >= 2, f"--n-gen must be at least 2 (the first token comes with the prompt), got {args.n_gen}"),
             (args.repetitions >= 1, f"-r must be at least 1, got {args.repetitions}"),
             (args.threads is None or args.threads >= 1, f"--threads must be at least 1, got {args.threads}"),
             (args.startup_timeout > 0, f"--startup-timeout must be > 0, got {args.startup_timeout}"),
             (args.plot is None or Path(args.plot).suffix.lower() in PLOT_SUFFIXES,
              f"--plot {args.plot}: the file name must end in {', '.join(PLOT_SUFFIXES)}")]
    for ok, message in rules:
        if not ok:
            raise RequestError(message)
    lanes = parse_lanes(args.lanes or ["f16"])
    sweep = parse_sweep(args.sweep) if args.sweep else []
    peer = _parse_peer(args.peer) if args.peer else None
    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    if args.model:
        model = Path(args.model).expanduser()
        if not model.is_file():
            raise RequestError(f"-m {args.model}: no such file")
    else:
        from qatserve.default_model import default_model_path

        model = default_model_path()

    from qatserve.bench import report
    from qatserve.bench.progress import BenchProgress
    from qatserve.bench.runner import Bench, BenchConfig

    cfg = BenchConfig(model=model, lanes=lanes, n_prompt=args.n_prompt, n_gen=args.n_gen, threads=args.threads,
                      reps=args.repetitions, peer=peer, sweep=sweep, startup_timeout=args.startup_timeout,
                      command=_command_text(args))
    with BenchProgress() as progress:
        data = Bench(cfg, progress).run()
    sys.stdout.write(report.markdown(data))
    sys.stdout.flush()
    if args.json:
        report.write_json(data, args.json)
        print(f"qatserve bench: wrote {args.json}", file=sys.stderr)
    if args.plot:
        from qatserve.bench.plot import plot

        plot(data, args.plot)
        print(f"qatserve bench: wrote {args.plot}", file=sys.stderr)
    failed = [f"{ln['lane']} on {s}" for ln in data["lanes"] for s, c in ln["results"].items() if "error" in c]
    if failed:
        print(f"qatserve bench: failed: {', '.join(failed)} (see the table's notes)", file=sys.stderr)
        return 1
    return 0
