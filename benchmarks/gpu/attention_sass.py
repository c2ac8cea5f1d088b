"""Compiles the paged-attention kernels (qatserve/quant/kernels/triton_attention_kernels.py) for the H100
(sm_90a) on any host, GPU or not, and prints what ptxas made of them: registers, stack (spills), shared
memory, per kernel, layer shape and KV type, with the launch parameters paged_attention would use.

    python benchmarks/gpu/attention_sass.py                      # default tuning, the 27B/31B shapes
    python benchmarks/gpu/attention_sass.py --warps 4 8 --keys 16 32 --kernel decode

Registers decide how many programs an SM holds (65536 / (regs x threads)), i.e. how many K/V loads
are in flight for this memory-bound kernel; a non-zero stack means spills. Uses Triton's bundled
cuobjdump; costs no GPU time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qatserve.quant.kernels import triton_attention as A  # noqa: E402
from qatserve.quant.kernels import triton_attention_kernels as AK  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
BUF = {"f16": "*fp16", "bf16": "*bf16", "f32": "*fp32", "q8_0": "*i16", "q4_0": "*i16"}
# (shape, layer, G, head dim)
SHAPES = [("g3-27b", "any", 2, 128), ("g4-31b", "sliding", 2, 256), ("g4-31b", "full", 8, 512)]
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def compile_kernel(kernel: str, kind: str, G: int, d: int, tuning: A.Tuning, softcap: bool):
    meta = A.kernel_meta(kernel, kind, kind, d, d, G, softcap=softcap, round_q=True, tuning=tuning.resolved(d))
    opts = {k: meta.pop(k) for k in LAUNCH_OPTIONS if k in meta}
    ptrs = dict(q_ptr="*fp16", k_buf=BUF[kind], v_buf=BUF[kind], tab_ptr="*i32")
    if kernel == "decode":
        fn = AK._decode_kernel
        ptrs.update(rows_ptr="*i32", pos_ptr="*i32", tix_ptr="*i32", out_ptr="*fp16", ws_acc="*fp32", ws_ml="*fp32")
        ints = ["s_qr", "s_qh", "s_ks", "s_kh", "s_vs", "s_vh", "s_tab", "s_or", "s_oh", "H", "G"]
        tail = dict(qk_scale="fp32", softcap="fp32", window="i32", max_splits="i32", min_split_blocks="i32",
                    grid_splits="i32")
    else:
        fn = AK._prefill_kernel
        ptrs.update(tiles_ptr="*i32", out_ptr="*fp16")
        ints = ["s_qr", "s_qh", "s_ks", "s_kh", "s_vs", "s_vh", "s_tab", "s_or", "s_oh", "G"]
        tail = dict(qk_scale="fp32", softcap="fp32", window="i32")
    sig = {**ptrs, **{n: "i32" for n in ints}, **tail, **{k: "constexpr" for k in meta}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptrs}
    src = ASTSource(fn, sig, constexprs=meta, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts), opts


def resources(k) -> dict[str, int]:
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
        fh.write(k.asm["cubin"])
    try:
        out = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", fh.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(fh.name)
    return {name: int(v) for name, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", nargs="*", default=["decode", "prefill"])
    ap.add_argument("--kinds", nargs="*", default=["f16", "q8_0", "q4_0"])
    ap.add_argument("--warps", nargs="*", type=int, help="num_warps to try (default: the tuning's)")
    ap.add_argument("--keys", nargs="*", type=int, help="keys per step to try (16, 32; default: the tuning's)")
    ap.add_argument("--softcap", action="store_true", help="compile the soft-capped variant")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"triton {triton.__version__}, sm_90a")
    print(f"{'kernel':8} {'shape':8} {'layer':8} {'G':>2} {'D':>4} {'kv':5} {'warps':>5} {'keys':>4} {'rows':>4} "
          f"{'regs':>4} {'stack':>5} {'smem':>6} {'CTAs/SM':>7}")
    for kernel in a.kernel:
        for shape, layer, G, d in SHAPES:
            for kind in a.kinds:
                for warps in a.warps or [None]:
                    for keys in a.keys or [None]:
                        t = (A.Tuning(decode_warps=warps, decode_keys=keys) if kernel == "decode"
                             else A.Tuning(prefill_warps=warps, prefill_keys=keys))
                        r = t.resolved(d)
                        w, kk = ((r.decode_warps, r.decode_keys) if kernel == "decode"
                                 else (r.prefill_warps, r.prefill_keys))
                        rows = max(16, G) if kernel == "decode" else r.prefill_block_m
                        try:
                            k, _ = compile_kernel(kernel, kind, G, d, t, a.softcap)
                        except Exception as e:  # noqa: BLE001 - report and go on with the next variant
                            print(f"{kernel:8} {shape:8} {layer:8} {G:>2} {d:>4} {kind:5} {w:>5} {kk:>4} FAILED: "
                                  f"{str(e).splitlines()[-1][:200]}")
                            continue
                        res = resources(k)
                        ctas = min(65536 // max(1, res.get("REG", 0) * 32 * w), 32)
                        print(f"{kernel:8} {shape:8} {layer:8} {G:>2} {d:>4} {kind:5} {w:>5} {kk:>4} {rows:>4} "
                              f"{res.get('REG', 0):>4} {res.get('STACK', 0):>5} {res.get('SHARED', 0):>6} "
                              f"{ctas:>7}", flush=True)


if __name__ == "__main__":
    main()
