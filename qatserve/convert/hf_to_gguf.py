"""Hugging Face safetensors checkpoint -> GGUF, for the architectures qatserve runs.
Gemma 4 and the unified 12B: convert/gemma4.py; their MTP assistants: convert/gemma4_assistant.py.

Tensor names come from the `gguf` package's maps, so files match what llama.cpp's converter writes:
Gemma norms get their `1 + w` baked in; Llama Q/K rows are permuted so that llama.cpp's 'norm' RoPE
(adjacent pairs) equals HF's rotate-half. The vocabulary (convert/vocab.py) is exported when the checkpoint
has tokenizer.model (Gemma 3, Llama) or tokenizer.json (Gemma 4); without one the file still loads for
logits (`qatserve run` needs one).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch

from qatserve.convert.gemma4 import HF_CLASSES as GEMMA4_CLASSES, SKIP_PARTS as GEMMA4_SKIP, Gemma4Writer
from qatserve.convert.gemma4_assistant import HF_CLASSES as ASSISTANT_CLASSES, Gemma4AssistantWriter, assistant_config
from qatserve.convert.vocab import write_vocab
from qatserve.errors import ModelError, RequestError
from qatserve.quant.blocks import quantize
from qatserve.quant.qat_grid import quantize_q4_0_grid

T = gguf.GGMLQuantizationType
OUT_TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0, "Q4_0": T.Q4_0}
# general.file_type values (llama_ftype) for the whole-file type.
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}

# HF class name -> (GGUF arch, gguf MODEL_ARCH). Unknown classes fail by name: no silent aliasing.
HF_CLASSES = {
    "Gemma3ForCausalLM": ("gemma3", gguf.MODEL_ARCH.GEMMA3),
    "Gemma3TextModel": ("gemma3", gguf.MODEL_ARCH.GEMMA3),
    "Gemma3ForConditionalGeneration": ("gemma3", gguf.MODEL_ARCH.GEMMA3),
    "LlamaForCausalLM": ("llama", gguf.MODEL_ARCH.LLAMA),
    **GEMMA4_CLASSES,
    **ASSISTANT_CLASSES,
}


def _load_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise RequestError(f"{hf_dir}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def _rope(cfg: dict[str, Any], layer_type: str | None) -> tuple[float, float]:
    """(theta, linear factor) for a layer type, from HF v5 `rope_parameters` or the older keys."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        factor = float(params.get("factor", 1.0)) if params.get("rope_type", "default") == "linear" else 1.0
        return float(params["rope_theta"]), factor
    if layer_type == "sliding_attention" and "rope_local_base_freq" in cfg:
        return float(cfg["rope_local_base_freq"]), 1.0
    scaling = cfg.get("rope_scaling") or {}
    factor = float(scaling.get("factor", 1.0)) if scaling.get("rope_type", scaling.get("type")) == "linear" else 1.0
    return float(cfg.get("rope_theta", 10000.0)), factor


def _hf_tensor_name(name: str) -> str:
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    return name


def _write_common(w: gguf.GGUFWriter, cfg: dict[str, Any], head_dim: int) -> None:
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(int(cfg["vocab_size"]))


def _gemma3_meta(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> Callable[[str, torch.Tensor], torch.Tensor]:
    head_dim = int(cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]))
    _write_common(w, cfg, head_dim)
    theta, factor = _rope(cfg, "full_attention")
    theta_swa, _ = _rope(cfg, "sliding_attention")
    w.add_rope_freq_base(theta)
    if factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    if theta_swa != 10000.0:
        w.add_float32(f"{w.arch}.rope.freq_base_swa", theta_swa)
    window = cfg.get("sliding_window")
    n_layer = int(cfg["num_hidden_layers"])
    if window:
        w.add_sliding_window(int(window))
        types = cfg.get("layer_types") or [
            "full_attention" if (i + 1) % int(cfg.get("sliding_window_pattern", 6)) == 0 else "sliding_attention"
            for i in range(n_layer)
        ]
        flags = [t == "sliding_attention" for t in types]
        if flags != [(i % 6) < 5 for i in range(n_layer)]:
            w.add_array(f"{w.arch}.attention.sliding_window_pattern", flags)
    qpas = float(cfg.get("query_pre_attn_scalar", head_dim))
    if qpas != head_dim:
        w.add_float32(f"{w.arch}.attention.scale", 1.0 / math.sqrt(qpas))
    for key, writer in (("final_logit_softcapping", w.add_final_logit_softcapping),
                        ("attn_logit_softcapping", w.add_attn_logit_softcapping)):
        if cfg.get(key):
            writer(float(cfg[key]))

    def fix(name: str, t: torch.Tensor) -> torch.Tensor:
        # HF Gemma RMSNorm computes x * (1 + w); GGUF stores 1 + w so that every norm is x * w.
        return t + 1.0 if name.endswith("norm.weight") else t

    return fix


def _llama_meta(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> Callable[[str, torch.Tensor], torch.Tensor]:
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads", n_head))
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    _write_common(w, cfg, head_dim)
    theta, factor = _rope(cfg, None)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    if factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)

    def permute(t: torch.Tensor, heads: int) -> torch.Tensor:
        # rows of each head go from [half0 | half1] to interleaved pairs (i, i + d/2).
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    def fix(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith("self_attn.q_proj.weight"):
            return permute(t, n_head)
        if name.endswith("self_attn.k_proj.weight"):
            return permute(t, n_kv)
        return t

    return fix


# Each writes the metadata and returns fix(hf_name, tensor) -> tensor; it may also offer
# rename(hf_name) -> GGUF name | None (names the gguf map lacks) and extra() -> [(GGUF name, tensor)]
# (generated tensors), as Gemma4Writer does.
# It may also offer skip(hf_name) -> bool for tensors that stay out of the file.
_ARCH_META = {"gemma3": _gemma3_meta, "gemma4": Gemma4Writer, "gemma4-assistant": Gemma4AssistantWriter,
              "llama": _llama_meta}


def _encode(t: torch.Tensor, qtype: T, stats: dict[str, int]) -> tuple[np.ndarray, T]:
    """Tensor -> (array for GGUFWriter, its GGML type). 1-D tensors and odd widths stay float32.

    Q4_0 fits each block's scale to the 4-bit grid a QAT checkpoint already sits on (quant/qat_grid.py)
    and counts exact blocks in `stats`."""
    x = t.detach().to(torch.float32)
    if x.ndim < 2 or qtype == T.F32:
        return x.numpy(), T.F32
    if qtype == T.F16:
        return x.to(torch.float16).numpy(), T.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if x.shape[-1] % block:
        return x.numpy(), T.F32
    if qtype == T.Q4_0:
        raw, exact, total = quantize_q4_0_grid(x)
        stats["q4_0_exact_blocks"] = stats.get("q4_0_exact_blocks", 0) + exact
        stats["q4_0_blocks"] = stats.get("q4_0_blocks", 0) + total
        return raw, qtype
    return quantize(x, qtype), qtype


def convert(hf_dir: str | Path, out_path: str | Path, out_type: str = "F32", *, centroids: bool = True,
            stats: dict[str, int] | None = None) -> Path:
    """Write OUT.gguf from an HF checkpoint directory; returns the output path.

    centroids: for a Gemma 4 assistant with a centroid head, keep its tensors (qatserve's sparse head;
    llama.cpp refuses such a file) or drop them as llama.cpp's converter does.
    """
    hf_dir = Path(hf_dir)
    stats = {} if stats is None else stats
    if out_type not in OUT_TYPES:
        raise RequestError(f"--type {out_type!r}: expected one of {', '.join(OUT_TYPES)}")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise RequestError(f"{hf_dir}: no config.json")
    config = json.loads(cfg_path.read_text())
    classes = config.get("architectures") or []
    known = [c for c in classes if c in HF_CLASSES]
    if not known:
        raise ModelError(
            f"{hf_dir}: architecture {classes or config.get('model_type')!r} is not supported for conversion "
            f"(supported: {', '.join(sorted(HF_CLASSES))})"
        )
    arch, model_arch = HF_CLASSES[known[0]]
    cfg = assistant_config(config) if arch == "gemma4-assistant" else _text_config(config)
    qtype = OUT_TYPES[out_type]
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(hf_dir.name)
    writer.add_file_type(_FILE_TYPE[out_type])
    meta = _ARCH_META[arch]
    if arch == "gemma4-assistant":
        meta = functools.partial(meta, centroids=centroids)
    fix = meta(writer, cfg)
    write_vocab(writer, hf_dir, arch, int(cfg["vocab_size"]))
    names = gguf.get_tensor_name_map(model_arch, int(cfg["num_hidden_layers"]))
    rename = getattr(fix, "rename", lambda name: None)
    skip = getattr(fix, "skip", lambda name: False)
    state = _load_state(hf_dir)
    for hf_name, tensor in state.items():
        name = _hf_tensor_name(hf_name)
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings", True):
            continue
        if any(part in name for part in ("vision_tower", "multi_modal_projector", "rotary_emb", *GEMMA4_SKIP)):
            continue
        if skip(name):
            continue
        gguf_name = rename(name) or names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"{hf_dir}: tensor {hf_name!r} has no GGUF name for arch {arch}")
        if not tensor.is_floating_point():  # index tensors (a token permutation) stay integers
            writer.add_tensor(gguf_name, tensor.to(torch.int32).numpy(), raw_dtype=T.I32)
            continue
        data, dtype = _encode(fix(name, tensor.to(torch.float32)), qtype, stats)
        writer.add_tensor(gguf_name, data, raw_dtype=dtype)
    for gguf_name, tensor in getattr(fix, "extra", lambda: [])():
        writer.add_tensor(gguf_name, tensor.numpy(), raw_dtype=T.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)
