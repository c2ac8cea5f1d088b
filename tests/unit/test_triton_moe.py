"""The routed experts on the GPU (quant/kernels/triton_moe.py, gpu_experts.py, quant/experts.py): the gathered
gemv (decode), the grouped tensor-core dot (prefill) and the routing-weighted combine against gguf.quants'
dequantisation and float64; a row's bits alone = in a batch; the expert grouping; ExpertFFN on the device =
its host loop; a tiny Gemma 4 MoE model's logits with its experts on the kernels = the CPU path's.

On a CUDA machine on the GPU; elsewhere on the CPU under Triton's interpreter (set before Triton is imported),
with tiny sizes (the interpreter costs ~0.1 s per program).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")
gguf_quants = pytest.importorskip("gguf.quants")

from tests.triton_interp import kernels_device  # noqa: E402

DEVICE = kernels_device()

from qatserve.quant import blocks  # noqa: E402
from qatserve.quant.experts import ExpertFFN  # noqa: E402
from qatserve.quant.kernels import gpu_experts, gpu_layout  # noqa: E402
from qatserve.quant.kernels import triton_moe as tm  # noqa: E402
from qatserve.quant.kernels.gpu_matmul import row_kind  # noqa: E402
from qatserve.quant.linear import QuantLinear  # noqa: E402

INTERP = DEVICE == "cpu"
# The interpreter's tl.dot is numpy's float32 matmul (no tf32 rounding); on a GPU one tf32 rounding per operand.
DOT_TOL = 1e-5 if INTERP else 3e-3  # tf32 (10-bit mantissa) x and w: H100 2026-11-23 up to 2.2e-3


def _quantize(w: torch.Tensor, qt) -> np.ndarray:
    """Real GGUF blocks of `w` [rows, K] from gguf.quants (Q4_0 / Q8_0), or random well-formed K-quant blocks."""
    if qt in (T.Q4_0, T.Q8_0):
        return gguf_quants.quantize(w.numpy(), qt).reshape(w.shape[0], -1)
    return gpu_layout.random_blocks(qt, w.shape[0], w.shape[1], torch.Generator().manual_seed(w.shape[0])).numpy()


def _experts(qt, E: int, N: int, K: int, seed: int):
    """(raw uint8 [E * N, row bytes], float64 reference [E, N, K] from gguf.quants.dequantize)."""
    g = torch.Generator().manual_seed(seed)
    raw = _quantize(torch.randn(E * N, K, generator=g) * 0.05, qt)
    ref = torch.from_numpy(gguf_quants.dequantize(raw, qt)).double().view(E, N, K)
    return raw, ref


def _ids(T_: int, E: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T_)])


def _rel(a, b) -> float:
    return float((a.double().cpu() - b).norm() / b.norm())


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q4_K])
def test_gather_gemv_matches_float64(qt):
    """gate|up-style (x per row, every chosen expert of a row) with K = 256, and down-style (x per pair)
    with K = 96, which no power-of-two tile wider than 32 divides (the 26B's 704)."""
    E, N, k = 5, 24, 2
    K = 256
    raw, ref = _experts(qt, E, N, K, 1)
    w = gpu_layout.repack(raw, qt, K, E * N, DEVICE)
    ids = _ids(3, E, k, 2)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    y = tm.gather_gemv(w, E, x.to(DEVICE), ids.to(DEVICE), per_pair=False, block_n=16, block_k=128)
    want = torch.stack([x[t].double() @ ref[ids[t, j]].T for t in range(3) for j in range(k)])
    assert y.shape == (3 * k, N) and y.dtype == torch.float32
    assert _rel(y, want) < 1e-5  # float32 sums of exact products
    if qt == T.Q4_K:
        return
    K2 = 96
    raw2, ref2 = _experts(qt, E, N, K2, 4)
    w2 = gpu_layout.repack(raw2, qt, K2, E * N, DEVICE)
    h = torch.randn(3 * k, K2, generator=torch.Generator().manual_seed(5))
    y2 = tm.gather_gemv(w2, E, h.to(DEVICE), ids.to(DEVICE), per_pair=True, block_n=32, block_k=256)
    want2 = torch.stack([h[p].double() @ ref2[ids.view(-1)[p]].T for p in range(3 * k)])
    assert _rel(y2, want2) < 1e-5


def test_float_experts_gemv_matches_float64():
    """F16 experts of width 24 (a tiny model's down projections: no block format holds K = 24)."""
    E, N, K, k = 4, 40, 24, 2
    w = (torch.randn(E * N, K, generator=torch.Generator().manual_seed(6)) * 0.1).half()
    ids = _ids(3, E, k, 7)
    h = torch.randn(3 * k, K, generator=torch.Generator().manual_seed(8))
    y = tm.gather_fgemv(w.to(DEVICE), E, h.to(DEVICE), ids.to(DEVICE), per_pair=True, block_n=32)
    ref = w.double().view(E, N, K)
    want = torch.stack([h[p].double() @ ref[ids.view(-1)[p]].T for p in range(3 * k)])
    assert _rel(y, want) < 1e-6


def test_group_pairs_sorts_by_expert_with_padded_tiles():
    E, k, bm = 6, 3, 16
    ids = _ids(11, E, k, 9)
    ids[:, 0] = 2  # one expert with more than a tile's worth of pairs
    pairs, tile_expert = tm.group_pairs(ids.to(DEVICE), E, bm)
    pairs, tile_expert = pairs.cpu(), tile_expert.cpu()
    flat = ids.view(-1)
    P = flat.numel()
    assert pairs.numel() == tile_expert.numel() * bm
    assert tile_expert.numel() == -(-(P + min(E, P) * (bm - 1)) // bm)  # the static bound
    real = pairs[pairs >= 0]
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    for i, e in enumerate(tile_expert.tolist()):
        tile = pairs[i * bm : (i + 1) * bm]
        if e >= E:
            assert bool((tile < 0).all())
            continue
        got = tile[tile >= 0]
        assert got.numel() > 0 and bool((flat[got.long()] == e).all())
        assert got.tolist() == sorted(got.tolist())  # stable: ascending pair within an expert
        assert bool((tile[: got.numel()] >= 0).all())  # padding only at the end of an expert's run
    used = [e for e in tile_expert.tolist() if e < E]
    assert used == sorted(used) and set(used) == set(flat.tolist())


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0])
def test_grouped_dot_matches_float64(qt):
    E, N, K, k, T_ = 4, 32, 128, 2, 13
    raw, ref = _experts(qt, E, N, K, 10)
    w = gpu_layout.repack(raw, qt, K, E * N, DEVICE)
    ids = _ids(T_, E, k, 11)
    x = torch.randn(T_, K, generator=torch.Generator().manual_seed(12))
    y = tm.grouped_dot(w, E, x.to(DEVICE), ids.to(DEVICE), per_pair=False, block_n=32, block_k=64, block_m=16)
    want = torch.stack([x[t].double() @ ref[ids[t, j]].T for t in range(T_) for j in range(k)])
    assert _rel(y, want) < DOT_TOL


def test_combine_sums_in_rank_order():
    T_, k, N = 3, 4, 50
    g = torch.Generator().manual_seed(13)
    y, wts = torch.randn(T_ * k, N, generator=g), torch.rand(T_, k, generator=g)
    out = tm.combine(y.to(DEVICE), wts.to(DEVICE)).cpu()
    want = (y.double().view(T_, k, N) * wts.double()[:, :, None]).sum(1)
    assert float((out.double() - want).norm() / want.norm()) < 1e-6


# -- ExpertFFN --------------------------------------------------------------------------------------
def _glu(gate, up):
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _ffn(gate_up_qt, down_qt, E=6, n_embd=64, ff=32, seed=20, split_gate_up=False) -> ExpertFFN:
    """An ExpertFFN over real blocks, as Gemma4MoE builds it (fused gate|up tensor, or separate gate and up
    tensors as a fused QuantLinear per expert)."""
    g = torch.Generator().manual_seed(seed)

    def stack(qt, rows, K):
        w = torch.randn(E * rows, K, generator=g) * 0.08
        if qt in (T.F16, T.F32):
            raw = w.half().numpy() if qt == T.F16 else w.numpy()
            return raw.view(np.uint8).reshape(E * rows, -1)
        return _quantize(w, qt)

    if split_gate_up:
        gates, ups = stack(gate_up_qt, ff, n_embd), stack(gate_up_qt, ff, n_embd)
        gate_up = [QuantLinear.fused([QuantLinear(gates[e * ff:(e + 1) * ff], gate_up_qt, n_embd, ff),
                                      QuantLinear(ups[e * ff:(e + 1) * ff], gate_up_qt, n_embd, ff)])
                   for e in range(E)]
    else:
        gu = stack(gate_up_qt, 2 * ff, n_embd)
        gate_up = [QuantLinear(gu[e * 2 * ff:(e + 1) * 2 * ff], gate_up_qt, n_embd, 2 * ff, backend="torch")
                   for e in range(E)]
    dn = stack(down_qt, n_embd, ff)
    down = [QuantLinear(dn[e * n_embd:(e + 1) * n_embd], down_qt, ff, n_embd, backend="torch") for e in range(E)]
    return ExpertFFN(gate_up, down)


def _reference(ffn: ExpertFFN, x, weights, ids) -> torch.Tensor:
    """float64 [T, n_embd] from the experts' dequantised weights."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = x[t].double() @ ffn.gate_up[e].dequantized().double().T
            gate, up = gu.chunk(2)
            h = torch.nn.functional.gelu(gate, approximate="tanh") * up
            out[t] += float(weights[t, j]) * (h @ ffn.down[e].dequantized().double().T)
    return out


def _route(T_, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T_, k, generator=g), -1), _ids(T_, E, k, seed)


@pytest.fixture
def big_tiles(monkeypatch):
    """Whole-matrix tiles: the interpreter's cost is per program."""
    monkeypatch.setattr(gpu_experts, "DEFAULT_CONFIG", gpu_experts.MoEConfig(
        gemv_block_n=64, gemv_block_k=256, dot_block_n=64, dot_block_k=64, dot_block_m=16))


@pytest.mark.parametrize("types", [(T.Q4_0, T.Q4_0), (T.Q8_0, T.Q8_0), (T.Q4_0, T.F16), ("split", T.Q4_0)])
@pytest.mark.parametrize("kind", ["decode", "prompt"])
def test_expert_ffn_on_the_device_equals_the_host_loop(types, kind, big_tiles):
    split = types[0] == "split"
    ffn = _ffn(T.Q4_0 if split else types[0], types[1], split_gate_up=split)
    weights, ids = _route(5, 6, 2, 21)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(22))
    want = _reference(ffn, x, weights, ids)
    # the host loop agrees (float32 dequantised weights; the split case's fused layer runs onnxruntime's
    # MatMulNBits, which rounds x to 8 bits: 1e-2)
    assert float((ffn(x, weights, ids, _glu).double() - want).norm() / want.norm()) < (2e-2 if split else 1e-5)
    ffn.to_device(DEVICE)
    assert not ffn.reads_ids_on_host
    assert all(m._gpu is None for m in ffn.modules() if isinstance(m, QuantLinear))  # not uploaded twice
    with row_kind(kind):
        got = ffn(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), _glu).cpu()
    assert got.shape == want.shape and got.dtype == torch.float32
    tol = 1e-5 if kind == "decode" else DOT_TOL
    assert float((got.double() - want).norm() / want.norm()) < tol


def test_expert_ffn_without_a_stacked_kernel_keeps_the_loop(big_tiles):
    """Q2_K experts (no GPU layout): each expert on its own GPU backend, ids read on the host."""
    E, n_embd, ff = 3, 256, 256
    raw_gu = np.random.default_rng(0).integers(0, 256, (E * 2 * ff, blocks.row_bytes(T.Q2_K, n_embd)), dtype=np.uint8)
    raw_dn = np.random.default_rng(1).integers(0, 256, (E * n_embd, blocks.row_bytes(T.Q2_K, ff)), dtype=np.uint8)
    for raw in (raw_gu, raw_dn):  # finite fp16 d / dmin at the end of each 84-byte block
        b = raw.reshape(raw.shape[0], -1, 84)
        b[:, :, 80:84] = np.array([0.01, 0.01], dtype=np.float16).view(np.uint8)
    ffn = ExpertFFN([QuantLinear(raw_gu[e * 2 * ff:(e + 1) * 2 * ff], T.Q2_K, n_embd, 2 * ff) for e in range(E)],
                    [QuantLinear(raw_dn[e * n_embd:(e + 1) * n_embd], T.Q2_K, ff, n_embd) for e in range(E)])
    weights, ids = _route(2, E, 2, 24)
    x = torch.randn(2, n_embd, generator=torch.Generator().manual_seed(25))
    want = ffn(x, weights, ids, _glu)
    ffn.to_device(DEVICE)
    assert ffn.reads_ids_on_host
    got = ffn(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), _glu).cpu()
    assert float((got.double() - want.double()).norm() / want.double().norm()) < 1e-5


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0])
def test_a_row_alone_equals_the_row_in_a_batch(qt, big_tiles):
    """Bitwise, on the decode plan: gate|up, GLU, down and the combine of a row depend on that row only."""
    ffn = _ffn(qt, qt, seed=26)
    ffn.to_device(DEVICE)
    weights, ids = _route(6, 6, 2, 27)
    ids[3] = ids[1]  # two rows sharing their experts
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(28)).to(DEVICE)
    weights, ids = weights.to(DEVICE), ids.to(DEVICE)
    with row_kind("decode"):
        batch = ffn(x, weights, ids, _glu)
        for r in (0, 3, 5):
            alone = ffn(x[r:r + 1], weights[r:r + 1], ids[r:r + 1], _glu)
            assert torch.equal(alone[0], batch[r]), r
        pair = ffn(x[2:4], weights[2:4], ids[2:4], _glu)
        assert torch.equal(pair, batch[2:4])


@pytest.mark.skipif(INTERP, reason="the interpreter's tl.dot is numpy's BLAS, whose column sums depend on the "
                    "column's place in the tile (tests/unit/test_gpu_matmul.py)")
def test_prompt_plan_row_alone_equals_the_row_in_a_batch():
    ffn = _ffn(T.Q4_0, T.Q4_0, seed=29)
    ffn.to_device(DEVICE)
    weights, ids = _route(40, 6, 2, 30)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(31)).to(DEVICE)
    weights, ids = weights.to(DEVICE), ids.to(DEVICE)
    with row_kind("prompt"):
        batch = ffn(x, weights, ids, _glu)
        for r in (0, 17, 39):
            assert torch.equal(ffn(x[r:r + 1], weights[r:r + 1], ids[r:r + 1], _glu)[0], batch[r]), r


# -- a tiny Gemma 4 MoE model -------------------------------------------------------------------------
S, F = "sliding_attention", "full_attention"


@pytest.fixture(scope="module", params=["Q4_0", "Q8_0"])
def moe_model(request, tmp_path_factory):
    """A random 3-layer Gemma 4 MoE (8 experts, top 2, expert width 32 so every expert matrix is a block
    format) converted to GGUF; the router is made decisive (weights ~N(0, 1)), so the ~1e-7 differences of
    the kernels' sums cannot flip a top-2 choice and the logits compare to float32 rounding."""
    transformers = pytest.importorskip("transformers")
    from qatserve.convert.hf_to_gguf import convert
    from qatserve.engine.loader import load_model_file

    cfg = transformers.Gemma4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, global_head_dim=64, sliding_window=16, max_position_embeddings=256,
        vocab_size_per_layer_input=256, final_logit_softcapping=30.0, layer_types=[S, S, F], num_hidden_layers=3,
        attention_k_eq_v=True, num_global_key_value_heads=1, hidden_size_per_layer_input=0, enable_moe_block=True,
        num_experts=8, top_k_experts=2, moe_intermediate_size=32)
    cfg._attn_implementation = "eager"
    hf = transformers.Gemma4ForCausalLM(cfg)
    g = torch.Generator().manual_seed(32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)
            elif "router.proj" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    d = tmp_path_factory.mktemp(f"moe-{request.param}")
    hf.eval().save_pretrained(d / "hf")
    path = convert(d / "hf", d / "model.gguf", request.param)
    loaded = load_model_file(path, backend="torch", device="cpu")
    yield loaded
    loaded.gguf.close()


def test_tiny_moe_model_logits_equal_the_cpu_path(moe_model, big_tiles, monkeypatch):
    """Prompt logits with every layer's experts on the stacked kernels (decode plan, then prompt plan) against
    the host loop of the same model; everything else runs the same CPU code (on a CUDA machine the experts'
    inputs go to the GPU and their output comes back)."""
    from qatserve.engine.generate import score_tokens
    from qatserve.models.common import gelu_tanh_glu
    from qatserve.models.gemma4_moe import Gemma4MoE

    model = moe_model.model
    moes = [m for m in model.modules() if isinstance(m, Gemma4MoE)]
    assert len(moes) == 3
    tokens = torch.randint(1, 256, (12,), generator=torch.Generator().manual_seed(33)).tolist()
    want = score_tokens(model, tokens)
    launches: dict[str, int] = {}
    for name in ("gather_gemv", "grouped_dot", "combine"):
        real = getattr(tm, name)

        def spy(*a, _real=real, _name=name, **kw):
            launches[_name] = launches.get(_name, 0) + 1
            return _real(*a, **kw)

        monkeypatch.setattr(tm, name, spy)
    for m in moes:
        ffn = copy.copy(m.ffn)  # the fixture's model keeps its host loop
        ffn.to_device(DEVICE)
        assert ffn._gpu.gate_up.packed is not None and ffn._gpu.down.packed is not None  # block formats
        monkeypatch.setattr(m, "experts", lambda x, w, i, _f=ffn: _f(
            x.to(DEVICE), w.to(DEVICE), i.to(DEVICE), gelu_tanh_glu).to(x.device))
    for kind, tol in (("decode", 1e-5), ("prompt", 10 * DOT_TOL)):
        launches.clear()
        with row_kind(kind):
            got = score_tokens(model, tokens)
        rel = float((got.double() - want.double()).norm() / want.double().norm())
        assert rel < tol, (kind, rel)  # interpreter: 1.5e-6 (decode), 7e-7 (prompt)
        used = "gather_gemv" if kind == "decode" else "grouped_dot"
        assert launches == {used: 2 * len(moes), "combine": len(moes)}


def test_model_to_device_stacks_the_experts_once(moe_model, big_tiles, request):
    """engine/device.to_device on the whole model: each MoE layer's experts become one stacked backend (their
    per-expert QuantLinears are not uploaded as well), the other matrices their GPU backends; logits on the
    decode plan = the CPU path's (interpreter: 1e-6; on CUDA the paged attention's fp16 dots add ~1e-3)."""
    from qatserve.engine.device import to_device
    from qatserve.engine.generate import score_tokens
    from qatserve.engine.loader import load_model_file

    if INTERP and request.node.callspec.params["moe_model"] != "Q4_0":
        pytest.skip("every matrix interpreted costs ~15 s a file: the Q4_0 one (the QAT format) covers the wiring")
    copy_ = load_model_file(moe_model.path, backend="torch", device="cpu")
    try:
        to_device(copy_.model, DEVICE)
        ffns = [m for m in copy_.model.modules() if isinstance(m, ExpertFFN)]
        assert len(ffns) == 3 and not any(f.reads_ids_on_host for f in ffns)
        inside = {id(m) for f in ffns for m in f.modules() if isinstance(m, QuantLinear)}
        linears = [m for m in copy_.model.modules() if isinstance(m, QuantLinear)]
        assert all((m._gpu is None) == (id(m) in inside) for m in linears)
        tokens = torch.randint(1, 256, (10,), generator=torch.Generator().manual_seed(34)).tolist()
        with row_kind("decode"):
            got = score_tokens(copy_.model, tokens)
        want = score_tokens(moe_model.model, tokens)
        assert float((got.double() - want.double()).norm() / want.double().norm()) < (1e-5 if INTERP else 1e-2)
    finally:
        copy_.gguf.close()
