"""GGUF weight blocks -> the GPU layout the Triton matmul kernels read (exact, once, at load time).

A GGUF row interleaves scales and codes in blocks of 18, 22, 34, 144 or 210 bytes, so a block never
starts on a 16-byte boundary and a thread cannot fetch its codes with one 16-byte load. `repack`
splits each matrix W [N, K] (N = out_features rows, K = in_features) into separate, row-major,
contiguous planes; every value keeps its exact code and scale (no re-quantisation), and
`dequantize_packed` decodes the planes bit-exactly as ggml's dequantize_row_* does.

Planes (k = value index within a row; SB = sub-block size, 32, or 16 for Q6_K):

| plane | dtype, shape | contents |
|---|---|---|
| lo | int32 [N, K/8] | low 4 bits of each code: value k in bits 4*(k%8).. of word k//8 (natural order) |
| q8 | int8 [N, K] | Q8_0 only, instead of lo: the signed codes |
| hi | int32 [N, K/32] | Q5_*: bit 4 of value k's code in bit k%32 of word k//32 |
|    | int32 [N, K/16] | Q6_K: bits 4-5 of value k's code in bits 2*(k%16).. of word k//16 |
| scale | fp16 [N, K/32] | legacy types: d per 32-block |
|       | uint8 [N, K/32] | Q4_K/Q5_K: the 6-bit sub-block scale (unpacked from get_scale_min_k4) |
|       | int8 [N, K/16] | Q6_K: the sub-block scale |
| minv | fp16 [N, K/32] | Q4_1/Q5_1: m per 32-block |
|      | uint8 [N, K/32] | Q4_K/Q5_K: the 6-bit sub-block min |
| d, dmin | fp16 [N, K/256] | K-quants: super-block scale (and min scale) |

Every value is w = a * (q - off) + b with an integer code q, a per-sub-block scale a and offset b:
Q4_0 a=d, off=8; Q4_1 a=d, b=m; Q5_0 a=d, off=16; Q5_1 a=d, b=m; Q8_0 a=d, q signed; Q4_K/Q5_K
a=d*sc, b=-dmin*m; Q6_K a=d*sc, off=32. fp16 d times a 6- or 8-bit integer fits fp32's 24-bit
mantissa, so a is exact in fp32, as it is in ggml's own float code.

Bytes per weight match the GGUF block sizes except Q4_K/Q5_K (+2.8% / +2.3%: their 12-byte packed
6-bit scales become one byte each, which a thread can load without cross-lane unpacking).
The natural value order (instead of GGUF's split low/high halves) lets a kernel expand one int32
word into 8 consecutive values with a broadcast shift and read x contiguously.

Torch only (no Triton, no gguf): runs on CPU or on the weights' GPU, in row chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..k_blocks import _scale_min_k4
from ..legacy_blocks import _high_bits, _nibbles

# GGML type ids (gguf.GGMLQuantizationType values; gguf itself is not needed on the GPU host).
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14


@dataclass(frozen=True)
class Format:
    """Static description of one GGML type in the GPU layout."""

    name: str
    qtype: int
    block: int      # values per GGUF block
    type_size: int  # bytes per GGUF block
    sb: int         # values per scale (sub-block)
    off: int        # code offset: w = a * (q - off) + b
    hi_bits: int    # 0, 1 (Q5_*) or 2 (Q6_K) high code bits in the hi plane
    kquant: bool    # scale = integer sub-scale * fp16 super-block d
    has_min: bool   # b != 0 (Q4_1, Q5_1, Q4_K, Q5_K)


FORMATS: dict[int, Format] = {f.qtype: f for f in [
    Format("Q4_0", Q4_0, 32, 18, 32, 8, 0, False, False),
    Format("Q4_1", Q4_1, 32, 20, 32, 0, 0, False, True),
    Format("Q5_0", Q5_0, 32, 22, 32, 16, 1, False, False),
    Format("Q5_1", Q5_1, 32, 24, 32, 0, 1, False, True),
    Format("Q8_0", Q8_0, 32, 34, 32, 0, 0, False, False),
    Format("Q4_K", Q4_K, 256, 144, 32, 0, 0, True, True),
    Format("Q5_K", Q5_K, 256, 176, 32, 0, 1, True, True),
    Format("Q6_K", Q6_K, 256, 210, 16, 32, 2, True, False),
]}


def fmt(qtype) -> Format:
    """The Format of a GGML type (int or gguf.GGMLQuantizationType); ValueError if unsupported."""
    f = FORMATS.get(int(qtype))
    if f is None:
        raise ValueError(f"no GPU layout for GGML type {qtype!r}")
    return f


@dataclass
class PackedWeights:
    """One matrix W [N, K] in the GPU layout (planes as in the module docstring; None where unused)."""

    fmt: Format
    N: int
    K: int
    lo: torch.Tensor | None
    q8: torch.Tensor | None
    hi: torch.Tensor | None
    scale: torch.Tensor
    minv: torch.Tensor | None
    d: torch.Tensor | None
    dmin: torch.Tensor | None

    def planes(self) -> list[torch.Tensor]:
        return [t for t in (self.lo, self.q8, self.hi, self.scale, self.minv, self.d, self.dmin) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads for one pass over W."""
        return sum(t.numel() * t.element_size() for t in self.planes())

    @property
    def device(self) -> torch.device:
        return self.scale.device


# -------------------------------------------------------------------------------------------- packing
def _pack(v: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [n, K] codes of `bits` bits -> int32 [n, K*bits/32]: value k at bit bits*(k % (32/bits))
    of word k // (32/bits) (packed LSB-first into bytes, bytes little-endian into words)."""
    per = 8 // bits
    n, k = v.shape
    sh = torch.arange(0, 8, bits, dtype=torch.int32, device=v.device)
    b = (v.view(n, k // per, per).to(torch.int32) << sh).sum(-1).to(torch.uint8)  # < 256: exact
    return b.view(n, -1, 4).contiguous().view(torch.int32).view(n, -1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, nb, 2] (little-endian fp16 fields) -> fp16 [n, nb]."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _codes(f: Format, blk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 [n, nb, type_size] -> (low 4 bits uint8 [n, K] or int8 codes [n, K] for Q8_0,
    high bits uint8 [n, K] or None), both in natural value order."""
    n, nb, _ = blk.shape
    if f.qtype == Q8_0:
        return blk[:, :, 2:].contiguous().view(torch.int8).reshape(n, -1), None
    if not f.kquant:
        qs_at = {Q4_0: 2, Q4_1: 4, Q5_0: 6, Q5_1: 8}[f.qtype]
        lo = _nibbles(blk[:, :, qs_at:].reshape(n * nb, 16)).view(n, -1)
        hi = None
        if f.hi_bits:
            hi = _high_bits(blk[:, :, qs_at - 4:qs_at].reshape(n * nb, 4)).view(n, -1)
        return lo, hi
    if f.qtype in (Q4_K, Q5_K):
        # 4 chunks of 32 bytes: low nibbles are values 64c + l, high nibbles 64c + 32 + l.
        qs = blk[:, :, -128:].reshape(n, nb, 4, 1, 32)
        lo = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(n, -1)
        hi = None
        if f.qtype == Q5_K:
            # Bit j of qh byte l is bit 4 of value 32j + l.
            sh = torch.arange(8, dtype=torch.uint8, device=blk.device).view(8, 1)
            hi = ((blk[:, :, 16:48].reshape(n, nb, 1, 32) >> sh) & 1).reshape(n, -1)
        return lo, hi
    # Q6_K: per 128-half, ql byte l (< 64): low nibble = value l, high = value 64 + l; qh byte l (< 32):
    # bit pair s = bits 4-5 of value 32s + l.
    ql = blk[:, :, 0:128].reshape(n, nb, 2, 1, 64)
    lo = torch.cat([ql & 0x0F, ql >> 4], dim=3).reshape(n, -1)
    sh = torch.arange(0, 8, 2, dtype=torch.uint8, device=blk.device).view(4, 1)
    hi = ((blk[:, :, 128:192].reshape(n, nb, 2, 1, 32) >> sh) & 3).reshape(n, -1)
    return lo, hi


def _pack_rows(f: Format, blk: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 [n, nb, type_size] GGUF blocks of n whole rows -> the planes of those rows."""
    n, nb, _ = blk.shape
    lo, hi = _codes(f, blk)
    out = {"q8": lo} if f.qtype == Q8_0 else {"lo": _pack(lo, 4)}
    if hi is not None:
        out["hi"] = _pack(hi, f.hi_bits)
    if not f.kquant:
        out["scale"] = _f16(blk[:, :, 0:2])
        if f.has_min:
            out["minv"] = _f16(blk[:, :, 2:4])
    elif f.qtype == Q6_K:
        out["scale"] = blk[:, :, 192:208].contiguous().view(torch.int8).reshape(n, -1)
        out["d"] = _f16(blk[:, :, 208:210])
    else:
        sc, m = _scale_min_k4(blk[:, :, 4:16].reshape(n * nb, 12))
        out["scale"], out["minv"] = sc.reshape(n, -1), m.reshape(n, -1)
        out["d"], out["dmin"] = _f16(blk[:, :, 0:2]), _f16(blk[:, :, 2:4])
    return out


def _as_bytes(raw, device) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        t = raw.reshape(-1)
        t = t if t.dtype == torch.uint8 else t.view(torch.uint8)
    else:
        a = np.asarray(raw).reshape(-1).view(np.uint8)
        # from_numpy needs a writable buffer (a GGUF memmap is read-only); nothing here writes to it.
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t.to(device)


def repack(raw, qtype, in_features: int, out_features: int, device=None,
           rows_per_chunk: int = 8192) -> PackedWeights:
    """GGUF rows (uint8: np.ndarray, memmap, torch tensor or bytes; out_features rows of
    in_features values) -> PackedWeights on `device` (default: raw's device, or CPU).

    Work happens on `device` in chunks of rows_per_chunk rows, so temporaries stay a few bytes per
    weight of one chunk. Raises ValueError on a wrong byte count or a row length that is not a
    multiple of the block size."""
    f = fmt(qtype)
    N, K = int(out_features), int(in_features)
    if K <= 0 or N <= 0 or K % f.block:
        raise ValueError(f"{f.name}: in_features {K} must be a positive multiple of {f.block}")
    if device is None:
        device = raw.device if isinstance(raw, torch.Tensor) else "cpu"
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, np.uint8)
    nb = K // f.block
    want = N * nb * f.type_size
    got = raw.numel() * raw.element_size() if isinstance(raw, torch.Tensor) else np.asarray(raw).nbytes
    if got != want:
        raise ValueError(f"{f.name} [{N}, {K}] needs {want} bytes, got {got}")
    flat = raw.reshape(-1) if isinstance(raw, torch.Tensor) else np.asarray(raw).reshape(-1)
    row = nb * f.type_size
    parts: dict[str, list[torch.Tensor]] = {}
    for r0 in range(0, N, rows_per_chunk):
        r1 = min(N, r0 + rows_per_chunk)
        blk = _as_bytes(flat[r0 * row:r1 * row], device).view(r1 - r0, nb, f.type_size)
        for key, t in _pack_rows(f, blk).items():
            parts.setdefault(key, []).append(t)
    planes = {key: torch.cat(ts) if len(ts) > 1 else ts[0].contiguous() for key, ts in parts.items()}
    return PackedWeights(f, N, K, planes.get("lo"), planes.get("q8"), planes.get("hi"), planes["scale"],
                         planes.get("minv"), planes.get("d"), planes.get("dmin"))


# ------------------------------------------------------------------------------------------- decoding
def _unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [n, W] -> int32 [n, W * 32/bits] fields of `bits` bits, LSB first (inverse of _pack)."""
    sh = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> sh) & ((1 << bits) - 1)).reshape(words.shape[0], -1)


def scales(w: PackedWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a, b) float32 [N, K/SB]: the exact per-sub-block scale and offset (None: no offset)."""
    f = w.fmt
    if not f.kquant:
        a = w.scale.float()
        return a, (w.minv.float() if f.has_min else None)
    per = 256 // f.sb  # sub-blocks per super-block
    a = w.d.float().repeat_interleave(per, dim=1) * w.scale.float()
    if not f.has_min:
        return a, None
    return a, -(w.dmin.float().repeat_interleave(per, dim=1) * w.minv.float())


def codes(w: PackedWeights) -> torch.Tensor:
    """int32 [N, K]: q - off for every value (the integer that the scale multiplies)."""
    f = w.fmt
    if f.qtype == Q8_0:
        return w.q8.to(torch.int32)
    q = _unpack(w.lo, 4)
    if f.hi_bits:
        q = q | (_unpack(w.hi, f.hi_bits) << 4)
    return q - f.off


def row_slice(w: PackedWeights, r0: int, r1: int) -> PackedWeights:
    """Rows r0:r1 of W as views of w's planes (for chunked references over big matrices)."""
    def cut(t):
        return None if t is None else t[r0:r1]
    return PackedWeights(w.fmt, r1 - r0, w.K, cut(w.lo), cut(w.q8), cut(w.hi), cut(w.scale), cut(w.minv),
                         cut(w.d), cut(w.dmin))


def dequantize_packed(w: PackedWeights) -> torch.Tensor:
    """float32 [N, K], bit-exact with ggml's dequantize_row_* of the original blocks (torch reference
    of what the kernels compute)."""
    a, b = scales(w)
    q = codes(w).float().view(w.N, -1, w.fmt.sb)
    # Separate mul and add (two roundings, as in C); a * q is exact anyway.
    y = q * a.unsqueeze(-1)
    if b is not None:
        y = y + b.unsqueeze(-1)
    return y.view(w.N, w.K)


# ------------------------------------------------------------------------------------- test material
def random_blocks(qtype, n_rows: int, k: int, generator: torch.Generator | None = None,
                  scale: float = 0.01, device=None) -> torch.Tensor:
    """Random well-formed GGUF rows (uint8 [n_rows, row_bytes] on `device`, default the generator's or
    CPU) of any format here: random code bytes, random fp16 scales of about `scale` (signed where the
    format allows, positive super-block d/dmin for K-quants). For tests and benchmarks: K-quants have
    no quantiser in gguf.quants, and a benchmark host may have no gguf at all."""
    f = fmt(qtype)
    g = generator
    dev = device if device is not None else (g.device if g is not None else "cpu")
    nb = k // f.block
    blk = torch.randint(0, 256, (n_rows, nb, f.type_size), dtype=torch.uint8, generator=g, device=dev)

    def put(at: int, values: torch.Tensor) -> None:
        blk[:, :, at:at + 2] = values.half().contiguous().view(torch.uint8).view(n_rows, nb, 2)

    def uni(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n_rows, nb, generator=g, device=dev)

    sign = torch.where(torch.rand(n_rows, nb, generator=g, device=dev) < 0.5, -1.0, 1.0)
    if f.qtype == Q6_K:
        put(208, uni(0.5, 1.5) * scale / 32)  # int8 sub-scales (|sc| < 128) multiply d
    elif f.kquant:
        put(0, uni(0.5, 1.5) * scale / 16)   # 6-bit sub-scales and mins
        put(2, uni(0.5, 1.5) * scale / 16)
    else:
        put(0, sign * uni(0.5, 1.5) * scale)
        if f.has_min:
            put(2, torch.randn(n_rows, nb, generator=g, device=dev) * scale * 8)
    return blk.view(n_rows, nb * f.type_size)
