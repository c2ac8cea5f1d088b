"""The llama.cpp-CPU numerics emulation (quant/kernels/ggml_numerics.py, ggml_matmul.py).

What can be pinned without llama.cpp itself: the reference activation quantiser is bit-exact with
gguf.quants (= quantize_row_q8_0_ref); the AVX2 variant differs from it exactly on rounding ties;
Q8_K follows the C reference by hand; the fp16 GELU table matches a hand computation; the
accumulation-order matmuls agree with an exact float64 product of the same quantised operands to float32
rounding; the fp16 flash-attention emulation agrees with exact softmax attention to fp16 precision.
(Agreement with llama.cpp end to end is tests/golden/test_llamacpp_greedy.py.)
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qatserve.quant.kernels import ggml_numerics as gn
from qatserve.quant.kernels.ggml_matmul import GGMLQuantMatmul, hsum8
from tests.unit.test_quant_linear import random_blocks


def _x(n_rows=3, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, n, generator=g) * torch.rand(n_rows, n // 32, 1, generator=g).repeat_interleave(32, 1).view(n_rows, n) * 4


def test_q8_0_reference_bit_exact_with_gguf():
    x = _x()
    q, d = gn.quantize_q8_0_ref(x)
    raw = gguf.quants.quantize(x.numpy(), T.Q8_0).reshape(-1, 34)
    assert np.array_equal(raw[:, 2:].view(np.int8).reshape(q.shape).astype(np.float32), q.numpy())
    assert np.array_equal(raw[:, :2].copy().view(np.float16).astype(np.float32).reshape(d.shape), d.numpy())


def test_q8_0_avx2_differs_only_on_ties():
    # 127/amax * x == 2.5 exactly: AVX2 rounds half to even (2), the reference away from zero (3).
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 127.0, 2.5
    q_avx, _ = gn.quantize_q8_0(x)
    q_ref, _ = gn.quantize_q8_0_ref(x)
    assert q_avx[0, 0, 1] == 2 and q_ref[0, 0, 1] == 3
    # Off ties both agree (up to the rare double-rounding of 1/(amax/127) vs 127/amax).
    x = _x(seed=1)
    a, b = gn.quantize_q8_0(x)[0], gn.quantize_q8_0_ref(x)[0]
    assert (a != b).float().mean() < 1e-3


def test_q8_1_sum_uses_unrounded_scale():
    x = _x(1, 64, seed=2)
    q, d, s = gn.quantize_q8_1(x)
    amax = x.view(1, 2, 32).abs().amax(-1, keepdim=True)
    want = (amax / 127.0 * q.sum(-1, keepdim=True)).half().float()
    assert torch.equal(s, want)
    assert torch.equal(d, (amax / 127.0).half().float())


def test_q8_k_matches_c_reference_by_hand():
    x = _x(2, 256, seed=3)
    q, d = gn.quantize_q8_k(x)
    for r in range(2):
        row = x[r].numpy()
        j = int(np.argmax(np.abs(row)))  # first max, as the C loop's strict '>'
        iscale = np.float32(-127.0) / np.float32(row[j])
        want = np.minimum(127, np.rint(np.float32(iscale) * row.astype(np.float32)))
        assert np.array_equal(q[r, 0].numpy(), want.astype(np.float32))
        assert d[r, 0, 0].item() == np.float32(1.0) / iscale


def test_gelu_table_hand_value():
    # gelu(1) = 0.5 * (1 + tanh(sqrt(2/pi) * 1.044715)) = 0.841192..., stored as fp16.
    want = np.float16(0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715)))
    assert gn.gelu_fp16_table(torch.tensor([1.0])).item() == float(want)
    # The table is indexed by fp16(x): inputs rounding to the same fp16 give the same output.
    a, b = torch.tensor([1.0001]), torch.tensor([1.0002])
    assert gn.gelu_fp16_table(a).item() == gn.gelu_fp16_table(b).item()
    assert gn.gelu_fp16_table(torch.tensor([-11.0])).item() == 0.0
    assert gn.gelu_fp16_table(torch.tensor([12.5])).item() == 12.5


def test_rope_angles_are_repeated_float32_products():
    a = gn.rope_angles(torch.tensor([7]), 8, 10000.0)
    step = np.power(np.float32(10000.0), np.float32(-0.25), dtype=np.float32)
    want = [np.float32(7.0)]
    for _ in range(3):
        want.append(np.float32(want[-1] * step))
    assert a[0].tolist() == [float(v) for v in want]


def test_vec_dot_f16_and_hsum_order():
    a = gn.f16(torch.randn(5, 256))
    b = gn.f16(torch.randn(5, 256))
    got = gn.vec_dot_f16(a, b)
    exact = (a.double() * b.double()).sum(-1)
    assert torch.allclose(got.double(), exact, rtol=0, atol=1e-5)
    # hsum_float_8 adds lane i to lane i+4 first: (1e8 + 1) - 1e8 loses the 1 in float32.
    x = torch.tensor([1e8, 0, 0, 0, 1.0, 0, 0, 0])
    assert hsum8(x).item() == 1e8
    x = torch.tensor([1e8, 0, -1e8, 0, 1.0, 0, 0, 0])
    assert hsum8(x).item() == 0.0  # (1e8 + 1) + (-1e8) in float32


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_1, T.Q5_1, T.Q4_K, T.Q6_K])
def test_quant_matmul_matches_exact_product(qtype):
    n_in, n_out = 512, 24
    raw = random_blocks(qtype, n_out, n_in, seed=int(qtype))
    from qatserve.quant.blocks import dequantize

    w = dequantize(raw, qtype, (n_out, n_in)).double()
    x = _x(3, n_in, seed=5)
    mm = GGMLQuantMatmul(raw, qtype, n_in, n_out)
    assert mm.kind != "dense"
    y = mm(x)
    xq, s = gn.fake_quant_activation(x, qtype)
    ref = xq @ w.T
    if s is not None:  # Q8_1: mins meet the rounded block sums, not sum(x_deq)
        _, m = gn.split_min(raw, qtype, n_out, n_in, w.float())
        ref = xq @ (w - m.repeat_interleave(32, 1)).T + s @ m.T
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_flash_attn_f16_close_to_softmax():
    g = torch.Generator().manual_seed(0)
    T_, S, H, Hkv, D = 4, 9, 4, 2, 64
    q = torch.randn(T_, H, D, generator=g)
    k = torch.randn(S, Hkv, D, generator=g)
    v = torch.randn(S, Hkv, D, generator=g)
    qp, kp = torch.arange(5, 9), torch.arange(S)
    out = gn.flash_attn_f16(q, k, v, qp, kp, scale=D ** -0.5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    sc = torch.einsum("thd,shd->ths", q, kk) * D ** -0.5
    sc = sc.masked_fill(~(kp[None, None, :] <= qp[:, None, None]), float("-inf"))
    ref = torch.einsum("ths,shd->thd", sc.softmax(-1), vv).reshape(T_, -1)
    assert (out - ref).abs().max() < 5e-3
