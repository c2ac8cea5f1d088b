"""Tiny random Gemma 3 / Gemma 4 models for the llama.cpp interop fixtures (tests/fixtures/llamacpp-interop/).

Shared by the recorder (tests/fixtures/make_llamacpp_interop.py, which needs llama.cpp) and the test
(tests/models/test_llamacpp_interop.py, which does not). Every weight comes from a seeded generator, so
the same seed rebuilds the same model bit for bit; the tokenizer is a 512-piece SentencePiece BPE trained
once by the recorder and committed beside the fixtures (llama.cpp needs a vocabulary in the file).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "llamacpp-interop"
TOKENIZER_DIR = FIXTURES / "tokenizer"
VOCAB = 512
N_POS = 24
WINDOW = 8
S, F = "sliding_attention", "full_attention"

_G4 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
           head_dim=16, global_head_dim=32, sliding_window=WINDOW, max_position_embeddings=128,
           vocab_size_per_layer_input=VOCAB, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
           pad_token_id=0, eos_token_id=1, bos_token_id=2)

# name -> (transformers config class, model class, config kwargs, weight seed)
MODELS = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=WINDOW, max_position_embeddings=128,
        query_pre_attn_scalar=16, final_logit_softcapping=None, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        11),
    # 31B-style: K=V full layers with fewer KV heads and a wider head.
    "gemma4-dense": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        _G4, layer_types=[S, S, F, S, F], attention_k_eq_v=True, num_global_key_value_heads=1), 12),
    # E2B-style: per-layer embeddings, the last 2 layers share K/V, double-wide MLP there, no soft-cap.
    "gemma4-ple": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        _G4, layer_types=[S, S, F, S, F], hidden_size_per_layer_input=16, num_kv_shared_layers=2,
        use_double_wide_mlp=True, final_logit_softcapping=None), 13),
    # 26B-A4B-style: routed experts beside the dense MLP, K=V full layers.
    "gemma4-moe": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        _G4, layer_types=[S, F, S, F], attention_k_eq_v=True, num_global_key_value_heads=1,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16), 14),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and the layer scalars from one seeded generator (HF's own init uses the global RNG).

    Gemma 3 norms store w of x * (1 + w): around 0; Gemma 4 norms multiply by w: around 1. Router and
    expert scales and layer scalars stay positive, as trained ones are.
    """
    gemma4 = type(model).__name__.startswith("Gemma4")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.copy_(float(gemma4) + torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def build(name: str, hf_dir: Path) -> torch.nn.Module:
    """Write the tiny model `name` (weights, config, committed tokenizer) to hf_dir; returns the model."""
    import transformers

    cfg_cls, model_cls, kwargs, seed = MODELS[name]
    if "layer_types" in kwargs:
        kwargs = dict(kwargs, num_hidden_layers=len(kwargs["layer_types"]))
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(cfg).eval()
    randomise(model, seed)
    model.save_pretrained(hf_dir)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, hf_dir / f.name)
    return model


def tokens(name: str) -> list[int]:
    """<bos> then N_POS - 1 ordinary pieces (ids past the 7 control tokens), seeded per model."""
    seed = 100 + MODELS[name][3]
    rest = torch.randint(7, VOCAB, (N_POS - 1,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [2, *rest]


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), VOCAB] float32 logits of transformers' forward."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())
