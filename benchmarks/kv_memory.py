"""K/V cache bytes per token per layer type, and per 32K-token sequence, for released model shapes.

    python benchmarks/kv_memory.py [SHAPE ...]     (default: gemma3-270m gemma4-31b)

Figures come from engine.kv_cache.KVLayout, the same code that sizes the engine's buffers
(tests/engine/test_kv_cache.py checks the allocated bytes against the theory).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qatserve.bench.synth import get_shape  # noqa: E402
from qatserve.engine.kv_cache import KVLayout  # noqa: E402


def main(names: list[str]) -> None:
    print("| shape | K/V type | full layers B/token | sliding layers B/token | total B/token | one 32K sequence MiB |")
    print("|---|---|---|---|---|---|")
    for name in names or ["gemma3-270m", "gemma4-31b"]:
        lay = KVLayout(*get_shape(name).kv_layout())
        for t in ("f16", "q8_0", "q4_0"):
            b = lay.bytes_per_token(t, t)
            print(f"| {name} | {t} | {b.get('full', 0):,} | {b.get('sliding', 0):,} | {b['total']:,} | "
                  f"{lay.context_bytes(32768, t, t) / 2**20:,.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
