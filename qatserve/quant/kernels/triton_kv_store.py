"""One Triton launch per layer for the K/V store of a step, and the Hadamard rotation of Q and the output.

The store (`store`): for every new row t and KV head h, K[t, h] and V[t, h] are read once, rotated in
registers (llama.cpp's Walsh-Hadamard groups: kv_quant.k_rotation_group for K, 64 for V, when the type is
quantised), encoded (f32 / f16 / bf16 cast, or q8_0 / q4_0 blocks) and written into the paged slot buffers
at the row's slot. What it replaces on the GPU (engine/batch.py, gpu_runner.DecodeBatch before this):
`kv_quant.hadamard` of K and of V (log2(group) elementwise stages of ~4 torch kernels each, plus the
scaling), `quantize_kv` (legacy_blocks' ~12 torch kernels per tensor for q8_0, ~20 for q4_0 plus a host
sync in its tie check, which kept q4_0 K/V out of CUDA graphs) and two index_put writes.

Bit-identity. The stored bytes equal the torch path's (kv_quant._butterfly, then legacy_blocks.q_q8_0 /
q_q4_0, which are gguf.quants' bytes): the butterfly runs the same add/sub pairs in the same stage order
and scales once by the float32 1/sqrt(group); the quantisers follow quantize_row_q8_0_ref /
quantize_row_q4_0_ref with correctly rounded divisions (div_rn, not Triton's approximate `/`) and with
float contraction off (enable_fp_fusion=False: q4_0's `x * id + 8.5` is two roundings in C, never an FMA).
q4_0's signed absmax takes the first index of the largest magnitude, as the C loop does (ties included;
an all-zero block gives +0, so d = -0.0 as in C). tests/unit/test_gpu_fusions.py checks the bytes against
gguf.quants and the torch path under Triton's interpreter; on the GPU the same test runs on CUDA.

`hadamard`: the same butterfly for Q before attention and for the attention output after it (one launch
each instead of ~30 torch kernels), identical to kv_quant._butterfly bit for bit.

Roofline (H100, Gemma 3 27B decode, one row, per layer: 16 KV heads x 128, K group 128, V group 64):
| | launches | bytes moved |
|---|---|---|
| torch path, q8_0 K/V | ~80 (7 + 6 butterfly stages x ~4, 2 x ~12 quantiser ops, 2 writes, scaling) + 2 x ~28 for Q and output | ~100 KB of temporaries |
| this module, q8_0 K/V | 1 store + 2 rotations | 16 KB in (K, V, Q, out), 4.4 KB of blocks out |
| torch path, f16 K/V | 4 (2 casts, 2 index_put) | ~24 KB |
| this module, f16 K/V | 1 | 8 KB in, 8 KB out |
At ~2-3 us per small kernel inside a CUDA graph, ~130 launches per layer x 62 layers were ~12 ms of the
25.2 ms q8_0 step (README GPU section); what is left is ~3 launches per layer, i.e. q8_0 K/V should cost
about what f16 costs (the attention kernels already read q8_0 blocks in place). Bytes are negligible either
way (< 1 MB per token for the whole model); this is launch and latency work, not bandwidth work.

Kernel layout: one program per (row, KV head) for the store: a head is 64-512 values, loaded with one
vector load per thread; the butterfly's reshapes / splits / joins stay within the program (a few shared-
memory round trips for 128-512 values). Head dims must be powers of two (gpu_fusions.kv_store_fits says
when this path applies; the torch path covers the rest).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

KIND_IDS = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4}


@triton.jit
def _rotate(y, NG: tl.constexpr, G: tl.constexpr, LOG_G: tl.constexpr, SCALE: tl.constexpr):
    """y float32 [NG, G] -> the normalised Walsh-Hadamard transform of each row: kv_quant._butterfly's
    stages (stage s: entries i, i + 2^s of each 2^(s+1) block become (a + b, a - b)), then * SCALE."""
    for s in tl.static_range(LOG_G):
        y = _stage(y, NG, G, 1 << s)
    return y * SCALE


@triton.jit
def _stage(y, NG: tl.constexpr, G: tl.constexpr, H: tl.constexpr):
    """One butterfly stage: entries i and i + H of each block of 2H become (a + b, a - b)."""
    v = tl.permute(tl.reshape(y, (NG, G // (2 * H), 2, H)), (0, 1, 3, 2))
    a, b = tl.split(v)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (NG, G))


@triton.jit
def _bf16(x):
    """float32 -> bfloat16, round to nearest even on the bit pattern (c10's round_to_nearest_even; NaN
    aside). Spelled out because Triton's interpreter truncates where the GPU's cvt.rn rounds."""
    b = x.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _f16_bytes(base, offs, d):
    """Store the fp16 (round to nearest even) of float32 d at byte offsets offs, offs + 1 (little-endian)."""
    bits = d.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    tl.store(base + offs, (bits & 0xFF).to(tl.uint8))
    tl.store(base + offs + 1, ((bits >> 8) & 0xFF).to(tl.uint8))


@triton.jit
def _store_q8_0(base, x, D: tl.constexpr):
    """x float32 [D] -> D / 32 Q8_0 blocks (34 B: fp16 d, 32 int8) at base (quantize_row_q8_0_ref)."""
    NB: tl.constexpr = D // 32
    y = tl.reshape(x, (NB, 32))
    amax = tl.max(tl.abs(y), axis=1)
    d = tl.math.div_rn(amax, tl.full((NB,), 127.0, tl.float32))
    nz = d != 0.0
    inv = tl.where(nz, tl.math.div_rn(tl.full((NB,), 1.0, tl.float32), tl.where(nz, d, 1.0)), 0.0)
    v = y * inv[:, None]
    # roundf (half away from zero) in exact steps, as legacy_blocks._round_away.
    a = tl.abs(v)
    fl = tl.floor(a)
    r = fl + tl.floor(2.0 * (a - fl))
    q = tl.where(v < 0.0, -r, r).to(tl.int32)
    blk = tl.arange(0, NB) * 34
    tl.store(base + blk[:, None] + 2 + tl.arange(0, 32)[None, :], (q & 0xFF).to(tl.uint8))
    _f16_bytes(base, blk, d)


@triton.jit
def _store_q4_0(base, x, D: tl.constexpr):
    """x float32 [D] -> D / 32 Q4_0 blocks (18 B: fp16 d, 16 B of nibbles) at base (quantize_row_q4_0_ref)."""
    NB: tl.constexpr = D // 32
    y = tl.reshape(x, (NB, 32))
    ay = tl.abs(y)
    amax = tl.max(ay, axis=1)
    j = tl.arange(0, 32)[None, :]
    # The value of largest magnitude with its sign, first index on ties (C's strict `amax < fabsf(v)`).
    first = tl.min(tl.where(ay == amax[:, None], j, 32), axis=1)
    pick = tl.max(tl.where(j == first[:, None], y, float("-inf")), axis=1)
    pick = tl.where(pick == 0.0, 0.0, pick)  # C starts from max = +0.0: an all-zero block gives d = -0.0
    d = pick * -0.125  # == pick / -8.0 exactly (power of two)
    nz = d != 0.0
    inv = tl.where(nz, tl.math.div_rn(tl.full((NB,), 1.0, tl.float32), tl.where(nz, d, 1.0)), 0.0)
    t = y * inv[:, None] + 8.5  # two roundings: the kernel is compiled without FMA contraction
    q = tl.minimum(tl.maximum(t.to(tl.int32), 0), 15)  # float -> int truncates toward zero, as trunc()
    lo, hi = tl.split(tl.permute(tl.reshape(q, (NB, 2, 16)), (0, 2, 1)))  # codes j and j + 16
    blk = tl.arange(0, NB) * 18
    tl.store(base + blk[:, None] + 2 + tl.arange(0, 16)[None, :], (lo | (hi << 4)).to(tl.uint8))
    _f16_bytes(base, blk, d)


@triton.jit
def _store_head(src, buf, D: tl.constexpr, ROT: tl.constexpr, LOG_ROT: tl.constexpr, SCALE: tl.constexpr,
                KIND: tl.constexpr):
    x = tl.load(src + tl.arange(0, D)).to(tl.float32)
    if ROT > 0:
        x = tl.reshape(_rotate(tl.reshape(x, (D // ROT, ROT)), D // ROT, ROT, LOG_ROT, SCALE), (D,))
    if KIND == 0:
        tl.store(buf + tl.arange(0, D), x)
    elif KIND == 1:
        tl.store(buf + tl.arange(0, D), x.to(tl.float16, fp_downcast_rounding="rtne"))
    elif KIND == 2:
        tl.store(buf + tl.arange(0, D), _bf16(x))
    elif KIND == 3:
        _store_q8_0(buf, x, D)
    else:
        _store_q4_0(buf, x, D)


@triton.jit
def _kv_store_kernel(k_ptr, v_ptr, kbuf_ptr, vbuf_ptr, slot_ptr,
                     s_kt, s_kh, s_vt, s_vh, s_kb, s_kbh, s_vb, s_vbh,
                     DK: tl.constexpr, DV: tl.constexpr, ROT_K: tl.constexpr, LOG_K: tl.constexpr,
                     SCALE_K: tl.constexpr, ROT_V: tl.constexpr, LOG_V: tl.constexpr, SCALE_V: tl.constexpr,
                     KIND_K: tl.constexpr, KIND_V: tl.constexpr):
    """Row t = pid 0, KV head h = pid 1: rotate + encode K[t, h] and V[t, h] into slot slots[t]."""
    t, h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    _store_head(k_ptr + t.to(tl.int64) * s_kt + h * s_kh, kbuf_ptr + slot * s_kb + h * s_kbh,
                DK, ROT_K, LOG_K, SCALE_K, KIND_K)
    _store_head(v_ptr + t.to(tl.int64) * s_vt + h * s_vh, vbuf_ptr + slot * s_vb + h * s_vbh,
                DV, ROT_V, LOG_V, SCALE_V, KIND_V)


@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, n_rows, G: tl.constexpr, LOG_G: tl.constexpr, SCALE: tl.constexpr,
                     R: tl.constexpr):
    """R rows of G values per program (x, y contiguous [n_rows, G])."""
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    mask = (rows < n_rows)[:, None]
    offs = rows[:, None] * G + tl.arange(0, G)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _rotate(x, R, G, LOG_G, SCALE)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _scale(group: int) -> float:
    """1/sqrt(group) rounded to float32 once, as torch rounds the Python scalar of kv_quant._butterfly."""
    return float(np.float32(1.0 / math.sqrt(group)))


def _log2(n: int) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard group must be a power of two, got {n}")
    return n.bit_length() - 1


def hadamard(x: torch.Tensor, group: int) -> torch.Tensor:
    """kv_quant._butterfly(x, group) in one launch: x float [..., D] (group | D) -> a new tensor of x's
    shape and dtype, bit-identical to the torch stages."""
    d = x.shape[-1]
    log_g = _log2(group)
    if d % group:
        raise ValueError(f"Hadamard group {group} does not divide the last dim {d}")
    x2 = x.reshape(-1, group)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    n = x2.shape[0]
    if n:
        r = max(1, min(16, 2048 // group))
        _hadamard_kernel[(triton.cdiv(n, r),)](x2, y, n, G=group, LOG_G=log_g, SCALE=_scale(group), R=r,
                                               num_warps=4, enable_fp_fusion=False)
    return y.view(x.shape)


def store(kbuf: torch.Tensor, vbuf: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          type_k: str, type_v: str, rot_k: int, rot_v: int) -> None:
    """Rotate (group rot_k / rot_v, 0 = none) and encode k [T, n_kv, DK], v [T, n_kv, DV] (float32, last dim
    contiguous) into the cache buffers kbuf / vbuf [slots, n_kv, width] at slots [T] (int64): the bytes
    kv_quant.quantize_kv(kv_quant._butterfly(...)) would write there."""
    T, n_kv, dk = k.shape
    dv = v.shape[-1]
    if T == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if slots.dtype != torch.int64:
        slots = slots.long()
    _kv_store_kernel[(T, n_kv)](
        k, v, kbuf, vbuf, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kbuf.stride(0), kbuf.stride(1), vbuf.stride(0), vbuf.stride(1),
        DK=dk, DV=dv, ROT_K=rot_k, LOG_K=_log2(rot_k) if rot_k else 0, SCALE_K=_scale(rot_k) if rot_k else 1.0,
        ROT_V=rot_v, LOG_V=_log2(rot_v) if rot_v else 0, SCALE_V=_scale(rot_v) if rot_v else 1.0,
        KIND_K=KIND_IDS[type_k], KIND_V=KIND_IDS[type_v], num_warps=4 if max(dk, dv) >= 256 else 2,
        enable_fp_fusion=False)
