"""Prefill and decode tok/s on the CPU, llama-bench style (pp512 / tg128), beside llama.cpp when given.

    python benchmarks/cpu_speed.py [-m MODEL.gguf] [-t 2] [-r 3] [--llama-bench /path/to/llama-bench]

pp: one prompt of P random tokens from an empty cache; tg: N tokens decoded one at a time after a
1-token prompt (as llama-bench does). Median of -r repetitions after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def measure(model_path: Path, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict:
    from qatserve.engine.generate import Generator
    from qatserve.engine.loader import load_model_file
    from qatserve.quant.linear import set_cpu_threads

    set_cpu_threads(threads)
    t0 = time.perf_counter()
    loaded = load_model_file(model_path)
    load_s = time.perf_counter() - t0
    gen = Generator(loaded.model, loaded.tokenizer, n_ctx=n_prompt + n_gen + 8)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, loaded.config.n_vocab, (n_prompt,), generator=g).tolist()

    def pp() -> float:
        gen.cache.truncate(0)
        t = time.perf_counter()
        gen.prefill(prompt)
        return n_prompt / (time.perf_counter() - t)

    def tg() -> float:
        gen.cache.truncate(0)
        logits = gen.prefill(prompt[:1])
        t = time.perf_counter()
        for pos in range(1, n_gen + 1):
            token = int(logits.argmax())
            logits = gen.model(torch.tensor([token]), torch.tensor([pos]), gen.cache)[-1]
        return n_gen / (time.perf_counter() - t)

    pp(), tg()  # warm-up: lazy sessions, RoPE tables, cache growth
    pps = [pp() for _ in range(reps)]
    tgs = [tg() for _ in range(reps)]
    return {"load_s": load_s, "pp": statistics.median(pps), "pp_all": pps, "tg": statistics.median(tgs), "tg_all": tgs}


def llama_bench(binary: str, model_path: Path, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict:
    out = subprocess.run(
        [binary, "-m", str(model_path), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
         "-r", str(reps), "-o", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = json.loads(out)
    res = {"build": rows[0].get("build_commit", "?")}
    for row in rows:
        key = "pp" if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0 else "tg"
        res[key] = row["avg_ts"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench binary, run on the same file")
    args = ap.parse_args()
    if args.model is None:
        from qatserve.default_model import default_model_path

        args.model = default_model_path()

    ours = measure(args.model, args.threads, args.n_prompt, args.n_gen, args.reps)
    print(f"model: {args.model.name}, threads: {args.threads}, load: {ours['load_s']:.2f} s", file=sys.stderr)
    rows = [("qatserve", ours["pp"], ours["tg"])]
    if args.llama_bench:
        peer = llama_bench(args.llama_bench, args.model, args.threads, args.n_prompt, args.n_gen, args.reps)
        rows.append((f"llama.cpp {peer['build']}", peer["pp"], peer["tg"]))
    print(f"| engine | pp{args.n_prompt} tok/s | tg{args.n_gen} tok/s |")
    print("|---|---|---|")
    for name, pp, tg in rows:
        print(f"| {name} | {pp:.1f} | {tg:.1f} |")
    if len(rows) == 2:
        print(f"| ratio qatserve/llama.cpp | {rows[0][1] / rows[1][1]:.2f} | {rows[0][2] / rows[1][2]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
