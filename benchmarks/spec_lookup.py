"""Decode speed with and without prompt lookup (`--lookup`) on a repetitive code-edit prompt, on the CPU.

    python benchmarks/spec_lookup.py [-m MODEL.gguf] [-t 1] [-n 128] [-r 3] [--blocks 1-8]

One greedy request per run (one slot, f16 K/V, as `qatserve run`); decode tok/s = generated tokens / time
from the first token to the last (the prompt's forward excluded), median of -r runs after a warm-up run.
Rows: plain decoding, then `--lookup --draft-max K` for each K and `--draft-max auto`. Columns: acceptance
(accepted / drafted), tokens per target forward (generated / decode steps), ms per decode step (the
cost of verifying K + 1 rows), and whether the output is token-for-token the plain output (it must be).
Prints a markdown table; CPU timings on a shared machine are noisy, so the command is printed with it.
"""

from __future__ import annotations

import argparse
import sys
import time

# The prompt: a function, then the instruction to repeat it with one change; the continuation copies
# most of the function, which is what prompt lookup drafts from.
PROMPT = '''def moving_average(values, window):
    """Return the moving averages of `values` over `window` items."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = 0.0
    out = []
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out


# The same function with the variable `total` renamed to `running_sum`:
def moving_average(values, window):
'''


def parse_blocks(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def run_once(model, tokenizer, ids, n_gen, spec):
    from qatserve.engine.engine import Engine, EngineConfig
    from qatserve.engine.sampler import SamplingParams

    eng = Engine(model, tokenizer, EngineConfig(n_ctx=2048, n_slots=1, spec=spec))
    req = eng.add_request(ids, SamplingParams(temperature=0.0, max_tokens=n_gen))
    eng.step()  # the prompt's forward (and the first token)
    steps0, t0 = eng.stats.steps, time.perf_counter()
    eng.run_until_done()
    dt = time.perf_counter() - t0
    res = req.result
    decode_steps = eng.stats.steps - steps0
    return {"tokens": res.tokens, "tps": (len(res.tokens) - 1) / dt, "ms_step": 1000 * dt / max(decode_steps, 1),
            "per_step": (len(res.tokens) - 1) / max(decode_steps, 1), "draft_n": res.timings.draft_n,
            "accepted": res.timings.draft_n_accepted}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF model (default: the embedded Gemma 3 270M)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--blocks", default="1-8", help="draft block sizes, e.g. 1-8 or 2,4")
    args = ap.parse_args(argv)

    from qatserve.engine.loader import load_model_file
    from qatserve.engine.speculative import SpeculativeConfig
    from qatserve.quant.linear import set_cpu_threads

    set_cpu_threads(args.threads)
    if args.model is None:
        from qatserve.default_model import default_model_path

        args.model = str(default_model_path())
    loaded = load_model_file(args.model)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok.encode(PROMPT)
    configs = [("plain", None)] + [(str(k), SpeculativeConfig("ngram-simple", n_max=k))
                                   for k in parse_blocks(args.blocks)]
    configs.append(("auto", SpeculativeConfig("ngram-simple", auto=True)))
    run_once(model, tok, ids, 8, None)  # warm-up: kernel sessions, RoPE tables
    rows, plain = [], None
    for name, spec in configs:
        runs = [run_once(model, tok, ids, args.n_gen, spec) for _ in range(args.reps)]
        med = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]
        if plain is None:
            plain = med
        same = all(r["tokens"] == plain["tokens"] for r in runs)
        rows.append((name, med, same, [r["tps"] for r in runs]))
        print(f"{name}: {med['tps']:.2f} tok/s ({', '.join(f'{r:.2f}' for r in rows[-1][3])})", file=sys.stderr)

    cmd = "python benchmarks/spec_lookup.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{cmd.strip()}` — {loaded.path.name}, {args.n_gen} tokens, greedy, {args.threads} thread(s), "
          f"median of {args.reps}\n")
    print("| --draft-max | decode tok/s | speed-up | acceptance | tokens / forward | ms / step | identical |")
    print("|---|---|---|---|---|---|---|")
    for name, r, same, _ in rows:
        acc = f"{100 * r['accepted'] / r['draft_n']:.0f}% ({r['accepted']}/{r['draft_n']})" if r["draft_n"] else "-"
        label = "plain (no drafting)" if name == "plain" else f"--lookup --draft-max {name}"
        print(f"| {label} | {r['tps']:.2f} | {r['tps'] / plain['tps']:.2f}x | {acc} | {r['per_step']:.2f} | "
              f"{r['ms_step']:.0f} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
