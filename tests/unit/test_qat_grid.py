"""QAT-faithful Q4_0: weights already on a 4-bit grid convert with every block exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qatserve.quant.blocks import dequantize, quantize
from qatserve.quant.qat_grid import grid_exact_share, quantize_q4_0_grid


def on_grid(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """w = s * k per block of 32, k in [-7, 7] with a +7 in every block: plain max/-8 rounding
    (d = -7s/8) cannot recover these codes."""
    g = torch.Generator().manual_seed(seed)
    rows, n = int(np.prod(shape[:-1])), shape[-1]
    k = torch.randint(-7, 8, (rows * n // 32, 32), generator=g).float()
    k[:, 5] = 7
    s = (torch.rand(rows * n // 32, 1, generator=g) * 0.02 + 0.002).half().float()  # fp16-representable
    return (k * s).reshape(shape)


def test_grid_blocks_are_recovered_exactly_where_plain_rounding_is_not():
    w = on_grid((64, 256), seed=0)
    plain = quantize(w.numpy(), T.Q4_0)
    assert grid_exact_share(w, plain) < 0.05
    raw, exact, total = quantize_q4_0_grid(w)
    assert (exact, total) == (64 * 8, 64 * 8)
    assert torch.equal(dequantize(raw, T.Q4_0, tuple(w.shape)), w)


def test_blocks_off_the_grid_fall_back_to_llamacpp_rounding():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    raw, exact, total = quantize_q4_0_grid(w)
    assert exact == 0 and total == 64
    assert np.array_equal(raw, quantize(w.numpy(), T.Q4_0))
    zeros = torch.zeros(2, 64)
    raw, exact, _ = quantize_q4_0_grid(zeros)
    assert exact == 4 and torch.equal(dequantize(raw, T.Q4_0, (2, 64)), zeros)


def test_negative_extremes_and_small_codes():
    g = torch.Generator().manual_seed(2)
    s = (torch.rand(16, 1, generator=g) * 0.02 + 0.002).half().float()
    k = torch.randint(-7, 8, (16, 32), generator=g).float()
    k[:8, 0] = -8  # largest magnitude on code -8
    k[8:] = torch.randint(-3, 4, (8, 32), generator=g).float()
    k[8:, 7] = 3  # largest code only 3: the scale comes from amax / 3
    w = (k * s).reshape(4, 128)
    raw, exact, total = quantize_q4_0_grid(w)
    assert (exact, total) == (16, 16)
    assert torch.equal(dequantize(raw, T.Q4_0, (4, 128)), w)


transformers = pytest.importorskip("transformers")


def test_grid_model_converts_exactly_and_keeps_its_logits(tmp_path):
    from qatserve.convert.hf_to_gguf import convert
    from qatserve.engine.generate import Generator
    from qatserve.engine.loader import load_model_file

    cfg = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=16, max_position_embeddings=128,
        query_pre_attn_scalar=32,
    )
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.ndim == 2:
                p.copy_(on_grid(tuple(p.shape), seed=10 + i))
            else:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
    model.save_pretrained(tmp_path / "hf")
    stats: dict[str, int] = {}
    path = convert(tmp_path / "hf", tmp_path / "q4.gguf", "Q4_0", stats=stats)
    assert stats["q4_0_blocks"] > 0 and stats["q4_0_exact_blocks"] == stats["q4_0_blocks"]
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0]
    loaded = load_model_file(path, backend="torch")
    got = Generator(loaded.model, None, n_ctx=64).logits_all(tokens)
    loaded.gguf.close()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
