"""Tiny random Gemma 4 target + MTP assistant pairs built with transformers and converted by qatserve's
converter (shared by tests/models/test_gemma4_assistant.py and the speculative-decoding tests)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from qatserve.convert.hf_to_gguf import convert

VOCAB, WINDOW = 512, 16
S, F = "sliding_attention", "full_attention"
COMMON = dict(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
              sliding_window=WINDOW, max_position_embeddings=256)
TARGETS = {
    # E2B-style: PLE, KV sharing (the assistant reads layers 2 and 3), double-wide MLP.
    "e2b": dict(hidden_size=64, intermediate_size=96, layer_types=[S, S, S, F, S, S, F], hidden_size_per_layer_input=8,
                vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=3, use_double_wide_mlp=True,
                final_logit_softcapping=30.0),
    # 12B-style unified target: K=V full layers with one KV head, no sharing (reads layers 3 and 4).
    "unified": dict(hidden_size=48, intermediate_size=80, layer_types=[S, S, F, S, F], attention_k_eq_v=True,
                    num_global_key_value_heads=1, final_logit_softcapping=30.0),
}
ASSISTANT = dict(hidden_size=32, intermediate_size=40, layer_types=[S, S, S, F], hidden_size_per_layer_input=0,
                 vocab_size_per_layer_input=0)
N_CENTROIDS, TOP_K = 16, 4
ASSISTANT_STD = 0.05  # see _randomise


def _kv_sharing_modes(self):
    n = self.num_hidden_layers
    first = n - (self.num_kv_shared_layers or 0)
    modes = [None if i < first else "reuse" for i in range(n)]
    for kind in set(self.layer_types):
        producers = [i for i in range(first) if self.layer_types[i] == kind]
        if producers:
            modes[producers[-1]] = "store"
    return modes


@contextlib.contextmanager
def patched_kv_sharing():
    """transformers 5.23 cannot build an all-KV-shared assistant: patch Gemma4*TextConfig.kv_sharing_modes
    (keeping its rule) while models are built and run."""
    import transformers

    with pytest.MonkeyPatch.context() as mp:
        for cls in (transformers.Gemma4TextConfig, transformers.Gemma4UnifiedTextConfig):
            mp.setattr(cls, "kv_sharing_modes", property(_kv_sharing_modes))
        yield


def _randomise(model: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Every parameter and buffer random (norms around 1, layer scalars positive, the centroid ordering a
    permutation). The assistant uses a smaller std: with 0.08 the random draft recurrence h -> h' amplifies
    float32 rounding 3-10x per step (step 0 agrees to 3e-6, step 4 drifts to 2e-4 in either direction),
    which would test the weights' conditioning rather than the math."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "norm" in name else std
            p.copy_((1.0 if "norm" in name else 0.0) + torch.randn(p.shape, generator=g) * scale)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("token_ordering"):
                b.copy_(torch.randperm(b.numel(), generator=g))


def _build_pair(kind: str, tmp_path, ordered: bool, seed: int = 1):
    """(HF target, target GGUF path, HF assistant, assistant GGUF path), written under tmp_path; call
    with the kv-sharing patch active."""
    import transformers

    unified = kind == "unified"
    text_cls = transformers.Gemma4UnifiedTextConfig if unified else transformers.Gemma4TextConfig
    opts = {**COMMON, **TARGETS[kind]}
    tcfg = text_cls(num_hidden_layers=len(opts["layer_types"]), **opts)
    tcfg._attn_implementation = "eager"
    target = (transformers.Gemma4UnifiedForCausalLM if unified else transformers.Gemma4ForCausalLM)(tcfg).eval()
    _randomise(target, seed)
    target.save_pretrained(tmp_path / "hf_target")

    a_opts = {**COMMON, **ASSISTANT}
    if unified:  # the assistant's full layer must read the target's one KV head
        a_opts.update(attention_k_eq_v=True, num_global_key_value_heads=1)
    atext = text_cls(num_hidden_layers=4, num_kv_shared_layers=4, **a_opts)
    acls = transformers.Gemma4UnifiedAssistantConfig if unified else transformers.Gemma4AssistantConfig
    acfg = acls(text_config=atext.to_dict(), backbone_hidden_size=tcfg.hidden_size, use_ordered_embeddings=ordered,
                num_centroids=N_CENTROIDS, centroid_intermediate_top_k=TOP_K)
    acfg._attn_implementation = "eager"
    acfg.text_config._attn_implementation = "eager"
    amodel = (transformers.Gemma4UnifiedAssistantForCausalLM if unified
              else transformers.Gemma4AssistantForCausalLM)(acfg).eval()
    _randomise(amodel, seed + 1, ASSISTANT_STD)
    amodel.save_pretrained(tmp_path / "hf_assistant")
    return (target, convert(tmp_path / "hf_target", tmp_path / "target.gguf"),
            amodel, convert(tmp_path / "hf_assistant", tmp_path / "assistant.gguf"))
