"""Times the routed experts' GPU path (qatserve/quant/kernels/gpu_experts.py + triton_moe.py) at the Gemma 4
26B-A4B shape (128 experts, top 8, n_embd 2816, expert width 704, Q4_0), checks it against float64.

    python benchmarks/gpu/moe_bench.py [--no-sweep] [--fusions none|all]
    python benchmarks/gpu/moe_bench.py --smoke   # CPU, Triton interpreter, tiny shapes: checks the script

Decode (T = 1, 2, 4, 8 rows; the "decode" plan: gathered gemv for gate|up, GLU, gathered gemv for down,
combine): 30 layer-calls captured in one CUDA graph (one token's worth), each on one of 3 copies of the
layer's expert stacks with its own random routing, so no call reads its experts from the 50 MB L2; median
of REPLAYS replays. Prefill (T = 1150, the "prompt" plan: pairs grouped by expert, tensor-core dot): one
layer-call, eager. Then a tile sweep of both (MoEConfig).

Roofline, 26B-A4B decode (shapes from qatserve/bench/shapes.py; Q4_0 = 18 B per 32 weights; router F32,
head Q6_K as llama.cpp's Q4_0 files; bytes per token, MB = 1e6 B):

| part | per layer | x layers | MB |
|---|---|---|---|
| attention, sliding (q 4096, k 2048, v 2048, o: x 2816) | 19.46 | 25 | 486.6 |
| attention, full (q 8192, k 1024, K=V, o) | 27.57 | 5 | 137.9 |
| shared dense MLP (gate, up 2112 x 2816; down) | 10.04 | 30 | 301.1 |
| router 128 x 2816 F32 | 1.44 | 30 | 43.3 |
| 8 experts x (gate|up 1408 x 2816 = 2.230 MB + down 2816 x 704 = 1.115 MB) | 26.76 | 30 | 802.9 |
| head 262144 x 2816 Q6_K (tied embedding) | | 1 | 605.6 |
| one token | | | 2377.3 |

At 3.0 TB/s: 0.79 ms per token, ~1260 tok/s; the experts are 34% of it (26.8 MB per layer = 8.9 us at 3.0
TB/s). llama.cpp CUDA reaches 227 tok/s (4.4 ms per token) on the H100: this shape is bound by launches and
latency, not bytes, so the decode MoE must stay in the CUDA graph with few launches (here 4 per layer:
gate|up, GLU, down, combine). Decode T rows read T x 8 experts (no sharing between rows: their experts differ).
Written and checked with --smoke on a CPU; not yet run on the H100.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. at import

import torch  # noqa: E402
from gpu_timing import REPLAYS, ROOF, elapsed_s, sync  # noqa: E402

from qatserve.models.common import gelu_tanh_glu  # noqa: E402
from qatserve.quant.kernels import gpu_experts as GE  # noqa: E402
from qatserve.quant.kernels import gpu_fusions  # noqa: E402
from qatserve.quant.kernels import gpu_layout as L  # noqa: E402
from qatserve.quant.kernels.gpu_matmul import row_kind  # noqa: E402

# (n_expert, top_k, n_embd, expert ff, layers)
SHAPE = (8, 2, 64, 32, 2) if SMOKE else (128, 8, 2816, 704, 30)
COPIES = 1 if SMOKE else 3


def make_layer(E, n_embd, ff, dev, seed) -> GE.GPUExperts:
    """Random well-formed Q4_0 stacks made on the device (GPUExperts takes host parts: build it empty and
    set its stacks from device-side repacks, which is what its constructor does from host bytes)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    self = GE.GPUExperts.__new__(GE.GPUExperts)
    self.device, self.config = torch.device(dev), GE.DEFAULT_CONFIG
    stacks = []
    for n, k in ((2 * ff, n_embd), (n_embd, ff)):
        s = GE._Stack.__new__(GE._Stack)
        s.n_expert, s.K, s.rows, s.float_w = E, k, n, None
        s.packed = L.repack(L.random_blocks(L.Q4_0, E * n, k, g), L.Q4_0, k, E * n, dev)
        stacks.append(s)
    self.gate_up, self.down = stacks
    self.n_expert, self.ff = E, ff
    return self


def routing(T, E, k, dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(dev)
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(dev)
    return w, ids


def reference(layer: GE.GPUExperts, x, w, ids) -> torch.Tensor:
    """float64 of the chosen experts' exact dequantisation, a few rows."""
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = L.dequantize_packed(L.row_slice(layer.gate_up.packed, e * layer.gate_up.rows,
                                                 (e + 1) * layer.gate_up.rows)).double() @ x[t].double()
            h = torch.nn.functional.gelu(gu[: layer.ff], approximate="tanh") * gu[layer.ff :]
            dn = L.dequantize_packed(L.row_slice(layer.down.packed, e * layer.down.rows, (e + 1) * layer.down.rows))
            acc += float(w[t, j]) * (dn.double() @ h)
        out.append(acc)
    return torch.stack(out)


def time_decode(layers, T, dev, layers_per_token) -> float:
    """Seconds per layer-call at T rows (a token's worth of calls in one graph on the GPU)."""
    E, k = layers[0].n_expert, SHAPE[1]
    calls = [(layers[i % len(layers)], torch.randn(T, SHAPE[2], device=dev), *routing(T, E, k, dev, 100 + i))
             for i in range(layers_per_token)]

    def step():
        with row_kind("decode"):
            for layer, x, w, ids in calls:
                layer(x, w, ids, gelu_tanh_glu)

    step()
    sync(dev)
    if dev.type != "cuda":
        return elapsed_s(step, dev) / len(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    sync(dev)
    return statistics.median(elapsed_s(graph.replay, dev) for _ in range(REPLAYS)) / len(calls)


def time_prefill(layer, T, dev) -> float:
    w, ids = routing(T, layer.n_expert, SHAPE[1], dev, 7)
    x = torch.randn(T, SHAPE[2], device=dev)

    def run():
        with row_kind("prompt"):
            layer(x, w, ids, gelu_tanh_glu)

    run()
    sync(dev)
    return statistics.median(elapsed_s(run, dev) for _ in range(3 if SMOKE else REPLAYS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--fusions", default=None, help="QATSERVE_GPU_FUSIONS for the run (GLU: the geglu fusion)")
    args = ap.parse_args()
    dev = torch.device("cpu" if SMOKE else "cuda")
    E, k, H, ff, n_layers = SHAPE
    with gpu_fusions.use(args.fusions if args.fusions is not None else ",".join(gpu_fusions.active()) or "none"):
        layers = [make_layer(E, H, ff, dev, s) for s in range(COPIES)]
        per_expert = layers[0].gate_up.packed.nbytes // E + layers[0].down.packed.nbytes // E
        print(f"26B-A4B experts: {E} x (gate|up {2 * ff}x{H} + down {H}x{ff}) Q4_0, top {k}: "
              f"{per_expert / 1e6:.3f} MB per chosen expert, {k * per_expert / 1e6:.2f} MB per row per layer")
        # correctness: decode and prompt plans vs float64 on 3 rows
        w, ids = routing(3, E, k, dev, 1)
        x = torch.randn(3, H, device=dev)
        want = reference(layers[0], x, w, ids)
        for kind in ("decode", "prompt"):
            with row_kind(kind):
                got = layers[0](x, w, ids, gelu_tanh_glu)
            print(f"rel.err {kind}: {float((got.double() - want).norm() / want.norm()):.2e}")
        print("\n| plan | T | us/layer | GB/s | % of 3.0 TB/s | x30 layers ms | cfg |")
        print("|---|---|---|---|---|---|---|")

        def decode_rows(cfg_note=""):
            for T in (1, 2, 4, 8) if not SMOKE else (1, 2):
                s = time_decode(layers, T, dev, n_layers)
                b = T * k * per_expert
                print(f"| decode | {T} | {s * 1e6:.1f} | {b / s / 1e9:.0f} | {100 * b / s / ROOF:.0f} | "
                      f"{s * n_layers * 1e3:.2f} | {cfg_note} |")

        decode_rows(str(GE.DEFAULT_CONFIG))
        T = 64 if SMOKE else 1150
        s = time_prefill(layers[0], T, dev)
        flops = 2 * T * k * per_expert / 0.5625  # Q4_0: 0.5625 B per weight
        print(f"| prompt | {T} | {s * 1e6:.0f} | | | {s * n_layers * 1e3:.1f} (= {T / (s * n_layers):.0f} tok/s for "
              f"the experts alone; {flops / s / 1e12:.1f} TFLOP/s) | |")
        if args.no_sweep:
            return
        print("\nsweep (T = 1 decode; T = 1150 prompt):")
        base = GE.DEFAULT_CONFIG
        sweeps = [dict(gemv_block_n=bn, gemv_block_k=bk, gemv_warps=nw) for bn in (16, 32, 64) for bk in (128, 256)
                  for nw in (2, 4)]
        sweeps += [dict(dot_block_m=bm, dot_block_n=bn, dot_block_k=bk) for bm in (16, 32, 64) for bn in (64, 128)
                   for bk in (64, 128)]
        if SMOKE:
            sweeps = sweeps[:1] + sweeps[-1:]
        for over in sweeps:
            cfg = GE.MoEConfig(**{**base.__dict__, **over})
            for layer in layers:
                layer.config = cfg
            if "gemv_block_n" in over:
                s = time_decode(layers, 1, dev, n_layers)
                b = k * per_expert
                print(f"  decode {over}: {s * 1e6:.1f} us/layer, {100 * b / s / ROOF:.0f}% of roofline")
            else:
                s = time_prefill(layers[0], T, dev)
                print(f"  prompt {over}: {s * 1e6:.0f} us/layer")
        for layer in layers:
            layer.config = base


if __name__ == "__main__":
    main()
