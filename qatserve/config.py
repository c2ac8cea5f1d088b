"""Frozen configuration records. ModelConfig is read from GGUF metadata; the engine ones come from flags."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from qatserve.errors import ModelError

# Sanity caps for numbers a file could lie about (faults.md item 13): far above any real model,
# far below what would make us allocate absurd buffers.
_MAX_LAYERS = 1024
_MAX_HEADS = 1024
_MAX_DIM = 1 << 20
_ATTN_SOFTCAP_ARCHS = frozenset({"gemma2"})


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder, in llama.cpp's meaning of the GGUF keys."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key length per head
    head_dim_v: int  # value length per head
    n_ff: int
    norm_eps: float
    context_length: int
    rope_base: float  # global (full-attention) layers
    rope_base_swa: float  # sliding-window layers
    rope_freq_scale: float  # 1 / linear scaling factor, global layers only
    rope_dim: int
    sliding_window: int  # 0: no sliding window
    swa_layers: tuple[bool, ...]  # per layer: True where the layer attends within the window only
    attn_scale: float
    attn_softcap: float  # 0: off
    final_softcap: float  # 0: off

    @property
    def n_swa_layers(self) -> int:
        return sum(self.swa_layers)


def _req(meta: Mapping[str, Any], key: str, kind: type = int) -> Any:
    if key not in meta:
        raise ModelError(f"missing required metadata key {key!r}")
    value = meta[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ModelError(f"metadata {key!r}: expected an integer, got {type(value).__name__} {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ModelError(f"metadata {key!r}: expected a number, got {type(value).__name__} {value!r}")
    return value


def _opt(meta: Mapping[str, Any], key: str, default: Any) -> Any:
    value = meta.get(key, default)
    return default if value is None else value


def _bounded(key: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise ModelError(f"metadata {key!r}: expected {lo}..{hi}, got {value}")
    return value


def _per_layer(meta: Mapping[str, Any], key: str, n_layer: int) -> int:
    """Head counts may be a scalar or a per-layer array; we need them uniform here."""
    value = _opt(meta, key, None)
    if value is None:
        raise ModelError(f"missing required metadata key {key!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    values = [int(v) for v in value]
    if len(values) != n_layer:
        raise ModelError(f"metadata {key!r}: expected {n_layer} per-layer values, got {len(values)}")
    if len(set(values)) != 1:
        raise ModelError(f"metadata {key!r}: per-layer head counts differ; not supported for this architecture")
    return values[0]


def _swa_layers(meta: Mapping[str, Any], arch: str, n_layer: int, window: int, default_period: int) -> tuple[bool, ...]:
    """Which layers use the sliding window.

    llama.cpp's gemma3 uses a fixed period of 6 (five local layers, then one global) unless the file
    carries `sliding_window_pattern`, either as a period or as one flag per layer.
    """
    if window <= 0:
        return (False,) * n_layer
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", default_period)
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        if pattern <= 0:
            return (False,) * n_layer
        # period p: layer il is local when il % p < p - 1 (llama_hparams::set_swa_pattern)
        return tuple((il % pattern) < (pattern - 1) for il in range(n_layer))
    flags = [bool(v) for v in pattern]
    if len(flags) != n_layer:
        raise ModelError(
            f"metadata '{arch}.attention.sliding_window_pattern': expected {n_layer} flags, got {len(flags)}"
        )
    return tuple(flags)


def model_config_from_gguf(meta: Mapping[str, Any], n_vocab_tensor: int | None = None) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (arch-prefixed keys, as llama.cpp reads them).

    n_vocab_tensor: rows of token_embd, used when the file has no vocab_size key.
    """
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError("missing required metadata key 'general.architecture'")
    p = arch + "."
    n_embd = _bounded(p + "embedding_length", _req(meta, p + "embedding_length"), 1, _MAX_DIM)
    n_layer = _bounded(p + "block_count", _req(meta, p + "block_count"), 1, _MAX_LAYERS)
    n_head = _bounded(p + "attention.head_count", _per_layer(meta, p + "attention.head_count", n_layer), 1, _MAX_HEADS)
    n_head_kv = _per_layer(meta, p + "attention.head_count_kv", n_layer) if p + "attention.head_count_kv" in meta else n_head
    _bounded(p + "attention.head_count_kv", n_head_kv, 1, n_head)
    if n_head % n_head_kv:
        raise ModelError(f"metadata {p}attention.head_count_kv: {n_head_kv} does not divide head_count {n_head}")
    head_dim = _opt(meta, p + "attention.key_length", n_embd // n_head)
    head_dim_v = _opt(meta, p + "attention.value_length", head_dim)
    _bounded(p + "attention.key_length", head_dim, 1, _MAX_DIM)
    _bounded(p + "attention.value_length", head_dim_v, 1, _MAX_DIM)
    n_ff = _bounded(p + "feed_forward_length", _per_layer(meta, p + "feed_forward_length", n_layer), 1, _MAX_DIM)
    n_vocab = meta.get(p + "vocab_size")
    if n_vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if tokens is not None else n_vocab_tensor
    if n_vocab is None:
        raise ModelError("cannot tell the vocabulary size: no vocab_size key, tokens array or token_embd tensor")
    eps = float(_opt(meta, p + "attention.layer_norm_rms_epsilon", 1e-6 if arch.startswith("gemma") else 1e-5))
    rope_base = float(_opt(meta, p + "rope.freq_base", 10000.0))
    rope_dim = int(_opt(meta, p + "rope.dimension_count", head_dim))
    factor = float(_opt(meta, p + "rope.scaling.factor", 1.0))
    scaling_type = _opt(meta, p + "rope.scaling.type", "none" if factor == 1.0 else "linear")
    if scaling_type not in ("none", "linear"):
        raise ModelError(f"metadata {p}rope.scaling.type: {scaling_type!r} is not supported (none, linear)")
    if not (math.isfinite(factor) and factor > 0):
        raise ModelError(f"metadata {p}rope.scaling.factor: expected a positive number, got {factor}")

    window = int(_opt(meta, p + "attention.sliding_window", 0))
    is_gemma = arch.startswith("gemma")
    swa = _swa_layers(meta, arch, n_layer, window, 6 if arch == "gemma3" else 0)
    # Gemma 3 local layers use base 10000 without scaling (fixed in llama.cpp unless the file says otherwise).
    rope_base_swa = float(_opt(meta, p + "rope.freq_base_swa", 10000.0 if is_gemma else rope_base))

    scale = meta.get(p + "attention.scale")
    if scale is None:
        # llama.cpp's rule for gemma3: query_pre_attn_scalar = n_embd / n_head on the 27B, head_dim elsewhere.
        is_27b = arch == "gemma3" and n_layer == 62 and n_embd == 5376
        scale = 1.0 / math.sqrt(n_embd / n_head if is_27b else head_dim)
    return ModelConfig(
        arch=arch,
        n_vocab=int(n_vocab),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=int(head_dim),
        head_dim_v=int(head_dim_v),
        n_ff=n_ff,
        norm_eps=eps,
        context_length=int(_opt(meta, p + "context_length", 4096)),
        rope_base=rope_base,
        rope_base_swa=rope_base_swa,
        rope_freq_scale=1.0 / factor,
        rope_dim=rope_dim,
        sliding_window=window,
        swa_layers=swa,
        attn_scale=float(scale),
        # Gemma 3 carries the key but neither llama.cpp nor transformers applies it there (Gemma 2 did).
        attn_softcap=float(_opt(meta, p + "attn_logit_softcapping", 0.0)) if arch in _ATTN_SOFTCAP_ARCHS else 0.0,
        final_softcap=float(_opt(meta, p + "final_logit_softcapping", 0.0)),
    )
