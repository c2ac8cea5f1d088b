"""A tiny random Gemma 3 (sliding window 16, head dim 64 so K/V rotation applies, Q4_0 weights so the
4-bit kernels run), written once per test session, for the engine tests."""

from __future__ import annotations

import pytest
import torch

from qatserve.engine.loader import load_model_file

VOCAB = 512
WINDOW = 16


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from qatserve.convert.hf_to_gguf import convert

    d = tmp_path_factory.mktemp("tiny-gemma3")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=WINDOW,
        max_position_embeddings=1024, query_pre_attn_scalar=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.08))
    model.save_pretrained(d / "hf")
    path = convert(d / "hf", d / "tiny-q4_0.gguf", "Q4_0")
    loaded = load_model_file(path)
    yield loaded
    loaded.gguf.close()


def random_prompts(lengths, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
