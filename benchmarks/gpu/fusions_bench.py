"""Times each issue-8 fusion (qatserve/quant/kernels/gpu_fusions.py) against the path it replaces, on the GPU,
at Gemma 3 27B decode shapes, and checks on the same inputs that the fused result is the old one (bitwise
where the fusion promises it, else the error against float64).

    python benchmarks/gpu/fusions_bench.py [--out DIR]     # H100: ~1-2 minutes, most of it compiling
    python benchmarks/gpu/fusions_bench.py --smoke         # CPU, Triton interpreter, tiny shapes: checks the script

Rows (one decode row of one layer unless the name says otherwise; 27B: n_embd 5376, 32 q heads and 16
KV heads of 128, n_ff 21504, K rotated in groups of 128 and V in 64 for quantised K/V):
- kv_store q8_0 / q4_0 / f16: torch (2 butterflies + 2 quantisers + 2 index_put; q4_0's tie check syncs
  with the host, so its torch row runs without a graph) against one launch;
- hadamard: Q [1, 32, 128] in groups of 128, the attention output [1, 32, 128] in groups of 64;
- rms_norm: the [1, 5376] block norm; the q heads as a strided [1, 32, 128] view of the q|k|v output;
- rope: q [1, 32, 128]; geglu: the [1, 2 x 21504] gate|up output;
- splitk: q|k|v 8192 x 5376, o 5376 x 4096, down 5376 x 21504 (Q4_0, M = 1): partials + torch sum against
  the in-kernel sum (each matrix rotated over copies past the 50 MB L2, as gemv_bench.py does);
- multirow M = 2 and 4: q|k|v, o, gate|up 43008 x 5376, down at the decode plan (one program per row)
  against the multi-row gemv; the F16 head 262144 x 5376 at M = 2 (triton_dense, 2 rows per program).
Columns: us per call before / after (median of CUDA-graph replays of many calls: launch gaps out, the
graph's per-kernel cost in), saving, and the check. Then a per-token projection for 62 layers.

Measures only this repository's kernels; the engine-level figures (tok/s, GPU ms per step, fusions on and
off in one process) come from `engine_bench.py MODEL --fusions none,all`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. at import

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import gemv_bench as GB  # noqa: E402  (make, clones, reference: the gemv table's weights)
from gpu_timing import REPLAYS, elapsed_s, sync  # noqa: E402  (the same timing rules as the gemv table)
from qatserve.models.common import Rope  # noqa: E402
from qatserve.quant.kernels import gpu_fusions, kv_quant  # noqa: E402
from qatserve.quant.kernels import gpu_layout as L  # noqa: E402
from qatserve.quant.kernels import triton_dense, triton_fused, triton_gemv, triton_kv_store  # noqa: E402
from qatserve.quant.kernels import triton_qmatmul as Q  # noqa: E402

LAYERS = 62
E, H, HKV, D, FF = (5376, 32, 16, 128, 21504) if not SMOKE else (512, 4, 2, 64, 384)
ROT_K, ROT_V = (128, 64) if not SMOKE else (64, 64)


def time_us(fn, calls: int, graph: bool = True) -> tuple[float, bool]:
    """Median microseconds per fn() over CUDA-graph replays of `calls` calls (a plain loop with graph=False,
    for work that syncs with the host, or where capture fails: then the second value is False)."""
    dev = torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")
    calls = 1 if SMOKE else calls
    fn()
    fn()
    sync(dev)

    def body():
        for _ in range(calls):
            fn()
    run, captured = body, False
    if dev.type == "cuda" and graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                body()
            run, captured = g.replay, True
        except Exception:  # noqa: BLE001 - time the plain loop instead
            torch.cuda.synchronize()
    run()
    sync(dev)
    reps = 2 if SMOKE else REPLAYS
    return statistics.median(elapsed_s(run, dev) * 1e6 / calls for _ in range(reps)), captured or SMOKE


class Table:
    def __init__(self, out_dir: str | None):
        self.rows: list[dict] = []
        self.csv = open(os.path.join(out_dir, "fusions_bench.csv"), "w") if out_dir else None
        if self.csv:
            self.csv.write("fusion,case,per_token,before_us,after_us,check,graphs\n")
        print(f"{'fusion':9} {'case':34} {'x/tok':>5} {'before us':>9} {'after us':>9} {'saved':>6}  check", flush=True)

    def add(self, fusion, case, per_token, before, after, check):
        (b, gb), (a, ga) = before, after
        self.rows.append(dict(fusion=fusion, case=case, per_token=per_token, before=b, after=a))
        flag = "" if gb and ga else " (no graph: " + ("before" if not gb else "after") + ")"
        print(f"{fusion:9} {case:34} {per_token:>5} {b:9.2f} {a:9.2f} {b / max(a, 1e-9):5.1f}x  {check}{flag}",
              flush=True)
        if self.csv:
            self.csv.write(f"{fusion},{case},{per_token},{b:.3f},{a:.3f},{check},{gb and ga}\n")


def same(a: torch.Tensor, b: torch.Tensor) -> str:
    return "bitwise" if torch.equal(a, b) else f"DIFFERS (max {float((a.double() - b.double()).abs().max()):.1e})"


def rel64(y: torch.Tensor, want: torch.Tensor) -> str:
    return f"rel {float((y.double() - want).norm() / want.norm()):.1e} vs f64"


def kv_rows(tab: Table, dev, gen):
    slots = torch.tensor([37], device=dev)
    k = torch.randn(1, HKV, D, device=dev, generator=gen) * 2
    v = torch.randn(1, HKV, D, device=dev, generator=gen)
    for kind in ("q8_0", "q4_0", "f16"):
        rk, rv = (ROT_K, ROT_V) if kind != "f16" else (0, 0)
        bufs = [[torch.zeros(64, HKV, kv_quant.kv_row_bytes(kind, D) if kind != "f16" else D, device=dev,
                             dtype=kv_quant.kv_storage_dtype(kind)) for _ in range(2)] for _ in range(2)]

        def torch_path(kb=bufs[0][0], vb=bufs[0][1]):
            kk = kv_quant._butterfly(k, rk) if rk else k
            vv = kv_quant._butterfly(v, rv) if rv else v
            kb[slots] = kv_quant.quantize_kv(kk, kind)
            vb[slots] = kv_quant.quantize_kv(vv, kind)

        def fused(kb=bufs[1][0], vb=bufs[1][1]):
            triton_kv_store.store(kb, vb, slots, k, v, kind, kind, rk, rv)
        before, after = time_us(torch_path, 50, graph=kind != "q4_0"), time_us(fused, 50)
        check = same(bufs[0][0], bufs[1][0]) + "/" + same(bufs[0][1], bufs[1][1])
        tab.add("kv_store", f"{kind} K+V {HKV}x{D}", LAYERS, before, after, check)
    for name, g in (("Q before attention", ROT_K), ("output after attention", ROT_V)):
        x = torch.randn(1, H, D, device=dev, generator=gen)
        tab.add("hadamard", f"{name} {H}x{D} g{g}", LAYERS,
                time_us(lambda: kv_quant._butterfly(x, g), 50),
                time_us(lambda: triton_kv_store.hadamard(x, g), 50),
                same(kv_quant._butterfly(x, g), triton_kv_store.hadamard(x, g)))


def elementwise_rows(tab: Table, dev, gen):
    h = torch.randn(1, E, device=dev, generator=gen)
    w = torch.randn(E, device=dev, generator=gen)
    tab.add("rms_norm", f"block norm [1, {E}]", 4 * LAYERS, time_us(lambda: F.rms_norm(h, (E,), w, 1e-6), 50),
            time_us(lambda: triton_fused.rms_norm(h, w, 1e-6), 50),
            rel64(triton_fused.rms_norm(h, w, 1e-6), F.rms_norm(h.double(), (E,), w.double(), 1e-6)))
    proj = torch.randn(1, (H + 2 * HKV) * D, device=dev, generator=gen)
    qv = proj[:, : H * D].view(1, H, D)
    wq = torch.randn(D, device=dev, generator=gen)
    tab.add("rms_norm", f"q heads, strided view {H}x{D}", 2 * LAYERS,
            time_us(lambda: F.rms_norm(qv, (D,), wq, 1e-6), 50),
            time_us(lambda: triton_fused.rms_norm(qv, wq, 1e-6), 50),
            rel64(triton_fused.rms_norm(qv, wq, 1e-6), F.rms_norm(qv.double(), (D,), wq.double(), 1e-6)))
    rope = Rope(D, 10000.0).to(dev)
    rope.reserve(1024)
    pos = torch.tensor([700], device=dev)
    cos, sin = rope.tables(pos)
    q = torch.randn(1, H, D, device=dev, generator=gen)

    def torch_rope():
        return q * cos + rope._swap(q) * sin
    tab.add("rope", f"q {H}x{D}", 2 * LAYERS, time_us(torch_rope, 50),
            time_us(lambda: triton_fused.rope(q, cos, sin, D, True), 50),
            same(torch_rope(), triton_fused.rope(q, cos, sin, D, True)))
    gu = torch.randn(1, 2 * FF, device=dev, generator=gen)
    g, u = gu.chunk(2, dim=-1)
    tab.add("geglu", f"gate|up [1, 2 x {FF}]", LAYERS, time_us(lambda: F.gelu(g, approximate="tanh") * u, 50),
            time_us(lambda: triton_fused.geglu(g, u), 50),
            rel64(triton_fused.geglu(g, u), F.gelu(g.double(), approximate="tanh") * u.double()))


def matmul_rows(tab: Table, dev, gen):
    """Split-K at M = 1, multi-row at M = 2 and 4: the decode plan's config (TritonQuantMatmul.config_for(1))."""
    shapes = [("q|k|v", (H + 2 * HKV) * D, E), ("o", E, H * D), ("gate|up", 2 * FF, E), ("down", E, FF)]
    saved_2 = 0.0
    for name, n, k in shapes:
        w = GB.make(L.Q4_0, n, k, dev, seed=n + k)
        ws = GB.clones(w)
        c = Q.TritonQuantMatmul.from_packed(w).config_for(1)
        counters = torch.zeros(64 * triton.cdiv(n, c.block_n), dtype=torch.int32, device=dev)
        it = iter(range(1 << 30))

        calls = max(len(ws), 20)

        def call(x, rows=1, red=True, ws=ws, c=c, counters=counters, it=it):
            wi = ws[next(it) % len(ws)]
            return triton_gemv.launch(wi, x, kernel="gemv", block_n=c.block_n, block_k=c.block_k, split_k=c.split_k,
                                      num_warps=c.num_warps, num_stages=c.num_stages, out_dtype=torch.float32,
                                      rows=rows, counters=counters if red else None)
        x1 = torch.randn(1, k, device=dev, generator=gen)
        split = triton_gemv.plan_k(k, c.block_k, c.split_k)[1]
        if split > 1:
            ref = GB.reference(w, x1)
            tab.add("splitk", f"{name} {n}x{k} M=1 split {split}", LAYERS,
                    time_us(lambda: call(x1, red=False), calls), time_us(lambda: call(x1), calls),
                    rel64(triton_gemv.launch(w, x1, kernel="gemv", block_n=c.block_n, block_k=c.block_k,
                                             split_k=c.split_k, out_dtype=torch.float32, counters=counters), ref)
                    + ", " + same(call(x1, red=False), call(x1)).split(" ")[0] + " vs torch sum")
        for m in (2, 4):
            xm = torch.randn(m, k, device=dev, generator=gen)
            before, after = time_us(lambda: call(xm, rows=1), calls), time_us(lambda: call(xm, rows=m), calls)
            alone = torch.cat([triton_gemv.launch(w, xm[i : i + 1], kernel="gemv", block_n=c.block_n,
                                                  block_k=c.block_k, split_k=c.split_k, out_dtype=torch.float32,
                                                  counters=counters) for i in range(m)])
            multi = triton_gemv.launch(w, xm, kernel="gemv", block_n=c.block_n, block_k=c.block_k, split_k=c.split_k,
                                       out_dtype=torch.float32, rows=m, counters=counters)
            tab.add("multirow", f"{name} {n}x{k} M={m}", LAYERS, before, after, same(multi, alone) + " vs rows alone")
            if m == 2:
                saved_2 += LAYERS * (before[0] - after[0])
        ws = w = call = None  # the copies go before the next shape's
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    nv = 262144 if not SMOKE else 512
    head = (torch.randn(nv, E, device=dev, generator=gen) * 0.02).half()
    x2 = torch.randn(2, E, device=dev, generator=gen)
    before, after = (time_us(lambda: triton_dense.dense_gemv(head, x2, rows=1), 5),
                     time_us(lambda: triton_dense.dense_gemv(head, x2, rows=2), 5))
    tab.add("multirow", f"F16 head {nv}x{E} M=2", 1, before, after,
            same(triton_dense.dense_gemv(head, x2, rows=2), triton_dense.dense_gemv(head, x2, rows=1)) + " vs rows=1")
    return saved_2 + before[0] - after[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for fusions_bench.csv (default $OUT)")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (tests the script)")
    ap.add_argument("--skip-matmuls", action="store_true", help="only the K/V and elementwise rows")
    a = ap.parse_args()
    if SMOKE:
        dev = torch.device("cpu")
        print(f"# smoke run on the CPU (Triton interpreter), torch {torch.__version__}, triton {triton.__version__}")
    elif not torch.cuda.is_available():
        sys.exit("fusions_bench: needs a CUDA GPU (or --smoke)")
    else:
        dev = torch.device("cuda")
        p = torch.cuda.get_device_properties(dev)
        print(f"# {p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    print(f"# fusions on by default here: {', '.join(gpu_fusions.active()) or 'none'} (this script calls each "
          "kernel directly)")
    t0 = time.time()
    tab = Table(a.out)
    gen = torch.Generator(device=dev).manual_seed(0)
    kv_rows(tab, dev, gen)
    elementwise_rows(tab, dev, gen)
    saved_2 = 0.0 if a.skip_matmuls else matmul_rows(tab, dev, gen)
    print(f"# done in {time.time() - t0:.0f} s")

    def saved_ms(rows) -> float:
        return sum(r["per_token"] * (r["before"] - r["after"]) for r in rows) / 1e3

    common = [r for r in tab.rows if r["fusion"] in ("rms_norm", "rope", "geglu", "splitk")]
    q8 = [r for r in tab.rows if r["fusion"] == "hadamard" or r["case"].startswith("q8_0")]
    f16 = [r for r in tab.rows if r["case"].startswith("f16")]
    print(f"# projection, gemma3-27b decode, one row: {saved_ms(common + f16):.2f} ms less GPU time per token with "
          f"f16 K/V, {saved_ms(common + q8):.2f} ms with q8_0 K/V (README: 12.7 and 25.2 ms per token)")
    if saved_2:
        print(f"# projection, 2 generated rows (multi-row matmuls, head included): {saved_2 / 1e3:.2f} ms less per step")

if __name__ == "__main__":
    main()
