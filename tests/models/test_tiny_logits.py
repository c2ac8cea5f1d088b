"""Tiny random Gemma 3 and Llama models built offline with transformers, written to GGUF by qatserve,
must give the same logits (float32, within 1e-4) as transformers on a 64-token prompt."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qatserve.convert.hf_to_gguf import convert  # noqa: E402
from qatserve.engine.generate import Generator  # noqa: E402
from qatserve.engine.loader import load_model_file  # noqa: E402

PROMPT_LEN = 64
VOCAB = 512


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """HF initialises Gemma norms to 0 (i.e. scale 1): randomise everything so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def _gguf_logits(hf_dir, tmp_path, tokens, out_type="F32"):
    path = convert(hf_dir, tmp_path / "model.gguf", out_type)
    loaded = load_model_file(path, backend="torch")
    try:
        gen = Generator(loaded.model, None, n_ctx=256, prefill_chunk=24)
        return gen.logits_all(tokens)
    finally:
        loaded.gguf.close()


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def _tokens(seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


GEMMA3_VARIANTS = {
    "default": {},
    # Non-standard local/global pattern, a scaled global RoPE and both soft-caps (Gemma 2 style).
    "pattern-scaling-softcap": {
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                        "full_attention", "sliding_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    # 27B-style attention scale: query_pre_attn_scalar != head_dim.
    "query-scalar": {"query_pre_attn_scalar": 24},
}


@pytest.mark.parametrize("variant", sorted(GEMMA3_VARIANTS))
def test_gemma3_logits_match_transformers(tmp_path, variant):
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
        max_position_embeddings=256, **{"query_pre_attn_scalar": 16, **GEMMA3_VARIANTS[variant]},
    )
    cfg._attn_implementation = "eager"
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    _randomise(model, seed=1)
    model.save_pretrained(tmp_path / "hf")
    tokens = _tokens(2)
    ref = _hf_logits(model, tokens)
    got = _gguf_logits(tmp_path / "hf", tmp_path, tokens)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # The prompt is 4x the window, so local layers really dropped keys: a sanity check that the
    # comparison is sensitive (logits depend on the window).
    assert PROMPT_LEN > 2 * cfg.sliding_window


@pytest.mark.parametrize("tied", [True, False])
def test_llama_logits_match_transformers(tmp_path, tied):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomise(model, seed=3)
    model.save_pretrained(tmp_path / "hf")
    tokens = _tokens(4)
    ref = _hf_logits(model, tokens)
    got = _gguf_logits(tmp_path / "hf", tmp_path, tokens)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_incremental_decode_equals_full_prefill(tmp_path):
    """Decoding token by token through the KV cache gives the logits of one full forward."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
        max_position_embeddings=256, query_pre_attn_scalar=16,
    )
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    _randomise(model, seed=5)
    model.save_pretrained(tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "m.gguf")
    loaded = load_model_file(path, backend="torch")
    gen = Generator(loaded.model, None, n_ctx=64)
    tokens = _tokens(6)[:40]
    full = gen.logits_all(tokens)
    gen.cache.truncate(0)
    steps = [gen.model(torch.tensor([t]), torch.tensor([i]), gen.cache)[0] for i, t in enumerate(tokens)]
    torch.testing.assert_close(torch.stack(steps), full, atol=1e-5, rtol=0)
    loaded.gguf.close()
