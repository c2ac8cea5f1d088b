"""Q4_0 for QAT checkpoints: recover each block's 4-bit grid exactly instead of re-rounding it.

Google's "unquantized" QAT checkpoints already hold w = s * k per block of 32, k integer in [-8, 7].
llama.cpp's plain Q4_0 rounding takes d = (signed max) / -8; when a block's extreme code is +7 (not
-8) that gives d = -7s/8 and codes -8k/7, which are not integers, so every such block is re-rounded
and the model moves off the grid it was trained on. Here each block tries the scales that put its
largest magnitude on code 8, 7, ..., 1 (either sign) and keeps the first one that reproduces every
weight exactly (fp16 scale, codes in range); blocks with no exact scale fall back to plain rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from qatserve.quant.blocks import dequantize, quantize

QK = 32


def _pack(d: torch.Tensor, codes: torch.Tensor) -> np.ndarray:
    """d float16 [B], codes uint8 [B, 32] in 0..15 -> Q4_0 blocks uint8 [B, 18]."""
    lo, hi = codes[:, :16], codes[:, 16:]
    qs = (lo | (hi << 4)).to(torch.uint8)
    return np.concatenate([d.numpy().view(np.uint8).reshape(-1, 2), qs.numpy()], axis=1)


def quantize_q4_0_grid(x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, int, int]:
    """x float32 [..., n] (n % 32 == 0) -> (Q4_0 bytes [..., n/32*18], exact blocks, total blocks)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    lead, n = x.shape[:-1], x.shape[-1]
    blocks = x.reshape(-1, QK)
    nb = blocks.shape[0]
    amax = blocks.abs().amax(dim=1)
    best_d = torch.zeros(nb, dtype=torch.float16)
    best_codes = torch.full((nb, QK), 8, dtype=torch.uint8)
    found = amax == 0  # an all-zero block is exact with d = 0
    for k in (8, 7, 6, 5, 4, 3, 2, 1):
        for sign in (1.0, -1.0):
            d16 = (sign * amax / k).to(torch.float16)
            d = d16.float()
            with torch.no_grad():
                q = torch.where(d[:, None] != 0, blocks / d[:, None], torch.zeros_like(blocks))
            r = torch.round(q)
            exact = ((r * d[:, None]) == blocks).all(dim=1) & (r >= -8).all(dim=1) & (r <= 7).all(dim=1)
            take = exact & ~found & (d != 0)
            if bool(take.any()):
                best_d[take] = d16[take]
                best_codes[take] = (r[take] + 8).to(torch.uint8)
                found |= take
    raw = quantize(blocks.numpy(), T.Q4_0).reshape(nb, 18)  # llama.cpp's rounding, for inexact blocks
    grid = _pack(best_d, best_codes)
    raw[found.numpy()] = grid[found.numpy()]
    n_exact = int(found.sum())
    return raw.reshape(*lead, n // QK * 18), n_exact, nb


def grid_exact_share(x: torch.Tensor | np.ndarray, raw: np.ndarray) -> float:
    """Fraction of blocks whose Q4_0 dequantisation equals x exactly (a check for reports and tests)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    back = dequantize(raw, T.Q4_0, tuple(x.shape))
    return float((back.reshape(-1, QK) == x.reshape(-1, QK)).all(dim=1).float().mean())
