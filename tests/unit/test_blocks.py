"""Bit-exactness of qatserve.quant.blocks against gguf.quants (the reference oracle, test-time only)."""

from __future__ import annotations


import gguf.quants as ref
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from qatserve.quant import blocks as B

DEQ = sorted(B.DEQUANT_TYPES, key=int)
QNT = sorted(B.QUANT_TYPES, key=int)
SHAPES = [(1, 256), (3, 512), (2, 3, 256), (4, 1, 768)]  # multiples of 256 suit both block sizes

# Byte offsets of the fp16 scale fields inside each block; everything else is free random bits.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def _finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random finite fp16 values spanning subnormals to large magnitudes, both signs, as uint8 [n, 2]."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent all-ones (Inf/NaN) -> clear one exponent bit
    return bits.view(np.uint8).reshape(n, 2)


def _random_raw(rng: np.random.Generator, qt: T, shape: tuple[int, ...]) -> np.ndarray:
    """Random encoded bytes for `shape`, as uint8 [rows..., row_bytes] with finite float fields."""
    rows, n = shape[:-1], shape[-1]
    bs, ts = GGML_QUANT_SIZES[qt]
    n_blocks = int(np.prod(shape)) // bs
    if qt == T.F32:
        raw = rng.standard_normal(n_blocks, dtype=np.float32).view(np.uint8)
    elif qt == T.F16:
        raw = _finite_f16(rng, n_blocks)
    elif qt == T.BF16:
        raw = (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
        for off in F16_FIELDS[qt]:
            raw[:, off : off + 2] = _finite_f16(rng, n_blocks)
    return raw.reshape(*rows, B.row_bytes(qt, n))


def _oracle_deq(raw: np.ndarray, qt: T) -> np.ndarray:
    if qt == T.BF16:  # gguf routes BF16 through its trait class, F32/F16 through views
        return ref.dequantize(raw, qt)
    return ref.dequantize(raw, qt).astype(np.float32)


def _same_bits(a: torch.Tensor, b: np.ndarray) -> bool:
    """Bitwise equality of float32 arrays (NaN-safe, distinguishes -0.0 from 0.0)."""
    a = a.numpy()
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qt", DEQ, ids=lambda q: q.name)
def test_dequantize_bit_exact(qt: T, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(int(qt) * 1000 + len(shape) * 10 + shape[-1])
    raw = _random_raw(rng, qt, shape)
    want = _oracle_deq(raw, qt).reshape(shape)
    got = B.dequantize(raw, qt, shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    assert _same_bits(got, want)
    # Same bytes handed over flat, as a torch tensor, and through a read-only memmap-like view.
    assert _same_bits(B.dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qt), shape), want)
    ro = raw.reshape(-1).copy()
    ro.flags.writeable = False
    assert _same_bits(B.dequantize(ro, qt, shape), want)


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda q: q.name)
def test_dequantize_many_blocks_chunked(qt: T) -> None:
    """More blocks than one kernel chunk: the chunk loop must stitch rows in order."""
    shape = (64, 1 << 16)
    raw = _random_raw(np.random.default_rng(7), qt, shape)
    assert _same_bits(B.dequantize(raw, qt, shape), _oracle_deq(raw, qt).reshape(shape))


def _test_inputs(rng: np.random.Generator, n_blocks: int) -> list[np.ndarray]:
    """float32 [n_blocks, 256] inputs at several scales, with all-zero and negative-maximum blocks."""
    out = []
    for scale in (1e-30, 1e-4, 1.0, 3e3):
        x = (rng.standard_normal((n_blocks, 256)) * scale).astype(np.float32)
        x[0] = 0.0  # all-zero row (every block of it zero)
        x[1, :32] = -np.abs(x[1, :32])  # negative-only block
        x[1, 32 + 5] = -10 * scale  # block whose largest magnitude is negative
        x[2, :32] = np.float32(scale)  # constant block (max == min)
        x[2, 64:96] = np.float32(scale) * (np.arange(32) % 2 * 2 - 1)  # -max and +max tie: first wins
        x[2, 96:128] = -x[2, 64:96]  # +max first
        out.append(x)
    # Values that land exactly on rounding boundaries (x.5 after scaling) in some blocks.
    out.append(np.tile(np.arange(-128, 128, dtype=np.float32) / 4, (n_blocks, 1)))
    out.append(rng.uniform(-1, 1, (n_blocks, 256)).astype(np.float32) ** 3)
    return out


@pytest.mark.parametrize("qt", QNT, ids=lambda q: q.name)
def test_quantize_bit_exact(qt: T) -> None:
    rng = np.random.default_rng(int(qt))
    for x in _test_inputs(rng, 8):
        want = ref.quantize(x, qt).view(np.uint8).reshape(8, -1)
        got = B.quantize(x, qt)
        assert got.dtype == np.uint8 and got.shape == (8, B.row_bytes(qt, 256))
        assert np.array_equal(got, want)
        assert np.array_equal(B.quantize(torch.from_numpy(x), int(qt)), want)


def _c_scales(block: np.ndarray, qt: T) -> list[np.float32]:
    """Scalar transliteration of the scale selection in ggml-quants.c quantize_row_*_ref (d, then m)."""
    f = np.float32
    if qt in (T.Q4_0, T.Q5_0):
        amax, mx = f(0.0), f(0.0)
        for v in block:
            if amax < abs(v):
                amax, mx = abs(v), v
        return [mx / f(-8 if qt == T.Q4_0 else -16)]
    if qt in (T.Q4_1, T.Q5_1):
        mn, mx = f(np.finfo(np.float32).max), f(-np.finfo(np.float32).max)
        for v in block:
            mn = v if v < mn else mn
            mx = v if v > mx else mx
        return [(mx - mn) / f(15 if qt == T.Q4_1 else 31), mn]
    amax = f(0.0)
    for v in block:
        amax = max(amax, abs(v))
    return [amax / f(127)]


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda q: q.name)
def test_quantize_signed_zeros_follow_c(qt: T) -> None:
    """Blocks of mixed +0.0/-0.0 (and zeros beside negatives): the fp16 sign bits of d and m follow the C
    loops. gguf's numpy reductions pick an arbitrary zero here, so C is the oracle for the scale fields and
    gguf for the codes (identical, as every code of such a block is the zero point or exact)."""
    z = np.arange(32) % 2 == 1
    blocks = np.stack([
        np.full(32, -0.0), np.where(z, -0.0, 0.0), np.where(z, 0.0, -0.0),
        np.where(z, -0.0, -1.5), np.where(z, 0.0, -1.5), np.where(z, -0.0, 2.0), np.zeros(32),
    ]).astype(np.float32)
    got = B.quantize(blocks, qt)
    want = ref.quantize(blocks, qt).view(np.uint8)
    n_scales = len(_c_scales(blocks[0], qt))
    for blk, g, w in zip(blocks, got, want):
        scales = np.array(_c_scales(blk, qt), np.float32).astype(np.float16).view(np.uint8)
        assert np.array_equal(g[: 2 * n_scales], scales)
        assert np.array_equal(g[2 * n_scales :], w[2 * n_scales :])


@pytest.mark.parametrize("shape", [(256,), (2, 3, 256), (5, 1024)], ids=str)
@pytest.mark.parametrize("qt", QNT, ids=lambda q: q.name)
def test_quantize_shapes_roundtrip(qt: T, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    q = B.quantize(x, qt)
    assert q.shape == (*shape[:-1], B.row_bytes(qt, shape[-1]))
    assert np.array_equal(q.view(np.uint8), ref.quantize(x, qt).view(np.uint8).reshape(q.shape))
    # Round trip through our own dequantizer equals the oracle's.
    back = B.dequantize(q, qt, shape)
    assert _same_bits(back, _oracle_deq(q, qt).reshape(shape))


def test_bf16_nan_and_rounding() -> None:
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, 3.4e38], np.float32)
    x = np.concatenate([x, np.frombuffer(np.uint32([0x7F800001, 0xFFFFFFFF]).tobytes(), np.float32)])
    assert np.array_equal(B.quantize(x, T.BF16), ref.quantize(x, T.BF16))


def test_row_bytes_and_errors() -> None:
    assert B.row_bytes(T.Q8_0, 640) == 20 * 34
    assert B.row_bytes(int(T.Q4_K), 512) == 2 * 144
    assert B.row_bytes(T.F16, 3) == 6
    for qt in DEQ:
        bs, ts = GGML_QUANT_SIZES[qt]
        assert B.row_bytes(qt, 4 * bs) == 4 * ts
    with pytest.raises(ValueError):
        B.row_bytes(T.Q4_0, 48)
    with pytest.raises(ValueError):
        B.row_bytes(T.Q6_K, 128)
    with pytest.raises(ValueError):
        B.dequantize(np.zeros(35, np.uint8), T.Q8_0, (1, 32))
    with pytest.raises(ValueError):
        B.quantize(np.zeros((2, 48), np.float32), T.Q8_0)
    with pytest.raises(NotImplementedError):
        B.quantize(np.zeros(256, np.float32), T.Q4_K)
    assert B.DEQUANT_TYPES >= B.QUANT_TYPES
    assert len(B.DEQUANT_TYPES) == 13 and len(B.QUANT_TYPES) == 8


def test_dequantize_does_not_write_to_source() -> None:
    raw = _random_raw(np.random.default_rng(3), T.F32, (4, 32))
    raw.flags.writeable = False
    out = B.dequantize(raw, T.F32, (4, 32))
    out.fill_(0)  # the result must be a private copy
    assert np.array_equal(raw.view(np.float32).reshape(4, 32), _oracle_deq(raw, T.F32).reshape(4, 32))
    assert not np.all(raw == 0)
