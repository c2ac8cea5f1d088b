"""Gemma 4 MTP assistants (Gemma4AssistantForCausalLM, the 12B's Gemma4UnifiedAssistantForCausalLM) for
the HF -> GGUF converter: arch `gemma4-assistant`, metadata and tensor names as llama.cpp reads them
(spec 4.2/4.4), built on the target writer (the assistant's stack is a Gemma 4 decoder).

Beyond upstream llama.cpp: the centroid head of E2B/E4B (`masked_embd_centroids.weight`, the int32
permutation `masked_embd_ordering`, keys `A.assistant.{use_ordered_embeddings, num_centroids,
centroid_intermediate_top_k}`) is kept unless `centroids=False`. llama.cpp's loader counts tensors and
refuses files with ones it does not create, so write `centroids=False` for a file llama.cpp must load.
"""

from __future__ import annotations

from typing import Any

import gguf
import torch

from qatserve.convert.gemma4 import Gemma4Writer
from qatserve.errors import ModelError

ARCH = "gemma4-assistant"
HF_CLASSES = {
    "Gemma4AssistantForCausalLM": (ARCH, gguf.MODEL_ARCH.GEMMA4),
    "Gemma4UnifiedAssistantForCausalLM": (ARCH, gguf.MODEL_ARCH.GEMMA4),
}
# Top-level keys of an assistant's config.json (beside its text_config) that the writer needs.
TOP_LEVEL_KEYS = ("backbone_hidden_size", "use_ordered_embeddings", "num_centroids", "centroid_intermediate_top_k",
                  "tie_word_embeddings")
_NAMES = {
    "pre_projection.weight": "nextn.pre_projection.weight",
    "post_projection.weight": "nextn.post_projection.weight",
    "masked_embedding.centroids.weight": "masked_embd_centroids.weight",
    "masked_embedding.token_ordering": "masked_embd_ordering",
}


def assistant_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text config with the assistant's top-level keys merged in (what `Gemma4AssistantWriter` takes)."""
    text = config.get("text_config")
    if not isinstance(text, dict) or "num_hidden_layers" not in text:
        raise ModelError("assistant config.json has no text_config with the layer stack (num_hidden_layers ...)")
    return {**text, **{k: config[k] for k in TOP_LEVEL_KEYS if k in config}}


class Gemma4AssistantWriter(Gemma4Writer):
    def __init__(self, w: gguf.GGUFWriter, cfg: dict[str, Any], centroids: bool = True):
        n_layer = int(cfg["num_hidden_layers"])
        # HF makes every assistant layer KV-shared (it reads the target's cache) and has no double-wide
        # MLP, PLE or experts; say so whatever the saved text_config spells.
        body = {**cfg, "num_kv_shared_layers": n_layer, "use_double_wide_mlp": False,
                "hidden_size_per_layer_input": 0, "enable_moe_block": False}
        super().__init__(w, body)
        backbone = int(cfg.get("backbone_hidden_size") or 0)
        if backbone <= 0:
            raise ModelError("assistant config.json lacks backbone_hidden_size (the target's hidden size)")
        w.add_embedding_length_out(backbone)  # llama.cpp: n_embd_out; the pre-projection reads 2x this
        w.add_nextn_predict_layers(n_layer)  # = block_count: every block is an MTP block
        self.centroids = centroids and bool(cfg.get("use_ordered_embeddings"))
        if self.centroids:
            p = f"{ARCH}.assistant."
            w.add_bool(p + "use_ordered_embeddings", True)
            w.add_uint32(p + "num_centroids", int(cfg.get("num_centroids", 2048)))
            w.add_uint32(p + "centroid_intermediate_top_k", int(cfg.get("centroid_intermediate_top_k", 32)))

    def rename(self, name: str) -> str | None:
        return _NAMES.get(name) or super().rename(name)

    def skip(self, name: str) -> bool:
        """HF tensors that do not go into the file: the centroid head when not kept."""
        return name.startswith("masked_embedding.") and not self.centroids

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t
