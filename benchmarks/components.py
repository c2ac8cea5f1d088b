"""Speeds of the pieces on the load and decode paths (kept out of the unit tests, which assert behaviour).

    python benchmarks/components.py

Prints: tokenizer build time for both real models, dequantisation throughput per block format, and
sampler latency on a 262k vocabulary (greedy, default chain, with penalties and n_probs=5).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as T


def best_ms(f, n: int = 5) -> float:
    f()
    out = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        out = min(out, time.perf_counter() - t)
    return out * 1e3


def main() -> None:
    from qatserve.default_model import default_model_path
    from qatserve.engine.sampler import Sampler, SamplingParams
    from qatserve.formats.gguf_reader import open_gguf
    from qatserve.formats.tokenizer import Tokenizer
    from qatserve.quant import blocks

    with open_gguf(default_model_path()) as f:
        print(f"tokenizer build, gemma3 270m (262k SPM): {best_ms(lambda: Tokenizer.from_gguf_metadata(f.metadata), 3):.0f} ms")
    shape = (4096, 10240)
    rng = np.random.default_rng(0)
    for qt in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K):
        raw = blocks.quantize(rng.standard_normal(shape, dtype=np.float32), qt) if qt in blocks.QUANT_TYPES else \
            rng.integers(0, 255, (shape[0], blocks.row_bytes(qt, shape[1])), dtype=np.uint8)
        if qt not in blocks.QUANT_TYPES:  # keep fp16 scales finite: d/dmin are the first 4 bytes of each block
            raw.reshape(-1, blocks.row_bytes(qt, 256))[:, :4] = np.frombuffer(np.float16([0.01, 0.01]).tobytes(), np.uint8)
        ms = best_ms(lambda: blocks.dequantize(raw, qt, shape), 3)
        print(f"dequantize {qt.name:5s} 4096x10240: {ms:7.1f} ms ({shape[0] * shape[1] / ms / 1e6:.2f} G values/s)")
    v = 262144
    x = torch.randn(v, generator=torch.Generator().manual_seed(8)) * 3
    history = list(range(0, 64 * 97, 97))
    for name, p in (("greedy", SamplingParams(temperature=0.0)), ("default chain", SamplingParams(seed=1)),
                    ("penalties + n_probs=5", SamplingParams(seed=1, repeat_penalty=1.1, frequency_penalty=0.1, n_probs=5))):
        s = Sampler(p, v)
        print(f"sampler {name}: {best_ms(lambda: s.sample(x, history), 30):.2f} ms")


if __name__ == "__main__":
    main()
