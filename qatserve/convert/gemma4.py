"""Gemma 4 (and the 12B `Gemma4Unified*`) metadata and tensor names for the HF -> GGUF converter.

Writes what llama.cpp's gemma4 loader reads (spec 4.2/4.3), following its converter
(conversion/gemma.py, Gemma4Model): per-layer arrays for head_count_kv (when full layers differ) and
feed_forward_length (double-wide MLP), key_length = full-layer head dim and key_length_swa = sliding
head dim, the sliding pattern as one bool per layer, and `rope_freqs.weight` for proportional RoPE.
Norm weights are stored raw (Gemma 4's RMSNorm multiplies by w, not 1 + w).
"""

from __future__ import annotations

import re
from typing import Any

import gguf
import torch

from qatserve.errors import ModelError

# HF class -> (GGUF arch, gguf tensor map). The unified 12B has the same text decoder minus PLE/MoE.
HF_CLASSES = {
    "Gemma4ForCausalLM": ("gemma4", gguf.MODEL_ARCH.GEMMA4),
    "Gemma4ForConditionalGeneration": ("gemma4", gguf.MODEL_ARCH.GEMMA4),
    "Gemma4UnifiedForCausalLM": ("gemma4", gguf.MODEL_ARCH.GEMMA4),
    "Gemma4UnifiedForConditionalGeneration": ("gemma4", gguf.MODEL_ARCH.GEMMA4),
}
# Multimodal towers and projectors of the *ForConditionalGeneration checkpoints: not text decoder.
SKIP_PARTS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")


def _full_layer_value(cfg: dict[str, Any], key: str, global_key: str) -> Any:
    """A full-attention-layer override: `global_head_dim`-style key in official configs, or the
    `per_layer_config` transformers 5 writes on save_pretrained."""
    if cfg.get(global_key) is not None:
        return cfg[global_key]
    types = cfg["layer_types"]
    for idx, over in (cfg.get("per_layer_config") or {}).items():
        if int(idx) < len(types) and types[int(idx)] == "full_attention" and key in over:
            return over[key]
    return None


class Gemma4Writer:
    """Writes the metadata on construction; then maps tensors (`rename`, `__call__`) and adds the
    generated ones (`extra`). The HF -> GGUF converter drives it."""

    def __init__(self, w: gguf.GGUFWriter, cfg: dict[str, Any]):
        n_layer = int(cfg["num_hidden_layers"])
        types = cfg.get("layer_types") or [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layer)]
        types = list(types)
        types[-1] = "full_attention"  # HF forces the last layer to full attention
        cfg = {**cfg, "layer_types": types}
        swa = [t == "sliding_attention" for t in types]
        hd_swa = int(cfg.get("head_dim", 256))
        hd_full = int(_full_layer_value(cfg, "head_dim", "global_head_dim") or 512)
        n_kv = int(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
        # HF applies num_global_key_value_heads only on K=V models (attention_k_eq_v gates it).
        n_kv_full = n_kv
        if cfg.get("attention_k_eq_v", False):
            n_kv_full = int(_full_layer_value(cfg, "num_key_value_heads", "num_global_key_value_heads") or n_kv)
        n_shared = int(cfg.get("num_kv_shared_layers") or 0)
        n_ff = int(cfg["intermediate_size"])

        rope = cfg.get("rope_parameters") or {}
        full = rope.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                              "rope_theta": 1_000_000.0}
        sliding = rope.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10_000.0}
        for name, params in (("full_attention", full), ("sliding_attention", sliding)):
            kind = params.get("rope_type", "default")
            if kind not in ("default", "proportional") or float(params.get("factor", 1.0)) != 1.0:
                raise ModelError(f"rope_parameters[{name!r}]: {kind!r} with factor "
                                 f"{params.get('factor', 1.0)} is not supported (default, proportional)")

        w.add_context_length(int(cfg.get("max_position_embeddings", 131072)))
        w.add_embedding_length(int(cfg["hidden_size"]))
        w.add_block_count(n_layer)
        if cfg.get("use_double_wide_mlp") and n_shared:
            w.add_feed_forward_length([n_ff if il < n_layer - n_shared else 2 * n_ff for il in range(n_layer)])
        else:
            w.add_feed_forward_length(n_ff)
        w.add_head_count(int(cfg["num_attention_heads"]))
        w.add_head_count_kv(n_kv if n_kv_full == n_kv else [n_kv if s else n_kv_full for s in swa])
        w.add_rope_freq_base(float(full["rope_theta"]))
        w.add_rope_freq_base_swa(float(sliding["rope_theta"]))
        w.add_key_length(hd_full)
        w.add_value_length(hd_full)
        w.add_key_length_swa(hd_swa)
        w.add_value_length_swa(hd_swa)
        # Full layers "rotate" the whole head; rope_freqs.weight switches off all but the proportional part.
        w.add_rope_dimension_count(hd_full)
        w.add_rope_dimension_count_swa(int(hd_swa * float(sliding.get("partial_rotary_factor", 1.0))))
        w.add_sliding_window_pattern(swa)
        w.add_shared_kv_layers(n_shared)
        w.add_sliding_window(int(cfg["sliding_window"]))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_embedding_length_per_layer_input(int(cfg.get("hidden_size_per_layer_input") or 0))
        # llama.cpp applies 30 when the key is absent, so "no soft-cap" must be written as 0.
        w.add_final_logit_softcapping(float(cfg.get("final_logit_softcapping") or 0.0))
        if cfg.get("enable_moe_block"):
            w.add_expert_count(int(cfg["num_experts"]))
            w.add_expert_used_count(int(cfg["top_k_experts"]))
            w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))

        # rope_freqs: per frequency pair of the full head, 1.0 where it rotates and 1e30 (ggml divides
        # the angle by it: ~0) where proportional RoPE leaves the pair alone.
        n_pairs = hd_full // 2
        n_rot = n_pairs
        if full.get("rope_type") == "proportional":
            n_rot = int(hd_full * float(full.get("partial_rotary_factor", 1.0)) / 2)
        self._rope_freqs = torch.tensor([1.0] * n_rot + [1e30] * (n_pairs - n_rot), dtype=torch.float32)

    def rename(self, name: str) -> str | None:
        """GGUF names for the HF tensors the gguf package's map lacks or names without a suffix."""
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if not m:
            return None
        bid, rest = m.groups()
        return {
            "router.scale": f"blk.{bid}.ffn_gate_inp.scale",
            "router.per_expert_scale": f"blk.{bid}.ffn_down_exps.scale",  # a model parameter, not a quant scale
            "layer_scalar": f"blk.{bid}.layer_output_scale.weight",
            "experts.gate_up_proj": f"blk.{bid}.ffn_gate_up_exps.weight",
            "experts.down_proj": f"blk.{bid}.ffn_down_exps.weight",
        }.get(rest)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t

    def extra(self) -> list[tuple[str, torch.Tensor]]:
        """Generated tensors: rope_freqs.weight (required by llama.cpp's loader on full layers)."""
        return [("rope_freqs.weight", self._rope_freqs)]
