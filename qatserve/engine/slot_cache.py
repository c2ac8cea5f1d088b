"""What an idle slot keeps of its last request (llama.cpp's slot prompt cache), and the engine's half of
slot save / restore / erase (the file format is engine/slot_file.py, the HTTP route server/slot_routes.py).

Kept is the request's tokens (prompt and generated, llama.cpp's `n_saved`) and its SeqKV cut to the
reusable prefix: the whole blocks computed as prompt rows. Rows computed while generating (one at a
time) are not kept: a later prompt that contains them computes them as prompt rows, whose bits can
differ (batch invariance, engine/batch.py), so reusing them would change that request's output.

Blocks the engine computed are in the shared prefix cache already, so any slot finds them by hash.
Restored blocks come from a file the engine did not compute: they stay private to the slot they were
restored into (kv_cache.SeqKV.private). A request admitted to that slot adopts them (`adopt`), and
nothing computed on top of them enters the shared cache, so a crafted file can only ever affect requests
that run in the slot it was restored into.

Every function here runs on the engine thread, between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qatserve.engine.kv_cache import PagedKVCache, SeqKV
from qatserve.errors import RequestError


class SlotBusy(RequestError):
    """The slot is running a request (HTTP 409: try again when it is idle)."""


@dataclass
class KeptSlot:
    tokens: list[int]  # what the slot's last request processed (prompt + generated)
    seq: SeqKV  # its reusable prefix: positions [0, seq.length), whole blocks

    @property
    def n_reuse(self) -> int:
        return self.seq.length


@dataclass
class SlotImage:
    """A slot's kept state outside the cache: what save copies out and restore writes back.

    blocks[g]: block indices (position // block_size) present in layer group g, ascending (a sliding
    group holds only the blocks its window still sees); k[layer] / v[layer]: those blocks' rows of every
    KV-owning layer, [len(blocks[group]) * block_size, n_kv, width] in the cache's storage dtype."""

    tokens: list[int]
    n_reuse: int
    blocks: list[list[int]]
    k: dict[int, torch.Tensor]
    v: dict[int, torch.Tensor]


def keep(seq: SeqKV, tokens: list[int]) -> KeptSlot:
    """A finished request's sequence as its slot keeps it (generated rows dropped, see the module doc)."""
    seq.truncate(seq.registered * seq.cache.block_size)
    return KeptSlot(list(tokens), seq)


def local_match(kept: KeptSlot | None, prompt: list[int]) -> int:
    """Whole blocks of `prompt` a private (restored) kept slot can lend; 0 for an engine-computed one,
    whose blocks the shared prefix cache finds by itself. At least one prompt token is left to compute."""
    if kept is None or not kept.seq.private:
        return 0
    bs = kept.seq.cache.block_size
    n, limit = 0, min(kept.n_reuse // bs, (len(prompt) - 1) // bs)
    while n < limit and prompt[n * bs : (n + 1) * bs] == kept.tokens[n * bs : (n + 1) * bs]:
        n += 1
    while n > 0 and kept.seq.span_of(kept.seq, n) is None:
        n -= 1
    return n


def adopt(kept: KeptSlot | None, seq: SeqKV, prompt: list[int], computed: int) -> int:
    """Admission into a slot: take the kept prefix when it is longer than what the shared prefix cache
    gave (`computed` positions); returns the positions now committed."""
    n = local_match(kept, prompt)
    if n * seq.cache.block_size > computed:
        return seq.adopt(kept.seq, n)
    return computed


def _slot_index(cache: PagedKVCache, table: list[int | None], indices: list[int]) -> torch.Tensor:
    """Flat buffer slots of the given block indices of a table, block after block."""
    bs = cache.block_size
    ids = torch.tensor([table[i] for i in indices], dtype=torch.long)
    return (ids[:, None] * bs + torch.arange(bs)).reshape(-1)


def snapshot(cache: PagedKVCache, kept: KeptSlot | None) -> SlotImage:
    """Copy a slot's kept state out of the cache (an empty image for a slot that keeps nothing)."""
    n_reuse = kept.n_reuse if kept is not None else 0
    n_blk = n_reuse // cache.block_size
    blocks = [[i for i, b in enumerate(kept.seq.tables[g][:n_blk]) if b is not None] if kept is not None else []
              for g in range(len(cache.pools))]
    k, v = {}, {}
    for st in cache.layers:
        if st is None:
            continue
        if blocks[st.group]:
            slots = _slot_index(cache, kept.seq.tables[st.group], blocks[st.group]).to(st.k.device)
            # copies, on the CPU whatever device the cache is on: the file is written from these
            k[st.layer] = st.k.index_select(0, slots).to("cpu")
            v[st.layer] = st.v.index_select(0, slots).to("cpu")
        else:
            k[st.layer], v[st.layer] = st.k[:0].to("cpu", copy=True), st.v[:0].to("cpu", copy=True)
    return SlotImage(list(kept.tokens) if kept is not None else [], n_reuse, blocks, k, v)


def check_room(cache: PagedKVCache, image: SlotImage, old: KeptSlot | None) -> None:
    """RequestError unless every group has the blocks the image needs once `old` (the slot's current
    kept state, replaced by the restore) is released."""
    for g, pool in enumerate(cache.pools):
        mine = [b for b in (old.seq.tables[g] if old is not None else []) if b is not None and pool.refs[b] == 1]
        if len(image.blocks[g]) > pool.n_available() + len(mine):
            raise RequestError(f"the KV cache has no room for the restored slot ({len(image.blocks[g])} blocks "
                               f"of layer group {g} needed, {pool.n_available() + len(mine)} free)")


def install(cache: PagedKVCache, image: SlotImage) -> KeptSlot:
    """Write a validated image into newly allocated blocks (check_room first); the slot's new kept state."""
    seq = cache.new_sequence()
    seq.private = True
    n_blk = image.n_reuse // cache.block_size
    for g, pool in enumerate(cache.pools):
        table: list[int | None] = [None] * n_blk
        for i in image.blocks[g]:
            table[i] = pool.allocate()
        seq.tables[g] = table
    for st in cache.layers:
        if st is not None and image.blocks[st.group]:
            slots = _slot_index(cache, seq.tables[st.group], image.blocks[st.group]).to(st.k.device)
            st.k[slots] = image.k[st.layer].to(st.k.device)
            st.v[slots] = image.v[st.layer].to(st.v.device)
    seq.length = image.n_reuse
    seq.registered = n_blk
    return KeptSlot(list(image.tokens), seq)
