"""Compiles the Triton quantised-matmul kernels for the H100 (sm_90a) on any host, GPU or not, and prints
what ptxas made of them: registers, local memory (spills), and the instruction mix of the main loop
per weight, which says how close a variant can get to ~20 weights/clock/SM (see triton_gemv.py).

    python benchmarks/gpu/gemv_sass.py                       # default configs, every format
    python benchmarks/gpu/gemv_sass.py --fmt Q4_0 --kernel gemv --cfg 64,256,4,1 128,256,8,1
    python benchmarks/gpu/gemv_sass.py --fmt Q4_0 Q6_K --kernel gemv --rows 1 2 4 8 --reduce   # multi-row, split-K

--cfg takes BLOCK_N,BLOCK_K,num_warps,num_stages[,BLOCK_M]; --rows the gemv's rows per program (ins/w is then
per weight x row). Integer arguments are specialised as a real
launch at --K (default 5376) would specialise them (divisible by 16 or not). Uses Triton's bundled
cuobjdump; costs no GPU time. A loop that shows SHFL, or STS/LDS beyond the x and scale tiles, has
a layout conversion inside it.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qatserve.quant.kernels import gpu_layout as L  # noqa: E402
from qatserve.quant.kernels import triton_gemv as G  # noqa: E402
from qatserve.quant.kernels import triton_qmatmul as Q  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
KEY = ["LDG", "LDGSTS", "LDS", "STS", "SHFL", "BAR", "HGMMA", "HMMA", "I2F", "F2FP", "FFMA", "FADD", "FMUL",
       "LOP3", "SHF", "IMAD"]


def compile_kernel(f: L.Format, kernel: str, bn: int, bk: int, warps: int, stages: int, bm: int, K: int, xdt: str,
                   rows: int = 1, reduce: bool = False):
    fn = G._gemv_kernel if kernel == "gemv" else G._qdot_kernel
    is_q8 = f.qtype == L.Q8_0
    bk, _ = G.plan_k(K, bk, 1)
    sc = "*fp16" if not f.kquant else ("*i8" if f.qtype == L.Q6_K else "*u8")
    sig = {"x_ptr": f"*{xdt}", "y_ptr": f"*{xdt}", "lo_ptr": "*i32", "hi_ptr": "*i32", "sc_ptr": sc,
           "mn_ptr": "*fp16" if not f.kquant else "*u8", "d_ptr": "*fp16", "dm_ptr": "*fp16",
           "M": "i32", "N": "i32", "s_xm": "i32", "s_lo": "i32", "s_hi": "i32", "s_sc": "i32", "s_d": "i32",
           "tiles_per_split": "i32", "exp": "i32"}
    ce = dict(SB=f.sb, CB=8 if is_q8 else 4 + f.hi_bits, OFF=128 if is_q8 else f.off, HI_BITS=f.hi_bits,
              KQUANT=f.kquant, HAS_MIN=f.has_min, IS_Q8=is_q8, BLOCK_N=bn, BLOCK_K=bk)
    if kernel == "dot":
        ce.update(BLOCK_M=bm, DOT_DTYPE=tl.float16 if xdt == "fp16" else tl.float32)
    else:  # the multi-row gemv's rows per program and the in-kernel split-K sum
        sig.update(ws_ptr="*fp32", cnt_ptr="*i32", n_split="i32")
        ce.update(ROWS=rows, MASKED=False, REDUCE=reduce)
    sig.update({k: "constexpr" for k in ce})
    vals = dict(N=21504, s_xm=K, s_lo=K // 4 if is_q8 else K // 8, s_hi=K * max(f.hi_bits, 1) // 32,
                s_sc=K // f.sb, s_d=max(K // 256, 1))
    div = ["x_ptr", "y_ptr", "lo_ptr", "hi_ptr", "sc_ptr", "mn_ptr", "d_ptr", "dm_ptr"]
    div += ["ws_ptr", "cnt_ptr"] if kernel == "gemv" else []
    div += [k for k, v in vals.items() if v % 16 == 0]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = ASTSource(fn, sig, constexprs=ce, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def cuobjdump(k, flag: str) -> str:
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
        fh.write(k.asm["cubin"])
    try:
        return subprocess.run([os.path.join(TOOLS, "cuobjdump"), flag, fh.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(fh.name)


def loop_mix(sass: str) -> tuple[int, collections.Counter]:
    """Instructions of the longest backward-branch loop in the SASS, counted by opcode."""
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", ln)]
    addr = [int(re.search(r"/\*([0-9a-f]{4,})\*/", ln).group(1), 16) for ln in lines]
    best = None
    for a, ln in zip(addr, lines):
        m = re.search(r"BRA (0x[0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < a and (best is None or a - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), a)
    if best is None:
        return 0, collections.Counter()
    ops = collections.Counter()
    for a, ln in zip(addr, lines):
        if best[0] <= a <= best[1]:
            ops[re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln).group(1)] += 1
    return sum(ops.values()), ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmt", nargs="*", default=[f.name for f in L.FORMATS.values()])
    ap.add_argument("--kernel", nargs="*", default=["gemv", "dot"])
    ap.add_argument("--cfg", nargs="*", help="BLOCK_N,BLOCK_K,warps,stages[,BLOCK_M] (default: the wrapper's)")
    ap.add_argument("--K", type=int, default=5376)
    ap.add_argument("--x", default="fp16", choices=["fp16", "fp32", "bf16"])
    ap.add_argument("--rows", type=int, nargs="*", default=[1], help="gemv: rows per program (multi-row decode)")
    ap.add_argument("--reduce", action="store_true", help="gemv: with the in-kernel split-K sum")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"triton {triton.__version__}, sm_90a, K = {a.K}, x {a.x}")
    print(f"{'fmt':5} {'kernel':6} {'config':22} {'regs':>4} {'local':>5} {'loop':>5} {'w/thr':>5} {'ins/w':>5}  mix")
    by_name = {f.name: f for f in L.FORMATS.values()}
    for name in a.fmt:
        f = by_name[name]
        for kernel in a.kernel:
            if a.cfg:
                cfgs = [tuple(int(v) for v in c.split(",")) for c in a.cfg]
            else:
                d = Q.DEFAULT_CONFIGS["gemv" if kernel == "gemv" else "decode"]
                cfgs = [(d.block_n, d.block_k, d.num_warps, d.num_stages, d.block_m)]
            for c, rows in [(c, r) for c in cfgs for r in (a.rows if kernel == "gemv" else [1])]:
                bn, bk, nw, ns = c[:4]
                bm = c[4] if len(c) > 4 else 16
                try:
                    k = compile_kernel(f, kernel, bn, bk, nw, ns, bm, a.K, a.x, rows, a.reduce)
                except Exception as e:  # noqa: BLE001 - report and go on with the next variant
                    print(f"{name:5} {kernel:6} {c!s:22} FAILED: {str(e).splitlines()[-1][:200]}")
                    continue
                res = cuobjdump(k, "--dump-resource-usage")
                regs = re.search(r"REG:(\d+)", res).group(1)
                local = re.search(r"LOCAL:(\d+)", res).group(1)
                n, ops = loop_mix(cuobjdump(k, "-sass"))
                per_thread = bn * G.plan_k(a.K, bk, 1)[0] // (32 * nw)  # weights per thread per iteration
                mix = " ".join(f"{op}:{sum(v for o, v in ops.items() if o == op or o.startswith(op + '_'))}"
                               for op in KEY if any(o == op or o.startswith(op + "_") for o in ops))
                cfg = f"{bn}x{bk}" + (f"x{bm}" if kernel == "dot" else "") + f"/w{nw}/s{ns}"
                if kernel == "gemv" and (rows > 1 or a.reduce):
                    cfg += f"/r{rows}" + ("/red" if a.reduce else "")
                    per_thread *= rows  # weight x row products per thread per iteration
                print(f"{name:5} {kernel:6} {cfg:22} {regs:>4} {local:>5} {n:>5} {per_thread:>5} "
                      f"{n / max(per_thread, 1):5.1f}  {mix}", flush=True)


if __name__ == "__main__":
    main()
