"""Building blocks shared by the architectures: norms, RoPE, attention, gated MLPs, the cache protocol.

Everything here is plain tensor math. Per-step metadata (positions, the cache) is an explicit argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch
import torch.nn.functional as F

from qatserve.quant.kernels import ggml_numerics, gpu_fusions
from qatserve.quant.linear import QuantLinear

if TYPE_CHECKING:
    from qatserve.config import ModelConfig
    from qatserve.models.weights import WeightLoader


class AttentionCache(Protocol):
    """What a model needs from a KV cache: store this step's K/V for a layer and attend to the cache.

    engine/batch.py's StepBatch implements it for one sequence or a batch of several (each row attends
    only to its own sequence); the cache owns storage types, rotation and which keys a row may see.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
               positions: torch.Tensor, *, scale: float, window: int = 0, softcap: float = 0.0,
               attention: Callable) -> torch.Tensor:
        """Store k [T, Hkv, D], v [T, Hkv, Dv] of `layer` at `positions` [T] (k = v = None: a layer
        that reads `layer`'s K/V without writing), then return attention(q [T, H, D]) [T, H * Dv] over
        every key each row may see (causal; `window` > 0: only the last `window` positions)."""
        ...


class StepInputs:
    """Per-step metadata shared by every layer: token positions and the RoPE tables for them.

    Built once per forward so that 18+ layers do not each index the tables again.
    """

    def __init__(self, positions: torch.Tensor):
        self.positions = positions
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_tables(self, rope: "Rope") -> tuple[torch.Tensor, torch.Tensor]:
        key = id(rope)
        tables = self._tables.get(key)
        if tables is None:
            tables = self._tables[key] = rope.tables(self.positions)
        return tables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim. x [..., n], weight [n] (GGUF stores Gemma's 1 + w already).
    On a CUDA device one Triton launch that reads strided head views in place (kernels/gpu_fusions.py)."""
    fused = gpu_fusions.rms_norm(x, weight)
    if fused is not None:
        return fused.rms_norm(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


class Rope:
    """Rotary embedding for one (base, freq_scale, dim) triple, tables grown on demand.

    neox=True rotates the two halves of each head (Gemma, HF layout); neox=False rotates adjacent
    pairs, which is what llama.cpp's 'norm' RoPE does on llama GGUFs (whose Q/K rows were permuted
    at conversion so that pairs line up).
    Applied as x * cos' + swap(x) * sin', where swap exchanges the two members of each rotated pair
    and sin' carries the minus sign of the first member: 4 tensor ops per call.
    """

    def __init__(self, dim: int, base: float, freq_scale: float = 1.0, neox: bool = True,
                 cos_sin: Callable | None = None):
        self.dim = dim
        self.neox = neox
        self.base, self.freq_scale = base, freq_scale
        # cos_sin(positions, dim, base, freq_scale) -> (cos, sin) float32 [T, dim/2]: the angles and
        # their rounding of another implementation (Numerics.rope_cos_sin); None = the float64 tables.
        self.cos_sin = cos_sin
        # llama.cpp computes theta = p * freq_scale * base^(-2i/d) in float32; float64 tables then
        # rounding to float32 keep us within an ulp of both it and HF.
        self.inv_freq = freq_scale * base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.cos = torch.empty(0, dim)
        self.sin = torch.empty(0, dim)
        self.device = torch.device("cpu")
        self.reserved = 0  # tables cover [0, reserved) for good: device positions skip the bounds check

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cos.shape[0], 256)
        # Angles on the CPU in float64 (the same bits on every device), then the tables move.
        angles = torch.arange(n, dtype=torch.float64)[:, None] * self.inv_freq.cpu()[None, :]
        cos, sin = angles.cos().float(), angles.sin().float()
        if self.neox:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        else:
            cos, sin = torch.stack((cos, cos), dim=-1).flatten(-2), torch.stack((-sin, sin), dim=-1).flatten(-2)
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)

    def to(self, device) -> "Rope":
        """Keep the tables on `device` (the positions given to tables() must be there too)."""
        self.device = torch.device(device)
        self.cos, self.sin = self.cos.to(self.device), self.sin.to(self.device)
        return self

    def reserve(self, n: int) -> None:
        """Grow the tables to n positions now and trust callers to stay below n: tables() then reads no
        device value back to the host (a CUDA graph cannot contain such a sync)."""
        if n > self.cos.shape[0]:
            self._grow(n)
        self.reserved = max(self.reserved, n)

    def _arrange(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.neox:
            return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return torch.stack((cos, cos), dim=-1).flatten(-2), torch.stack((-sin, sin), dim=-1).flatten(-2)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos', sin') [T, 1, dim] for positions [T]."""
        if self.cos_sin is not None:
            cos, sin = self._arrange(*self.cos_sin(positions, self.dim, self.base, self.freq_scale))
            return cos[:, None, :], sin[:, None, :]
        if not (self.reserved and positions.device.type != "cpu"):
            need = int(positions.max()) + 1
            if need > self.cos.shape[0]:
                self._grow(need)
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]

    def _swap(self, x: torch.Tensor) -> torch.Tensor:
        if self.neox:
            return x.roll(self.dim // 2, dims=-1)
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)

    def apply(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, H, D] -> rotated x (only the first `dim` features rotate)."""
        cos, sin = tables
        fused = gpu_fusions.rope(x, cos, sin, self.dim)
        if fused is not None:  # CUDA: the same products and sum in one launch (kernels/triton_fused.py)
            return fused.rope(x, cos, sin, self.dim, self.neox)
        if self.dim == x.shape[-1]:
            return x * cos + self._swap(x) * sin
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        return torch.cat((rot * cos + self._swap(rot) * sin, rest), dim=-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal (optionally sliding-window, soft-capped) attention with grouped KV heads.

    q [T, H, D], k [S, Hkv, D], v [S, Hkv, Dv], q_pos [T], k_pos [S] -> [T, H * Dv].
    A key is visible when k_pos <= q_pos and, with a window, q_pos - k_pos < window (llama.cpp's and
    HF's rule alike).
    """
    T, H, _ = q.shape
    Hkv = k.shape[1]
    if T == 1:
        # Decode: the cache hands a single query exactly the keys it may see, so no mask; two small
        # batched matmuls per KV head group cost a quarter of SDPA's dispatch on the CPU.
        qg = q.view(Hkv, H // Hkv, -1) * scale  # [Hkv, group, D]
        scores = torch.bmm(qg, k.permute(1, 2, 0))  # [Hkv, group, S]
        if softcap > 0.0:
            scores = torch.tanh(scores / softcap) * softcap
        return torch.bmm(torch.softmax(scores, dim=-1), v.transpose(0, 1)).reshape(1, -1)
    visible = k_pos[None, :] <= q_pos[:, None]
    if window > 0:
        visible &= (q_pos[:, None] - k_pos[None, :]) < window
    qh = q.transpose(0, 1)  # [H, T, D]
    kh = k.transpose(0, 1)
    vh = v.transpose(0, 1)
    if softcap > 0.0:
        group = H // Hkv
        kh = kh.repeat_interleave(group, dim=0)
        vh = vh.repeat_interleave(group, dim=0)
        scores = torch.matmul(qh, kh.transpose(1, 2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), vh)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible, scale=scale, enable_gqa=H != Hkv)
    return out.transpose(0, 1).reshape(T, -1)


def gelu_tanh_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU with the tanh approximation of GELU (Gemma's gelu_pytorch_tanh). On a CUDA device one Triton
    launch over the gate|up halves (kernels/gpu_fusions.py)."""
    fused = gpu_fusions.geglu(gate, up)
    if fused is not None:
        return fused.geglu(gate, up)
    return F.gelu(gate, approximate="tanh") * up


def silu_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Llama)."""
    return F.silu(gate) * up


@dataclass(frozen=True)
class Numerics:
    """How a model rounds its non-matmul math, chosen when it is built (never a global).

    TORCH: plain float32 torch (fast; matches HF transformers). GGML: llama.cpp's x86 CPU kernels
    (quant/kernels/ggml_numerics.py: fp16-table GELU, double-sum RMSNorm, float32-product RoPE angles
    through the C library's cosf/sinf, flash attention over an F16 KV cache with an fp16 accumulator).
    Matmul numerics are the QuantLinear backend's business ("ggml" pairs with GGML).
    """

    name: str = "torch"
    rms_norm: Callable = rms_norm
    attention: Callable = attention
    gelu_glu: Callable = gelu_tanh_glu
    silu_glu: Callable = silu_glu
    rope_cos_sin: Callable | None = None


TORCH = Numerics()
GGML = Numerics("ggml", ggml_numerics.rms_norm, ggml_numerics.flash_attn_f16, ggml_numerics.geglu,
                ggml_numerics.swiglu, ggml_numerics.rope_cos_sin)


def numerics_for(backend: str) -> Numerics:
    """GGML numerics for the "ggml" QuantLinear backend, TORCH for every other."""
    return GGML if backend == "ggml" else TORCH


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap); identity when cap is 0."""
    return x if cap <= 0.0 else torch.tanh(x / cap) * cap


def embed_scale(n_embd: int) -> float:
    """Gemma multiplies token embeddings by sqrt(n_embd) (in float32, as llama.cpp and HF do)."""
    return float(torch.tensor(math.sqrt(n_embd), dtype=torch.float32))


class ParallelLinear(torch.nn.Module):
    """Several projections of one input, concatenated on the last dim (used where they cannot fuse)."""

    def __init__(self, parts: list[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def fuse_linears(parts: list[QuantLinear]) -> torch.nn.Module:
    """One module computing cat([p(x) for p in parts], -1): a single kernel call when the formats
    allow it (q|k|v, gate|up), else the parts one after another."""
    try:
        return QuantLinear.fused(parts)
    except (ValueError, AttributeError):
        return ParallelLinear(parts)


class SelfAttention(torch.nn.Module):
    """Project Q/K/V (one fused call), optional per-head q/k RMSNorm, RoPE, cache, attend, project out."""

    def __init__(
        self,
        layer: int,
        wq: QuantLinear,
        wk: QuantLinear,
        wv: QuantLinear,
        wo: torch.nn.Module,
        *,
        n_head: int,
        n_head_kv: int,
        head_dim: int,
        head_dim_v: int,
        rope: Rope,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
        q_norm: torch.Tensor | None = None,
        k_norm: torch.Tensor | None = None,
        norm_eps: float = 1e-6,
        numerics: Numerics = TORCH,
    ):
        super().__init__()
        self.layer = layer
        self.numerics = numerics
        self.wqkv = fuse_linears([wq, wk, wv])
        self.wo = wo
        self.n_head, self.n_head_kv = n_head, n_head_kv
        self.head_dim, self.head_dim_v = head_dim, head_dim_v
        self.split = (n_head * head_dim, n_head_kv * head_dim, n_head_kv * head_dim_v)
        self.rope = rope
        self.scale, self.window, self.softcap = scale, window, softcap
        self.q_norm, self.k_norm, self.norm_eps = q_norm, k_norm, norm_eps

    @classmethod
    def from_gguf(cls, w: "WeightLoader", cfg: "ModelConfig", il: int, rope: Rope, **kw) -> "SelfAttention":
        """The attention of block `il` from llama.cpp's standard tensor names (blk.N.attn_q/k/v/output)."""
        p, e = f"blk.{il}.", cfg.n_embd
        return cls(
            il,
            w.linear(p + "attn_q.weight", e, cfg.n_head * cfg.head_dim),
            w.linear(p + "attn_k.weight", e, cfg.n_head_kv * cfg.head_dim),
            w.linear(p + "attn_v.weight", e, cfg.n_head_kv * cfg.head_dim_v),
            w.linear(p + "attn_output.weight", cfg.n_head * cfg.head_dim_v, e),
            n_head=cfg.n_head,
            n_head_kv=cfg.n_head_kv,
            head_dim=cfg.head_dim,
            head_dim_v=cfg.head_dim_v,
            rope=rope,
            norm_eps=cfg.norm_eps,
            numerics=getattr(w, "numerics", TORCH),
            **kw,
        )

    def forward(self, x: torch.Tensor, step: StepInputs, cache: AttentionCache) -> torch.Tensor:
        """x [T, n_embd] -> [T, n_embd]."""
        T = x.shape[0]
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = q.view(T, self.n_head, self.head_dim)
        k = k.view(T, self.n_head_kv, self.head_dim)
        v = v.view(T, self.n_head_kv, self.head_dim_v)
        nx = self.numerics
        if self.q_norm is not None:
            q = nx.rms_norm(q, self.q_norm, self.norm_eps)
        if self.k_norm is not None:
            k = nx.rms_norm(k, self.k_norm, self.norm_eps)
        tables = step.rope_tables(self.rope)
        q = self.rope.apply(q, tables)
        k = self.rope.apply(k, tables)
        out = cache.attend(self.layer, q, k, v, step.positions, scale=self.scale, window=self.window,
                           softcap=self.softcap, attention=nx.attention)
        return self.wo(out)


class DecoderLM(torch.nn.Module):
    """The outer loop every decoder here shares: embed, run the blocks, final norm, LM head.

    Architectures subclass it and provide `embed` and `blocks`; logits are computed only for the rows
    asked for, since the head is the largest matmul of a small model.
    """

    config: object
    output_norm: torch.Tensor
    output: torch.nn.Module
    norm_eps: float
    final_softcap: float = 0.0
    numerics: Numerics = TORCH

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        """tokens [T], positions [T] -> final-normed hidden states [T, n_embd]."""
        step = StepInputs(positions)
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, step, cache)
        return self.numerics.rms_norm(h, self.output_norm, self.norm_eps)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: AttentionCache,
        all_logits: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [T] int64, positions [T] int64 -> logits [T, n_vocab] (all_logits), [len(rows), n_vocab]
        (rows: the rows whose next token is wanted), or [1, n_vocab] (the last row)."""
        return self.logits(self.hidden_states(tokens, positions, cache), all_logits, rows)

    def logits(self, h: torch.Tensor, all_logits: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """LM head on final-normed hidden states h [T, n_embd] (all rows, `rows`, or the last)."""
        if rows is not None:
            h = h[rows]
        elif not all_logits:
            h = h[-1:]
        return softcap(self.output(h), self.final_softcap)
