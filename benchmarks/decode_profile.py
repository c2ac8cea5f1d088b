"""Where a decode step's time goes: total step time and the time inside each kind of QuantLinear call.

    python benchmarks/decode_profile.py [-m MODEL.gguf] [-t 2] [-n 30]

The rest of the step (total minus matmuls) is per-op framework overhead: norms, RoPE, cache, attention.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--steps", type=int, default=30)
    args = ap.parse_args()

    import qatserve.quant.linear as ql
    from qatserve.default_model import default_model_path
    from qatserve.engine.generate import Generator
    from qatserve.engine.loader import load_model_file

    ql.set_cpu_threads(args.threads)
    loaded = load_model_file(args.model or default_model_path())
    gen = Generator(loaded.model, loaded.tokenizer, n_ctx=512)
    gen.prefill([2, 100, 200])
    model = loaded.model

    def step(pos: int) -> None:
        model(torch.tensor([5]), torch.tensor([pos]), gen.cache)

    for pos in range(3, 30):  # warm-up: lazy sessions, tables
        step(pos)
    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    forward = ql.QuantLinear.forward

    def timed(self, x):
        t = time.perf_counter()
        y = forward(self, x)
        key = "output head" if self.out_features > 100_000 else f"{self.qtype.name} {self.out_features}x{self.in_features}"
        spent[key] += time.perf_counter() - t
        calls[key] += 1
        return y

    ql.QuantLinear.forward = timed
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(30 + i)
    total = (time.perf_counter() - t0) / args.steps * 1e3
    ql.QuantLinear.forward = forward
    matmul = sum(spent.values()) / args.steps * 1e3
    print(f"step {total:.1f} ms ({1000 / total:.1f} tok/s): matmuls {matmul:.1f} ms, other {total - matmul:.1f} ms")
    for key, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {key:22s} {s / args.steps * 1e3:6.2f} ms/step {s / calls[key] * 1e6:8.1f} us/call "
              f"x{calls[key] // args.steps}")


if __name__ == "__main__":
    main()
