"""Per-sequence contiguous KV cache (float32), grown on demand.

Implements models.common.AttentionCache. One instance holds one sequence; positions of a step must
be consecutive. Sliding-window layers hand back only the keys a query of this step can still see.
"""

from __future__ import annotations

import torch

from qatserve.config import ModelConfig
from qatserve.errors import RequestError


class ContiguousKVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, dtype: torch.dtype = torch.float32):
        if n_ctx < 1:
            raise RequestError(f"context size must be at least 1, got {n_ctx}")
        self.n_ctx = n_ctx
        self.dtype = dtype
        # Per layer (n_kv, head_dim_k, head_dim_v), or None for a layer that owns no K/V because it
        # attends to another layer's (Gemma 4's KV sharing; the model routes that, the cache never sees
        # such a layer). Configs without `kv_layer_shapes` have uniform shapes.
        self.layer_shapes = tuple(
            getattr(cfg, "kv_layer_shapes", None) or [(cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v)] * cfg.n_layer
        )
        self.n_layer = len(self.layer_shapes)
        self.last_layer = max(il for il, s in enumerate(self.layer_shapes) if s is not None)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0  # positions [0, length) hold valid entries
        self._reserve(min(n_ctx, 256))

    def _reserve(self, n: int) -> None:
        n = min(self.n_ctx, max(n, 2 * self.capacity))
        if n <= self.capacity:
            return
        def grow(old: list[torch.Tensor], which: int) -> list[torch.Tensor]:
            out = []
            for il, s in enumerate(self.layer_shapes):
                buf = torch.zeros((n, 0, 0) if s is None else (n, s[0], s[1 + which]), dtype=self.dtype)
                if old:
                    buf[: self.capacity] = old[il][: self.capacity]
                out.append(buf)
            return out
        self.k, self.v = grow(self.k, 0), grow(self.v, 1)
        self.capacity = n

    def bytes_per_token(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return elem * sum(s[0] * (s[1] + s[2]) for s in self.layer_shapes if s is not None)

    def truncate(self, length: int) -> None:
        """Forget positions >= length (rollback, or reuse of a shared prompt prefix)."""
        self.length = max(0, min(self.length, length))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int):
        p0 = int(positions[0])
        p1 = p0 + k.shape[0]
        if p1 > self.n_ctx:
            raise RequestError(f"context full: position {p1 - 1} does not fit in a context of {self.n_ctx}")
        if p1 > self.capacity:
            self._reserve(p1)
        self.k[layer][p0:p1] = k
        self.v[layer][p0:p1] = v
        if layer == self.last_layer:
            self.length = p1
        lo = max(0, p0 - window + 1) if window > 0 else 0
        return self.k[layer][lo:p1], self.v[layer][lo:p1], torch.arange(lo, p1)

    def read(self, layer: int, end: int, n: int = 0):
        """Read-only K/V of `layer` at positions [max(0, end - n), end) (n = 0: all of [0, end)), as
        (keys [S, Hkv, D], values [S, Hkv, Dv], key_positions [S]); the MTP assistant reads the target's
        committed entries this way. Views into the cache: valid until its next update."""
        if self.layer_shapes[layer] is None:
            raise RequestError(f"layer {layer} owns no K/V in this cache")
        if not 0 <= end <= self.length:
            raise RequestError(f"read up to position {end}, but the cache holds {self.length} positions")
        lo = max(0, end - n) if n > 0 else 0
        return self.k[layer][lo:end], self.v[layer][lo:end], torch.arange(lo, end)
