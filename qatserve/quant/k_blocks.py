"""K-quant GGML super-blocks (256 values: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): vectorised torch dequantisation.

Each function maps uint8 [n_blocks, type_size] to float32 [n_blocks, 256]. Layouts follow the block_q*_K
structs of ggml-common.h; the arithmetic follows dequantize_row_q*_K in ggml-quants.c, one eager torch op
per C operation, so each float32 intermediate is rounded where C rounds it (bit-exact results).

Bit fields are unpacked with broadcast shifts: a byte tensor [..., 1, L] shifted by [k, 1] shift amounts
gives [..., k, L], i.e. the k bit planes of the same L bytes in the order the C loops consume them.
"""

from __future__ import annotations

import torch

from .legacy_blocks import Out, f16_col

QK_K = 256


def _planes(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """uint8 [n, g, L] -> uint8 [n, g, len(shifts), L]: (b >> s) & mask for each shift s."""
    key = (tuple(shifts), b.device)
    s = _SHIFTS.get(key)
    if s is None:
        # Made once per device and kept: a host->device copy inside a CUDA graph capture is an error.
        s = _SHIFTS[key] = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(len(shifts), 1)
    return (b.unsqueeze(-2) >> s) & mask


_SHIFTS: dict[tuple, torch.Tensor] = {}


def _affine(dl: torch.Tensor, q: torch.Tensor, ml: torch.Tensor | None, out: Out) -> torch.Tensor:
    """dl * q (- ml) -> float32 [n, 256]. dl/ml: float32 [n, g, 1]; q: small ints [n, g, 256 // g]."""
    n, g = q.shape[0], q.shape[1]
    o = None if out is None else out.view(n, g, -1)
    # mul promotes the integer codes to float32 (exact) in its own pass; sub_ is a separate rounding
    # step as in C (no fused multiply-add).
    r = torch.mul(dl, q, out=o)
    if ml is not None:
        r.sub_(ml)
    return r.view(n, QK_K)


def deq_q2_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q2_K (84 B: 16 B scales|mins nibbles, 64 B 2-bit codes, fp16 d, fp16 dmin) -> float32 [n, 256]."""
    n = blocks.shape[0]
    sc = blocks[:, :16]
    d, dmin = f16_col(blocks[:, 80:82]), f16_col(blocks[:, 82:84])
    dl = (d * (sc & 0x0F).float()).unsqueeze(-1)  # [n, 16, 1] scale per 16 values
    ml = (dmin * (sc >> 4).float()).unsqueeze(-1)  # [n, 16, 1] min per 16 values
    # Two 128-value halves, each 32 bytes read 4 times (shifts 0,2,4,6) -> 16 groups of 16 in order.
    q = _planes(blocks[:, 16:80].view(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
    return _affine(dl, q, ml, out)


def deq_q3_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q3_K (110 B: 32 B hmask, 64 B 2-bit codes, 12 B 6-bit scales, fp16 d) -> float32 [n, 256]."""
    n = blocks.shape[0]
    d = f16_col(blocks[:, 108:110])
    # 16 six-bit scales: low nibbles from bytes 0..7 (low nibble = scales 0..7, high = 8..15) and the two
    # high bits from bytes 8..11 (shift 0,2,4,6 = scales 0-3, 4-7, 8-11, 12-15).
    lo = _planes(blocks[:, 96:104].unsqueeze(1), [0, 4], 0x0F).reshape(n, 16)
    hi = _planes(blocks[:, 104:108].unsqueeze(1), [0, 2, 4, 6], 0x03).reshape(n, 16)
    # Scales are stored with a +32 bias; integer subtraction is exact after the float cast.
    dl = (d * ((lo | (hi << 4)).float() - 32.0)).unsqueeze(-1)  # [n, 16, 1]
    ql = _planes(blocks[:, 32:96].view(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
    # hmask bit j of byte l is the high bit of value 32*j + l (over the whole block): a CLEAR bit means
    # "subtract 4" (code - 4), a set bit means the code stands as is.
    hm = _planes(blocks[:, :32].unsqueeze(1), list(range(8)), 1).reshape(n, 16, 16)
    q = ql.view(torch.int8) - ((hm ^ 1) << 2).view(torch.int8)
    return _affine(dl, q, None, out)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, 12] packed 6-bit scales/mins (get_scale_min_k4) -> (sc, m), each uint8 [n, 8]."""
    # Bytes 0-3: scales 0-3 (low 6 bits) + top 2 bits of scales 4-7; bytes 4-7: same for mins;
    # bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = low 4 bits of mins 4-7.
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    m = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=-1)
    return sc, m


def deq_q4_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q4_K (144 B: fp16 d, fp16 dmin, 12 B scales/mins, 128 B nibbles) -> float32 [n, 256]."""
    n = blocks.shape[0]
    d, dmin = f16_col(blocks[:, 0:2]), f16_col(blocks[:, 2:4])
    sc, m = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).unsqueeze(-1)  # [n, 8, 1] scale per 32 values
    ml = (dmin * m.float()).unsqueeze(-1)
    # Four chunks of 32 bytes; low nibbles are values 0..31 of a 64-chunk, high nibbles 32..63.
    q = _planes(blocks[:, 16:144].view(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    return _affine(dl, q, ml, out)


def deq_q5_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q5_K (176 B: fp16 d, fp16 dmin, 12 B scales/mins, 32 B high bits, 128 B nibbles) -> float32 [n, 256]."""
    n = blocks.shape[0]
    d, dmin = f16_col(blocks[:, 0:2]), f16_col(blocks[:, 2:4])
    sc, m = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).unsqueeze(-1)
    ml = (dmin * m.float()).unsqueeze(-1)
    ql = _planes(blocks[:, 48:176].view(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    # Bit j of qh byte l is the fifth bit of value 32*j + l.
    qh = _planes(blocks[:, 16:48].unsqueeze(1), list(range(8)), 1).reshape(n, 8, 32)
    return _affine(dl, ql | (qh << 4), ml, out)


def deq_q6_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """Q6_K (210 B: 128 B low nibbles, 64 B 2-bit highs, 16 x int8 scales, fp16 d) -> float32 [n, 256]."""
    n = blocks.shape[0]
    d = f16_col(blocks[:, 208:210])
    dl = (d * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)  # [n, 16, 1]
    # Per 128-value half: 64 ql bytes give values 0..63 (low nibbles) and 64..127 (high nibbles);
    # 32 qh bytes give the top 2 bits of values l, l+32, l+64, l+96 (shifts 0, 2, 4, 6).
    ql = _planes(blocks[:, :128].view(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
    qh = _planes(blocks[:, 128:192].view(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 8, 32)
    # Codes carry a +32 bias, removed in int8 (codes are 0..63, so no overflow).
    q = (ql | (qh << 4)).view(torch.int8) - 32
    return _affine(dl, q.reshape(n, 16, 16), None, out)
