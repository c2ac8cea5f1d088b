"""The fused GPU kernels of issue 8 (kernels/gpu_fusions.py) against the paths they replace.

- K/V store (triton_kv_store): the exact bytes of kv_quant's torch path (Hadamard stages, then
  legacy_blocks' quantisers), and for q8_0/q4_0 gguf.quants' bytes of the rotated values; the Hadamard
  launch = kv_quant._butterfly bit for bit.
- RMSNorm, RoPE, GeGLU (triton_fused): RoPE bit-identical to Rope.apply; RMSNorm / GeGLU within float32
  rounding of float64, and per row (a row alone = the row in a batch, bitwise).
- multi-row gemv and the in-kernel split-K sum (triton_gemv, triton_dense): a row computed with 2..8
  others is bitwise the row alone; values against float64; the counters are left at zero.

On a CUDA machine everything runs on the GPU (where bit-identity is what the engine relies on); elsewhere
on CPU tensors under Triton's interpreter (set before Triton is imported, as in test_triton_gemv.py),
small sizes. Skips without Triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")

from qatserve.errors import RequestError  # noqa: E402
from qatserve.models.common import Rope  # noqa: E402
from qatserve.quant import blocks  # noqa: E402
from qatserve.quant.kernels import gpu_fusions, kv_quant  # noqa: E402
from qatserve.quant.kernels import gpu_layout as L  # noqa: E402
from qatserve.quant.kernels import triton_dense, triton_fused, triton_gemv, triton_kv_store  # noqa: E402
from tests.triton_interp import kernels_device  # noqa: E402

DEVICE = kernels_device()
CUDA = DEVICE == "cuda"
GGUF_TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}


# -- K/V store -------------------------------------------------------------------------------------
def _buffer(kind: str, n_slots: int, n_kv: int, d: int) -> torch.Tensor:
    width = kv_quant.kv_row_bytes(kind, d) if kind in kv_quant.QUANTISED_KV_TYPES else d
    return torch.zeros(n_slots, n_kv, width, dtype=kv_quant.kv_storage_dtype(kind), device=DEVICE)


def _torch_store(kind: str, x: torch.Tensor, rot: int) -> torch.Tensor:
    """What the GPU wrote before the fused store: the butterfly stages, then quantize_kv (legacy_blocks)."""
    return kv_quant.quantize_kv(kv_quant._butterfly(x, rot) if rot else x, kind)


def _crafted(d: int, n_kv: int, t: int, g: torch.Generator) -> torch.Tensor:
    """K/V rows whose blocks hit the quantisers' edge cases: all zero, all -0.0, +/- ties of the largest
    magnitude (either sign first), one outlier, exact half steps, then random blocks."""
    x = torch.randn(t, n_kv, d, generator=g) * 2.0
    flat = x.view(-1, 32)
    flat[0] = 0.0
    flat[1] = -0.0
    flat[2] = torch.linspace(-1, 1, 32)
    flat[2, 5], flat[2, 20] = -3.0, 3.0  # tie, negative first
    flat[3] = torch.linspace(-1, 1, 32)
    flat[3, 5], flat[3, 20] = 3.0, -3.0  # tie, positive first
    flat[4] = 1e-3
    flat[4, 7] = 50.0
    flat[5] = torch.arange(32) * 0.5 - 8.0  # halves: exact .5 after scaling
    return x


CASES = [  # (type_k, type_v, dk, dv, rot_k, rot_v): Gemma 3 27B-like q8_0 / q4_0 with llama.cpp's groups,
    ("q8_0", "q8_0", 128, 128, 128, 64),  # Gemma 3 27B, -ctk/-ctv q8_0
    ("q4_0", "q4_0", 256, 256, 256, 64),  # 270M / Gemma 4 sliding, q4_0
    ("q8_0", "f16", 64, 64, 64, 0),  # mixed: only K rotates
    ("q4_0", "q8_0", 64, 64, 0, 0),  # no rotation: the crafted blocks reach the quantisers as they are
    ("f16", "bf16", 64, 32, 0, 0),
    ("f32", "f16", 32, 32, 0, 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kv_store_writes_the_torch_paths_bytes(case):
    type_k, type_v, dk, dv, rot_k, rot_v = case
    g = torch.Generator().manual_seed(dk + dv + rot_k)
    n_kv, t, n_slots = 2, 3, 9
    k, v = _crafted(dk, n_kv, t, g), _crafted(dv, n_kv, t, g).flip(0)
    slots = torch.tensor([6, 0, 3])
    kb, vb = _buffer(type_k, n_slots, n_kv, dk), _buffer(type_v, n_slots, n_kv, dv)
    triton_kv_store.store(kb, vb, slots.to(DEVICE), k.to(DEVICE), v.to(DEVICE), type_k, type_v, rot_k, rot_v)
    want_k, want_v = _buffer(type_k, n_slots, n_kv, dk).cpu(), _buffer(type_v, n_slots, n_kv, dv).cpu()
    want_k[slots], want_v[slots] = _torch_store(type_k, k, rot_k), _torch_store(type_v, v, rot_v)
    assert torch.equal(kb.cpu(), want_k) and torch.equal(vb.cpu(), want_v)
    for kind, buf, x, rot in ((type_k, kb, k, rot_k), (type_v, vb, v, rot_v)):
        if kind in GGUF_TYPES:  # and gguf.quants' bytes (its numpy port of ggml's quantize_row_*_ref)
            rotated = (kv_quant._butterfly(x, rot) if rot else x).reshape(-1, 32)
            ref = gguf.quants.quantize(rotated.numpy(), GGUF_TYPES[kind])
            got = buf.cpu()[slots].reshape(ref.shape).numpy()
            # One block differs on purpose: all -0.0. ggml's C loop never updates its `max = 0.0f`, so q4_0's
            # d = +0 / -8 = -0.0 there (legacy_blocks and the kernel do so); gguf.quants' argmax returns the
            # -0.0 itself and stores d = +0.0.
            neg_zero = ((rotated == 0) & torch.signbit(rotated)).all(-1).numpy()
            assert np.array_equal(got[~neg_zero], ref[~neg_zero])
            assert kind != "q4_0" or rot or neg_zero.any()  # the crafted block reached the quantiser


def test_kv_store_writes_only_its_slots_and_takes_strided_views():
    """k and v as the fused q|k|v projection hands them over (views with a wide row stride)."""
    g = torch.Generator().manual_seed(5)
    n_kv, d, t = 2, 64, 2
    proj = torch.randn(t, 3 * n_kv * d + 16, generator=g).to(DEVICE)
    k = proj[:, n_kv * d : 2 * n_kv * d].view(t, n_kv, d)
    v = proj[:, 2 * n_kv * d : 3 * n_kv * d].view(t, n_kv, d)
    kb, vb = _buffer("q8_0", 5, n_kv, d), _buffer("q8_0", 5, n_kv, d)
    kb.fill_(7)
    triton_kv_store.store(kb, vb, torch.tensor([4, 1], device=DEVICE), k, v, "q8_0", "q8_0", 64, 64)
    assert bool((kb[[0, 2, 3]] == 7).all())
    assert torch.equal(kb[[4, 1]].cpu(), _torch_store("q8_0", k.cpu(), 64))
    assert torch.equal(vb[[4, 1]].cpu(), _torch_store("q8_0", v.cpu(), 64))


@pytest.mark.parametrize("group", [64, 128, 256])
def test_hadamard_launch_equals_the_butterfly(group):
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(group))
    got = triton_kv_store.hadamard(x.to(DEVICE), group).cpu()
    assert torch.equal(got, kv_quant._butterfly(x, group))
    h = x.half()
    assert torch.equal(triton_kv_store.hadamard(h.to(DEVICE), group).cpu(), kv_quant._butterfly(h, group))


@pytest.mark.skipif(not CUDA, reason="the cache dispatches to the fused kernels on a CUDA device only")
@pytest.mark.parametrize("kv", ["q8_0", "q4_0", "f16"])
def test_cache_store_fused_equals_unfused_on_the_gpu(kv):
    from qatserve.engine.kv_cache import KVCacheOptions, KVLayout, PagedKVCache

    layout = KVLayout(((4, 128, 128), (2, 256, 256)), (0, 16))
    caches = [PagedKVCache(layout, 256, 2, KVCacheOptions(kv, kv), device="cuda") for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    for layer, (n_kv, d, _) in enumerate(layout.shapes):
        k, v = (torch.randn(5, n_kv, d, generator=g).cuda() for _ in range(2))
        slots = torch.tensor([3, 9, 33, 0, 70], device="cuda")
        with gpu_fusions.use("none"):
            caches[0].store(layer, slots, k, v)
        with gpu_fusions.use("all"):
            caches[1].store(layer, slots, k, v)
        assert torch.equal(caches[0].layers[layer].k, caches[1].layers[layer].k)
        assert torch.equal(caches[0].layers[layer].v, caches[1].layers[layer].v)


# -- RMSNorm, RoPE, GeGLU ----------------------------------------------------------------------------
def test_rms_norm_matches_float64_and_is_per_row():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 320, generator=g) * 3
    w = torch.randn(320, generator=g)
    got = triton_fused.rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6).cpu()
    want = F.rms_norm(x.double(), (320,), w.double(), 1e-6)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-6
    assert torch.equal(triton_fused.rms_norm(x[3:4].to(DEVICE), w.to(DEVICE), 1e-6).cpu()[0], got[3])
    # q/k heads as a strided view of a fused projection [T, H, D], read in place; and no weight (Gemma 4's V)
    proj = torch.randn(4, 3 * 64 + 32, generator=g)
    heads = proj[:, : 3 * 64].view(4, 3, 64)
    got = triton_fused.rms_norm(heads.to(DEVICE), w[:64].contiguous().to(DEVICE), 1e-6).cpu()
    want = F.rms_norm(heads.double(), (64,), w[:64].double(), 1e-6)
    assert got.is_contiguous() and float((got.double() - want).abs().max() / want.abs().max()) < 1e-6
    got = triton_fused.rms_norm(heads.to(DEVICE), None, 1e-6).cpu()
    assert float((got.double() - F.rms_norm(heads.double(), (64,), None, 1e-6)).abs().max()) < 1e-5


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "pairs"])
@pytest.mark.parametrize("d", [64, 96])
def test_rope_is_bit_identical_to_rope_apply(neox, d):
    """The full head and a partial rotation (the first 64 of 96 features rotate, the rest pass through)."""
    rope = Rope(64, 10000.0, neox=neox)
    pos = torch.tensor([0, 7, 300, 1023])
    cos, sin = rope.tables(pos)
    g = torch.Generator().manual_seed(d)
    proj = torch.randn(4, 3 * d + 8, generator=g) * 4
    x = proj[:, : 3 * d].view(4, 3, d)  # strided, as a q view of the q|k|v output
    want = rope.apply(x, (cos, sin))  # the torch expression (CPU tensors: no fused path)
    got = triton_fused.rope(x.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), 64, neox).cpu()
    assert torch.equal(got, want)


def test_geglu_matches_float64_on_the_gate_up_halves():
    g = torch.Generator().manual_seed(4)
    y = torch.randn(3, 2 * 1500, generator=g) * 3  # F not a multiple of the 1024 tile
    gate, up = y.chunk(2, dim=-1)
    got = triton_fused.geglu(*(t.to(DEVICE) for t in (gate, up))).cpu()
    want = F.gelu(gate.double(), approximate="tanh") * up.double()
    assert float((got.double() - want).abs().max() / want.abs().max()) < 2e-6
    assert torch.equal(triton_fused.geglu(gate[1:2].to(DEVICE), up[1:2].to(DEVICE)).cpu()[0], got[1])


# -- multi-row gemv, in-kernel split-K ----------------------------------------------------------------
def _packed(qt, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    raw = L.random_blocks(qt, n, k, g).numpy()
    return L.repack(raw, qt, k, n, DEVICE), torch.from_numpy(blocks.dequantize(raw, qt, (n, k)).numpy()).double()


@pytest.mark.parametrize("qt, ms", [(T.Q4_0, (2, 3, 8)), (T.Q6_K, (3,))], ids=["Q4_0", "Q6_K"])
def test_multirow_gemv_rows_equal_the_row_alone(qt, ms):
    """Rows 1..8 of a call at the rows per program the decode plan uses for the format (max_rows: 4 for
    Q4_0, groups and a masked tail; 1 for K-quants): bitwise the one-row results, split-K summed in the
    kernel; float64 agreement; the counters are zero again afterwards."""
    k, n, m_max = 256, 24, max(ms)
    w, wd = _packed(qt, n, k, 7)
    x = torch.randn(m_max, k, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    cfg = dict(kernel="gemv", block_n=16, block_k=64, split_k=2, out_dtype=torch.float32)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    alone = torch.cat([triton_gemv.launch(w, x[i : i + 1], counters=counters, **cfg) for i in range(m_max)])
    for m in ms:
        rows = min(m, triton_gemv.max_rows(w.fmt))
        y = triton_gemv.launch(w, x[:m], rows=rows, counters=counters, **cfg)
        assert torch.equal(y, alone[:m]), f"{m} rows, {rows} per program"
    assert int(counters.abs().sum()) == 0
    want = x.cpu().double() @ wd.T
    assert float((alone.cpu().double() - want).norm() / want.norm()) < 1e-5
    # the torch sum of the same partials agrees to float32 rounding (bitwise only where it sums in order)
    torch_sum = triton_gemv.launch(w, x, rows=min(m_max, triton_gemv.max_rows(w.fmt)), **cfg)
    assert float((torch_sum.cpu().double() - want).norm() / want.norm()) < 1e-5


def test_decode_plan_rows_equal_alone_with_and_without_fusions():
    """GPUMatmul's decode plan (what generated rows use): 3 rows together = each alone, both with the
    multi-row / split-K fusions on and off."""
    from qatserve.quant.kernels.gpu_matmul import GPUMatmul, row_kind

    g = torch.Generator().manual_seed(9)
    parts = [(L.random_blocks(T.Q4_0, 40, 512, g).numpy(), T.Q4_0, 512, 40),
             ((torch.randn(24, 512, generator=g) * 0.05).half().view(torch.uint8).numpy(), T.F16, 512, 24)]
    mm = GPUMatmul(parts, DEVICE)
    x = torch.randn(3, 512, generator=g).to(DEVICE)
    for names in ("all", "none"):
        with gpu_fusions.use(names), row_kind("decode"):
            together = mm(x)
            for i in range(3):
                assert torch.equal(mm(x[i : i + 1])[0], together[i]), (names, i)


@pytest.mark.parametrize("m", [1, 2, 5])
def test_dense_two_rows_per_program_equal_one(m):
    g = torch.Generator().manual_seed(m)
    w = (torch.randn(40, 300, generator=g) * 0.1).half().to(DEVICE)
    x = torch.randn(m, 300, generator=g).to(DEVICE)
    one = triton_dense.dense_gemv(w, x, rows=1)
    assert torch.equal(triton_dense.dense_gemv(w, x, rows=2), one)
    assert float((one.cpu().double() - x.cpu().double() @ w.cpu().double().T).abs().max()) < 1e-4


# -- switches --------------------------------------------------------------------------------------
def test_fusion_switches(monkeypatch):
    before = gpu_fusions.active()
    with gpu_fusions.use("none"):
        assert not gpu_fusions.enabled("kv_store") and gpu_fusions.active() == ()
        with gpu_fusions.use("rope,multirow"):
            assert gpu_fusions.active() == ("rope", "multirow")
        with gpu_fusions.use(["splitk"]):
            assert gpu_fusions.active() == ("splitk",)
    assert gpu_fusions.active() == before
    with pytest.raises(RequestError, match="QATSERVE_GPU_FUSIONS: unknown GPU fusion 'warp'"):
        with gpu_fusions.use("rope,warp"):
            pass
    # CPU tensors never take a fused path (the engine's CPU path is unchanged)
    assert gpu_fusions.rms_norm(torch.zeros(2, 8), torch.ones(8)) is None
    assert gpu_fusions.geglu(torch.zeros(2, 8), torch.zeros(2, 8)) is None
    # the environment: read once, a bad value is one clear error (to_device asks when a model moves)
    monkeypatch.setattr(gpu_fusions, "_on", None)
    monkeypatch.setenv("QATSERVE_GPU_FUSIONS", "rope, geglu")
    assert gpu_fusions.active() == ("rope", "geglu")
    # unset: every fusion but multirow (measured slower on the H100); "default" names the same set
    monkeypatch.setattr(gpu_fusions, "_on", None)
    monkeypatch.delenv("QATSERVE_GPU_FUSIONS")
    default = ("kv_store", "hadamard", "rms_norm", "rope", "geglu", "splitk")
    assert gpu_fusions.active() == default
    with gpu_fusions.use("all"):
        assert gpu_fusions.active() == default + ("multirow",)
    with gpu_fusions.use("default"):
        assert gpu_fusions.active() == default
    monkeypatch.setattr(gpu_fusions, "_on", None)
    monkeypatch.setenv("QATSERVE_GPU_FUSIONS", "rope,fast")
    with pytest.raises(RequestError, match="unknown GPU fusion 'fast'"):
        gpu_fusions.active()
