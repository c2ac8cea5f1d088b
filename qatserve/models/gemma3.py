"""Gemma 3 text decoder (GGUF arch `gemma3`).

Per block: RMSNorm -> attention (q/k RMSNorm per head, RoPE with a local base on sliding-window layers
and a global base, possibly linearly scaled, on the others) -> post-attention RMSNorm -> residual;
RMSNorm -> GeGLU MLP -> post-MLP RMSNorm -> residual. Embeddings scaled by sqrt(n_embd); the output
head is tied to the embeddings unless the file has `output.weight`.
"""

from __future__ import annotations

import torch

from qatserve.config import ModelConfig
from qatserve.models.common import AttentionCache, DecoderLM, StepInputs, fuse_linears, Rope, SelfAttention, embed_scale
from qatserve.models.weights import WeightLoader


class Gemma3Block(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, w: WeightLoader, il: int, ropes: dict[bool, Rope]):
        super().__init__()
        p = f"blk.{il}."
        e = cfg.n_embd
        local = cfg.swa_layers[il]
        self.eps = cfg.norm_eps
        self.nx = w.numerics
        self.attn_norm = w.vector(p + "attn_norm.weight", e)
        self.attn = SelfAttention.from_gguf(
            w, cfg, il, ropes[local],
            scale=cfg.attn_scale,
            window=cfg.sliding_window if local else 0,
            softcap=cfg.attn_softcap,
            q_norm=w.vector(p + "attn_q_norm.weight", cfg.head_dim),
            k_norm=w.vector(p + "attn_k_norm.weight", cfg.head_dim),
        )
        self.post_attn_norm = w.vector(p + "post_attention_norm.weight", e)
        self.ffn_norm = w.vector(p + "ffn_norm.weight", e)
        self.gate_up = fuse_linears(
            [w.linear(p + "ffn_gate.weight", e, cfg.n_ff), w.linear(p + "ffn_up.weight", e, cfg.n_ff)]
        )
        self.down = w.linear(p + "ffn_down.weight", cfg.n_ff, e)
        self.post_ffn_norm = w.vector(p + "post_ffw_norm.weight", e)

    def forward(self, h: torch.Tensor, step: StepInputs, cache: AttentionCache) -> torch.Tensor:
        nx = self.nx
        a = self.attn(nx.rms_norm(h, self.attn_norm, self.eps), step, cache)
        h = h + nx.rms_norm(a, self.post_attn_norm, self.eps)
        x = nx.rms_norm(h, self.ffn_norm, self.eps)
        m = self.down(nx.gelu_glu(*self.gate_up(x).chunk(2, dim=-1)))
        return h + nx.rms_norm(m, self.post_ffn_norm, self.eps)


class Gemma3(DecoderLM):
    arch = "gemma3"

    def __init__(self, cfg: ModelConfig, w: WeightLoader):
        super().__init__()
        self.config = cfg
        self.numerics = w.numerics
        self.norm_eps = cfg.norm_eps
        self.final_softcap = cfg.final_softcap
        self.tok_embd = w.embedding("token_embd.weight", cfg.n_vocab, cfg.n_embd)
        self.scale = embed_scale(cfg.n_embd)
        ropes = {
            False: Rope(cfg.rope_dim, cfg.rope_base, cfg.rope_freq_scale, neox=True, cos_sin=w.numerics.rope_cos_sin),
            True: Rope(cfg.rope_dim, cfg.rope_base_swa, 1.0, neox=True, cos_sin=w.numerics.rope_cos_sin),
        }
        self.blocks = torch.nn.ModuleList(Gemma3Block(cfg, w, il, ropes) for il in range(cfg.n_layer))
        self.output_norm = w.vector("output_norm.weight", cfg.n_embd)
        if w.has("output.weight"):
            self.output = w.linear("output.weight", cfg.n_embd, cfg.n_vocab)
        else:
            self.output = w.linear("token_embd.weight", cfg.n_embd, cfg.n_vocab)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embd(tokens) * self.scale
