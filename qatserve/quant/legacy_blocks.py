"""Legacy 32-value GGML blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): vectorised torch (de)quantisation.

Every function works on a whole batch of blocks at once: `blocks` is uint8 [n_blocks, type_size] for
dequantisation and float32 [n_blocks, 32] for quantisation. Layouts and rounding follow ggml-quants.c
(`dequantize_row_*`, `quantize_row_*_ref`); results are bit-exact with them.

Bit-exactness notes that apply throughout:
- fp16 <-> fp32 conversions are exact (widening) or round-to-nearest-even (narrowing) in both torch and C.
- Float expressions are evaluated as separate eager torch ops in the reference's order, so every
  intermediate is rounded to float32 exactly where C rounds it (no fused multiply-add, no reassociation).
"""

from __future__ import annotations

from typing import Optional

import torch

QK = 32  # values per legacy block
Out = Optional[torch.Tensor]  # optional float32 [n, block_size] destination of a dequant kernel


def f16_col(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] (a little-endian fp16 per row, usually a strided column slice) -> float32 [n, 1]."""
    # .contiguous() copies only 2 bytes per block; view() needs densely packed pairs to reinterpret.
    return b.contiguous().view(torch.float16).float()


def f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1] -> uint8 [n, 2]: the fp16 (round-to-nearest-even, as GGML_FP32_TO_FP16) bytes."""
    return d.half().view(torch.uint8)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 16] -> uint8 [n, 32]: value j < 16 is the low nibble of byte j, value j >= 16 the high one."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 4] (a little-endian uint32 bitmask) -> uint8 [n, 32] of bit j of the mask."""
    # Byte k of a little-endian uint32 holds bits 8k..8k+7, so unpacking bytes LSB-first keeps value order
    # and avoids uint32 shifts (poorly supported for torch uint32).
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], QK)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 32] of values < 32 -> uint8 [n, 16]: low nibbles of values 0..15 | values 16..31 << 4."""
    # Masking before the shift drops bit 4 (the Q5 high bit, stored in qh) without relying on uint8 wrap.
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 32] of values < 32 -> uint8 [n, 4]: the little-endian uint32 of bit 4 of each value."""
    bits = ((q >> 4) & 1).reshape(q.shape[0], 4, 8).to(torch.int32)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=q.device)
    return (bits * weights).sum(-1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------- dequant
def deq_q4_0(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q4_0 (18 B: fp16 d, 16 B nibbles) -> float32 [n, 32]; x = d * (q - 8)."""
    d = f16_col(blocks[:, :2])
    # The bias is removed in int8 (as C does); mul promotes int8 -> float32 exactly inside its one pass.
    return torch.mul(_nibbles(blocks[:, 2:]).view(torch.int8) - 8, d, out=out)


def deq_q4_1(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q4_1 (20 B: fp16 d, fp16 m, 16 B nibbles) -> float32 [n, 32]; x = d * q + m (two roundings)."""
    d, m = f16_col(blocks[:, :2]), f16_col(blocks[:, 2:4])
    # Separate mul and add_ (never addcmul/FMA) so d*q is rounded before adding m, as in C.
    return torch.mul(_nibbles(blocks[:, 4:]), d, out=out).add_(m)


def deq_q5_0(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q5_0 (22 B: fp16 d, 4 B high bits, 16 B nibbles) -> float32 [n, 32]; x = d * (q - 16)."""
    d = f16_col(blocks[:, :2])
    q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
    return torch.mul(q.view(torch.int8) - 16, d, out=out)


def deq_q5_1(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q5_1 (24 B: fp16 d, fp16 m, 4 B high bits, 16 B nibbles) -> float32 [n, 32]; x = d * q + m."""
    d, m = f16_col(blocks[:, :2]), f16_col(blocks[:, 2:4])
    q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
    return torch.mul(q, d, out=out).add_(m)


def deq_q8_0(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q8_0 (34 B: fp16 d, 32 x int8) -> float32 [n, 32]; x = d * q."""
    d = f16_col(blocks[:, :2])
    # The int8 payload is a strided slice; its dtype view is free and mul reads it in a single pass.
    return torch.mul(blocks[:, 2:].view(torch.int8), d, out=out)


# ------------------------------------------------------------------------------------------------ quant
def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, or 0 where d == 0 (an all-zero block then quantises to the zero code)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _absmax_signed(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 32] -> [n, 1]: the value of largest magnitude WITH its sign, as the C loop picks it
    (first one on ties; +0.0 for an all-zero block, whatever the signs of its zeros)."""
    # The sign matters: Q4_0/Q5_0 map this value to code 0 (-8/-16), which makes the grid asymmetric
    # towards it. max/min reductions are much cheaper than argmax+gather; they decide every row except
    # |min| == max (incl. all-zero rows), which falls back to argmax: torch returns the first maximal
    # index, as the C loop's strict `amax < fabsf(v)` does.
    mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    pick = torch.where(-mn > mx, mn, mx)
    tie = (-mn == mx).squeeze(-1)
    if bool(tie.any()):
        xt = x[tie]
        # + 0.0 maps -0.0 to +0.0 (IEEE round-to-nearest) and leaves every other value unchanged: C never
        # updates its initial `max = 0.0f` in an all-zero block.
        pick[tie] = xt.gather(-1, xt.abs().argmax(-1, keepdim=True)) + 0.0
    return pick


def _first_zero_sign(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Fix the sign of a zero min/max `m` [n, 1] of `x` [n, 32] to C's: the first zero in the block.

    C's `if (v < min) min = v;` keeps the first of equal values, and only zeros have two encodings; torch's
    (and numpy's) vectorised reductions return either zero, which would flip the sign bit of d or m."""
    z = (m == 0).squeeze(-1)
    if bool(z.any()):
        xz = x[z]
        m[z] = xz.gather(-1, (xz == 0).to(torch.uint8).argmax(-1, keepdim=True))
    return m


def _min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [n, 32] -> (min, max), each [n, 1], with C's signed-zero semantics."""
    return _first_zero_sign(x, x.amin(-1, keepdim=True)), _first_zero_sign(x, x.amax(-1, keepdim=True))


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """roundf(): round half away from zero (torch.round is half-to-even)."""
    # trunc(|v| + 0.5) would be wrong for |v| just below 0.5 (the sum rounds up to 1.0); splitting into
    # floor + fraction keeps every step exact: a - floor(a) and 2 * frac are exact in float32.
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2.0 * (a - fl)))


def q_q4_0(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 32] -> Q4_0 bytes [n, 18] (quantize_row_q4_0_ref)."""
    d = _absmax_signed(x) / -8.0
    # +8.5 then truncation = round-half-up onto the 0..15 codes; the clamp catches the +max value -> 16.
    q = torch.trunc(x * _inverse(d) + 8.5).clamp_(0, 15).to(torch.uint8)
    return torch.cat([f16_bytes(d), _pack_nibbles(q)], dim=-1)


def q_q4_1(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 32] -> Q4_1 bytes [n, 20] (quantize_row_q4_1_ref)."""
    mn, mx = _min_max(x)
    d = (mx - mn) / 15.0
    q = torch.trunc((x - mn) * _inverse(d) + 0.5).clamp_(0, 15).to(torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(mn), _pack_nibbles(q)], dim=-1)


def q_q5_0(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 32] -> Q5_0 bytes [n, 22] (quantize_row_q5_0_ref)."""
    d = _absmax_signed(x) / -16.0
    q = torch.trunc(x * _inverse(d) + 16.5).clamp_(0, 31).to(torch.uint8)
    return torch.cat([f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], dim=-1)


def q_q5_1(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 32] -> Q5_1 bytes [n, 24] (quantize_row_q5_1_ref)."""
    mn, mx = _min_max(x)
    d = (mx - mn) / 31.0
    q = torch.trunc((x - mn) * _inverse(d) + 0.5).clamp_(0, 31).to(torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(mn), _pack_high_bits(q), _pack_nibbles(q)], dim=-1)


def q_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 32] -> Q8_0 bytes [n, 34] (quantize_row_q8_0_ref)."""
    d = x.abs().amax(-1, keepdim=True) / 127.0
    q = _round_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([f16_bytes(d), q], dim=-1)
