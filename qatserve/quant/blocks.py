"""GGML block formats: the registry keyed by GGML type, and the public (de)quantisation front.

Reference semantics are llama.cpp's ggml-quants.c (dequantize_row_*, quantize_row_*_ref); the
implementations are vectorised torch (legacy_blocks.py: 32-value blocks, k_blocks.py: 256-value
K-quant super-blocks) and bit-exact with the reference on every input without fp16 NaN/Inf scales.

gguf.quants (numpy) is the test oracle and agrees byte for byte, except in one corner where it departs
from C: blocks whose chosen max/min is a zero of mixed +0.0/-0.0 signs, where numpy's reductions pick
either zero. We follow the C loops there (the sign bit of a zero fp16 d or m; values decode identically).
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from . import k_blocks as K
from . import legacy_blocks as L

__all__ = ["row_bytes", "dequantize", "quantize", "DEQUANT_TYPES", "QUANT_TYPES"]

_Fn = Callable[[torch.Tensor], torch.Tensor]

# Block-wise kernels: uint8 [n_blocks, type_size] -> float32 [n_blocks, block_size], optionally into `out`.
_DEQUANT: dict[T, Callable[..., torch.Tensor]] = {
    T.Q4_0: L.deq_q4_0,
    T.Q4_1: L.deq_q4_1,
    T.Q5_0: L.deq_q5_0,
    T.Q5_1: L.deq_q5_1,
    T.Q8_0: L.deq_q8_0,
    T.Q2_K: K.deq_q2_k,
    T.Q3_K: K.deq_q3_k,
    T.Q4_K: K.deq_q4_k,
    T.Q5_K: K.deq_q5_k,
    T.Q6_K: K.deq_q6_k,
}
# Block-wise PTQ: float32 [n_blocks, block_size] -> uint8 [n_blocks, type_size].
_QUANT: dict[T, _Fn] = {
    T.Q4_0: L.q_q4_0,
    T.Q4_1: L.q_q4_1,
    T.Q5_0: L.q_q5_0,
    T.Q5_1: L.q_q5_1,
    T.Q8_0: L.q_q8_0,
}
_FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})

DEQUANT_TYPES: frozenset[T] = frozenset(_DEQUANT) | _FLOAT_TYPES
QUANT_TYPES: frozenset[T] = frozenset(_QUANT) | _FLOAT_TYPES

# Blocks per kernel call: big enough to amortise per-op overhead and keep torch's intra-op threads busy,
# small enough that the kernel's temporaries (a few x 4 B per value) stay cache-resident.
_CHUNK_VALUES = 1 << 20


def _qtype(qtype: T | int) -> T:
    return qtype if isinstance(qtype, T) else T(int(qtype))


def row_bytes(qtype: T | int, n_cols: int) -> int:
    """Bytes of one row of `n_cols` values stored as `qtype`.

    Raises ValueError if `n_cols` is not a multiple of the type's block size (or the type is unknown).
    """
    qt = _qtype(qtype)
    if qt not in GGML_QUANT_SIZES:
        raise ValueError(f"unknown GGML type {qt!r}")
    block_size, type_size = GGML_QUANT_SIZES[qt]
    if n_cols < 0 or n_cols % block_size:
        raise ValueError(f"row of {n_cols} values is not a multiple of the {qt.name} block size {block_size}")
    return n_cols // block_size * type_size


def _as_byte_tensor(raw) -> torch.Tensor:
    """Flat uint8 torch view of `raw` (np.ndarray incl. read-only memmap, torch.Tensor, bytes); no copy
    unless `raw` is non-contiguous."""
    if isinstance(raw, torch.Tensor):
        t = raw.reshape(-1)
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    arr = np.asarray(raw) if not isinstance(raw, (bytes, bytearray, memoryview)) else np.frombuffer(raw, np.uint8)
    arr = arr.reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # torch warns that read-only arrays (mmapped GGUF data) are shared writable; we only ever read
        # them, and every output below is freshly allocated.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def dequantize(raw, qtype: T | int, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode GGML-encoded bytes to a float32 tensor.

    raw:   uint8 bytes (np.ndarray / np.memmap view / torch.Tensor), exactly
           prod(shape[:-1]) * row_bytes(qtype, shape[-1]) of them, rows in order. Never written to.
    shape: torch order (rows..., cols).
    Returns a new float32 tensor of `shape` on raw's device, bit-exact with ggml's dequantize_row_*.
    """
    qt = _qtype(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("dequantize needs at least one dimension")
    if qt not in DEQUANT_TYPES:
        raise NotImplementedError(f"dequantization of {qt.name} is not supported")
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    nbytes = n_rows * row_bytes(qt, shape[-1])
    b = _as_byte_tensor(raw)
    if b.numel() != nbytes:
        raise ValueError(f"{qt.name} {shape} needs {nbytes} bytes, got {b.numel()}")

    if qt == T.F32:
        # clone: the source may be a read-only mmap, and callers expect to own the result.
        return b.view(torch.float32).clone().view(shape)
    if qt == T.F16:
        return b.view(torch.float16).float().view(shape)
    if qt == T.BF16:
        # bf16 is the top half of an fp32, so widening is a bit move and exact for every pattern (NaN too).
        return b.view(torch.bfloat16).float().view(shape)

    block_size, type_size = GGML_QUANT_SIZES[qt]
    fn = _DEQUANT[qt]
    blocks = b.view(-1, type_size)
    n_blocks = blocks.shape[0]
    chunk = max(1, _CHUNK_VALUES // block_size)
    if n_blocks <= chunk:
        return fn(blocks).view(shape)
    out = torch.empty((n_blocks, block_size), dtype=torch.float32, device=b.device)
    for i in range(0, n_blocks, chunk):  # loop over chunks (not blocks): temporaries stay in cache
        fn(blocks[i : i + chunk], out[i : i + chunk])
    return out.view(shape)


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> uint8 [..., 2]: ggml_compute_fp32_to_bf16 (NaN -> quiet NaN, else round-to-even)."""
    # int32 arithmetic stands in for C's uint32: the sum below never carries past bit 31 of the unsigned
    # value, so wrap-around and the arithmetic shift leave the low 16 result bits identical.
    n = x.view(torch.int32)
    # A NaN keeps sign and top mantissa bits but gets the quiet bit, so truncation cannot make it Inf.
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & -0x10000) | (64 << 16), n)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, is round-half-to-even on the dropped half.
    r = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    # Sign-extend the low 16 bits so the int16 cast is exact (no reliance on a wrapping narrow cast).
    r = ((r & 0xFFFF) ^ 0x8000) - 0x8000
    return r.to(torch.int16).view(torch.uint8)


def quantize(x, qtype: T | int) -> np.ndarray:
    """Encode float values as GGML `qtype` bytes (PTQ with llama.cpp's reference rounding).

    x: float array/tensor [..., n] (cast to float32 first; n a multiple of the block size).
    Returns uint8 np.ndarray [..., row_bytes(qtype, n)], bit-exact with quantize_row_*_ref.
    """
    qt = _qtype(qtype)
    if qt not in QUANT_TYPES:
        raise NotImplementedError(f"quantization to {qt.name} is not supported")
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    t = t.to(device="cpu", dtype=torch.float32).contiguous()
    if t.dim() == 0:
        raise ValueError("quantize needs at least one dimension")
    lead, n = tuple(t.shape[:-1]), t.shape[-1]
    rb = row_bytes(qt, n)

    if qt in _FLOAT_TYPES:
        flat, block_size, fn = t.view(-1, 1), 1, _FLOAT_QUANT[qt]
    else:
        block_size, fn = GGML_QUANT_SIZES[qt][0], _QUANT[qt]
        flat = t.view(-1, block_size)
    chunk = max(1, _CHUNK_VALUES // block_size)
    out = torch.cat([fn(flat[i : i + chunk]) for i in range(0, max(flat.shape[0], 1), chunk)])
    return out.reshape(*lead, rb).numpy()


# Float "quantisers": float32 [n, 1] -> uint8 [n, bytes per value]. F16 is round-to-nearest-even, as numpy.
_FLOAT_QUANT: dict[T, _Fn] = {
    T.F32: lambda v: v.view(torch.uint8).clone(),
    T.F16: lambda v: v.half().view(torch.uint8),
    T.BF16: lambda v: _bf16_bytes(v).view(-1, 2),
}
