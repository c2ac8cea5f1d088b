"""Triton attention over the paged KV cache (kernels/triton_attention.py) against float64 attention of
the cache's dequantised K/V (gguf.quants for q8_0/q4_0) and against StepBatch.attend's CPU path.

On a CUDA machine the kernels run on the GPU; elsewhere on CPU tensors under Triton's interpreter
(TRITON_INTERPRET is set here before Triton is imported, as in test_triton_gemv.py). Sizes are small:
the interpreter runs every program in numpy, ~0.1 s per program and key block. Skips without Triton.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qatserve.engine.batch import Segment, StepBatch  # noqa: E402
from qatserve.engine.kv_cache import KVCacheOptions, KVLayout, PagedKVCache  # noqa: E402
from qatserve.models.common import attention  # noqa: E402
from qatserve.quant.kernels import kv_quant  # noqa: E402
from qatserve.quant.kernels import triton_attention as A  # noqa: E402
from qatserve.quant.kernels import triton_attention_kernels as AK  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not A.interpreting():
    importlib.reload(AK)  # imported earlier in this session without the interpreter
    importlib.reload(A)
DEVICE = "cpu" if A.interpreting() else "cuda"
GGUF_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def _dequantised(buf: torch.Tensor, kind: str) -> torch.Tensor:
    """float64 [slots, n_kv, D] of a cache buffer: gguf.quants for blocks, the stored floats otherwise."""
    buf = buf.cpu()
    if kind in GGUF_TYPES:
        return torch.from_numpy(gguf.quants.dequantize(buf.numpy(), GGUF_TYPES[kind]).astype(np.float64))
    return buf.double()


def _reference(q, kd, vd, table, qpos, *, scale, window, softcap):
    """float64 attention of one row q [H, D] at qpos over the sequence's visible keys -> [H * Dv]."""
    lo = max(0, qpos - window + 1) if window else 0
    pos = torch.arange(lo, qpos + 1)
    slots = torch.tensor([table[p // 32] * 32 + p % 32 for p in pos.tolist()])
    k, v = kd[slots], vd[slots]  # [S, n_kv, D]
    n_kv = k.shape[1]
    qg = q.double().view(n_kv, -1, q.shape[-1])
    s = torch.einsum("hgd,shd->hgs", qg, k) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    return torch.einsum("hgs,shd->hgd", torch.softmax(s, -1), v).reshape(-1)


def _rel(y: torch.Tensor, want: torch.Tensor) -> float:
    y = y.double().cpu()
    assert bool(torch.isfinite(y).all())
    return float((y - want).norm() / want.norm())


class Setup:
    """A paged cache of one layer filled with random K/V, and sequences whose blocks interleave."""

    def __init__(self, type_k, type_v, *, n_kv=2, group=2, dk=64, dv=64, window=0, lengths=(70, 161, 37),
                 seed=0):
        self.type_k, self.type_v, self.window = type_k, type_v, window
        layout = KVLayout(((n_kv, dk, dv),), (window,))
        n_seq = len(lengths)
        per_seq = (max(lengths) // 32 + 2) * 32
        self.cache = PagedKVCache(layout, n_ctx=n_seq * per_seq, n_seq=n_seq,
                                  options=KVCacheOptions(type_k, type_v, rotate=False, prefix_cache=False),
                                  max_step_tokens=per_seq)
        st = self.cache.layers[0]
        g = torch.Generator().manual_seed(seed)
        n = st.k.shape[0]
        st.k.copy_(kv_quant.quantize_kv(torch.randn(n, n_kv, dk, generator=g), type_k))
        st.v.copy_(kv_quant.quantize_kv(torch.randn(n, n_kv, dv, generator=g) * 2, type_v))
        self.kd, self.vd = _dequantised(st.k, type_k), _dequantised(st.v, type_v)
        # Reserve in rounds, so every sequence's blocks interleave with the others' in the pool.
        self.seqs = [self.cache.new_sequence() for _ in lengths]
        for frac in (0.3, 0.6, 1.0):
            for s, L in zip(self.seqs, lengths):
                s.reserve(max(1, int(L * frac)))
        for s, L in zip(self.seqs, lengths):
            s.commit(L, 0)  # a sliding window releases the blocks nobody sees any more
        self.lengths = lengths
        self.n_kv, self.H, self.dk, self.dv = n_kv, n_kv * group, dk, dv
        self.k, self.v = st.k.to(DEVICE), st.v.to(DEVICE)

    def tables(self):
        return [s.tables[0] for s in self.seqs]

    def query(self, segments, seed=1) -> torch.Tensor:
        rows = sum(n for _, _, n, _ in segments)
        return torch.randn(rows, self.H, self.dk, generator=torch.Generator().manual_seed(seed))

    def reference(self, segments, q, *, scale=0.125, softcap=0.0, round_q=True) -> torch.Tensor:
        """float64 rows of `segments` (seq index, pos0, n, prompt), laid out in order; q rounded as the
        engine does (kv_quant.query_for_keys) unless round_q is False."""
        q = kv_quant.query_for_keys(q, self.type_k) if round_q else q
        ref, row0 = [], 0
        for si, pos0, n, _ in segments:
            for r in range(n):
                ref.append(_reference(q[row0 + r], self.kd, self.vd, self.tables()[si], pos0 + r, scale=scale,
                                      window=self.window, softcap=softcap))
            row0 += n
        return torch.stack(ref)

    def run(self, segments, *, scale=0.125, softcap=0.0, seed=1, round_q=True, **kw):
        """The kernels on `segments` -> (out, float64 reference)."""
        q = self.query(segments, seed)
        plan_segs, row0 = [], 0
        for si, pos0, n, prompt in segments:
            plan_segs.append((si, row0, pos0, n, prompt))
            row0 += n
        plan = A.AttentionPlan.build(self.tables(), plan_segs, DEVICE)
        out = A.paged_attention(q.to(DEVICE), self.k, self.v, plan, type_k=self.type_k, type_v=self.type_v,
                                scale=scale, window=self.window, softcap=softcap, round_q=round_q, **kw)
        assert out.shape == (row0, self.H * self.dv) and out.dtype == torch.float32
        return out, self.reference(segments, q, scale=scale, softcap=softcap, round_q=round_q)


def _noncontiguous(table) -> bool:
    ids = [b for b in table if b is not None]
    return any(b1 != b0 + 1 for b0, b1 in zip(ids, ids[1:]))


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_decode_rows_match_float64(kind):
    s = Setup(kind, kind, lengths=(70, 100, 37))
    assert all(_noncontiguous(t) for t in s.tables()[:2])
    # The last position of two sequences, and a row + 2 verification rows of another (one row each);
    # up to 4 blocks split 2 ways: the reduce kernel combines partials.
    segs = [(0, 69, 1, False), (1, 97, 3, False), (2, 36, 1, False)]
    out, ref = s.run(segs, max_splits=2, min_split_blocks=1)
    assert _rel(out, ref) < 1e-3


@pytest.mark.parametrize("kind", ["bf16", "f32"])
def test_float_caches(kind):
    # bf16 keys: q rounded to bf16 (the engine's rule), products exact in tf32; f32: q as given.
    s = Setup(kind, kind, lengths=(50,))
    out, ref = s.run([(0, 40, 9, True), (0, 49, 1, False)], max_splits=2, min_split_blocks=1)
    assert _rel(out, ref) < 1e-3


def test_unrounded_query():
    # round_q=False: q enters the dot as given (the q8_0 rounding alone would cost ~4e-3 here).
    s = Setup("q8_0", "q8_0", lengths=(70, 100))
    segs = [(0, 69, 1, False), (1, 90, 10, True)]
    # (and key steps of 16: half cache blocks)
    out, ref = s.run(segs, round_q=False, max_splits=2, min_split_blocks=1,
                     tuning=A.Tuning(decode_keys=16, prefill_keys=16))
    assert _rel(out, ref) < 1e-3
    assert _rel(out, s.reference(segs, s.query(segs))) > 1e-3


@triton.jit
def _round_probe(q_ptr, out_ptr, Q_ROUND: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr):
    r = tl.arange(0, ROWS)[:, None] * (NB * 32)
    c0, c1 = AK._half_cols(NB, 0)[None, :], AK._half_cols(NB, 1)[None, :]
    q0, q1 = AK._round_q(tl.load(q_ptr + r + c0), tl.load(q_ptr + r + c1), Q_ROUND, ROWS, NB)
    tl.store(out_ptr + r + c0, q0)
    tl.store(out_ptr + r + c1, q1)


@pytest.mark.parametrize("kind", ["q4_0", "bf16"])
def test_in_kernel_query_rounding_is_the_engines(kind):
    # Bit for bit kv_quant.query_for_keys: AVX2 q8_0 blocks (ties to even, fp16 scale) for block keys,
    # bf16 for bf16 keys; with a tie, an all-zero block and a block of one sign.
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(9)) * 3
    x[0, :32] = 0.0
    x[1, 0], x[1, 1] = 127.0, 2.5  # 2.5 * 127/127 is a tie: 2
    x[2, 32:64] = x[2, 32:64].abs()
    out = torch.empty_like(x, device=DEVICE)
    _round_probe[(1,)](x.to(DEVICE), out, Q_ROUND=1 if kind == "q4_0" else 2, ROWS=16, NB=4)
    want = kv_quant.query_for_keys(x, kind)
    assert torch.equal(out.cpu(), want) and not torch.equal(want, x)


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_prompt_rows_match_float64(kind):
    s = Setup(kind, kind, lengths=(70, 100, 37))
    # Prompt runs that start off a tile boundary and cross one, beside a decode row (a mixed step).
    segs = [(1, 30, 70, True), (0, 60, 10, True), (2, 36, 1, False)]
    out, ref = s.run(segs)
    assert _rel(out, ref) < 1e-3


def test_sliding_window_and_softcap():
    # Window 40: sequence 1 (110 positions) has released its first block (-1 in the table).
    s = Setup("q8_0", "q4_0", window=40, lengths=(70, 110, 37))
    assert s.tables()[1][0] is None
    segs = [(1, 99, 9, True), (1, 108, 2, False), (0, 69, 1, False), (2, 30, 7, True)]
    out, ref = s.run(segs, softcap=3.0, scale=0.5, max_splits=2, min_split_blocks=1)
    assert _rel(out, ref) < 1e-3
    # The cap and the window change the answer (so the check above saw them applied).
    assert _rel(out, s.reference(segs, s.query(segs), scale=0.5)) > 1e-2
    s.window = 64  # (block 0 of sequence 1 is gone: a wider window, not none)
    assert _rel(out, s.reference(segs, s.query(segs), scale=0.5, softcap=3.0)) > 1e-2


def test_gemma4_full_layer_shape():
    # Gemma 4's full layers: head dim 512, 8 query heads per KV head (padded to 16 in the decode tile;
    # the prefill tile packs 4 positions x 8 heads).
    s = Setup("q4_0", "q8_0", n_kv=1, group=8, dk=512, dv=512, lengths=(45,))
    out, ref = s.run([(0, 38, 6, True), (0, 44, 1, False)], max_splits=2, min_split_blocks=1)
    assert _rel(out, ref) < 1e-3


def test_row_result_does_not_depend_on_the_batch():
    s = Setup("q4_0", "q4_0", n_kv=1, lengths=(100, 37))
    kw = dict(max_splits=4, min_split_blocks=2)
    alone, _ = s.run([(1, 36, 1, False)], **kw)  # 2 blocks = 1 split: a one-split grid, written directly
    both, _ = s.run([(1, 36, 1, False), (0, 99, 1, False)], **kw)  # 4 blocks = 2 splits: through the reduce
    assert torch.equal(alone.cpu(), both[:1].cpu())


def test_device_only_plan_with_a_fixed_grid():
    # A CUDA-graph decode step (engine/gpu_runner.py) fills fixed device tensors and passes grid_splits:
    # no host rows, the same results as a plan built from the tables.
    s = Setup("q8_0", "f16", n_kv=1, lengths=(100, 37))
    segs = [(0, 99, 1, False), (1, 36, 1, False)]
    q = s.query(segs)
    kw = dict(type_k="q8_0", type_v="f16", scale=0.125, max_splits=4, min_split_blocks=1)
    built = A.AttentionPlan.build(s.tables(), [(0, 0, 99, 1, False), (1, 1, 36, 1, False)], DEVICE)
    want = A.paged_attention(q.to(DEVICE), s.k, s.v, built, **kw)
    rows = torch.arange(2, dtype=torch.int32, device=DEVICE)
    plan = A.AttentionPlan(built.block_tables, rows, built.decode_pos, rows, [], 2)
    got = A.paged_attention(q.to(DEVICE), s.k, s.v, plan, grid_splits=4, **kw)
    assert torch.equal(got.cpu(), want.cpu())
    assert _rel(got, s.reference(segs, q)) < 1e-3


def test_step_batch_integration_with_rotation():
    """The documented integration: q rotated as K, output rotated back, equals StepBatch.attend."""
    layout = KVLayout(((2, 64, 64),), (0,))
    cache = PagedKVCache(layout, n_ctx=2 * 128, n_seq=2, options=KVCacheOptions("q8_0", "q4_0"))
    st = cache.layers[0]
    assert st.rot_k == 64 and st.rot_v == 64
    a, b = cache.new_sequence(), cache.new_sequence()
    g = torch.Generator().manual_seed(5)
    steps = [[Segment(a, 0, 0, 40, True), Segment(b, 40, 0, 20, True)],
             [Segment(a, 0, 40, 3, False), Segment(b, 3, 20, 12, True)]]  # a: a row + 2 draft rows
    for segs in steps:
        batch = StepBatch(cache, segs)
        T = batch.n_rows
        q, k, v = (torch.randn(T, n, 64, generator=g) for n in (4, 2, 2))
        want = batch.attend(0, q, k, v, batch.positions, scale=0.125, attention=attention)
        plan = A.AttentionPlan.from_segments(segs, st.group, DEVICE)
        out = A.paged_attention(kv_quant.hadamard(q, st.rot_k).to(DEVICE), st.k.to(DEVICE), st.v.to(DEVICE),
                                plan, type_k="q8_0", type_v="q4_0", scale=0.125)
        out = kv_quant.hadamard(out.cpu().view(T, -1, 64), st.rot_v).view(T, -1)
        assert _rel(out, want.double()) < 1e-3
        for s in segs:
            s.seq.commit(s.pos0 + s.n, 0)


def test_bad_arguments_are_refused():
    s = Setup("f16", "q8_0", lengths=(40,))
    plan = A.AttentionPlan.build(s.tables(), [(0, 0, 39, 1, False)], DEVICE)
    q = torch.zeros(1, s.H, 64, device=DEVICE)
    kw = dict(type_k="f16", type_v="q8_0", scale=1.0)
    with pytest.raises(ValueError, match="head dim 32"):
        A.paged_attention(q[..., :32], s.k, s.v, plan, **kw)
    with pytest.raises(ValueError, match="must hold"):
        A.paged_attention(q, s.k, s.v, plan, type_k="q4_0", type_v="q8_0", scale=1.0)
    with pytest.raises(ValueError, match="2 rows, the plan 1"):
        A.paged_attention(torch.zeros(2, s.H, 64, device=DEVICE), s.k, s.v, plan, **kw)
    with pytest.raises(ValueError, match="grid_splits 1 is below"):
        A.paged_attention(q, s.k, s.v, plan, grid_splits=1, max_splits=2, min_split_blocks=1, **kw)
    with pytest.raises(ValueError, match="16 or 32"):
        A.paged_attention(q, s.k, s.v, plan, tuning=A.Tuning(decode_keys=8), **kw)
    with pytest.raises(ValueError, match="need 3 blocks"):
        A.AttentionPlan.build(s.tables(), [(0, 0, 64, 1, False)], DEVICE)
    released = A.AttentionPlan.build([[None, s.tables()[0][1]]], [(0, 0, 39, 1, False)], DEVICE)
    with pytest.raises(ValueError, match="released"):
        A.paged_attention(q, s.k, s.v, released, **kw)  # a block the row sees is gone: refused, not read
    out = A.paged_attention(q, s.k, s.v, released, window=8, **kw)  # ... unless its window ends before it
    assert out.shape == (1, s.H * 64)


def test_decode_bytes_roofline():
    # Gemma 3 27B, one layer, 1024 keys: 16 KV heads x (128-wide K + V rows).
    assert A.decode_bytes(16, 128, 128, 1024, "f16", "f16") == 16 * 1024 * 512
    assert A.decode_bytes(16, 128, 128, 1024, "q8_0", "q8_0") == 16 * 1024 * 2 * 136
    assert A.decode_bytes(4, 512, 512, 1024, "q4_0", "f16") == 4 * 1024 * (288 + 1024)


def test_importable_without_triton():
    # A CPU-only install (no Triton): the module imports, says it is unavailable, and refuses to run.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from qatserve.quant.kernels import triton_attention as A\n"
            "assert not A.available() and not A.available('cpu') and A.K is None\n"
            "try:\n"
            "    A.paged_attention(torch.zeros(1, 4, 64), torch.zeros(32, 2, 64, dtype=torch.float16),\n"
            "                      torch.zeros(32, 2, 64, dtype=torch.float16), None, type_k='f16', type_v='f16',\n"
            "                      scale=1.0)\n"
            "except RuntimeError as e:\n"
            "    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr
    assert "refused: Triton kernels unavailable" in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("shape", [(16, 2, 128, 0), (16, 2, 256, 1024), (4, 8, 512, 0)],
                         ids=["g3-27b", "g4-31b-sliding", "g4-31b-full"])
def test_real_shapes_on_gpu(kind, shape):
    n_kv, group, d, window = shape
    s = Setup(kind, kind, n_kv=n_kv, group=group, dk=d, dv=d, window=window, lengths=(2100, 1100))
    # Committing 1100 keys released the sliding group's block 0 (window + one block kept), so a prompt
    # run there starts where every row still sees its whole window: past block 0's last key + window.
    p0 = 1000 if not window else 1100 - 40
    out, ref = s.run([(0, 2099, 1, False), (1, p0, 1099 - p0, True), (1, 1099, 1, False)], scale=d ** -0.5)
    assert _rel(out, ref) < 1e-3
