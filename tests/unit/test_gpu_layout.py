"""GGUF blocks -> the Triton kernels' GPU layout (kernels/gpu_layout.py): exact, checked against gguf.quants."""

from __future__ import annotations

import subprocess
import sys

import gguf.quants as ref
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qatserve.quant.kernels import gpu_layout as L

ALL = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qt", ALL, ids=lambda t: t.name)
def test_repack_is_exact_on_random_blocks(qt):
    g = torch.Generator().manual_seed(int(qt))
    n, k = 37, 512
    raw = L.random_blocks(qt, n, k, g)
    want = ref.dequantize(raw.numpy(), qt).reshape(n, k)
    w = L.repack(raw.numpy(), qt, k, n, rows_per_chunk=16)  # several chunks, one partial
    np.testing.assert_array_equal(_bits(L.dequantize_packed(w).numpy()), _bits(want))
    # Row slices decode to the same rows.
    np.testing.assert_array_equal(_bits(L.dequantize_packed(L.row_slice(w, 5, 21)).numpy()), _bits(want[5:21]))


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_repack_is_exact_on_quantised_data(qt):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 256, generator=g) * 3
    x[1] = 0.0  # all-zero blocks (d = 0)
    x[2, :32] = -x[2, :32].abs()  # a block of one sign
    raw = ref.quantize(x.numpy(), qt)
    w = L.repack(raw, qt, 256, 12)
    np.testing.assert_array_equal(_bits(L.dequantize_packed(w).numpy()), _bits(ref.dequantize(raw, qt)))


@pytest.mark.parametrize("qt", ALL, ids=lambda t: t.name)
def test_plane_shapes_and_bytes(qt):
    f = L.fmt(qt)
    n, k = 8, 256
    w = L.repack(L.random_blocks(qt, n, k), qt, k, n)
    gguf_bytes = n * k // f.block * f.type_size
    # Same bytes as the GGUF rows, except the unpacked 6-bit K-quant scales/mins (1 byte each).
    extra = n * k // 32 * 2 - n * k // 256 * 12 if qt in (T.Q4_K, T.Q5_K) else 0
    assert w.nbytes == gguf_bytes + extra
    for t in w.planes():
        assert t.is_contiguous() and t.shape[0] == n
    assert (w.lo is None) == (qt == T.Q8_0)
    assert w.scale.shape[1] == k // f.sb


def test_inputs_memmap_bytes_and_tensor(tmp_path):
    qt, n, k = T.Q4_0, 6, 64
    raw = L.random_blocks(qt, n, k).numpy()
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")  # read-only, as a GGUF mapping
    want = L.dequantize_packed(L.repack(raw, qt, k, n))
    for src in (mm, raw.tobytes(), torch.from_numpy(raw.copy()).reshape(-1)):
        assert torch.equal(L.dequantize_packed(L.repack(src, qt, k, n)), want)


def test_errors():
    raw = L.random_blocks(T.Q4_0, 4, 64)
    with pytest.raises(ValueError, match="needs 144 bytes"):
        L.repack(raw.reshape(-1)[:-1], T.Q4_0, 64, 4)
    with pytest.raises(ValueError, match="multiple of 256"):
        L.repack(raw, T.Q4_K, 64, 4)
    with pytest.raises(ValueError, match="no GPU layout"):
        L.fmt(T.Q2_K)


def test_triton_wrapper_imports_without_triton():
    # A fresh interpreter where `import triton` fails: the wrapper module must import and say so.
    code = ("import sys; sys.modules['triton'] = None\n"
            "from qatserve.quant.kernels import triton_qmatmul as q\n"
            "assert not q.available() and q.triton_gemv is None\n"
            "try:\n    q.TritonQuantMatmul(bytes(18), 2, 32, 1)\nexcept RuntimeError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "unavailable" in r.stdout
