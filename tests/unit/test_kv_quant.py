"""K/V cache formats (bit-exact with gguf.quants) and llama.cpp's Hadamard rotation of attention."""

from __future__ import annotations

import gguf.quants as ref
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qatserve.quant.kernels import kv_quant as K

QTYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}


def _data(seed: int, scale: float, shape=(5, 4, 128)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    x[1] = 0.0  # whole zero rows (every block of them all-zero)
    x[2, 0, :32] = 0.0  # a single zero block inside a row
    x[3, 1, 5] = x[3, 1, :32].abs().max() * 2  # a positive absmax winner
    x[3, 2, 7] = -x[3, 2, :32].abs().max() * 2  # a negative one (Q4_0 maps it to code 0)
    return x


@pytest.mark.parametrize("kind", sorted(QTYPES))
@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 37.0, 3e4])
def test_bit_exact_vs_gguf(kind, scale):
    x = _data(int(scale * 1000) % 997, scale)
    got = K.quantize_kv(x, kind)
    assert got.dtype == torch.uint8
    assert got.shape == (*x.shape[:-1], K.kv_row_bytes(kind, x.shape[-1]))
    want = ref.quantize(x.numpy(), QTYPES[kind])
    np.testing.assert_array_equal(got.numpy(), want)
    # Decoding agrees with the reference dequantiser, bit for bit.
    back = K.dequantize_kv(got, kind, x.shape)
    np.testing.assert_array_equal(back.numpy(), ref.dequantize(want, QTYPES[kind]).reshape(x.shape))


@pytest.mark.parametrize("kind", sorted(QTYPES))
def test_single_decode_row_and_empty(kind):
    x = torch.randn(1, 8, 256)
    np.testing.assert_array_equal(K.quantize_kv(x, kind).numpy(), ref.quantize(x.numpy(), QTYPES[kind]))
    e = K.quantize_kv(torch.empty(0, 8, 64), kind)
    assert e.shape == (0, 8, K.kv_row_bytes(kind, 64))
    assert K.dequantize_kv(e, kind, (0, 8, 64)).shape == (0, 8, 64)


@pytest.mark.parametrize("kind,rel", [("q8_0", 1 / 254 + 1e-3), ("q4_0", 1 / 8 + 1e-3)])
def test_round_trip_error_bound(kind, rel):
    x = torch.randn(64, 4, 128) * 3
    y = K.dequantize_kv(K.quantize_kv(x, kind), kind, x.shape)
    # Per block, |error| <= half a step (q8_0: amax/127/2) or one step at the far end (q4_0: amax/8);
    # plus fp16 rounding of the scale.
    amax = x.view(-1, 32).abs().amax(-1, keepdim=True)
    err = (y - x).view(-1, 32).abs()
    assert bool((err <= amax * rel).all())


@pytest.mark.parametrize("kind,dtype", [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_float_kinds(kind, dtype):
    x = torch.randn(3, 2, 64)
    s = K.quantize_kv(x, kind)
    assert s.dtype == dtype == K.kv_storage_dtype(kind)
    y = K.dequantize_kv(s, kind, x.shape)
    assert y.dtype == torch.float32
    assert torch.equal(y, x.to(dtype).float())
    if kind == "f32":
        assert y.data_ptr() != s.data_ptr()


def test_row_bytes():
    assert K.KV_TYPES == {"f32", "f16", "bf16", "q8_0", "q4_0"}
    for n in (32, 64, 128, 256, 512):
        assert K.kv_row_bytes("q8_0", n) == n // 32 * 34
        assert K.kv_row_bytes("q4_0", n) == n // 32 * 18
        assert K.kv_row_bytes("f16", n) == 2 * n
        assert K.kv_row_bytes("bf16", n) == 2 * n
        assert K.kv_row_bytes("f32", n) == 4 * n
    assert K.kv_row_bytes("f16", 80) == 160  # float kinds take any width
    with pytest.raises(ValueError):
        K.kv_row_bytes("q4_0", 80)
    with pytest.raises(ValueError):
        K.kv_row_bytes("q5_0", 64)
    with pytest.raises(ValueError):
        K.quantize_kv(torch.zeros(2, 48), "q8_0")


def test_rotation_applies():
    assert K.rotation_applies(128, "q4_0") and K.rotation_applies(256, "q8_0") and K.rotation_applies(64, "q8_0")
    assert not K.rotation_applies(96, "q4_0")  # not a multiple of 64
    for kind in ("f32", "f16", "bf16"):
        assert not K.rotation_applies(128, kind)


@pytest.mark.parametrize("group", [2, 8, 64, 128])
def test_hadamard_orthonormal_self_inverse(group):
    h = K.hadamard_matrix(group).double()
    eye = torch.eye(group, dtype=torch.float64)
    assert torch.allclose(h, h.T)
    assert torch.allclose(h @ h, eye, atol=1e-6)
    assert torch.allclose(h.abs(), torch.full_like(h, group**-0.5), atol=1e-7)
    x = torch.randn(7, 3, 256)
    hx = K.hadamard(x, group)
    assert torch.allclose(K.hadamard(hx, group), x, atol=1e-6)
    assert torch.allclose(hx.norm(dim=-1), x.norm(dim=-1), rtol=1e-6)
    # Groups are independent: the transform of one 64-slice depends on that slice only.
    assert torch.allclose(hx[..., :group], K.hadamard(x[..., :group], group), atol=1e-6)


def test_hadamard_matches_butterfly():
    """The matmul path equals a textbook fast Walsh-Hadamard transform (Sylvester order)."""
    x = torch.randn(4, 128, dtype=torch.float64)
    y = x.reshape(-1, 2, 64).clone()
    h = 1
    while h < 64:
        y = y.view(y.shape[0], 2, -1, 2, h)
        y = torch.stack((y[:, :, :, 0] + y[:, :, :, 1], y[:, :, :, 0] - y[:, :, :, 1]), dim=3)
        h *= 2
    want = y.reshape(4, 128) / 8
    assert torch.allclose(K.hadamard(x.float()).double(), want, atol=1e-5)
    with pytest.raises(ValueError):
        K.hadamard(torch.zeros(2, 96))  # 96 is not a multiple of 64
    with pytest.raises(ValueError):
        K.hadamard(torch.zeros(2, 96), group=48)


def test_rotation_preserves_scores_and_output():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(9, 256, generator=g) for _ in range(3))
    s = q @ k.T
    s_rot = K.hadamard(q) @ K.hadamard(k).T
    assert torch.allclose(s_rot, s, atol=1e-5 * s.abs().max())
    # Output of rotated values, rotated back, equals the plain attention output.
    p = torch.softmax(s / 16, -1)
    assert torch.allclose(K.hadamard(p @ K.hadamard(v)), p @ v, atol=1e-5)


def _outlier_keys(seed: int, n=256, d=128):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(32, d, generator=g)
    k = torch.randn(n, d, generator=g)
    k[:, [3, 40, 77, 100]] *= 25.0  # a few outlier channels, as real post-RoPE keys have
    return q, k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotation_reduces_q4_0_score_error(seed):
    q, k = _outlier_keys(seed)
    exact = q @ k.T

    def err(kq: torch.Tensor) -> float:
        return float((kq - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())

    k_plain = K.dequantize_kv(K.quantize_kv(k, "q4_0"), "q4_0", k.shape)
    e_plain = err(q @ k_plain.T)
    kr = K.hadamard(k)
    k_rot = K.dequantize_kv(K.quantize_kv(kr, "q4_0"), "q4_0", k.shape)
    e_rot = err(K.hadamard(q) @ k_rot.T)
    assert e_rot < 0.5 * e_plain, (e_plain, e_rot)


@pytest.mark.parametrize("kind", sorted(QTYPES))
def test_query_for_block_keys_is_q8_0(kind):
    # llama.cpp's CPU flash attention converts Q to the K type's vec_dot_type before K.Q: q8_0 for both
    # q8_0 and q4_0 keys. Each 32-value block of Q becomes d * n, d = fp16(amax / 127), integer n in
    # [-127, 127]: gguf.quants' Q8_0 round trip, except on rounding ties (AVX2 rounds them to even).
    x = _data(5, 2.0, shape=(6, 4, 256))
    got = K.query_for_keys(x, kind)
    assert got.dtype == torch.float32 and got.shape == x.shape
    want = ref.dequantize(ref.quantize(x.numpy(), T.Q8_0), T.Q8_0).reshape(x.shape)
    assert (got.numpy() != want).mean() < 1e-3
    np.testing.assert_allclose(got.numpy(), want, atol=float(x.abs().max()) / 127)
    assert not torch.equal(got, x)
    # Row by row: a row's result does not depend on the rows rounded with it (batch invariance).
    assert all(torch.equal(got[i : i + 1], K.query_for_keys(x[i : i + 1], kind)) for i in range(x.shape[0]))
    tie = torch.zeros(1, 1, 32)
    tie[..., 0], tie[..., 1] = 127.0, 2.5  # 2.5 * 127/127 is a tie: even (2), where gguf.quants gives 3
    assert K.query_for_keys(tie, kind)[0, 0, 1] == 2.0
    with pytest.raises(ValueError):
        K.query_for_keys(torch.zeros(2, 48), kind)


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_query_for_float_keys_is_unchanged(kind):
    # f32/f16 keys: llama.cpp's prefill path keeps Q in float32.
    x = torch.randn(3, 4, 64)
    assert K.query_for_keys(x, kind) is x


def test_query_for_bf16_keys_is_bf16():
    # bf16 keys: ggml converts Q to bf16 (round to nearest even) before the bf16 dot.
    x = torch.randn(3, 4, 64)
    got = K.query_for_keys(x, "bf16")
    assert got.dtype == torch.float32 and torch.equal(got, x.to(torch.bfloat16).float())
    assert not torch.equal(got, x)
