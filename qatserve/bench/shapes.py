"""The released Gemma 3 / Gemma 4 text models as GGUF tensor tables, for synthetic benchmark files.

Each `Shape` is one published model (or Gemma 4 MTP assistant); `tensor_specs(shape)` lists its GGUF
tensors (llama.cpp names, torch-order shapes) and `tensor_type` picks each one's GGML type the way the
published QAT Q4_0 files do. Nothing here touches a file; `synth.py` writes them.

Sources of the numbers (no weights were downloaded for any of this):
* Gemma 3: the published Hugging Face `config.json` of google/gemma-3-{270m,1b,4b,12b,27b}(-it)
  (`text_config` for 4B/12B/27B): hidden_size, num_hidden_layers, num_attention_heads,
  num_key_value_heads, head_dim, intermediate_size, sliding_window, max_position_embeddings,
  rope_theta 1e6 / rope_local_base_freq 1e4, rope_scaling {linear, factor 8} on 4B/12B/27B,
  query_pre_attn_scalar (256; 168 = 5376/32 on the 27B). gemma3-270m is cross-checked tensor by tensor
  against the embedded default model (tests/unit/test_synth.py). GGUF keys follow llama.cpp's
  gemma3 converter; llama.cpp stores no query_pre_attn_scalar and derives it from the model size
  (27B: n_embd / n_head), as `qatserve.config` does.
* Gemma 4: /work/shared/reference/gemma4.md sections 1, 1.1 and 4.2-4.4 (llama.cpp's gemma4 and
  gemma4-assistant loaders; values marked [V]/[L] there), tensor names from `gguf.MODEL_TENSORS
  [MODEL_ARCH.GEMMA4]` (gguf 0.19); `gemma4-assistant` is not in gguf 0.19, its names
  (`nextn.pre_projection` ...) come from the spec's section 4.4.
* Types (`tensor_type`): llama.cpp's `llama_tensor_get_type` for ftype Q4_0 keeps every 2-D/3-D
  weight in Q4_0 except the tied token embedding, which is quantised as the output head: Q6_K.
  The router `ffn_gate_inp` is never quantised (F32), nor are 1-D tensors. Google's own Gemma 3 QAT
  Q4_0 files instead keep `token_embd` in F16: only that choice reproduces their sizes
  (4B 3.16 GB, 12B 8.07 GB, 27B 17.2 GB). The Gemma 4 sizes given in issue 3 (12B 6.98 GB,
  26B-A4B 14.44 GB, 31B 17.65 GB) match Q6_K embeddings within 0.5 %, and would be 2-4 % off with
  F16 or Q8_0, so Gemma 4 files use llama.cpp's rule (also for `per_layer_token_embd`: Q4_0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gguf import GGMLQuantizationType as T

from qatserve.quant.blocks import row_bytes

VOCAB = 262144  # every Gemma 3 and Gemma 4 model
ALIGNMENT = 32  # GGUF default; every tensor's data starts on it
# Header + tokenizer arrays (262144 tokens, scores, types) of the embedded default model's GGUF,
# added to the tensor data for the size column; the synthetic files copy that tokenizer.
HEADER_BYTES = 6_525_120

Arch = Literal["gemma3", "gemma4", "gemma4-assistant"]
# --type choices: the GGML type of the weight matrices
WEIGHT_TYPES = {"Q4_0": T.Q4_0, "Q8_0": T.Q8_0, "F16": T.F16, "BF16": T.BF16, "F32": T.F32}


@dataclass(frozen=True)
class Shape:
    """One released model's text decoder (or assistant), in the fields the GGUF needs."""

    name: str
    arch: Arch
    hidden: int
    layers: int
    heads: int
    kv_heads: int  # sliding layers (Gemma 3: all layers)
    head_dim: int  # sliding layers (Gemma 3: all layers)
    n_ff: tuple[int, ...]  # per layer
    window: int
    context: int
    # Gemma 3
    rope_scaling: float = 0.0  # linear factor on the global layers; 0 = none
    query_pre_attn_scalar: float = 256.0
    # Gemma 4 (target and assistant)
    full_period: int = 6  # layer i is full attention iff (i + 1) % period == 0, and the last layer
    kv_heads_full: int = 0
    head_dim_full: int = 512
    k_eq_v: bool = False  # full layers have no attn_v (V = raw K)
    ple: int = 0  # embedding_length_per_layer_input
    kv_shared: int = 0  # trailing layers that read another layer's KV (no K/V projections)
    experts: int = 0
    experts_used: int = 0
    expert_ff: int = 0
    backbone: int = 0  # assistant: the target's hidden size
    published_gb: float | None = None  # size of the published QAT Q4_0 GGUF, where known
    size_label: str = ""

    @property
    def full_layers(self) -> tuple[bool, ...]:
        """Per layer: True for full (global) attention. Gemma 3 uses the same 5:1 period but, unlike
        Gemma 4, does not force the last layer to full (HF `layer_types`; llama.cpp's period 6)."""
        last_full = self.arch != "gemma3"
        return tuple((i + 1) % self.full_period == 0 or (last_full and i == self.layers - 1) for i in range(self.layers))

    def kv_layout(self) -> tuple[tuple[tuple[int, int, int] | None, ...], tuple[int, ...]]:
        """(per-layer (n_kv, head_dim_k, head_dim_v) or None for a KV-shared layer, per-layer window):
        what engine.kv_cache.KVLayout takes, for sizing a cache of this shape without weights."""
        first_shared = self.layers - self.kv_shared
        shapes = tuple(None if il >= first_shared else (self.kv(il)[0], self.kv(il)[1], self.kv(il)[1])
                       for il in range(self.layers))
        windows = tuple(0 if full else self.window for full in self.full_layers)
        return shapes, windows

    def kv(self, il: int) -> tuple[int, int]:
        """(kv heads, head dim) of layer il."""
        if self.arch != "gemma3" and self.full_layers[il]:
            return self.kv_heads_full, self.head_dim_full
        return self.kv_heads, self.head_dim


def _g3(name: str, hidden: int, layers: int, heads: int, kv: int, n_ff: int, window: int, ctx: int,
        scaling: float, head_dim: int = 256, qpas: float = 256.0, gb: float | None = None, label: str = "") -> Shape:
    return Shape(name, "gemma3", hidden, layers, heads, kv, head_dim, (n_ff,) * layers, window, ctx,
                 rope_scaling=scaling, query_pre_attn_scalar=qpas, published_gb=gb, size_label=label)


def _g4(name: str, hidden: int, layers: int, heads: int, kv: int, kv_full: int, n_ff: tuple[int, ...],
        window: int, ctx: int, gb: float | None = None, label: str = "", **kw) -> Shape:
    return Shape(name, "gemma4", hidden, layers, heads, kv, 256, n_ff, window, ctx, kv_heads_full=kv_full,
                 published_gb=gb, size_label=label, **kw)


def _assistant(target: Shape, hidden: int, n_ff: int, heads: int) -> Shape:
    # Four layers [S, S, S, F], all KV-shared with the target (same KV heads), tied head (spec 1.1).
    return Shape(f"{target.name}-assistant", "gemma4-assistant", hidden, 4, heads, target.kv_heads, 256,
                 (n_ff,) * 4, target.window, target.context, full_period=4, kv_heads_full=target.kv_heads_full,
                 kv_shared=4, backbone=target.hidden)


_GEMMA3 = [
    # name           hidden layers heads kv  n_ff   window ctx     rope x
    _g3("gemma3-270m", 640, 18, 4, 1, 2048, 512, 32768, 0.0, label="270M"),
    _g3("gemma3-1b", 1152, 26, 4, 1, 6912, 512, 32768, 0.0, gb=1.00, label="1B"),
    _g3("gemma3-4b", 2560, 34, 8, 4, 10240, 1024, 131072, 8.0, gb=3.16, label="4B"),
    _g3("gemma3-12b", 3840, 48, 16, 8, 15360, 1024, 131072, 8.0, gb=8.07, label="12B"),
    _g3("gemma3-27b", 5376, 62, 32, 16, 21504, 1024, 131072, 8.0, head_dim=128, qpas=5376 / 32, gb=17.2,
        label="27B"),
]

# E2B and 12B values are verified in the spec ([V], official config dumps); E4B, 26B-A4B and 31B
# dimensions are [L] there (several independent fixtures agree; their sizes match the published files).
_E2B = _g4("gemma4-e2b", 1536, 35, 8, 1, 1, (6144,) * 15 + (12288,) * 20, 512, 131072, label="E2B",
           full_period=5, ple=256, kv_shared=20)
_E4B = _g4("gemma4-e4b", 2560, 42, 8, 2, 2, (10240,) * 42, 512, 131072, label="E4B", ple=256, kv_shared=18)
_G4_12B = _g4("gemma4-12b", 3840, 48, 16, 8, 1, (15360,) * 48, 1024, 262144, gb=6.98, label="12B", k_eq_v=True)
_G4_26B = _g4("gemma4-26b-a4b", 2816, 30, 16, 8, 2, (2112,) * 30, 1024, 262144, gb=14.44, label="26B-A4B",
              k_eq_v=True, experts=128, experts_used=8, expert_ff=704)
_G4_31B = _g4("gemma4-31b", 5376, 60, 32, 16, 4, (21504,) * 60, 1024, 262144, gb=17.65, label="31B", k_eq_v=True)

_GEMMA4 = [_E2B, _E4B, _G4_12B, _G4_26B, _G4_31B]
_ASSISTANTS = [
    _assistant(_E2B, 256, 2048, 4),
    _assistant(_E4B, 256, 2048, 4),
    _assistant(_G4_12B, 1024, 8192, 16),
    _assistant(_G4_26B, 1024, 8192, 16),
    _assistant(_G4_31B, 1024, 8192, 32),
]

SHAPES: dict[str, Shape] = {s.name: s for s in _GEMMA3 + _GEMMA4 + _ASSISTANTS}


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: name, torch-order shape, and its role (which decides type and contents)."""

    name: str
    shape: tuple[int, ...]
    # weight: a matrix in --type; embd: the tied token embedding; router: ffn_gate_inp (never quantised);
    # norm / scale: F32 vectors near 1; rope_freqs: Gemma 4's proportional-RoPE factors
    role: Literal["weight", "embd", "router", "norm", "scale", "rope_freqs"]


def _gemma3_tensors(s: Shape) -> list[TensorSpec]:
    # The order of the real files (llama.cpp writes them sorted): output_norm, token_embd, then blocks.
    out = [TensorSpec("output_norm.weight", (s.hidden,), "norm"), TensorSpec("token_embd.weight", (VOCAB, s.hidden), "embd")]
    H, hq, hk = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    for il in range(s.layers):
        p, ff = f"blk.{il}.", s.n_ff[il]
        out += [
            TensorSpec(p + "attn_k.weight", (hk, H), "weight"),
            TensorSpec(p + "attn_k_norm.weight", (s.head_dim,), "norm"),
            TensorSpec(p + "attn_norm.weight", (H,), "norm"),
            TensorSpec(p + "attn_output.weight", (H, hq), "weight"),
            TensorSpec(p + "attn_q.weight", (hq, H), "weight"),
            TensorSpec(p + "attn_q_norm.weight", (s.head_dim,), "norm"),
            TensorSpec(p + "attn_v.weight", (hk, H), "weight"),
            TensorSpec(p + "ffn_down.weight", (H, ff), "weight"),
            TensorSpec(p + "ffn_gate.weight", (ff, H), "weight"),
            TensorSpec(p + "ffn_norm.weight", (H,), "norm"),
            TensorSpec(p + "ffn_up.weight", (ff, H), "weight"),
            TensorSpec(p + "post_attention_norm.weight", (H,), "norm"),
            TensorSpec(p + "post_ffw_norm.weight", (H,), "norm"),
        ]
    return out


def _gemma4_attention(s: Shape, il: int, p: str) -> list[TensorSpec]:
    H, nkv, hd = s.hidden, *s.kv(il)
    out = [TensorSpec(p + "attn_norm.weight", (H,), "norm"), TensorSpec(p + "attn_q.weight", (s.heads * hd, H), "weight"),
           TensorSpec(p + "attn_q_norm.weight", (hd,), "norm")]
    if il < s.layers - s.kv_shared:  # owns its KV (spec 2.5)
        out += [TensorSpec(p + "attn_k.weight", (nkv * hd, H), "weight"), TensorSpec(p + "attn_k_norm.weight", (hd,), "norm")]
        if not (s.k_eq_v and s.full_layers[il]):
            out.append(TensorSpec(p + "attn_v.weight", (nkv * hd, H), "weight"))
    out += [TensorSpec(p + "attn_output.weight", (H, s.heads * hd), "weight"),
            TensorSpec(p + "post_attention_norm.weight", (H,), "norm")]
    return out


def _gemma4_ffn(s: Shape, il: int, p: str) -> list[TensorSpec]:
    H, ff = s.hidden, s.n_ff[il]
    return [TensorSpec(p + "ffn_norm.weight", (H,), "norm"), TensorSpec(p + "ffn_gate.weight", (ff, H), "weight"),
            TensorSpec(p + "ffn_up.weight", (ff, H), "weight"), TensorSpec(p + "ffn_down.weight", (H, ff), "weight"),
            TensorSpec(p + "post_ffw_norm.weight", (H,), "norm")]


def _rope_freqs(s: Shape) -> TensorSpec:
    return TensorSpec("rope_freqs.weight", (s.head_dim_full // 2,), "rope_freqs")  # one factor per rotated pair


def _gemma4_tensors(s: Shape) -> list[TensorSpec]:
    H, L, D, E, I = s.hidden, s.layers, s.ple, s.experts, s.expert_ff
    out = [TensorSpec("token_embd.weight", (VOCAB, H), "embd"), _rope_freqs(s)]
    if D:
        out += [TensorSpec("per_layer_token_embd.weight", (VOCAB, L * D), "weight"),
                TensorSpec("per_layer_model_proj.weight", (L * D, H), "weight"),
                TensorSpec("per_layer_proj_norm.weight", (D,), "norm")]
    for il in range(L):
        p = f"blk.{il}."
        out += _gemma4_attention(s, il, p) + _gemma4_ffn(s, il, p)
        if E:
            out += [TensorSpec(p + "ffn_gate_inp.weight", (E, H), "router"),
                    TensorSpec(p + "ffn_gate_inp.scale", (H,), "scale"),
                    TensorSpec(p + "pre_ffw_norm_2.weight", (H,), "norm"),
                    TensorSpec(p + "post_ffw_norm_1.weight", (H,), "norm"),
                    TensorSpec(p + "post_ffw_norm_2.weight", (H,), "norm"),
                    TensorSpec(p + "ffn_gate_up_exps.weight", (E, 2 * I, H), "weight"),  # gate rows first
                    TensorSpec(p + "ffn_down_exps.weight", (E, H, I), "weight"),
                    TensorSpec(p + "ffn_down_exps.scale", (E,), "scale")]
        if D:
            out += [TensorSpec(p + "inp_gate.weight", (D, H), "weight"), TensorSpec(p + "proj.weight", (H, D), "weight"),
                    TensorSpec(p + "post_norm.weight", (H,), "norm")]
        out.append(TensorSpec(p + "layer_output_scale.weight", (1,), "scale"))
    out.append(TensorSpec("output_norm.weight", (H,), "norm"))
    return out


def _assistant_tensors(s: Shape) -> list[TensorSpec]:
    h, B = s.hidden, s.backbone
    out = [TensorSpec("token_embd.weight", (VOCAB, h), "embd"), _rope_freqs(s),
           TensorSpec("nextn.pre_projection.weight", (h, 2 * B), "weight"),
           TensorSpec("nextn.post_projection.weight", (B, h), "weight")]
    for il in range(s.layers):
        p = f"blk.{il}."  # all layers KV-shared: no attn_k / attn_v / attn_k_norm
        out += _gemma4_attention(s, il, p) + _gemma4_ffn(s, il, p)
        out.append(TensorSpec(p + "layer_output_scale.weight", (1,), "scale"))
    out.append(TensorSpec("output_norm.weight", (h,), "norm"))
    return out


def tensor_specs(shape: Shape) -> list[TensorSpec]:
    """Every GGUF tensor of `shape`, in file order."""
    if shape.arch == "gemma3":
        return _gemma3_tensors(shape)
    if shape.arch == "gemma4":
        return _gemma4_tensors(shape)
    return _assistant_tensors(shape)


def tensor_type(spec: TensorSpec, arch: Arch, weight_type: T) -> T:
    """GGML type of `spec` in a file whose matrices are `weight_type` (module docstring: why)."""
    if spec.role in ("norm", "scale", "rope_freqs", "router"):
        return T.F32
    if spec.role == "embd" and weight_type == T.Q4_0:
        return T.F16 if arch == "gemma3" else T.Q6_K
    return weight_type


def tensor_nbytes(spec: TensorSpec, qtype: T) -> int:
    rows = 1
    for d in spec.shape[:-1]:
        rows *= d
    return rows * row_bytes(qtype, spec.shape[-1])


def file_bytes(shape: Shape, weight_type: T = T.Q4_0) -> int:
    """Size of the synthetic file: aligned tensor data plus the default model's header/tokenizer size."""
    total = 0
    for spec in tensor_specs(shape):
        n = tensor_nbytes(spec, tensor_type(spec, shape.arch, weight_type))
        total += -(-n // ALIGNMENT) * ALIGNMENT
    return total + HEADER_BYTES


def n_params(shape: Shape) -> int:
    total = 0
    for spec in tensor_specs(shape):
        n = 1
        for d in spec.shape:
            n *= d
        total += n
    return total
