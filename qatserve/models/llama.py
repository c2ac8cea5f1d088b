"""Llama-family decoder (GGUF arch `llama`: Llama 2/3, SmolLM2, ...).

Pre-norm blocks: RMSNorm -> attention (RoPE) -> residual; RMSNorm -> SwiGLU MLP -> residual.
llama.cpp's converter permutes Q/K rows so that its 'norm' RoPE (adjacent pairs) applies; we use the
same pairing. The head is tied to the embeddings when the file has no `output.weight`.
"""

from __future__ import annotations

import math

import torch

from qatserve.config import ModelConfig
from qatserve.models.common import AttentionCache, DecoderLM, StepInputs, fuse_linears, Rope, SelfAttention
from qatserve.models.weights import WeightLoader


class LlamaBlock(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, w: WeightLoader, il: int, rope: Rope):
        super().__init__()
        p = f"blk.{il}."
        e = cfg.n_embd
        self.eps = cfg.norm_eps
        self.nx = w.numerics
        self.attn_norm = w.vector(p + "attn_norm.weight", e)
        self.attn = SelfAttention.from_gguf(w, cfg, il, rope, scale=1.0 / math.sqrt(cfg.head_dim),
                                             window=cfg.sliding_window)
        self.ffn_norm = w.vector(p + "ffn_norm.weight", e)
        self.gate_up = fuse_linears(
            [w.linear(p + "ffn_gate.weight", e, cfg.n_ff), w.linear(p + "ffn_up.weight", e, cfg.n_ff)]
        )
        self.down = w.linear(p + "ffn_down.weight", cfg.n_ff, e)

    def forward(self, h: torch.Tensor, step: StepInputs, cache: AttentionCache) -> torch.Tensor:
        h = h + self.attn(self.nx.rms_norm(h, self.attn_norm, self.eps), step, cache)
        x = self.nx.rms_norm(h, self.ffn_norm, self.eps)
        return h + self.down(self.nx.silu_glu(*self.gate_up(x).chunk(2, dim=-1)))


class Llama(DecoderLM):
    arch = "llama"

    def __init__(self, cfg: ModelConfig, w: WeightLoader):
        super().__init__()
        self.config = cfg
        self.numerics = w.numerics
        self.norm_eps = cfg.norm_eps
        self.tok_embd = w.embedding("token_embd.weight", cfg.n_vocab, cfg.n_embd)
        rope = Rope(cfg.rope_dim, cfg.rope_base, cfg.rope_freq_scale, neox=False, cos_sin=w.numerics.rope_cos_sin)
        self.blocks = torch.nn.ModuleList(LlamaBlock(cfg, w, il, rope) for il in range(cfg.n_layer))
        self.output_norm = w.vector("output_norm.weight", cfg.n_embd)
        name = "output.weight" if w.has("output.weight") else "token_embd.weight"
        self.output = w.linear(name, cfg.n_embd, cfg.n_vocab)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embd(tokens)
