"""Compiles the fused kernels of issue 8 (triton_kv_store, triton_fused, the multi-row / split-K gemv and the
two-row dense gemv) for the H100 (sm_90a) on any host, GPU or not, and prints registers, spills (local
memory / stack) and, for the kernels that must round like torch, the PTX float ops: no `fma` may appear
where the kernel is compiled without contraction (the K/V quantisers' `x * id + 8.5`, RoPE's products).

    python benchmarks/gpu/fusions_sass.py

Costs no GPU time; the interpreter tests cannot catch a kernel that fails to compile for the GPU, this can.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import gemv_sass as GS  # noqa: E402
from qatserve.quant.kernels import gpu_layout as L  # noqa: E402
from qatserve.quant.kernels import triton_dense, triton_fused, triton_kv_store  # noqa: E402
from qatserve.quant.kernels.triton_kv_store import KIND_IDS, _log2, _scale  # noqa: E402

_BUF = {"f32": "*fp32", "f16": "*fp16", "bf16": "*bf16", "q8_0": "*u8", "q4_0": "*u8"}


def compile_one(fn, sig: dict, constexprs: dict, warps: int, fusion: bool = True):
    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn, sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "enable_fp_fusion": fusion})


def report(name: str, k, check_no_fma: bool = False) -> bool:
    res = GS.cuobjdump(k, "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", res).group(1)
    stack = re.search(r"STACK:(\d+)", res).group(1)
    local = re.search(r"LOCAL:(\d+)", res).group(1)
    ops = collections.Counter(re.findall(r"\b(fma|mul|add|sub|div)\.(\w+\.)?f32\b", k.asm["ptx"]))
    fma = sum(v for (op, _), v in ops.items() if op == "fma")
    ok = not (check_no_fma and fma) and stack == "0" and local == "0"
    print(f"{name:52} regs {regs:>3}  stack {stack:>4}  local {local:>3}  ptx fma {fma:>3}"
          f"{'' if ok else '   <-- CHECK'}", flush=True)
    return ok


def main() -> int:
    warnings.filterwarnings("ignore")
    print(f"triton {triton.__version__}, sm_90a")
    ok = True
    kv_sig = dict(k_ptr="*fp32", v_ptr="*fp32", kbuf_ptr="", vbuf_ptr="", slot_ptr="*i64", s_kt="i32", s_kh="i32",
                  s_vt="i32", s_vh="i32", s_kb="i32", s_kbh="i32", s_vb="i32", s_vbh="i32")
    for kk, kv, d, rk, rv in [("q8_0", "q8_0", 128, 128, 64), ("q4_0", "q4_0", 128, 128, 64),
                              ("q8_0", "q8_0", 256, 256, 64), ("q8_0", "q8_0", 512, 512, 64),
                              ("q4_0", "q4_0", 512, 512, 64), ("f16", "f16", 128, 0, 0), ("bf16", "f32", 256, 0, 0),
                              ("q8_0", "f16", 64, 64, 0)]:
        sig = {**kv_sig, "kbuf_ptr": _BUF[kk], "vbuf_ptr": _BUF[kv]}
        ce = dict(DK=d, DV=d, ROT_K=rk, LOG_K=_log2(rk) if rk else 0, SCALE_K=_scale(rk) if rk else 1.0,
                  ROT_V=rv, LOG_V=_log2(rv) if rv else 0, SCALE_V=_scale(rv) if rv else 1.0,
                  KIND_K=KIND_IDS[kk], KIND_V=KIND_IDS[kv])
        k = compile_one(triton_kv_store._kv_store_kernel, sig, ce, 4 if d >= 256 else 2, fusion=False)
        ok &= report(f"kv_store {kk}/{kv} D {d} rot {rk}/{rv}", k, check_no_fma=True)
    for g, dt in ((64, "*fp32"), (128, "*fp32"), (256, "*fp16"), (512, "*fp32")):
        ce = dict(G=g, LOG_G=_log2(g), SCALE=_scale(g), R=max(1, min(16, 2048 // g)))
        k = compile_one(triton_kv_store._hadamard_kernel, dict(x_ptr=dt, y_ptr=dt, n_rows="i32"), ce, 4, False)
        ok &= report(f"hadamard group {g} {dt[1:]}", k, check_no_fma=True)
    norm_sig = dict(x_ptr="*fp32", w_ptr="*fp32", y_ptr="*fp32", n_inner="i32", s_outer="i32", s_inner="i32",
                    N="i32", n_f="fp32", eps="fp32")
    for n, w in ((5376, 8), (1152, 4), (128, 1), (512, 2)):
        k = compile_one(triton_fused._rms_norm_kernel, norm_sig, dict(BLOCK=triton.next_power_of_2(n), HAS_W=True), w)
        ok &= report(f"rms_norm N {n}", k)
    rope_sig = dict(x_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", y_ptr="*fp32", H="i32", s_xt="i32", s_xh="i32",
                    s_ct="i32", s_st="i32")
    for d, dim, neox in ((128, 128, True), (256, 256, True), (512, 512, True), (64, 64, False), (96, 64, True)):
        ce = dict(D=d, HALF=dim // 2, REST=triton.next_power_of_2(d - dim) if d > dim else 0, NEOX=neox)
        k = compile_one(triton_fused._rope_kernel, rope_sig, ce, 1 if d <= 256 else 2, fusion=False)
        ok &= report(f"rope D {d} rotated {dim} {'neox' if neox else 'pairs'}", k, check_no_fma=True)
    k = compile_one(triton_fused._geglu_kernel, dict(g_ptr="*fp32", u_ptr="*fp32", y_ptr="*fp32", F="i32", s_g="i32",
                                                     s_u="i32"), dict(BLOCK=1024), 4)
    ok &= report("geglu", k)
    dense_sig = dict(x_ptr="*fp32", w_ptr="*fp16", y_ptr="*fp32", M="i32", N="i32", K="i32", s_xm="i32", s_wn="i32",
                     s_ym="i32")
    for rows, masked in ((1, False), (2, False), (2, True)):
        k = compile_one(triton_dense._dense_gemv_kernel, dense_sig,
                        dict(BLOCK_N=32, BLOCK_K=256, ROWS=rows, MASKED=masked), 4)
        ok &= report(f"dense gemv F16 rows {rows}{' masked' if masked else ''}", k)
    for f in L.FORMATS.values():
        for rows, red in ((1, True), (2, True), (3, False), (4, True)):
            k = GS.compile_kernel(f, "gemv", 64, 256, 4, 1, 16, 5376, "fp32", rows, red)
            ok &= report(f"gemv {f.name} 64x256 rows {rows}{' split-K in kernel' if red else ''}", k)
    print("all compiled" + ("; no spills, no contraction where none may be" if ok else "; see the CHECK lines"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
