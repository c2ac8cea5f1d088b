"""Tiny random Gemma 4 models (every released variant's features) built offline with transformers,
written to GGUF by qatserve's converter, must give transformers' logits (float32, within 1e-4) on a
prompt 4x the sliding window; decoding token by token through the KV cache must give the same logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qatserve.convert.hf_to_gguf import convert  # noqa: E402
from qatserve.engine.generate import Generator  # noqa: E402
from qatserve.engine.loader import load_model_file  # noqa: E402
from qatserve.errors import ModelError  # noqa: E402
from qatserve.formats.gguf_reader import open_gguf  # noqa: E402

PROMPT_LEN = 64
VOCAB = 512
WINDOW = 16
S, F = "sliding_attention", "full_attention"

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, global_head_dim=32, sliding_window=WINDOW, max_position_embeddings=256,
            vocab_size_per_layer_input=VOCAB,
            final_logit_softcapping=30.0)

VARIANTS = {
    # 31B-style: K=V full layers with fewer KV heads and a wider head, no PLE.
    "dense-k-eq-v": dict(layer_types=[S, S, F, S, S, F], attention_k_eq_v=True, num_global_key_value_heads=1,
                         hidden_size_per_layer_input=0),
    # E2B-style: PLE, the last 3 of 7 layers read layers 2 (sliding) and 3 (full), double-wide MLP there,
    # loaded through the multimodal class (model.language_model.* names). No soft-cap key on purpose.
    "ple-kv-sharing": dict(layer_types=[S, S, S, F, S, S, F], hidden_size_per_layer_input=8, num_kv_shared_layers=3,
                           use_double_wide_mlp=True, final_logit_softcapping=None, conditional=True),
    # 26B-A4B-style: routed experts beside the dense MLP, K=V full layers.
    "moe": dict(layer_types=[S, S, F, S, F], attention_k_eq_v=True, num_global_key_value_heads=1,
                hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8, top_k_experts=2,
                moe_intermediate_size=24),
    # 12B "unified" classes (no PLE/MoE in the config at all).
    "unified": dict(layer_types=[S, S, F, S, F], attention_k_eq_v=True, num_global_key_value_heads=1, unified=True),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and persistent buffer (layer scalars) random, so each one changes the logits.

    Gemma 4 norms multiply by w (no +1): keep them around 1. Router/expert scales and layer scalars
    stay positive, as trained ones are.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _build(variant: str, tmp_path, seed: int = 1):
    opts = dict(VARIANTS[variant])
    conditional, unified = opts.pop("conditional", False), opts.pop("unified", False)
    opts["num_hidden_layers"] = len(opts["layer_types"])
    if unified:
        cfg = transformers.Gemma4UnifiedTextConfig(**{**BASE, **opts})
        cfg._attn_implementation = "eager"
        model = transformers.Gemma4UnifiedForCausalLM(cfg)
    elif conditional:
        text = transformers.Gemma4TextConfig(**{**BASE, **opts})
        cfg = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
        cfg._attn_implementation = "eager"
        cfg.text_config._attn_implementation = "eager"
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    else:
        cfg = transformers.Gemma4TextConfig(**{**BASE, **opts})
        cfg._attn_implementation = "eager"
        model = transformers.Gemma4ForCausalLM(cfg)
    model = model.eval()
    _randomise(model, seed)
    model.save_pretrained(tmp_path / "hf")
    return model, convert(tmp_path / "hf", tmp_path / "model.gguf")


def _tokens(seed: int, n: int = PROMPT_LEN) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gemma4_logits_match_transformers(tmp_path, variant):
    model, path = _build(variant, tmp_path)
    tokens = _tokens(2)
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].float()
    loaded = load_model_file(path, backend="torch")
    try:
        got = Generator(loaded.model, None, n_ctx=128, prefill_chunk=24).logits_all(tokens)
    finally:
        loaded.gguf.close()
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert PROMPT_LEN > 3 * WINDOW  # sliding layers really dropped keys


@pytest.mark.parametrize("variant", ["dense-k-eq-v", "ple-kv-sharing"])
def test_gemma4_incremental_decode_equals_full_prefill(tmp_path, variant):
    """Token-by-token decoding (per-layer cache shapes, shared KV, sliding windows) equals one forward."""
    _, path = _build(variant, tmp_path, seed=5)
    loaded = load_model_file(path, backend="torch")
    try:
        gen = Generator(loaded.model, None, n_ctx=64)
        tokens = _tokens(6, 48)
        full = gen.logits_all(tokens)
        gen.cache.truncate(0)
        steps = [gen.model(torch.tensor([t]), torch.tensor([i]), gen.cache)[0] for i, t in enumerate(tokens)]
        # Decode and prefill take different matmul and attention paths (scale-1 scores amplify float32
        # rounding): equal up to rounding, where a window or sharing bug would differ by O(1).
        torch.testing.assert_close(torch.stack(steps), full, atol=5e-5, rtol=0)
        assert gen.cache.length == len(tokens)
    finally:
        loaded.gguf.close()


def test_gemma4_gguf_metadata_is_what_llama_cpp_reads(tmp_path):
    _, path = _build("ple-kv-sharing", tmp_path)
    f = open_gguf(path)
    try:
        m, t = f.metadata, f.tensors
        assert m["general.architecture"] == "gemma4"
        assert list(m["gemma4.attention.sliding_window_pattern"]) == [True, True, True, False, True, True, False]
        assert m["gemma4.attention.shared_kv_layers"] == 3
        assert list(m["gemma4.feed_forward_length"]) == [96] * 4 + [192] * 3
        assert (m["gemma4.attention.key_length"], m["gemma4.attention.key_length_swa"]) == (32, 16)
        assert (m["gemma4.rope.dimension_count"], m["gemma4.rope.dimension_count_swa"]) == (32, 16)
        assert m["gemma4.embedding_length_per_layer_input"] == 8
        assert m["gemma4.final_logit_softcapping"] == 0.0  # HF None: llama.cpp would otherwise apply 30
        freqs = f.tensor_bytes("rope_freqs.weight").view("float32")
        assert freqs.tolist() == [1.0] * 4 + [pytest.approx(1e30)] * 12
        for name in ("per_layer_token_embd.weight", "per_layer_model_proj.weight", "per_layer_proj_norm.weight",
                     "blk.0.inp_gate.weight", "blk.0.proj.weight", "blk.0.post_norm.weight",
                     "blk.6.layer_output_scale.weight"):
            assert name in t, name
        assert "blk.4.attn_k.weight" not in t and "blk.3.attn_v.weight" in t
    finally:
        f.close()
    _, path = _build("moe", tmp_path / "moe")
    f = open_gguf(path)
    try:
        m, t = f.metadata, f.tensors
        assert list(m["gemma4.attention.head_count_kv"]) == [2, 2, 1, 2, 1]
        assert (m["gemma4.expert_count"], m["gemma4.expert_used_count"], m["gemma4.expert_feed_forward_length"]) == (
            8, 2, 24)
        assert tuple(t["blk.0.ffn_gate_up_exps.weight"].ne) == (64, 48, 8)
        assert tuple(t["blk.0.ffn_down_exps.weight"].ne) == (24, 64, 8)
        assert tuple(t["blk.0.ffn_gate_inp.scale"].ne) == (64,) and tuple(t["blk.0.ffn_down_exps.scale"].ne) == (8,)
        assert "blk.2.attn_v.weight" not in t and "blk.1.attn_v.weight" in t
    finally:
        f.close()


def test_unknown_hf_class_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma5ForCausalLM"]}))
    with pytest.raises(ModelError, match="Gemma5ForCausalLM"):
        convert(tmp_path, tmp_path / "x.gguf")
