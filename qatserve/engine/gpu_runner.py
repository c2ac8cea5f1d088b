"""One engine step's forward on a GPU: decode rows through CUDA graphs, prompt rows eagerly.

The engine plans a step as rows of generating slots (first) and prompt chunks (after). On a model that
`engine/device.to_device` moved to the GPU, `GPURunner.forward` runs them as two forwards:

- decode rows (every generating slot with one new token, no draft): `DecodeBatch`, an AttentionCache
  whose inputs are static device tensors (tokens, positions, the slot each row's K/V goes to, the slots
  of the keys each row sees, padded to a length bucket), so the whole forward (embedding, every layer,
  final norm, head) can be captured once per shape (rows B, key buckets S) as a CUDA graph and replayed;
  one host->device copy of the inputs per step. Shapes are captured lazily: the first step of a shape
  runs eagerly (compiling the Triton kernels it needs), the next one captures, later ones replay.
  Anything that cannot be captured (a host sync: the MoE's per-expert loop, left only for expert formats
  without the stacked kernels of quant/kernels/gpu_experts.py; the torch q4_0 K/V quantiser's tie check
  where the fused K/V store of kernels/triton_kv_store.py does not apply) turns
  graphs off for the runner and the same code keeps running eagerly.
- prompt rows, and generating rows with a draft to verify: `StepBatch` (engine/batch.py), eagerly.

Batch invariance on the GPU (what holds):
- matmuls: every row of the decode plan (gemv, split-K fixed per matrix; up to 4 rows share a program
  and its weight reads, each with the one-row arithmetic) and of the prompt plan (tensor-core dot, fixed
  tile, no split) is computed in an order that does not depend on the other rows
  (quant/kernels/gpu_matmul.py); decode and prompt rows never share a launch, because they are separate
  forwards. Norms, RoPE, GeGLU, the K/V store and the Hadamard rotation (one program per row or head in
  the fused kernels of quant/kernels/gpu_fusions.py, elementwise stages otherwise) are per row.
- attention: with the Triton paged kernels (quant/kernels/triton_attention.py; CUDA, power-of-two head
  dims) prompt rows are computed in tiles at multiples of the tile size and each generated row splits
  its keys by its own length alone, so neither depends on the rest of the batch. Without them (torch
  fallback) prompt rows keep StepBatch's 32-row sub-blocks, but decode rows attend over keys padded to
  the bucket of the batch's longest sequence, and the softmax / matmul reduction order may change with
  that padded length: there a decode row's attention can differ in its last bits between batch
  compositions whose longest sequences fall in different 256-key buckets.
- graphs: a replay runs the same kernels on the same shapes as the eager run: identical results.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import torch

from qatserve.engine.batch import Segment, StepBatch
from qatserve.engine.device import model_device, ropes_of
from qatserve.quant.kernels import gpu_fusions, kv_quant
from qatserve.quant.kernels.gpu_matmul import row_kind

KEY_BUCKET = 256  # decode key lists are padded to a multiple of this (one graph per bucket)
MAX_GRAPHS = 32  # captured shapes kept (oldest dropped first)


class DecodeBatch:
    """AttentionCache of a decode forward over B rows (one new token each) with static device inputs.

    Inputs live in one int64 device buffer (and, for the paged kernels, one int32 buffer of block
    tables), written on the host (pinned) by `fill` and copied once per step. Layout of the int64 one:
    tokens [B], positions [B], then per layer group g the new row's slot [B] and, without the paged
    kernels, the number of keys each row sees [B] and their slots [B, S_g] (padding repeats the new
    row's slot, so every gathered key is a finite stored value; the mask drops it).

    With the Triton paged kernels (every layer's head dims fit, on CUDA) the attention reads the pages
    in place: per group a plan over static block tables [B, blocks per sequence] and positions, with
    the launch grid fixed at the most splits (a row's split depends only on its own length), so one
    graph per B serves every length. Otherwise (torch): keys gathered and padded to the S_g buckets.
    """

    def __init__(self, cache, B: int, S: tuple[int, ...], paged: bool):
        self.cache, self.B, self.S, self.paged = cache, B, S, paged
        dev = cache.device
        n_groups = len(cache.pools)
        per_group = (B,) if paged else (B, B)
        sizes = [B, B] + [n for g in range(n_groups) for n in per_group + (() if paged else (B * S[g],))]
        pin = dev.type == "cuda"
        self._host = torch.zeros(sum(sizes), dtype=torch.long, pin_memory=pin)
        self._dev = torch.zeros(sum(sizes), dtype=torch.long, device=dev)
        views, hviews, at = [], [], 0
        for n in sizes:
            views.append(self._dev[at : at + n])
            hviews.append(self._host.numpy()[at : at + n])
            at += n
        self._h = hviews
        self.tokens, self.positions = views[0], views[1]
        step = len(per_group) + (0 if paged else 1)
        self._at = [2 + step * g for g in range(n_groups)]
        self.new_slot = [views[a] for a in self._at]
        if paged:
            from qatserve.quant.kernels import triton_attention as TA

            self._width = -(-cache.n_ctx_seq // cache.block_size) + 1
            self._host32 = torch.full((n_groups * B * self._width + B,), -1, dtype=torch.int32, pin_memory=pin)
            self._dev32 = torch.full_like(self._host32, -1, device=dev)
            self._h32 = self._host32.numpy()
            tables = self._dev32[: n_groups * B * self._width].view(n_groups, B, self._width)
            pos32 = self._dev32[n_groups * B * self._width :]
            rows = torch.arange(B, dtype=torch.int32, device=dev)
            # decode_pos_host stays empty: the grid is fixed at max_splits (grid_splits) for every step.
            self.plans = [TA.AttentionPlan(tables[g], rows, pos32, rows, [], B) for g in range(n_groups)]
        else:
            self.n_keys = [views[a + 1] for a in self._at]
            self.key_slots = [views[a + 2].view(B, s) for a, s in zip(self._at, S)]
            # Built on the device from n_keys inside the forward, so a graph replays it too.
            self._cols = [torch.arange(s, device=dev) for s in S]

    def fill(self, segments: list[Segment], tokens: list[int]) -> None:
        c, bs, B = self.cache, self.cache.block_size, self.B
        h = self._h
        h[0][:] = tokens
        for i, s in enumerate(segments):
            s.seq.reserve(s.pos0 + 1)
            p = s.pos0
            h[1][i] = p
            for g, w in enumerate(c.group_windows):
                tab = np.array([-1 if b is None else b for b in s.seq.tables[g]], dtype=np.int64)
                at = self._at[g]
                h[at][i] = tab[p // bs] * bs + p % bs
                if self.paged:
                    row = self._h32[(g * B + i) * self._width : (g * B + i + 1) * self._width]
                    row[: tab.size] = tab
                    row[tab.size :] = -1
                    continue
                lo = max(0, p - w + 1) if w > 0 else 0
                pos = np.arange(lo, p + 1)
                blk = tab[pos // bs]
                if (blk < 0).any():
                    raise RuntimeError(f"KV block for position {int(pos[blk < 0][0])} was released")
                slots = blk * bs + pos % bs
                if slots.size > self.S[g]:
                    raise RuntimeError(f"{slots.size} keys do not fit the bucket of {self.S[g]}")
                key_row = h[at + 2].reshape(B, self.S[g])[i]
                key_row[: slots.size] = slots
                key_row[slots.size :] = slots[-1]
                h[at + 1][i] = slots.size
        self._dev.copy_(self._host, non_blocking=True)
        if self.paged:
            self._h32[-B:] = h[1]
            self._dev32.copy_(self._host32, non_blocking=True)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
               positions: torch.Tensor, *, scale: float, window: int = 0, softcap: float = 0.0,
               attention=None) -> torch.Tensor:
        """As StepBatch.attend for B one-token rows: store k/v [B, Hkv, D], attend q [B, H, D] -> [B, H*Dv]."""
        c = self.cache
        st = c.layers[layer]
        g = st.group
        if k is not None:
            c.store(layer, self.new_slot[g], k, v)  # rotated there when the layer rotates (one launch)
        if st.rot_k:
            q = kv_quant.hadamard(q, st.rot_k)
        B = self.B
        if self.paged:
            from qatserve.quant.kernels import triton_attention as TA

            out = TA.paged_attention(q.contiguous(), st.k, st.v, self.plans[g], type_k=c.options.type_k,
                                     type_v=c.options.type_v, scale=scale, window=window, softcap=softcap,
                                     out_dtype=torch.float32, grid_splits=TA.DEFAULT_MAX_SPLITS)
        else:
            out = self._torch_attend(st, kv_quant.query_for_keys(q, c.options.type_k), scale, softcap)
        if st.rot_v:
            out = kv_quant.hadamard(out.view(B, -1, st.dv), st.rot_v).view(B, -1)
        return out

    def _torch_attend(self, st, q: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
        B, g = self.B, st.group
        S = self.S[g]
        keys, values = self.cache.gather(st.layer, self.key_slots[g].view(-1))
        keys = keys.view(B, S, st.n_kv, st.dk).permute(0, 2, 3, 1)  # [B, Hkv, D, S]
        values = values.view(B, S, st.n_kv, st.dv).transpose(1, 2)  # [B, Hkv, S, Dv]
        H = q.shape[1]
        qg = q.reshape(B, st.n_kv, H // st.n_kv, st.dk) * scale  # [B, Hkv, group, D]
        scores = torch.matmul(qg, keys)  # [B, Hkv, group, S]
        if softcap > 0.0:
            scores = torch.tanh(scores / softcap) * softcap
        hidden = self._cols[g][None, :] >= self.n_keys[g][:, None]  # [B, S]: padding
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), values).reshape(B, H * st.dv)


class _Shape:
    """One decode shape: its inputs, and once captured its graph and static outputs."""

    def __init__(self, batch: DecodeBatch):
        self.batch = batch
        self.graph = None
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.runs = 0


class GPURunner:
    """The GPU forward of Engine.step (module docstring)."""

    def __init__(self, model, cache, max_step_tokens: int, cuda_graphs: bool = True):
        self.model, self.cache = model, cache
        self.device = model_device(model)
        for rope in ropes_of(model):  # positions stay below a slot's context (+ a step's rows)
            rope.reserve(cache.n_ctx_seq + max_step_tokens)
        self.graphs = cuda_graphs and self.device.type == "cuda" and self._capturable()
        from qatserve.engine.batch import paged_attention_fits

        self.paged = all(paged_attention_fits(self.device, st) for st in cache.layers if st is not None)
        self._shapes: dict[tuple, _Shape] = {}
        self._pool = None
        self.n_captured = 0
        self.n_replays = 0

    def _capturable(self) -> bool:
        """False where a known host sync would break capture (saves a failed capture)."""
        from qatserve.quant.experts import ExpertFFN

        if any(isinstance(m, ExpertFFN) and m.reads_ids_on_host for m in self.model.modules()):
            return False  # an expert format without the stacked kernels: the loop reads the ids on the host
        if "q4_0" not in (self.cache.options.type_k, self.cache.options.type_v):
            return True
        # The torch q4_0 quantiser's tie check reads a flag back to the host; the fused store has none.
        return all(gpu_fusions.kv_store(st) is not None for st in self.cache.layers if st is not None)

    # -- the step --------------------------------------------------------------------------------
    def forward(self, segments: list[Segment], tokens: list[int], sample_rows: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [T, n_embd] and float32 logits [len(sample_rows), n_vocab], both on the device (the sampler
        runs there: no 1 MB copy of a 262144-entry row and no host math per token)."""
        dec = [s for s in segments if not s.prompt]
        n_dec = sum(s.n for s in dec)
        if any(s.prompt for s in segments[: len(dec)]):
            raise RuntimeError("the engine plans generating rows before prompt rows")
        hiddens, logits = [], []
        if dec:
            if all(s.n == 1 for s in dec):
                h, lg = self.decode(dec, tokens[:n_dec])
                hiddens.append(h)
                rows = [r for r in sample_rows if r < n_dec]
                logits.append(lg if rows == list(range(n_dec)) else lg[rows])
            else:  # verification rows of speculative drafts
                h = self._eager(dec, tokens[:n_dec], "decode")
                hiddens.append(h)
                rows = [r for r in sample_rows if r < n_dec]
                if rows:
                    logits.append(self._logits(h, rows))
        pro = [replace(s, row0=s.row0 - n_dec) for s in segments[len(dec):]]
        if pro:
            h = self._eager(pro, tokens[n_dec:], "prompt")
            hiddens.append(h)
            rows = [r - n_dec for r in sample_rows if r >= n_dec]
            if rows:
                logits.append(self._logits(h, rows))
        hidden = hiddens[0] if len(hiddens) == 1 else torch.cat(hiddens)
        if not logits:
            return hidden, None
        out = logits[0] if len(logits) == 1 else torch.cat(logits)
        return hidden, out.float()

    def _eager(self, segments: list[Segment], tokens: list[int], kind: str) -> torch.Tensor:
        batch = StepBatch(self.cache, segments)
        with row_kind(kind):
            return self.model.hidden_states(torch.tensor(tokens, dtype=torch.long, device=self.device),
                                            batch.positions, batch)

    def _logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        with row_kind("decode"):  # one sampled row each: the per-row plan, whatever the count
            return self.model.logits(hidden, rows=torch.tensor(rows, device=self.device))

    # -- decode rows -----------------------------------------------------------------------------
    def _bucket(self, g: int, n: int) -> int:
        c = self.cache
        w = c.group_windows[g]
        cap = min(w, c.n_ctx_seq) if w > 0 else c.n_ctx_seq
        return min(-(-n // KEY_BUCKET) * KEY_BUCKET, cap)

    def decode(self, segments: list[Segment], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """B one-token rows -> (hidden [B, n_embd], logits [B, n_vocab]) on the device."""
        c = self.cache
        if self.paged:
            S: tuple[int, ...] = ()
        else:
            longest = max(s.pos0 for s in segments) + 1
            S = tuple(self._bucket(g, min(longest, w) if w > 0 else longest) for g, w in enumerate(c.group_windows))
        key = (len(segments), S)
        shape = self._shapes.pop(key, None)  # re-inserted below: the dict keeps use order
        if shape is None:
            shape = _Shape(DecodeBatch(c, len(segments), S, self.paged))
        self._shapes[key] = shape
        if len(self._shapes) > MAX_GRAPHS:
            self._shapes.pop(next(iter(self._shapes)))
        shape.batch.fill(segments, tokens)
        if shape.graph is not None:
            shape.graph.replay()
            self.n_replays += 1
            return shape.hidden.clone(), shape.logits
        if self.graphs and shape.runs >= 1:
            try:
                return self._capture(shape)
            except Exception as e:  # noqa: BLE001 - any capture failure: keep running eagerly
                self.graphs = False
                print(f"qatserve: CUDA graphs off ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                      file=sys.stderr)
                torch.cuda.synchronize()
        shape.runs += 1
        return self._run(shape.batch)

    def _run(self, b: DecodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with row_kind("decode"):
            h = self.model.hidden_states(b.tokens, b.positions, b)
            return h, self.model.logits(h, all_logits=True)

    def _capture(self, shape: _Shape) -> tuple[torch.Tensor, torch.Tensor]:
        # The step itself runs eagerly on a side stream (torch's recipe: warm-up off the default stream
        # before capture); the capture records the same work without running it, later steps replay it.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            h, lg = self._run(shape.batch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            shape.hidden, shape.logits = self._run(shape.batch)
        shape.graph = graph
        self.n_captured += 1
        return h, lg
