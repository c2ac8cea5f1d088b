"""QuantLinear's GPU backend (quant/kernels/gpu_matmul.py): values against the float64 dequantisation, and
the batch invariance of its plans (a row's bits do not depend on the other rows of the call).

On a CUDA machine this runs on the GPU; elsewhere on the CPU under Triton's interpreter (set before Triton
is imported, as in test_triton_gemv.py). Also the GPU-side Hadamard stages against the matrix.
"""

from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")

from qatserve.quant import blocks  # noqa: E402
from qatserve.quant.kernels import gpu_layout as L  # noqa: E402
from qatserve.quant.kernels import kv_quant  # noqa: E402
from qatserve.quant.kernels import triton_dense, triton_gemv  # noqa: E402
from qatserve.quant.kernels import triton_qmatmul as Q  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not Q.interpreting():
    importlib.reload(triton_gemv)  # imported earlier in this session without the interpreter
if os.environ.get("TRITON_INTERPRET") == "1" and type(triton_dense._dense_gemv_kernel).__name__ != "InterpretedFunction":
    importlib.reload(triton_dense)

from qatserve.quant.kernels.gpu_matmul import GPUMatmul, row_kind  # noqa: E402
from qatserve.quant.linear import QuantLinear  # noqa: E402

DEVICE = "cpu" if Q.interpreting() else "cuda"
K = 256


def _parts(seed: int):
    """q|k|v-like parts: two Q4_0 matrices (one launch), a Q8_0 one (a second), an F16 one (the float kernel)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for qt, n in ((T.Q4_0, 48), (T.Q4_0, 16), (T.Q8_0, 32), (T.F16, 24)):
        if qt == T.F16:
            raw = (torch.randn(n, K, generator=g) * 0.05).half().view(torch.uint8).numpy()
        else:
            raw = L.random_blocks(qt, n, K, g).numpy()
        out.append((raw, qt, K, n))
    return out


def _reference(parts) -> torch.Tensor:
    return torch.cat([blocks.dequantize(raw, qt, (n, k)).double() for raw, qt, k, n in parts])


@pytest.mark.parametrize("kind", [None, "decode", "prompt"])
def test_values_match_float64(kind):
    parts = _parts(1)
    mm = GPUMatmul(parts, DEVICE)
    assert len(mm.launches) == 3 and mm.out_features == 120
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    with row_kind(kind):
        y = mm(x.to(DEVICE)).cpu()
    want = x.double() @ _reference(parts).T
    assert y.dtype == torch.float32 and y.shape == (5, 120)
    # float32 sums (decode plan, float kernel) ~1e-6; one tf32 rounding per operand (prompt plan) ~1e-3
    tol = 2e-3 if kind == "prompt" else 1e-5
    assert float((y.double() - want).norm() / want.norm()) < tol


@pytest.mark.parametrize("kind", ["decode", "prompt"])
def test_a_row_alone_equals_the_row_in_a_batch(kind):
    """Bitwise: what the engine's batch invariance rests on (a plan never changes with M)."""
    if kind == "prompt" and Q.interpreting():
        pytest.skip("the interpreter's tl.dot is numpy's BLAS, which sums a column in an order that depends "
                    "on its position in the tile (seen: row 19 of 20 differs by 5e-6 from the row alone)")
    mm = GPUMatmul(_parts(3), DEVICE)
    x = torch.randn(20, K, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with row_kind(kind):
        together = mm(x)
        for i in (0, 7, 19):
            assert torch.equal(mm(x[i : i + 1])[0], together[i])
            assert torch.equal(mm(x[i : i + 3])[0], together[i])


def test_quant_linear_to_device_runs_the_fused_parts():
    parts = _parts(5)[:2]
    layers = [QuantLinear(raw, qt, k, n) for raw, qt, k, n in parts]
    fused = QuantLinear.fused(layers).to_device(DEVICE)
    assert fused.backend_name == "gpu"
    fused.prepare()  # no onnxruntime session for a layer on the GPU
    assert fused._sess is None
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(6))
    y = fused(x.to(DEVICE)).cpu()
    want = x.double() @ fused.dequantized().double().T
    assert float((y.double() - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("group", [64, 128, 256])
def test_gpu_hadamard_stages_equal_the_matrix(group):
    x = torch.randn(6, 2, 512, generator=torch.Generator().manual_seed(group))
    got = kv_quant._butterfly(x, group)
    want = (x.double().reshape(-1, group) @ kv_quant.hadamard_matrix(group).double()).reshape(x.shape)
    assert float((got.double() - want).abs().max()) < 1e-5
    assert torch.allclose(kv_quant._butterfly(got, group), x, atol=1e-5)  # its own inverse
