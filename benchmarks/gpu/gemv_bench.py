"""Times the Triton quantised matmuls (qatserve/quant/kernels/triton_gemv.py) on a GPU at the real layer
shapes of Gemma 3 27B, Gemma 4 31B and Gemma 3 270M, for M = 1, 2, 4, 8, 16 rows of x, and checks each
matrix against a float64 matmul of its exact dequantisation on the GPU.

    python benchmarks/gpu/gemv_bench.py [--quick] [--no-sweep] [--out DIR]
    python benchmarks/gpu/gemv_bench.py --smoke   # CPU, Triton interpreter, tiny shapes: checks the script

Needs only torch and triton (no gguf, no network): weights are random well-formed GGUF blocks made on
the GPU. Timing: CUDA-graph replays of many launches (launch gaps out of the numbers), rotating over
enough copies of each matrix that repeated calls cannot run from the 50 MB L2; events around each
replay, median of REPLAYS. GB/s counts the bytes a call must move (weights + x + y); the roofline is
3.0 TB/s (a device-to-device copy on this H100; printed first, with a plain read rate).

Columns: model, matrix, fmt, N, K, M, kern (auto = what TritonQuantMatmul picks for M; gemv / dot
forced), cfg (BLOCK_N x BLOCK_K [x BLOCK_M] / warps / stages / split-K), us per call, GB/s, % of the
3.0 TB/s roofline, % of the measured copy rate, rel.err (||y - ref|| / ||ref||, checked at M = 1 and
M = 4 per kernel; x and y are fp16, so it includes ~2e-4 from rounding y). Then a tile sweep for
Q4_0 (M = 1 gemv, M = 16 dot) and a per-token projection.
Expected to take about 2 minutes on an H100, most of it Triton compiling ~60 kernel variants
(not yet run there: written and checked with --smoke on a CPU).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. at import

import torch  # noqa: E402
import triton  # noqa: E402
from gpu_timing import REPLAYS, ROOF, ROTATE_BYTES, ceilings, elapsed_s, sync  # noqa: E402

from qatserve.quant.kernels import gpu_layout as L  # noqa: E402
from qatserve.quant.kernels import triton_gemv as G  # noqa: E402
from qatserve.quant.kernels import triton_qmatmul as Q  # noqa: E402

Q4_0, Q5_0, Q8_0, Q4_K, Q6_K = L.Q4_0, L.Q5_0, L.Q8_0, L.Q4_K, L.Q6_K

# (model, matrix, fmt, N, K): the weight matrices one decode step reads (torch order: N = out rows).
SHAPES = [
    ("g3-27b", "q", Q4_0, 4096, 5376), ("g3-27b", "k|v", Q4_0, 2048, 5376), ("g3-27b", "o", Q4_0, 5376, 4096),
    ("g3-27b", "gate|up", Q4_0, 21504, 5376), ("g3-27b", "down", Q4_0, 5376, 21504),
    ("g3-27b", "qkv fused", Q4_0, 8192, 5376), ("g3-27b", "gate+up fused", Q4_0, 43008, 5376),
    ("g4-31b", "q sliding", Q4_0, 8192, 5376), ("g4-31b", "k|v sliding", Q4_0, 4096, 5376),
    ("g4-31b", "o sliding", Q4_0, 5376, 8192), ("g4-31b", "q full", Q4_0, 16384, 5376),
    ("g4-31b", "o full", Q4_0, 5376, 16384), ("g4-31b", "head", Q6_K, 262144, 5376),
    ("g3-270m", "q", Q5_0, 1024, 640), ("g3-270m", "k|v", Q5_0, 256, 640), ("g3-270m", "o", Q4_K, 640, 1024),
    ("g3-270m", "gate|up", Q5_0, 2048, 640), ("g3-270m", "down", Q4_K, 640, 2048),
    ("g3-270m", "down (some)", Q6_K, 640, 2048), ("g3-270m", "head", Q8_0, 262144, 640),
    # every format at a bandwidth-relevant size
    ("fmt", "27b gate", Q8_0, 21504, 5376), ("fmt", "27b gate", Q5_0, 21504, 5376),
    ("fmt", "27b gate", Q4_K, 21504, 5376), ("fmt", "27b gate", Q6_K, 21504, 5376),
]
QUICK = {("g3-27b", m) for m in ("q", "k|v", "o", "gate|up", "down")}


def cfg_str(c: Q.Config, K: int) -> str:
    """The configuration as launched (block_k and split-K after the launcher fits them to K)."""
    bk, split = G.plan_k(K, c.block_k, c.split_k or 1)
    m = f"x{c.block_m}" if c.kernel == "dot" else ""
    return f"{c.block_n}x{bk}{m}/w{c.num_warps}/s{c.num_stages}/k{split}"


def make(qt, n, k, dev, seed=0) -> L.PackedWeights:
    g = torch.Generator(device=dev).manual_seed(seed)
    return L.repack(L.random_blocks(qt, n, k, g), qt, k, n, device=dev)


def clones(w: L.PackedWeights) -> list[L.PackedWeights]:
    """Copies of w to rotate over. At most 256: the 270M's matrices (0.1-0.5 MB) then stay L2-resident,
    as they would in a real step; their rows measure latency, not bandwidth."""
    c = min(256, max(1, math.ceil(ROTATE_BYTES / w.nbytes)))
    out = [w]
    for _ in range(c - 1):
        out.append(L.PackedWeights(w.fmt, w.N, w.K, *[None if t is None else t.clone() for t in
                                   (w.lo, w.q8, w.hi, w.scale, w.minv, w.d, w.dmin)]))
    return out


def reference(w: L.PackedWeights, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T in float64 from the exact dequantisation, in row chunks (the 262144-row heads)."""
    out = []
    for r0 in range(0, w.N, 16384):
        wd = L.dequantize_packed(L.row_slice(w, r0, min(w.N, r0 + 16384))).double()
        out.append(x.double() @ wd.T)
    return torch.cat(out, dim=1)


def run(w: L.PackedWeights, x: torch.Tensor, c: Q.Config, out_dtype=None) -> torch.Tensor:
    return G.launch(w, x, kernel=c.kernel, block_n=c.block_n, block_k=c.block_k, block_m=c.block_m,
                    split_k=c.split_k or 1, num_warps=c.num_warps, num_stages=c.num_stages, out_dtype=out_dtype)


def time_us(ws: list[L.PackedWeights], x: torch.Tensor, c: Q.Config, out_dtype=None) -> tuple[float, bool]:
    """Median microseconds per call over graph replays (falls back to a plain loop: graph=False)."""
    dev = x.device
    est = ws[0].nbytes / ROOF
    calls = 1 if SMOKE else max(len(ws), min(400, math.ceil(300e-6 / est)))
    seq = [ws[i % len(ws)] for i in range(calls)]
    for w in ws[:2]:
        run(w, x, c, out_dtype)  # compile, allocate
    sync(dev)

    def body():
        for w in seq:
            run(w, x, c, out_dtype)
    graph = False
    if dev.type == "cuda":
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for w in seq[:3]:
                    run(w, x, c, out_dtype)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                body()
            body, graph = g.replay, True
        except Exception as e:  # noqa: BLE001 - report the plain-loop number instead
            print(f"# graph capture failed ({e!r}); timing a plain loop", flush=True)
            torch.cuda.synchronize()
    body()
    sync(dev)
    reps = 2 if SMOKE else REPLAYS
    return statistics.median(elapsed_s(body, dev) * 1e6 / calls for _ in range(reps)), graph or SMOKE


class Table:
    HEAD = (f"{'model':8} {'matrix':14} {'fmt':5} {'N':>6} {'K':>6} {'M':>3} {'kern':5} {'cfg':24} "
            f"{'us':>8} {'GB/s':>7} {'%3TB/s':>7} {'%copy':>6} {'rel.err':>8}")

    def __init__(self, copy_bw: float, out_dir: str | None):
        self.copy_bw = copy_bw
        self.rows: list[dict] = []
        self.csv = open(os.path.join(out_dir, "gemv_bench.csv"), "w") if out_dir else None
        if self.csv:
            self.csv.write("model,matrix,fmt,N,K,M,kern,cfg,us,GBps,pct_roof,pct_copy,relerr,graph\n")
        print(self.HEAD, flush=True)

    def add(self, model, matrix, w, m, kern, c, us, err, graph):
        nbytes = w.nbytes + m * w.K * 2 + m * w.N * 2
        gbs = nbytes / (us * 1e-6) / 1e9
        r = dict(model=model, matrix=matrix, fmt=w.fmt.name, N=w.N, K=w.K, M=m, kern=kern, cfg=cfg_str(c, w.K), us=us,
                 gbs=gbs, roof=100 * gbs * 1e9 / ROOF, copy=100 * gbs * 1e9 / self.copy_bw, err=err, graph=graph)
        self.rows.append(r)
        e = "" if err is None else f"{err:.1e}"
        print(f"{model:8} {matrix:14} {r['fmt']:5} {w.N:>6} {w.K:>6} {m:>3} {kern:5} {r['cfg']:24} {us:8.2f} "
              f"{gbs:7.0f} {r['roof']:7.1f} {r['copy']:6.1f} {e:>8}{'' if graph else ' (no graph)'}", flush=True)
        if self.csv:
            self.csv.write(",".join(str(r[k]) for k in ("model", "matrix", "fmt", "N", "K", "M", "kern", "cfg", "us",
                                                          "gbs", "roof", "copy", "err", "graph")) + "\n")


def small(qt, n, k) -> tuple[int, int]:
    """--smoke: the same format at a size the interpreter runs in a blink (masks still exercised)."""
    return min(n, 48), (256 if L.FORMATS[qt].kquant else 384)


def bench_shape(tab: Table, model, matrix, qt, n, k, ms, dev, gen):
    if SMOKE:
        n, k = small(qt, n, k)
    w = make(qt, n, k, dev, seed=n + k + qt)
    ws = clones(w)
    mm = Q.TritonQuantMatmul.from_packed(w)  # the wrapper's choice of kernel and split per M
    for m in ms:
        x = torch.randn(m, k, device=dev, generator=gen).half()
        auto = mm.config_for(m)
        variants = [("auto", auto)]
        if auto.kernel != "gemv" and m <= 4:
            variants.append(("gemv", replace(Q.DEFAULT_CONFIGS["gemv"], split_k=mm.config_for(1).split_k)))
        if auto.kernel == "gemv":
            d = Q.DEFAULT_CONFIGS["decode"]
            variants.append(("dot", replace(d, split_k=mm.config_for(2).split_k)))
        ref = reference(w, x) if m in (1, 4) else None
        for kern, c in variants:
            err = None
            if ref is not None:
                err = float((run(w, x, c).double() - ref).norm() / ref.norm())
            us, graph = time_us(ws, x, c)
            tab.add(model, matrix, w, m, kern, c, us, err, graph)
    del ws, w
    torch.cuda.empty_cache()


GEMV_SWEEP = [(32, 256, 4, 1), (64, 256, 4, 1), (64, 256, 4, 2), (128, 256, 8, 1), (128, 256, 8, 2),
              (64, 512, 4, 1), (64, 512, 8, 1), (128, 512, 8, 1), (64, 128, 4, 1), (16, 256, 2, 1)]
DOT_SWEEP = [(64, 128, 4, 2), (64, 256, 4, 2), (64, 128, 4, 3), (128, 128, 8, 2), (128, 128, 4, 3), (32, 256, 4, 2)]


def sweep(tab: Table, dev, gen):
    """Tile configurations for Q4_0 at M = 1 (gemv) and M = 16 (dot); split-K auto, then the best tile
    with split-K forced. Output in float32 throughout, so each tile compiles once whatever the split."""
    print("\n# tile sweep, Q4_0 (cfg = BLOCK_N x BLOCK_K / warps / stages / split-K; split auto, then forced)")
    print(Table.HEAD)
    shapes = [("gate|up", 21504, 5376, True), ("down", 5376, 21504, True), ("q", 4096, 5376, False)]
    for matrix, n, k, with_dot in shapes[:1] if SMOKE else shapes:
        if SMOKE:
            n, k = small(Q4_0, n, k)
        w = make(Q4_0, n, k, dev, seed=1)
        ws = clones(w)
        for m, kern, grid in [(1, "gemv", GEMV_SWEEP), (16, "dot", DOT_SWEEP)][:2 if with_dot else 1]:
            x = torch.randn(m, k, device=dev, generator=gen).half()
            best = None
            for bn, bk, nw, ns in grid[:2] if SMOKE else grid:
                c = Q.Config(kern, bn, bk, 16, nw, ns)
                mm_progs = m if kern == "gemv" else 1
                progs = mm_progs * -(-n // bn)
                split = min(k // bk, max(1, -(-Q.SPLIT_TARGET * Q._sm_count(w.device) // progs)))
                c = replace(c, split_k=split)
                us, graph = time_us(ws, x, c, torch.float32)
                tab.add("sweep", matrix, w, m, kern, c, us, None, graph)
                if best is None or us < best[0]:
                    best = (us, c)
            bk, split = G.plan_k(k, best[1].block_k, best[1].split_k)
            for s in (1, 2, 4, 8):
                if s != split and (k // bk) % s == 0:
                    c = replace(best[1], split_k=s)
                    us, graph = time_us(ws, x, c, torch.float32)
                    tab.add("sweep", matrix, w, m, kern, c, us, None, graph)
        del ws, w
        torch.cuda.empty_cache()


def projection(tab: Table, dev):
    """Per-token matmul time of Gemma 3 27B (62 layers) at M = 1 from the 'auto' rows, + F16 head."""
    t = {r["matrix"]: r["us"] for r in tab.rows if r["model"] == "g3-27b" and r["M"] == 1 and r["kern"] == "auto"}
    if SMOKE or not {"q", "k|v", "o", "gate|up", "down"} <= t.keys():
        return
    head = torch.randn(262144, 5376, device=dev, dtype=torch.float16)
    x = torch.randn(1, 5376, device=dev, dtype=torch.float16)
    torch.matmul(x, head.T); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        torch.matmul(x, head.T)
    e1.record(); torch.cuda.synchronize()
    head_us = e0.elapsed_time(e1) * 1e3 / 20
    del head
    sep = 62 * (t["q"] + 2 * t["k|v"] + t["o"] + 2 * t["gate|up"] + t["down"])
    print(f"\n# gemma3-27b decode, matmuls only, M = 1: layers {sep / 1e3:.2f} ms (separate q/k/v/o/gate/up/down)",
          end="")
    if {"qkv fused", "gate+up fused"} <= t.keys():
        fused = 62 * (t["qkv fused"] + t["o"] + t["gate+up fused"] + t["down"])
        print(f", {fused / 1e3:.2f} ms (fused qkv, gate+up)", end="")
        sep = min(sep, fused)
    print(f"; F16 head via torch.matmul {head_us:.0f} us ({2 * 262144 * 5376 / head_us / 1e3:.0f} GB/s)")
    total = sep + head_us
    print(f"# => {total / 1e3:.2f} ms per token, {1e6 / total:.0f} tok/s ceiling from matmuls "
          f"(target 170 tok/s = 5.88 ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="27B layer shapes only, no sweep")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--ms", default="1,2,4,8,16", help="rows of x to time")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gemv_bench.csv (default $OUT)")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (tests the script)")
    a = ap.parse_args()
    if SMOKE:
        dev = torch.device("cpu")
        a.ms = "1,4"
        print(f"# smoke run on the CPU (Triton interpreter), torch {torch.__version__}, triton {triton.__version__}")
    elif not torch.cuda.is_available():
        sys.exit("gemv_bench: needs a CUDA GPU (or --smoke)")
    else:
        dev = torch.device("cuda")
        p = torch.cuda.get_device_properties(dev)
        print(f"# {p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    t0 = time.time()
    copy_bw, read_bw = ceilings(dev, SMOKE)
    print(f"# device-to-device copy {copy_bw / 1e12:.2f} TB/s (read + write), read-only sum {read_bw / 1e12:.2f} TB/s; "
          f"roofline used: {ROOF / 1e12:.1f} TB/s\n")
    tab = Table(copy_bw, a.out)
    gen = torch.Generator(device=dev).manual_seed(0)
    ms = [int(v) for v in a.ms.split(",")]
    for model, matrix, qt, n, k in SHAPES:
        if a.quick and (model, matrix) not in QUICK:
            continue
        if SMOKE and model == "fmt":
            continue
        bench_shape(tab, model, matrix, qt, n, k, ms, dev, gen)
    print(f"# main table done at {time.time() - t0:.0f} s", flush=True)
    if not (a.quick or a.no_sweep):
        sweep(tab, dev, gen)
    projection(tab, dev)
    bad = [r for r in tab.rows if r["err"] is not None and not r["err"] < 1e-3]
    print(f"\n# {len(tab.rows)} timings in {time.time() - t0:.0f} s; "
          + (f"{len(bad)} FAILED the 1e-3 check: " + ", ".join(f"{r['fmt']} {r['matrix']} M{r['M']} {r['kern']}"
                                                              for r in bad) if bad else "all checks < 1e-3"))
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
