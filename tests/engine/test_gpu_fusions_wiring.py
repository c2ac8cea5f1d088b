"""The fused GPU kernels (quant/kernels/gpu_fusions.py) as a model reaches them: the tiny Gemma 3 of
conftest.py, prompt logits with the fusions on against all of them off.

The bit-identical fusions (K/V store, Hadamard, RoPE) must leave every logit's bits unchanged; RMSNorm and
GeGLU only their rounding. Spies count the fused calls, so a fusion that silently stopped applying fails
here. Without CUDA the fused kernels run on the CPU model's tensors under Triton's interpreter (dispatch
forced onto the CPU for the test; matmuls stay onnxruntime's); on a CUDA machine the GPU copy runs.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from qatserve.quant.kernels import gpu_fusions, kv_quant  # noqa: E402
from qatserve.quant.kernels import triton_fused, triton_kv_store  # noqa: E402
from tests.triton_interp import kernels_device  # noqa: E402
from tests.engine.conftest import random_prompts  # noqa: E402

DEVICE = kernels_device()
EXACT = "kv_store,hadamard,rope,splitk,multirow"


@pytest.fixture(scope="module")
def gpu_model(tiny_gemma3):
    """On CUDA a GPU copy of the model; without it the CPU model itself (its onnxruntime matmuls are not
    what is tested here and run in a blink, where the interpreted gemv would take seconds)."""
    if DEVICE == "cpu":
        yield tiny_gemma3.model
        return
    from qatserve.engine.device import to_device
    from qatserve.engine.loader import load_model_file

    loaded = load_model_file(tiny_gemma3.path, device="cpu")  # a second copy: to_device changes it in place
    to_device(loaded.model, DEVICE)
    yield loaded.model
    loaded.gguf.close()


@pytest.fixture
def calls(monkeypatch):
    """Counts of the fused kernels' entry points; off CUDA, dispatch onto CPU tensors (interpreter)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(gpu_fusions, "_gpu_ready", lambda t: True)
        # The rotation a GPU runs unfused (the butterfly), not the CPU's MLAS matmul, so "fusions off" is
        # the GPU's torch path here too and the K/V bytes must match bit for bit.
        monkeypatch.setattr(kv_quant, "hadamard", lambda x, group=kv_quant.ROTATION_GROUP: kv_quant._butterfly(x, group))
    counts: dict[str, int] = {}
    for mod, name in ((triton_kv_store, "store"), (triton_kv_store, "hadamard"), (triton_fused, "rms_norm"),
                      (triton_fused, "rope"), (triton_fused, "geglu")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **kw):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, spy)
    return counts


def _logits(model, tokens, kv: str, plan: str = "prompt") -> torch.Tensor:
    from qatserve.engine.generate import score_tokens
    from qatserve.engine.kv_cache import KVCacheOptions
    from qatserve.quant.kernels.gpu_matmul import row_kind

    # The multi-row and split-K gemv are checked bitwise in tests/unit/test_gpu_fusions.py.
    with row_kind(plan):
        return score_tokens(model, tokens, KVCacheOptions(kv, kv))


def test_fusions_in_a_model_forward(gpu_model, calls):
    """q8_0 K/V (rotation on: head dim 64): the bit-identical fusions keep every logit's bits; all of them
    (f16 K/V) change only rounding. Each fused entry point is reached as often as the model has places
    for it."""
    tokens = random_prompts([4], seed=1)[0]
    with gpu_fusions.use("none"):
        want = _logits(gpu_model, tokens, "q8_0")
    assert calls == {}
    with gpu_fusions.use(EXACT):
        got = _logits(gpu_model, tokens, "q8_0")
    assert torch.equal(got, want)
    n = len(gpu_model.blocks)
    # every layer: one K/V store, RoPE of q and k; on a GPU also Q rotated before attention and the output
    # after it (on the CPU the rotation is patched to the torch butterfly above)
    rotations = {"hadamard": 2 * n} if DEVICE == "cuda" else {}
    assert calls == {"store": n, "rope": 2 * n, **rotations}
    # All of them, f16 K/V (a q8_0 code boundary would turn a float32 rounding difference into a step), on
    # the float32 decode plan: the prompt plan's tf32 rounding of activations turns a 1-ulp float32
    # difference into a 2^-11 step (H100: 3.1e-4 there).
    with gpu_fusions.use("none"):
        want = _logits(gpu_model, tokens, "f16", "decode")
    calls.clear()
    with gpu_fusions.use("all"):
        approx = _logits(gpu_model, tokens, "f16", "decode")
    rel = float((approx.double() - want.double()).norm() / want.double().norm())
    print(f"fusions all vs none, f16 K/V, decode plan: rel {rel:.2e}; calls {calls}")
    assert rel < 1e-4  # CPU interpreter: 3e-7
    # per layer 4 block norms + the q and k head norms and one GeGLU; plus the final norm; no rotation
    assert calls == {"store": n, "rope": 2 * n, "rms_norm": 6 * n + 1, "geglu": n}
