"""QuantLinear / QuantEmbedding against gguf's reference dequantisation + a float64 matmul.

Bounds (relative to max |y_ref|):
- accuracy_level 0 (float activations): < 1e-3; the repacking is exact, so only fp32 matmul rounding remains.
- accuracy_level 4 (activations quantised to int8 per 32/16-value block, as llama.cpp's CPU path does with
  Q8_0/Q8_K): < 3e-2. An int8 activation block has relative step 1/127 per element; the errors are
  independent across blocks, so the output error is ~0.5% of max |y| for random data; 3e-2 leaves margin.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from qatserve.quant import linear as L
from qatserve.quant.kernels import cpu

ORT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
# fp16 scale offsets inside a block: (offset of d, offset of a second fp16 "min"/dmin or None)
_F16_FIELDS = {T.Q4_0: (0, None), T.Q4_1: (0, 2), T.Q5_0: (0, None), T.Q5_1: (0, 2), T.Q8_0: (0, None),
               T.Q2_K: (80, 82), T.Q3_K: (108, None), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208, None)}


def random_blocks(qtype, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """uint8 [n_rows, row_bytes]: random codes/sub-scales with finite random fp16 scales and mins."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(n_rows * n_cols // block, size), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        if off is not None:
            v = (rng.standard_normal(b.shape[0]) * 0.02).astype(np.float16)
            b[:, off:off + 2] = v.view(np.uint8).reshape(-1, 2)
    return b.reshape(n_rows, -1)


def reference(raw, qtype, x: torch.Tensor) -> np.ndarray:
    w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    return x.double().numpy() @ w.T


def rel_err(y: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(y.double().numpy() - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("batch", [1, 7, 40])  # 40 >= SPLIT_ROWS: rows split over the thread pool
@pytest.mark.parametrize("qtype", ORT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("level,bound", [(0, 1e-3), (4, 3e-2)])
def test_ort_matches_dequantised_matmul(qtype, batch, level, bound):
    n_out, n_in = 48, 512
    raw = random_blocks(qtype, n_out, n_in)
    layer = L.QuantLinear(raw, qtype, n_in, n_out, accuracy_level=level)
    assert layer.backend_name == "ort"
    x = torch.randn(batch, n_in, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert y.shape == (batch, n_out) and y.dtype == torch.float32
    assert rel_err(y, reference(raw, qtype, x)) < bound


def test_leading_dims_and_memmap(tmp_path):
    raw = random_blocks(T.Q4_K, 64, 256)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    layer = L.QuantLinear(mm, T.Q4_K, 256, 64, accuracy_level=0)
    x = torch.randn(2, 3, 256)
    y = layer(x)
    assert y.shape == (2, 3, 64)
    ref = reference(raw, T.Q4_K, x.reshape(6, 256)).reshape(2, 3, 64)
    assert rel_err(y, ref) < 1e-3


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.F16, T.F32], ids=lambda t: t.name)
def test_torch_fallback(qtype):
    n_out, n_in = 16, 256
    if qtype in (T.F16, T.F32):
        dtype = np.float16 if qtype == T.F16 else np.float32
        w = np.random.default_rng(0).standard_normal((n_out, n_in)).astype(dtype)
        raw = w.view(np.uint8).reshape(n_out, -1)
        ref_w = w.astype(np.float64)
    else:
        raw = random_blocks(qtype, n_out, n_in)
        ref_w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    layer = L.QuantLinear(raw, qtype, n_in, n_out)
    assert layer.backend_name == "torch"
    x = torch.randn(7, n_in)
    assert rel_err(layer(x), x.double().numpy() @ ref_w.T) < 1e-5


def test_ort_backend_rejects_unmapped_type():
    with pytest.raises(ValueError):
        L.QuantLinear(random_blocks(T.Q2_K, 4, 256), T.Q2_K, 256, 4, backend="ort")


def test_wrong_size_rejected():
    with pytest.raises(ValueError):
        L.QuantLinear(random_blocks(T.Q8_0, 4, 64)[:3], T.Q8_0, 64, 4)


def test_repack_codes_exact():
    """The repacked codes and scales reproduce the GGUF dequantisation bit for bit (no matmul)."""
    for qtype in ORT_TYPES:
        n_out, n_in = 8, 512
        raw = random_blocks(qtype, n_out, n_in, seed=3)
        w = cpu.repack(raw, qtype, n_in, n_out)
        codes = w.packed.reshape(n_out, n_in // w.block, -1)
        if w.bits == 4:
            codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(n_out, n_in // w.block, w.block)
        q = codes.astype(np.float64) - 2 ** (w.bits - 1)
        deq = q * w.scales.reshape(n_out, -1, 1).astype(np.float64)
        deq = deq.reshape(n_out, n_in)
        if w.offsets is not None:
            deq += np.repeat(w.offsets.T.astype(np.float64), 32, axis=1)
        ref = gguf.quants.dequantize(raw, qtype).astype(np.float64)
        assert np.abs(deq - ref).max() <= 1e-6 * np.abs(ref).max(), qtype.name


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_embedding_rows_exact(qtype):
    n_vocab, dim = 50, 256
    if qtype == T.F16:
        raw = np.random.default_rng(0).standard_normal((n_vocab, dim)).astype(np.float16).view(np.uint8)
        table = raw.view(np.float16).astype(np.float32)
    else:
        raw = random_blocks(qtype, n_vocab, dim)
        table = gguf.quants.dequantize(raw, qtype)
    emb = L.QuantEmbedding(raw, qtype, n_vocab, dim)
    ids = torch.tensor([[3, 0, 49], [7, 7, 12]])
    out = emb(ids)
    assert out.shape == (2, 3, dim) and out.dtype == torch.float32
    assert np.array_equal(out.numpy(), table[ids.numpy()])


def test_set_cpu_threads_roundtrip():
    before = torch.get_num_threads()
    L.set_cpu_threads(1)
    try:
        raw = random_blocks(T.Q8_0, 32, 64)
        y = L.QuantLinear(raw, T.Q8_0, 64, 32, accuracy_level=0)(torch.randn(40, 64))
        assert y.shape == (40, 32)
    finally:
        L.set_cpu_threads(before)


def test_fused_equals_concatenated_parts():
    """q|k|v of the real model mix Q5_0 and Q8_0 (both 8-bit block 32); Q5_1 adds per-block offsets."""
    specs = [(T.Q5_0, 64), (T.Q8_0, 32), (T.Q5_1, 16)]
    parts = [L.QuantLinear(random_blocks(q, n, 256, seed=i), q, 256, n, accuracy_level=0)
             for i, (q, n) in enumerate(specs)]
    fused = L.QuantLinear.fused(parts)
    x = torch.randn(3, 256)
    ref = np.concatenate([reference(p._raw.reshape(p.out_features, -1), p.qtype, x) for p in parts], axis=1)
    assert fused(x).shape == (3, 112)
    assert rel_err(fused(x), ref) < 1e-3
    with pytest.raises(ValueError):
        L.QuantLinear.fused([parts[0], L.QuantLinear(random_blocks(T.Q4_K, 8, 256), T.Q4_K, 256, 8)])


def test_early_kernels_are_taken_in_order_or_dropped():
    # The server queues kernels before the model exists (kernels/cpu.py, build_early): a layer over the
    # same bytes takes the very session built early; a dropped queue hands out nothing.
    raws = [random_blocks(T.Q4_0, 64, 128, seed=i) for i in range(3)]
    for raw in raws:
        cpu.build_early(raw, T.Q4_0, 128, 64, threads=1)
    layers = [L.QuantLinear(raw, T.Q4_0, 128, 64) for raw in raws]
    taken = cpu.take_early(raws[1], T.Q4_0, 128, 64, L.ACCURACY_LEVEL, 1)
    assert taken is not None
    layers[1].prepare()  # its early session was just taken: it builds its own, equal one
    x = torch.randn(3, 128)
    y = taken.run(None, {"X": x.numpy()})[0]
    assert np.array_equal(y, layers[1](x).numpy())
    for raw in raws[:1]:
        assert cpu.take_early(raw, T.Q4_0, 128, 64, L.ACCURACY_LEVEL, threads=2) is None  # other settings
    cpu.drop_early()
    assert cpu.take_early(raws[0], T.Q4_0, 128, 64, L.ACCURACY_LEVEL, 1) is None
    assert cpu.take_early(raws[2], T.Q4_0, 128, 64, L.ACCURACY_LEVEL, 1) is None
    layers[2].prepare()
    assert np.allclose(layers[2](x).numpy(), reference(raws[2], T.Q4_0, x), atol=5e-2 * float(np.abs(reference(raws[2], T.Q4_0, x)).max()))
