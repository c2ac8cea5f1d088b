"""One model forward over rows of several sequences: the `AttentionCache` the models call.

Every projection and MLP runs on all rows of the step at once (one weight read serves every sequence);
attention runs per sequence against that sequence's pages of the paged cache.

Batch invariance. A token's logits must not depend on what else is in the step, nor on how its prompt
was chunked or whether a prefix came from the prefix cache, nor on a speculative draft: otherwise
"identical to running alone" and lossless speculation would only hold up to rounding, which these models
amplify until greedy tokens flip. So every row-mixing op is fixed to a canonical shape:
- matmuls: onnxruntime/MLAS kernels whose rows are bit-identical for any row count (quant/linear.py,
  quant/kernels/dense.py), and the Hadamard rotation through the same;
- prompt rows: attention in sub-blocks of PROMPT_SUBBLOCK rows at absolute positions (a multiple of 32),
  each against exactly the keys its rows may see; prefill chunks and prefix-cache hits start on such
  boundaries, so a sub-block is always computed with the same operands;
- generated rows (decode, draft verification): one row at a time against exactly its visible keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qatserve.engine.kv_cache import PagedKVCache, SeqKV
from qatserve.quant.kernels import kv_quant, triton_attention

PROMPT_SUBBLOCK = 32


@dataclass
class Segment:
    """Rows [row0, row0 + n) of the step are positions [pos0, pos0 + n) of one sequence."""

    seq: SeqKV
    row0: int
    pos0: int
    n: int
    prompt: bool  # prompt rows (aligned sub-blocks) or generated rows (one at a time)


class StepBatch:
    """The cache view of one forward: writes this step's K/V, returns each row's attention output."""

    def __init__(self, cache: PagedKVCache, segments: list[Segment]):
        self.cache = cache
        self.segments = segments
        self.n_rows = sum(s.n for s in segments)
        self.device = dev = cache.device
        self.positions = (torch.cat([torch.arange(s.pos0, s.pos0 + s.n) for s in segments]) if segments
                          else torch.empty(0, dtype=torch.long)).to(dev)
        self._new_slots: dict[int, torch.Tensor] = {}
        self._key_slots: dict[tuple[int, int, int], torch.Tensor] = {}
        self._plans: dict[int, object] = {}  # GPU: the paged-attention plan of each layer group
        for s in segments:
            s.seq.reserve(s.pos0 + s.n)

    def new_slots(self, group: int) -> torch.Tensor:
        """Slot of every row of the step in a group's buffers [n_rows]."""
        out = self._new_slots.get(group)
        if out is None:
            parts = [self.cache.slots(group, s.seq.tables[group], torch.arange(s.pos0, s.pos0 + s.n))
                     for s in self.segments]
            out = self._new_slots[group] = torch.cat(parts).to(self.device)
        return out

    def key_slots(self, i: int, group: int, lo: int) -> torch.Tensor:
        """Slots of positions [lo, end of segment i) in a group (shared by the group's layers)."""
        key = (i, group, lo)
        out = self._key_slots.get(key)
        if out is None:
            s = self.segments[i]
            out = self._key_slots[key] = self.cache.slots(group, s.seq.tables[group],
                                                          torch.arange(lo, s.pos0 + s.n)).to(self.device)
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
               positions: torch.Tensor, *, scale: float, window: int = 0, softcap: float = 0.0,
               attention: Callable) -> torch.Tensor:
        """Store k/v [T, Hkv, D] of `layer` (None: a KV-shared layer reading `layer`'s cache), then
        attend q [T, H, D] -> [T, H * Dv]."""
        c = self.cache
        st = c.layers[layer]
        if k is not None:
            c.store(layer, self.new_slots(st.group), k, v)  # rotated there when the layer rotates
        if st.rot_k:
            q = kv_quant.hadamard(q, st.rot_k)
        if paged_attention_fits(self.device, st):
            # On a GPU: the Triton kernels read the pages in place (prompt rows in tiles at multiples of
            # their size, generated rows one by one, so the invariance above holds; they round Q as below).
            plan = self._plans.get(st.group)
            if plan is None:
                plan = self._plans[st.group] = triton_attention.AttentionPlan.from_segments(
                    self.segments, st.group, self.device)
            out = triton_attention.paged_attention(q.contiguous(), st.k, st.v, plan, type_k=c.options.type_k,
                                                   type_v=c.options.type_v, scale=scale, window=window,
                                                   softcap=softcap, out_dtype=torch.float32)
            if st.rot_v:
                t = out.shape[0]
                out = kv_quant.hadamard(out.view(t, -1, st.dv), st.rot_v).view(t, -1)
            return out
        # Q rounded to the K type's dot type, as llama.cpp's CPU attention does (q8_0 for q8_0/q4_0 keys).
        q = kv_quant.query_for_keys(q, c.options.type_k)
        outs = []
        for i, s in enumerate(self.segments):
            p1 = s.pos0 + s.n
            lo = max(0, s.pos0 - window + 1) if window > 0 else 0
            keys, values = c.gather(layer, self.key_slots(i, st.group, lo))
            qs = q[s.row0 : s.row0 + s.n]
            for a, b in _units(s):
                pa, pb = s.pos0 + a, s.pos0 + b
                klo = max(0, pa - window + 1) if window > 0 else 0
                ks = slice(klo - lo, pb - lo)
                outs.append(attention(qs[a:b], keys[ks], values[ks], torch.arange(pa, pb, device=self.device),
                                      torch.arange(klo, pb, device=self.device), scale=scale, window=window,
                                      softcap=softcap))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if st.rot_v:
            t = out.shape[0]
            out = kv_quant.hadamard(out.view(t, -1, st.dv), st.rot_v).view(t, -1)
        return out


def paged_attention_fits(device: torch.device, st) -> bool:
    """Whether a layer's attention runs in the Triton paged kernels (quant/kernels/triton_attention.py):
    on a CUDA device, with power-of-two head dims of at least 32 (the kernels' tiles)."""
    if device.type != "cuda" or not triton_attention.available(device):
        return False
    return all(d >= 32 and not d & (d - 1) for d in (st.dk, st.dv))


def _units(s: Segment) -> list[tuple[int, int]]:
    """Row ranges (relative to the segment) that attention computes together."""
    if not s.prompt:
        return [(r, r + 1) for r in range(s.n)]
    out, a = [], 0
    while a < s.n:
        b = min(s.n, a + PROMPT_SUBBLOCK - (s.pos0 + a) % PROMPT_SUBBLOCK)
        out.append((a, b))
        a = b
    return out


class SequenceView:
    """The AttentionCache of one sequence driven forward by forward (Generator, tests, benchmarks, the
    MTP assistant's reference loop): each model call continues the sequence at the positions it is given.

    Rows are treated as prompt rows (aligned sub-blocks); a one-row call is one row either way.
    """

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.seq = cache.new_sequence()
        self._positions: torch.Tensor | None = None
        self._batch: StepBatch | None = None

    @classmethod
    def for_model(cls, model, n_ctx: int, options=None) -> "SequenceView":
        from qatserve.engine.kv_cache import KVCacheOptions

        return cls(PagedKVCache(model, n_ctx, 1, options or KVCacheOptions("f32", "f32"),
                                max_step_tokens=max(512, n_ctx)))

    @property
    def length(self) -> int:
        return self.seq.length

    def truncate(self, length: int) -> None:
        self.seq.truncate(length)
        self._positions = self._batch = None

    def attend(self, layer, q, k, v, positions, **kw) -> torch.Tensor:
        if positions is not self._positions:
            # A new forward: its rows continue the sequence (positions are consecutive).
            p0, n = int(positions[0]), int(positions.shape[0])
            if p0 > self.seq.length:
                raise ValueError(f"positions start at {p0} but the sequence holds {self.seq.length}")
            self.seq.truncate(p0)
            self._batch = StepBatch(self.cache, [Segment(self.seq, 0, p0, n, True)])
            self._positions = positions
            self.seq.length = p0 + n
        return self._batch.attend(layer, q, k, v, positions, **kw)

    def read(self, layer: int, end: int, n: int = 0):
        return self.seq.read(layer, end, n)
