"""Gemma 4 text decoder (GGUF arch `gemma4`): E2B/E4B, the 12B "unified", 26B-A4B (MoE) and 31B.

Per block (spec section 2.3, order exact): RMSNorm -> attention -> RMSNorm -> residual; RMSNorm -> GeGLU
MLP (on MoE layers beside the routed experts, gemma4_moe.py) -> RMSNorm -> residual; on E2B/E4B the
per-layer embedding (PLE) injection; then the whole residual times `layer_output_scale`.

What differs from Gemma 3:
- head shapes per layer type: sliding layers `key_length_swa` (256), full layers `key_length` (512) and
  possibly fewer KV heads; full layers of K=V models have no `attn_v` (V = the raw K projection);
- V is RMS-normed without a weight; attention scale 1.0; no "+1" on any norm weight;
- full layers use "proportional" RoPE (a quarter of the 512 dims rotate, see `_full_rope`);
- the tail of E2B/E4B shares K/V: a shared layer attends to the cache of the last non-shared layer of
  its type and writes none (the cache allocates nothing for it);
- final logit soft-cap (30 when the file does not say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from qatserve.errors import ModelError
from qatserve.formats.gguf_reader import GGUFFile
from qatserve.models.common import (AttentionCache, DecoderLM, Rope, StepInputs, attention, fuse_linears,
                                    gelu_tanh_glu, rms_norm)
from qatserve.models.gemma4_moe import Gemma4MoE
from qatserve.models.weights import WeightLoader

_MAX = 1 << 20  # sanity cap for any count or width read from metadata


@dataclass(frozen=True)
class Gemma4Config:
    """Hyper-parameters of a Gemma 4 decoder, per layer where the family varies them (spec 4.2)."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    context_length: int
    norm_eps: float
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim: tuple[int, ...]  # K and V width per head (llama.cpp requires them equal)
    n_ff: tuple[int, ...]
    swa_layers: tuple[bool, ...]
    sliding_window: int
    rope_base: float  # full-attention layers
    rope_base_swa: float
    rope_dim: int  # rotated dims on full layers before rope_freqs masks most of them (= head dim)
    rope_dim_swa: int
    n_embd_per_layer: int  # PLE width D; 0 = no per-layer embeddings
    n_kv_shared: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    final_softcap: float
    # HF and vLLM multiply embeddings by sqrt(n_embd) rounded to bf16, llama.cpp by the exact float32
    # value (spec 2.1). Not in the file: set it (dataclasses.replace) to match a bf16 HF/vLLM run.
    bf16_embed_scale: bool = False

    @property
    def kv_source(self) -> tuple[int, ...]:
        """Per layer, the layer whose K/V it attends to: itself, or for the KV-shared tail the last
        non-shared layer of the same type (HF/vLLM rule; llama.cpp's fixed `first_shared - 2 / - 1`
        gives the same layers for every released model)."""
        first = self.n_layer - self.n_kv_shared
        out = []
        for il in range(self.n_layer):
            if il < first:
                out.append(il)
                continue
            same = [j for j in range(first) if self.swa_layers[j] == self.swa_layers[il]]
            if not same:
                kind = "sliding" if self.swa_layers[il] else "full"
                raise ModelError(f"layer {il} shares K/V but no earlier layer of its type ({kind}) has any")
            out.append(same[-1])
        return tuple(out)

    @property
    def kv_layer_shapes(self) -> tuple[tuple[int, int, int] | None, ...]:
        """Per layer (n_kv, head_dim_k, head_dim_v) for the KV cache; None where the layer owns no K/V."""
        src = self.kv_source
        return tuple((self.n_head_kv[il], self.head_dim[il], self.head_dim[il]) if src[il] == il else None
                     for il in range(self.n_layer))


def _num(meta: Mapping[str, Any], key: str, default: Any = None, kind: type = int) -> Any:
    value = meta.get(key, default)
    if value is None:
        raise ModelError(f"missing required metadata key {key!r}")
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        raise ModelError(f"metadata {key!r}: expected {'a number' if kind is float else 'an integer'}, got {value!r}")
    return value


def _bounded(key: str, value: int, lo: int, hi: int = _MAX) -> int:
    if not lo <= value <= hi:
        raise ModelError(f"metadata {key!r}: expected {lo}..{hi}, got {value}")
    return int(value)


def _per_layer(meta: Mapping[str, Any], key: str, n_layer: int, default: Any = None) -> tuple[int, ...]:
    """A key that is a scalar or one value per layer (llama.cpp's get_key_or_arr)."""
    value = meta.get(key, default)
    if value is None:
        raise ModelError(f"missing required metadata key {key!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        return (_bounded(key, value, 0),) * n_layer
    values = value.tolist() if hasattr(value, "tolist") else list(value)  # the reader gives numpy arrays
    if len(values) != n_layer or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelError(f"metadata {key!r}: expected an integer or {n_layer} per-layer integers")
    return tuple(_bounded(key, v, 0) for v in values)


def gemma4_config_from_gguf(meta: Mapping[str, Any], n_vocab: int) -> Gemma4Config:
    """Gemma4Config from GGUF metadata, with llama.cpp's defaults and requirements (spec 4.2)."""
    arch = meta.get("general.architecture")
    p = f"{arch}."
    n_embd = _bounded(p + "embedding_length", _num(meta, p + "embedding_length"), 1)
    n_layer = _bounded(p + "block_count", _num(meta, p + "block_count"), 1, 1024)
    pattern = meta.get(p + "attention.sliding_window_pattern")
    if pattern is None or isinstance(pattern, (int, str)) or len(pattern) != n_layer:
        raise ModelError(f"metadata '{p}attention.sliding_window_pattern': expected {n_layer} per-layer flags")
    swa = tuple(bool(v) for v in pattern)
    hd_full = _bounded(p + "attention.key_length", _num(meta, p + "attention.key_length"), 2)
    hd_swa = _bounded(p + "attention.key_length_swa", _num(meta, p + "attention.key_length_swa"), 2)
    if (_num(meta, p + "attention.value_length", hd_full), _num(meta, p + "attention.value_length_swa", hd_swa)) != (
            hd_full, hd_swa):
        raise ModelError("Gemma 4 needs value_length == key_length on both layer types")
    n_head = _per_layer(meta, p + "attention.head_count", n_layer)
    n_head_kv = _per_layer(meta, p + "attention.head_count_kv", n_layer, meta.get(p + "attention.head_count"))
    for il in range(n_layer):
        if not (1 <= n_head_kv[il] <= n_head[il] <= 1024) or n_head[il] % n_head_kv[il]:
            raise ModelError(f"layer {il}: {n_head_kv[il]} KV heads do not divide {n_head[il]} query heads")
    n_kv_shared = _bounded(p + "attention.shared_kv_layers", _num(meta, p + "attention.shared_kv_layers", 0), 0,
                           n_layer - 1)
    n_expert = _bounded(p + "expert_count", _num(meta, p + "expert_count", 0), 0, 4096)
    n_used = _bounded(p + "expert_used_count", _num(meta, p + "expert_used_count", 0), 0, max(n_expert, 0))
    if n_expert and not n_used:
        raise ModelError(f"metadata '{p}expert_used_count' is required with {n_expert} experts")
    ff_exp = _per_layer(meta, p + "expert_feed_forward_length", n_layer, 0)
    if len(set(ff_exp)) > 1:
        raise ModelError(f"metadata '{p}expert_feed_forward_length': per-layer expert widths are not supported")
    return Gemma4Config(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        context_length=_bounded(p + "context_length", _num(meta, p + "context_length", 131072), 1, 1 << 24),
        norm_eps=float(_num(meta, p + "attention.layer_norm_rms_epsilon", kind=float)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=tuple(hd_swa if s else hd_full for s in swa),
        n_ff=tuple(_bounded(p + "feed_forward_length", v, 1) for v in _per_layer(meta, p + "feed_forward_length", n_layer)),
        swa_layers=swa,
        sliding_window=_bounded(p + "attention.sliding_window", _num(meta, p + "attention.sliding_window"), 1),
        rope_base=float(_num(meta, p + "rope.freq_base", 10000.0, float)),
        rope_base_swa=float(_num(meta, p + "rope.freq_base_swa", 10000.0, float)),
        rope_dim=_bounded(p + "rope.dimension_count", _num(meta, p + "rope.dimension_count", hd_full), 2, hd_full),
        rope_dim_swa=_bounded(p + "rope.dimension_count_swa", _num(meta, p + "rope.dimension_count_swa", hd_swa), 2,
                              hd_swa),
        n_embd_per_layer=_bounded(p + "embedding_length_per_layer_input",
                                  _num(meta, p + "embedding_length_per_layer_input"), 0),
        n_kv_shared=n_kv_shared,
        n_expert=n_expert,
        n_expert_used=n_used,
        n_ff_exp=ff_exp[0],
        # llama.cpp applies 30 when the key is absent; 0 switches it off.
        final_softcap=float(_num(meta, p + "final_logit_softcapping", 30.0, float)),
    )


def _full_rope(cfg: Gemma4Config, w: WeightLoader) -> Rope:
    """RoPE of the full-attention layers.

    "Proportional" RoPE (partial factor 0.25 on a 512-dim head) rotates pairs (i, i + 256) for i < 64
    with frequencies base^(-2i/512), i.e. computed as if all 512 dims rotated, and leaves the other
    pairs alone. GGUF encodes it as rope.dimension_count = 512 plus `rope_freqs.weight` (256 factors
    ggml divides each frequency by: 1.0, then 1e30). We divide too, but turn the huge factors into
    exact zeros so the pass-through dims come out bit-identical (angle 0: cos 1, sin 0).
    """
    rope = Rope(cfg.rope_dim, cfg.rope_base, 1.0, neox=True)
    if w.has("rope_freqs.weight"):
        factors = w.vector("rope_freqs.weight", cfg.rope_dim // 2).double()
        if not bool((factors > 0).all()):
            raise ModelError("rope_freqs.weight: frequency factors must be positive")
        rope.inv_freq = torch.where(factors >= 1e20, torch.zeros_like(factors), rope.inv_freq / factors)
    return rope


class Gemma4Attention(torch.nn.Module):
    """Q (and, on layers that own K/V, K and V) projections, per-head norms, RoPE, cache, attention."""

    def __init__(self, cfg: Gemma4Config, w: WeightLoader, il: int, rope: Rope):
        super().__init__()
        p = f"blk.{il}."
        e, hd, nq = cfg.n_embd, cfg.head_dim[il], cfg.n_head[il]
        self.layer, self.source = il, cfg.kv_source[il]
        nkv = cfg.n_head_kv[self.source]
        self.n_head, self.n_head_kv, self.head_dim = nq, nkv, hd
        self.rope, self.eps = rope, cfg.norm_eps
        self.window = cfg.sliding_window if cfg.swa_layers[il] else 0
        self.q_norm = w.vector(p + "attn_q_norm.weight", hd)
        self.wo = w.linear(p + "attn_output.weight", nq * hd, e)
        owns = self.source == il
        if owns and w.has(p + "attn_qkv.weight"):  # llama.cpp's optional fused q|k|v (always with V)
            self.k_eq_v = False
            self.wqkv = w.linear(p + "attn_qkv.weight", e, (nq + 2 * nkv) * hd)
        elif owns:
            # K=V layers (full layers of 12B/26B/31B) have no V projection: V comes from the raw K.
            self.k_eq_v = not w.has(p + "attn_v.weight")
            parts = [w.linear(p + "attn_q.weight", e, nq * hd), w.linear(p + "attn_k.weight", e, nkv * hd)]
            if not self.k_eq_v:
                parts.append(w.linear(p + "attn_v.weight", e, nkv * hd))
            self.wqkv = fuse_linears(parts)
        else:
            self.k_eq_v = False
            self.wqkv = w.linear(p + "attn_q.weight", e, nq * hd)
        self.k_norm = w.vector(p + "attn_k_norm.weight", hd) if owns else None

    def forward(self, x: torch.Tensor, step: StepInputs, cache: AttentionCache) -> torch.Tensor:
        """x [T, n_embd] (already attn-normed) -> [T, n_embd]."""
        T, hd = x.shape[0], self.head_dim
        proj = self.wqkv(x)
        nq = self.n_head * hd
        tables = step.rope_tables(self.rope)
        q = self.rope.apply(rms_norm(proj[:, :nq].view(T, self.n_head, hd), self.q_norm, self.eps), tables)
        if self.k_norm is not None:
            nk = self.n_head_kv * hd
            kraw = proj[:, nq : nq + nk].view(T, self.n_head_kv, hd)
            vraw = kraw if self.k_eq_v else proj[:, nq + nk :].view(T, self.n_head_kv, hd)
            # The value norm has no weight; on K=V layers it normalises the raw K projection, so K
            # (normed with a weight, then roped) and V still differ and both are cached.
            v = F.rms_norm(vraw, (hd,), None, self.eps)
            k = self.rope.apply(rms_norm(kraw, self.k_norm, self.eps), tables)
        else:
            # A KV-shared layer attends to what its source layer (same type, earlier) stored this step.
            k = v = None
        # Gemma 4 has no query pre-scaling: the q/k norms set the logit scale, so scale is exactly 1.
        out = cache.attend(self.source, q, k, v, step.positions, scale=1.0, window=self.window,
                           attention=attention)
        return self.wo(out)


class Gemma4Block(torch.nn.Module):
    """One decoder layer (spec 2.3)."""

    def __init__(self, cfg: Gemma4Config, w: WeightLoader, il: int, ropes: dict[bool, Rope]):
        super().__init__()
        p = f"blk.{il}."
        e, ff = cfg.n_embd, cfg.n_ff[il]
        self.eps = cfg.norm_eps
        self.attn_norm = w.vector(p + "attn_norm.weight", e)
        self.attn = Gemma4Attention(cfg, w, il, ropes[cfg.swa_layers[il]])
        self.post_attn_norm = w.vector(p + "post_attention_norm.weight", e)
        self.ffn_norm = w.vector(p + "ffn_norm.weight", e)
        self.gate_up = fuse_linears([w.linear(p + "ffn_gate.weight", e, ff), w.linear(p + "ffn_up.weight", e, ff)])
        self.down = w.linear(p + "ffn_down.weight", ff, e)
        self.post_ffn_norm = w.vector(p + "post_ffw_norm.weight", e)
        self.moe = None
        if w.has(p + "ffn_gate_inp.weight"):  # 26B-A4B: routed experts beside the dense MLP
            self.moe = Gemma4MoE(cfg, w, il)
        self.ple = None
        if cfg.n_embd_per_layer:
            d = cfg.n_embd_per_layer
            self.ple = torch.nn.ModuleList([w.linear(p + "inp_gate.weight", e, d), w.linear(p + "proj.weight", d, e)])
            self.ple_norm = w.vector(p + "post_norm.weight", e)
        # Optional in llama.cpp's loader (absent = 1); present in every released file.
        self.out_scale = w.vector(p + "layer_output_scale.weight", 1) if w.has(p + "layer_output_scale.weight") else None

    def forward(self, h: torch.Tensor, step: StepInputs, cache: AttentionCache,
                ple: torch.Tensor | None = None) -> torch.Tensor:
        """h [T, n_embd], ple [T, D] (this layer's per-layer input) -> [T, n_embd]."""
        a = self.attn(rms_norm(h, self.attn_norm, self.eps), step, cache)
        h = h + rms_norm(a, self.post_attn_norm, self.eps)
        m = self.down(gelu_tanh_glu(*self.gate_up(rms_norm(h, self.ffn_norm, self.eps)).chunk(2, dim=-1)))
        if self.moe is not None:
            m = self.moe(m, h)
        h = h + rms_norm(m, self.post_ffn_norm, self.eps)
        if self.ple is not None:
            gate, proj = self.ple
            g = proj(F.gelu(gate(h), approximate="tanh") * ple)
            h = h + rms_norm(g, self.ple_norm, self.eps)
        # layer_output_scale rescales the whole residual stream, not just this layer's delta.
        return h if self.out_scale is None else h * self.out_scale


class Gemma4(DecoderLM):
    """The Gemma 4 decoder; `hidden_states` gives the post-final-norm state the MTP assistant reads."""

    arch = "gemma4"

    @staticmethod
    def config_from_gguf(gguf: GGUFFile) -> Gemma4Config:
        """Read the per-layer hyper-parameters (the registry calls this instead of ModelConfig)."""
        embd = gguf.tensors.get("token_embd.weight")
        if embd is None or len(embd.ne) != 2:
            raise ModelError("missing required tensor 'token_embd.weight'")
        # Logits cover the rows of token_embd (the converter may have trimmed them to the tokenizer).
        return gemma4_config_from_gguf(gguf.metadata, n_vocab=int(embd.ne[1]))

    def __init__(self, cfg: Gemma4Config, w: WeightLoader):
        super().__init__()
        self.config = cfg
        self.norm_eps = cfg.norm_eps
        self.final_softcap = cfg.final_softcap
        e = cfg.n_embd
        self.tok_embd = w.embedding("token_embd.weight", cfg.n_vocab, e)
        dtype = torch.bfloat16 if cfg.bf16_embed_scale else torch.float32
        self.scale = float(torch.tensor(math.sqrt(e), dtype=torch.float32).to(dtype))
        ropes = {True: Rope(cfg.rope_dim_swa, cfg.rope_base_swa, 1.0, neox=True), False: _full_rope(cfg, w)}
        self.blocks = torch.nn.ModuleList(Gemma4Block(cfg, w, il, ropes) for il in range(cfg.n_layer))
        self.output_norm = w.vector("output_norm.weight", e)
        name = "output.weight" if w.has("output.weight") else "token_embd.weight"
        self.output = w.linear(name, e, cfg.n_vocab)
        self.ple_embd = None
        if cfg.n_embd_per_layer:
            ld = cfg.n_layer * cfg.n_embd_per_layer
            # Its rows (HF vocab_size_per_layer_input) need not match token_embd's.
            info = w.gguf.tensors.get("per_layer_token_embd.weight")
            rows = int(info.ne[1]) if info is not None and len(info.ne) == 2 else cfg.n_vocab
            self.ple_embd = w.embedding("per_layer_token_embd.weight", rows, ld)
            self.ple_proj = w.linear("per_layer_model_proj.weight", e, ld)
            self.ple_proj_norm = w.vector("per_layer_proj_norm.weight", cfg.n_embd_per_layer)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] -> scaled embeddings [T, n_embd]."""
        return self.tok_embd(tokens) * self.scale

    def per_layer_inputs(self, tokens: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """PLE (spec 2.2): tokens [T], scaled embeddings x0 [T, n_embd] -> [T, n_layer, D].

        The token part is scaled by sqrt(D) and the context part (from the *scaled* x0) by
        1/sqrt(n_embd) before its per-slice norm; their sum by 1/sqrt(2) keeps unit variance.
        """
        cfg = self.config
        T, d = tokens.shape[0], cfg.n_embd_per_layer
        tok = self.ple_embd(tokens).view(T, cfg.n_layer, d) * float(torch.tensor(math.sqrt(d), dtype=torch.float32))
        ctx = (self.ple_proj(x0) * cfg.n_embd ** -0.5).view(T, cfg.n_layer, d)
        return (rms_norm(ctx, self.ple_proj_norm, self.norm_eps) + tok) * 2.0 ** -0.5

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        """tokens [T], positions [T] -> final-normed hidden states [T, n_embd]."""
        step = StepInputs(positions)
        h = self.embed(tokens)
        ple = self.per_layer_inputs(tokens, h) if self.ple_embd is not None else None
        for il, block in enumerate(self.blocks):
            h = block(h, step, cache, None if ple is None else ple[:, il])
        return rms_norm(h, self.output_norm, self.norm_eps)
