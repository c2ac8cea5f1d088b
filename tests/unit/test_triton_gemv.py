"""Triton quantised matmuls (kernels/triton_gemv.py, triton_qmatmul.py) against gguf.quants + float64.

On a CUDA machine the kernels run on the GPU; elsewhere on CPU tensors under Triton's interpreter.
TRITON_INTERPRET must be set before the kernels are decorated (triton.jit reads it then, through
triton.knobs) and stay set while they run, so it is set here, before any import of Triton, for the
rest of the session. Skips when Triton is not installed.
"""

from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import gguf.quants as ref  # noqa: E402
import pytest  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")

from qatserve.quant.kernels import gpu_layout as L  # noqa: E402
from qatserve.quant.kernels import triton_gemv as G  # noqa: E402
from qatserve.quant.kernels import triton_qmatmul as Q  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not Q.interpreting():
    importlib.reload(G)  # imported earlier in this session without the interpreter
DEVICE = "cpu" if Q.interpreting() else "cuda"

FORMATS = [T.Q4_0, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.Q4_1, T.Q5_1, T.Q5_K]
# (kernel, rows of x, x dtype, block_m, split_k): decode, a few rows, a full batched-decode tile with
# split K, prefill spanning two row tiles.
CASES = [("gemv", 1, torch.float32, 16, 1), ("gemv", 3, torch.float16, 16, 2),
         ("dot", 16, torch.float32, 16, 2), ("dot", 40, torch.float16, 32, 1)]


def _matrix(qt, n: int, k: int, seed: int):
    """Fresh random GGUF rows and their float64 dequantisation by gguf.quants."""
    g = torch.Generator().manual_seed(seed)
    if qt in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0) and seed % 2:
        raw = ref.quantize((torch.randn(n, k, generator=g) * 0.05).numpy(), qt)  # realistic blocks
    else:
        raw = L.random_blocks(qt, n, k, g).numpy()  # every code pattern; K-quants have no gguf quantiser
    return raw, torch.from_numpy(ref.dequantize(raw, qt).reshape(n, k)).double()


def _rel(y: torch.Tensor, want: torch.Tensor) -> float:
    y = y.double().cpu()
    assert bool(torch.isfinite(y).all())
    return float((y - want).norm() / want.norm())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-m{c[1]}-{str(c[2])[6:]}-s{c[4]}")
@pytest.mark.parametrize("qt", FORMATS, ids=lambda t: t.name)
def test_kernel_matches_dequantised_matmul(qt, case):
    kernel, m, dtype, block_m, split = case
    # N not a multiple of block_n (masked rows); legacy K = 384 is not a multiple of block_k = 256
    # (the launcher lowers it to 128: three K tiles).
    n, k = 80, (512 if L.fmt(qt).kquant else 384)
    raw, w = _matrix(qt, n, k, seed=int(qt) * 10 + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    packed = L.repack(raw, qt, k, n, device=DEVICE)
    y = G.launch(packed, x.to(DEVICE), kernel=kernel, block_n=32, block_k=256, block_m=block_m, split_k=split)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel(y, x.double() @ w.T) < 1e-3


def test_bf16_input_uses_a_float32_dot():
    raw, w = _matrix(T.Q4_0, 48, 256, seed=3)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    packed = L.repack(raw, T.Q4_0, 256, 48, device=DEVICE)
    y = G.launch(packed, x.to(DEVICE), kernel="dot", block_n=16, block_k=128, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert _rel(y, x.double() @ w.T) < 1e-3


def test_wrapper_picks_kernels_and_keeps_shapes():
    assert Q.available(DEVICE)
    n, k = 40, 512
    raw, w = _matrix(T.Q4_0, n, k, seed=1)
    mm = Q.TritonQuantMatmul(raw, T.Q4_0, k, n, device=DEVICE)
    assert mm.nbytes == raw.nbytes
    assert mm.config_for(1).kernel == "gemv" and mm.config_for(2).kernel == "dot"
    assert mm.config_for(16).block_m == 16 and mm.config_for(17).block_m == 64
    # 40 weight rows are one row tile: K is split (into its 2 tiles) to give more SMs work.
    assert mm.config_for(1).split_k > 1
    g = torch.Generator().manual_seed(2)
    for shape in [(1, k), (2, 3, k)]:
        x = torch.randn(*shape, generator=g)
        y = mm(x.to(DEVICE))
        assert y.shape == (*shape[:-1], n) and y.dtype == torch.float32
        assert _rel(y.reshape(-1, n), x.reshape(-1, k).double() @ w.T) < 1e-3
    y16 = mm(torch.randn(1, k, generator=g).to(DEVICE), out_dtype=torch.float16)
    assert y16.dtype == torch.float16
    assert mm(torch.empty(0, k, device=DEVICE)).shape == (0, n)


def test_launch_rejects_bad_arguments():
    packed = L.repack(L.random_blocks(T.Q8_0, 16, 64), T.Q8_0, 64, 16, device=DEVICE)
    with pytest.raises(ValueError, match="columns"):
        G.launch(packed, torch.zeros(1, 32, device=DEVICE), kernel="gemv", block_n=16, block_k=64)
    with pytest.raises(ValueError, match=">= 16"):
        G.launch(packed, torch.zeros(1, 64, device=DEVICE), kernel="dot", block_n=8, block_k=64)
    with pytest.raises(ValueError, match="unknown kernel"):
        G.launch(packed, torch.zeros(1, 64, device=DEVICE), kernel="nope", block_n=16, block_k=64)
