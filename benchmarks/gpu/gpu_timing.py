"""Timing helpers the GPU micro-benchmarks share (gemv_bench.py, attention_bench.py): the roofline figure,
CUDA-event timing (host clock under --smoke on the CPU) and the measured copy/read bandwidth ceilings."""

from __future__ import annotations

import statistics
import time

import torch

ROOF = 3.0e12  # bytes/s: the H100's measured read bandwidth, the roofline the tables quote
REPLAYS = 15
ROTATE_BYTES = 256 << 20  # > 5x the H100's L2: buffers rotated through so each call reads from HBM


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def elapsed_s(fn, dev) -> float:
    """Seconds one fn() takes: CUDA events around it on a GPU, the host clock on the CPU (--smoke)."""
    if dev.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e-3


def ceilings(dev, smoke: bool = False) -> tuple[float, float]:
    """(copy, read) bytes/s on 1 GiB buffers (4 MiB with smoke): copy counts bytes read + written."""
    n = 1 << (20 if smoke else 28)
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)

    def med(fn):
        fn()
        sync(dev)
        return statistics.median(elapsed_s(fn, dev) for _ in range(10))
    return 2 * 4 * n / med(lambda: b.copy_(a)), 4 * n / med(lambda: a.sum())
