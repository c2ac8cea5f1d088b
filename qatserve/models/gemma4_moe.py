"""Gemma 4 26B-A4B mixture of experts (spec 2.8): routed experts beside the dense MLP of every layer.

The dense MLP acts as a shared expert; the block hands this module its output and the residual:
    m = rms(mlp_out, post_ffw_norm_1) + rms(sum_k w_k * expert_k(rms(r, pre_ffw_norm_2)), post_ffw_norm_2)
Routing looks at the raw residual r (only a weightless RMS norm and a learned per-channel scale), not
at a normed FFN input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from qatserve.models.common import fuse_linears, gelu_tanh_glu, rms_norm
from qatserve.models.weights import WeightLoader
from qatserve.quant.experts import ExpertFFN

if TYPE_CHECKING:  # gemma4.py imports this module
    from qatserve.models.gemma4 import Gemma4Config


class Gemma4MoE(torch.nn.Module):
    """Router + experts of one layer; forward(dense_out, residual) -> the combined FFN output."""

    def __init__(self, cfg: "Gemma4Config", w: WeightLoader, il: int):
        super().__init__()
        p = f"blk.{il}."
        e, n_exp, ff = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp
        self.eps, self.top_k, self.n_embd = cfg.norm_eps, cfg.n_expert_used, e
        self.router = w.linear(p + "ffn_gate_inp.weight", e, n_exp)
        self.router_scale = w.vector(p + "ffn_gate_inp.scale", e)
        # Absent in files that folded it into the expert weights' scales (NVFP4): then it is 1.
        name = p + "ffn_down_exps.scale"
        self.expert_scale = w.vector(name, n_exp) if w.has(name) else None
        self.pre_norm = w.vector(p + "pre_ffw_norm_2.weight", e)
        self.post_norm_1 = w.vector(p + "post_ffw_norm_1.weight", e)
        self.post_norm_2 = w.vector(p + "post_ffw_norm_2.weight", e)
        if w.has(p + "ffn_gate_up_exps.weight"):
            # Fused [gate rows; up rows] per expert: gate is the first half.
            gate_up = w.expert_linears(p + "ffn_gate_up_exps.weight", n_exp, e, 2 * ff)
        else:
            gates = w.expert_linears(p + "ffn_gate_exps.weight", n_exp, e, ff)
            ups = w.expert_linears(p + "ffn_up_exps.weight", n_exp, e, ff)
            gate_up = [fuse_linears([g, u]) for g, u in zip(gates, ups)]
        # The backend (host loop, or stacked GPU kernels after to_device) is the container's business.
        self.ffn = ExpertFFN(gate_up, w.expert_linears(p + "ffn_down_exps.weight", n_exp, ff, e))

    def route(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r [T, n_embd] residual -> (weights [T, k] float32, expert ids [T, k])."""
        # The 1/sqrt(n_embd) keeps router logits O(1) after the per-channel scale (as trained).
        z = F.rms_norm(r, (self.n_embd,), None, self.eps) * self.router_scale * self.n_embd ** -0.5
        probs = torch.softmax(self.router(z).float(), dim=-1)  # over all experts, in float32
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        # Renormalise over the chosen k. llama.cpp clamps the sum at >= 6.1e-5; the top k of a softmax
        # over n experts sum to >= k/n, so the clamp never binds.
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.expert_scale is not None:
            weights = weights * self.expert_scale[ids]
        return weights, ids

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, n_embd] (pre_ffw_norm_2 applied) -> weighted sum of the chosen experts [T, n_embd]."""
        return self.ffn(x, weights, ids, gelu_tanh_glu)

    def forward(self, dense: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """dense [T, n_embd] (dense MLP output), r [T, n_embd] (residual after attention) -> [T, n_embd]."""
        weights, ids = self.route(r)
        moe = self.experts(rms_norm(r, self.pre_norm, self.eps), weights, ids)
        return rms_norm(dense, self.post_norm_1, self.eps) + rms_norm(moe, self.post_norm_2, self.eps)
