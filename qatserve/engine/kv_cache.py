"""Paged KV cache: per-layer block storage in llama.cpp's K/V types, shared by every sequence.

Layout. Each KV-owning layer has two buffers, K and V, of `n_blocks * block_size` token slots; a slot
holds one token's row per KV head in the layer's storage type (f32/f16/bf16 as floats, q8_0/q4_0 as
llama.cpp's blocks of 34/18 bytes per 32 values; quant/kernels/kv_quant.py). Layers are grouped by
attention window (0 = full attention): the layers of a group share block ids, so one block table per
group per sequence addresses all of them.

Sliding-window groups keep only their window: blocks wholly older than `window + block_size` positions
behind the committed end are handed back (the extra block keeps one window + 1 keys readable, which the
MTP assistant's HF semantics asks for), so their memory stays bounded on long contexts.

Capacity (llama.cpp's -c / -np): every sequence may hold up to n_ctx // n_seq positions, and the full
group has exactly enough blocks for that, so a running sequence can never be starved by another; the
sliding groups have enough for a window plus one step's tokens per sequence.

Prefix caching. A block whose 32 tokens were all computed as prompt rows gets a hash of its tokens and
all tokens before it (blake2b chain); freed hashed blocks stay readable on an LRU list until reused. A new
prompt reuses the longest run of such blocks (per group: every block a query at the first new position
still sees). Only prompt-computed blocks are shared because prompt rows run attention in 32-row
sub-blocks at absolute positions (engine/batch.py), so a shared block holds exactly the bits the new
request would compute itself: output is identical with prefix caching on or off.

Rotation (llama.cpp PR #21038): with a quantised K type and a head dim that is a multiple of 64, Q and K
are rotated by a Hadamard matrix of llama.cpp's size before the store (K: the largest power of two
dividing the head dim; V: 64 when V is quantised, and the attention output is rotated back).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from qatserve.errors import QatserveError, RequestError
from qatserve.quant.kernels import gpu_fusions, kv_quant

BLOCK_SIZE = 32


class KVCacheFull(QatserveError):
    """No free block although capacity was planned for this sequence (a bug, or -c too small)."""

    exit_code = 3


@dataclass(frozen=True)
class KVCacheOptions:
    """What `-ctk/-ctv`, rotation and prefix caching choose for one engine."""

    type_k: str = "f16"
    type_v: str = "f16"
    rotate: bool = True  # llama.cpp's default; LLAMA_ATTN_ROT_DISABLE=1 there, --no-kv-rotation here
    prefix_cache: bool = True
    block_size: int = BLOCK_SIZE

    def __post_init__(self):
        for name in ("type_k", "type_v"):
            kind = str(getattr(self, name)).lower()
            if kind not in kv_quant.KV_TYPES:
                raise RequestError(f"unknown KV cache type {getattr(self, name)!r} for {name}; "
                                   f"expected one of {', '.join(sorted(kv_quant.KV_TYPES))}")
            object.__setattr__(self, name, kind)
        if self.block_size < 1 or self.block_size % 32:
            raise RequestError(f"KV block size must be a positive multiple of 32, got {self.block_size}")


class BlockPool:
    """Block ids of one layer group: reference counts, free list, and the prefix cache's hashed blocks."""

    def __init__(self, n_blocks: int, prefix_cache: bool):
        self.n_blocks = n_blocks
        self.prefix_cache = prefix_cache
        self.refs = [0] * n_blocks
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.hash_of: list[bytes | None] = [None] * n_blocks
        self.by_hash: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # hashed, unreferenced; LRU first

    def n_available(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of[b]]
            self.hash_of[b] = None
        else:
            raise KVCacheFull("KV cache out of blocks")
        self.refs[b] = 1
        return b

    def release(self, b: int, forget: bool = False) -> None:
        """Drop one reference. A block nobody holds stays findable by its hash (prefix cache) unless
        `forget` (slot erase): then its content is unreachable at once."""
        self.refs[b] -= 1
        if self.refs[b] == 0:
            h = self.hash_of[b]
            if h is not None and forget:
                if self.by_hash.get(h) == b:
                    del self.by_hash[h]
                self.hash_of[b] = h = None
            if h is not None:
                self.evictable[b] = None
            else:
                self.free.append(b)

    def lookup(self, h: bytes) -> int | None:
        b = self.by_hash.get(h)
        return b

    def acquire(self, b: int) -> None:
        """Take a reference to a cached block found by lookup()."""
        if self.refs[b] == 0:
            self.evictable.pop(b, None)
        self.refs[b] += 1

    def register(self, b: int, h: bytes) -> None:
        if not self.prefix_cache or self.hash_of[b] is not None or h in self.by_hash:
            return
        self.hash_of[b] = h
        self.by_hash[h] = b


@dataclass
class LayerStore:
    """One KV-owning layer: its group, shapes, rotation sizes and the K/V slot buffers."""

    layer: int
    group: int
    n_kv: int
    dk: int
    dv: int
    rot_k: int  # Hadamard size for Q/K, 0 = no rotation
    rot_v: int  # for V and the attention output
    k: torch.Tensor  # [n_slots, n_kv, row bytes or dk]
    v: torch.Tensor


@dataclass(frozen=True)
class KVLayout:
    """Per layer: (n_kv, head_dim_k, head_dim_v), or None for a layer that owns no K/V (Gemma 4's
    KV-shared tail), and its attention window (0 = full)."""

    shapes: tuple[tuple[int, int, int] | None, ...]
    windows: tuple[int, ...]

    @classmethod
    def of_model(cls, model) -> "KVLayout":
        cfg = model.config
        shapes = tuple(getattr(cfg, "kv_layer_shapes", None)
                       or [(cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v)] * cfg.n_layer)
        return cls(shapes, tuple(kv_windows(model, len(shapes))))

    def bytes_per_token(self, type_k: str, type_v: str) -> dict[str, int]:
        """K+V bytes one token occupies, per layer type ("full", "sliding") and in total."""
        out: dict[str, int] = {}
        for s, w in zip(self.shapes, self.windows):
            if s is None:
                continue
            kind = "full" if w == 0 else "sliding"
            nkv, dk, dv = s
            out[kind] = out.get(kind, 0) + nkv * (kv_quant.kv_row_bytes(type_k, dk) + kv_quant.kv_row_bytes(type_v, dv))
        out["total"] = sum(out.values())
        return out

    def context_bytes(self, n_ctx: int, type_k: str, type_v: str) -> int:
        """K/V bytes of one sequence of n_ctx tokens when sliding layers keep only their window."""
        per = 0
        for s, w in zip(self.shapes, self.windows):
            if s is not None:
                nkv, dk, dv = s
                row = nkv * (kv_quant.kv_row_bytes(type_k, dk) + kv_quant.kv_row_bytes(type_v, dv))
                per += row * (min(n_ctx, w) if w > 0 else n_ctx)
        return per


def block_hashes(tokens: list[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """Chained hashes of each full block of `tokens` (block i's hash covers tokens[: (i + 1) * bs])."""
    out = []
    arr = np.asarray(tokens, dtype=np.int64)
    for i in range(len(tokens) // block_size):
        parent = hashlib.blake2b(parent + arr[i * block_size : (i + 1) * block_size].tobytes(),
                                 digest_size=16).digest()
        out.append(parent)
    return out


class PagedKVCache:
    """K/V storage for up to `n_seq` sequences of up to `n_ctx // n_seq` positions each."""

    def __init__(self, model, n_ctx: int, n_seq: int = 1, options: KVCacheOptions | None = None,
                 max_step_tokens: int = 512, device=None):
        """`model`: a built model, or a KVLayout (for sizing a cache without weights). `device`: where the
        K/V buffers live (default: the model's device, engine/device.py)."""
        from qatserve.engine.device import model_device

        layout = model if isinstance(model, KVLayout) else KVLayout.of_model(model)
        self.device = torch.device(device) if device is not None else (
            torch.device("cpu") if isinstance(model, KVLayout) else model_device(model))
        self.layout = layout
        self.options = opts = options or KVCacheOptions()
        if n_seq < 1:
            raise RequestError(f"number of parallel sequences must be at least 1, got {n_seq}")
        if n_ctx < n_seq:
            raise RequestError(f"context size {n_ctx} is smaller than the {n_seq} parallel sequences")
        self.n_ctx, self.n_seq = n_ctx, n_seq
        self.n_ctx_seq = n_ctx // n_seq
        self.block_size = bs = opts.block_size
        shapes, windows = layout.shapes, layout.windows
        self.n_layer = len(shapes)
        group_windows = sorted({windows[il] for il, s in enumerate(shapes) if s is not None})
        self.group_windows = group_windows
        self.layer_window = windows
        blocks_per_seq = math.ceil(self.n_ctx_seq / bs)
        self.pools = []
        for w in group_windows:
            n = blocks_per_seq
            if w > 0:
                # the window, one step's new rows, the assistant's extra key, and block rounding
                n = min(n, math.ceil((w + max_step_tokens) / bs) + 2)
            self.pools.append(BlockPool(n * n_seq, opts.prefix_cache))
        self.layers: list[LayerStore | None] = []
        for il, s in enumerate(shapes):
            if s is None:
                self.layers.append(None)
                continue
            nkv, dk, dv = s
            g = group_windows.index(windows[il])
            slots = self.pools[g].n_blocks * bs
            self.layers.append(LayerStore(
                il, g, nkv, dk, dv,
                kv_quant.k_rotation_group(dk) if opts.rotate and kv_quant.rotation_applies(dk, opts.type_k) else 0,
                kv_quant.ROTATION_GROUP if opts.rotate and kv_quant.rotation_applies(dv, opts.type_v) else 0,
                _buffer(slots, nkv, dk, opts.type_k, self.device), _buffer(slots, nkv, dv, opts.type_v, self.device)))
        self.last_layer = max(il for il, s in enumerate(shapes) if s is not None)

    # -- reporting -------------------------------------------------------------------------------
    def bytes_per_token(self) -> dict[str, int]:
        """K+V bytes one token occupies, per layer type ("full", "sliding") and in total."""
        return self.layout.bytes_per_token(self.options.type_k, self.options.type_v)

    def memory_bytes(self) -> int:
        return sum(st.k.numel() * st.k.element_size() + st.v.numel() * st.v.element_size()
                   for st in self.layers if st is not None)

    def usage(self) -> float:
        """Share of the full-attention group's blocks in use (0..1), for /metrics and /slots."""
        p = self.pools[0]
        return 1.0 - p.n_available() / p.n_blocks

    # -- sequences -------------------------------------------------------------------------------
    def new_sequence(self) -> "SeqKV":
        return SeqKV(self)

    def slots(self, group: int, table: list[int | None], positions: torch.Tensor) -> torch.Tensor:
        """Flat slot index of each position [T] in a group's buffers (every block must be present)."""
        bs = self.block_size
        tab = torch.tensor([-1 if b is None else b for b in table], dtype=torch.long)
        blk = tab[positions // bs]
        if bool((blk < 0).any()):
            raise KVCacheFull(f"KV block for position {int(positions[(blk < 0).nonzero()[0, 0]])} was released")
        return blk * bs + positions % bs

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a step's k [T, n_kv, dk] and v [T, n_kv, dv] (the model's basis) of `layer` at `slots` [T]:
        rotated first where the layer rotates (rot_k / rot_v), then encoded as write() does. On a GPU one
        fused launch (quant/kernels/triton_kv_store.py: the same bytes); elsewhere hadamard + write."""
        st = self.layers[layer]
        fused = gpu_fusions.kv_store(st)
        if fused is not None and k.dtype == v.dtype == torch.float32:  # the models' activations
            fused.store(st.k, st.v, slots.to(st.k.device), k, v, self.options.type_k, self.options.type_v,
                        st.rot_k, st.rot_v)
            return
        if st.rot_k:
            k = kv_quant.hadamard(k, st.rot_k)
        if st.rot_v:
            v = kv_quant.hadamard(v, st.rot_v)
        self.write(layer, slots, k, v)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        st = self.layers[layer]
        slots = slots.to(st.k.device)  # no-op where the caller built them there
        st.k[slots] = kv_quant.quantize_kv(k, self.options.type_k)
        st.v[slots] = kv_quant.quantize_kv(v, self.options.type_v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 keys [S, n_kv, dk] and values [S, n_kv, dv] at `slots` (as stored: rotated if so)."""
        st = self.layers[layer]
        slots = slots.to(st.k.device)
        n = slots.shape[0]
        keys = kv_quant.dequantize_kv(st.k.index_select(0, slots), self.options.type_k, (n, st.n_kv, st.dk))
        values = kv_quant.dequantize_kv(st.v.index_select(0, slots), self.options.type_v, (n, st.n_kv, st.dv))
        return keys, values


def _buffer(slots: int, n_kv: int, d: int, kind: str, device=None) -> torch.Tensor:
    width = kv_quant.kv_row_bytes(kind, d) if kind in kv_quant.QUANTISED_KV_TYPES else d
    dtype = kv_quant.kv_storage_dtype(kind)
    if device is None or torch.device(device).type == "cpu":
        # Zeroed by the OS on first touch (numpy's calloc) instead of filled here: torch.zeros fills on the
        # intra-op pool, and on a busy 2-core machine the server's start waited up to 0.5 s for that pool's
        # second thread (and for the GIL back from the kernel-building thread) across the layers' buffers.
        n = slots * n_kv * width * torch.empty((), dtype=dtype).element_size()
        return torch.from_numpy(np.zeros(n, np.uint8)).view(dtype).view(slots, n_kv, width)
    return torch.zeros((slots, n_kv, width), dtype=dtype, device=device)


def kv_windows(model, n_layer: int) -> list[int]:
    """Attention window of each layer (0 = full), read from the model's attention modules."""
    out = [0] * n_layer
    for m in model.modules():
        layer, window = getattr(m, "layer", None), getattr(m, "window", None)
        if isinstance(layer, int) and isinstance(window, int) and 0 <= layer < n_layer:
            out[layer] = window
    return out


class SeqKV:
    """One sequence's block tables (one per layer group) and committed length."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.tables: list[list[int | None]] = [[] for _ in cache.pools]
        self.length = 0  # positions [0, length) are committed
        self.hashes: list[bytes] = []  # hashes of the prompt's full blocks
        self.registered = 0  # leading blocks already registered in the prefix cache
        # Private: built on K/V restored from a slot file (engine/slot_cache.py), which the engine did not
        # compute itself; such blocks, and blocks computed on top of them, never enter the shared prefix cache.
        self.private = False

    @property
    def capacity(self) -> int:
        return self.cache.n_ctx_seq

    def match_prefix(self, prompt: list[int]) -> int:
        """Adopt the longest cached prefix of `prompt` (whole blocks, at least one prompt token left to
        compute). Returns the number of positions now committed from the cache."""
        c = self.cache
        bs = c.block_size
        self.hashes = block_hashes(prompt, bs)
        if not c.options.prefix_cache or self.length:
            return 0
        n = min(len(self.hashes), (len(prompt) - 1) // bs)
        while n > 0:
            if all(self._cached_span(g, n) is not None for g in range(len(c.pools))):
                break
            n -= 1
        if n == 0:
            return 0
        for g, pool in enumerate(c.pools):
            lo, ids = self._cached_span(g, n)
            self.tables[g] = [None] * lo + ids
            for b in ids:
                pool.acquire(b)
        self.registered = n
        self.length = n * bs
        return self.length

    def _cached_span(self, g: int, n: int) -> tuple[int, list[int]] | None:
        """Blocks of group g a query at position n*bs needs, if all cached: (first block index, ids)."""
        c = self.cache
        w, bs = c.group_windows[g], c.block_size
        lo = 0 if w == 0 else max(0, (n * bs - w - bs) // bs)
        ids = []
        for i in range(lo, n):
            b = c.pools[g].lookup(self.hashes[i])
            if b is None:
                return None
            ids.append(b)
        return lo, ids

    def span_of(self, source: "SeqKV", n: int) -> list[tuple[int, list[int]]] | None:
        """Per group, the blocks of `source` a query at position n*bs needs (first index, ids), or None
        when one of them is not held by `source`."""
        c = self.cache
        out = []
        for g, w in enumerate(c.group_windows):
            lo = 0 if w == 0 else max(0, (n * c.block_size - w - c.block_size) // c.block_size)
            ids = source.tables[g][lo:n]
            if len(ids) < n - lo or any(b is None for b in ids):
                return None
            out.append((lo, list(ids)))
        return out

    def adopt(self, source: "SeqKV", n: int) -> int:
        """Replace this (new) sequence's prefix with `source`'s first n blocks, shared by reference (n must
        satisfy span_of); returns the positions now committed. Adopting a private source makes this private."""
        spans = self.span_of(source, n)
        assert spans is not None and n * self.cache.block_size <= source.length
        self.free()
        for g, (lo, ids) in enumerate(spans):
            self.tables[g] = [None] * lo + ids
            for b in ids:
                self.cache.pools[g].acquire(b)
        self.registered = n
        self.length = n * self.cache.block_size
        self.private = self.private or source.private
        return self.length

    def reserve(self, end: int) -> None:
        """Make sure blocks exist for positions [length, end)."""
        if end > self.capacity:
            raise RequestError(f"context full: position {end - 1} does not fit in a context of {self.capacity}")
        need = math.ceil(end / self.cache.block_size)
        for g, pool in enumerate(self.cache.pools):
            tab = self.tables[g]
            while len(tab) < need:
                tab.append(pool.allocate())

    def commit(self, end: int, prompt_len: int) -> None:
        """Positions [0, end) are final. Registers newly completed prompt blocks and hands back sliding
        blocks that no query from `end` on can see."""
        c = self.cache
        bs = c.block_size
        self.length = end
        done = min(end, prompt_len) // bs
        # A private sequence counts its prompt-computed blocks (what slot save keeps) without sharing them.
        for i in range(self.registered, min(done, len(self.hashes))):
            for g, pool in enumerate(c.pools):
                b = self.tables[g][i]
                if b is not None and not self.private:
                    pool.register(b, self.hashes[i])
        self.registered = max(self.registered, min(done, len(self.hashes)))
        for g, w in enumerate(c.group_windows):
            if w == 0:
                continue
            keep_from = max(0, end - w - bs) // bs  # first block still visible (window + 1 keys)
            tab = self.tables[g]
            for i in range(keep_from):
                if tab[i] is not None:
                    c.pools[g].release(tab[i])
                    tab[i] = None

    def truncate(self, end: int) -> None:
        """Forget positions >= end (speculative rollback); blocks past the new end go back to the pool."""
        end = max(0, min(end, self.length))
        self.length = end
        keep = math.ceil(end / self.cache.block_size)
        for g, pool in enumerate(self.cache.pools):
            tab = self.tables[g]
            while len(tab) > keep:
                b = tab.pop()
                if b is not None:
                    pool.release(b)
        self.registered = min(self.registered, end // self.cache.block_size)

    def free(self, forget: bool = False) -> None:
        """Release every block (`forget`: blocks nobody else holds leave the prefix cache too)."""
        for g, pool in enumerate(self.cache.pools):
            for b in self.tables[g]:
                if b is not None:
                    pool.release(b, forget)
            self.tables[g] = []
        self.length = 0

    def read(self, layer: int, end: int, n: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Committed K/V of `layer` at positions [max(0, end - n), end) (n = 0: from 0), in the model's
        own basis (rotation undone): keys [S, Hkv, D], values [S, Hkv, Dv], positions [S]. For the MTP
        assistant, which attends to the target's cache with its own queries."""
        c = self.cache
        st = c.layers[layer] if 0 <= layer < c.n_layer else None
        if st is None:
            raise RequestError(f"layer {layer} owns no K/V in this cache")
        if not 0 <= end <= self.length:
            raise RequestError(f"read up to position {end}, but the sequence holds {self.length} positions")
        lo = max(0, end - n) if n > 0 else 0
        pos = torch.arange(lo, end)
        keys, values = c.gather(layer, c.slots(st.group, self.tables[st.group], pos))
        if st.rot_k:
            keys = kv_quant.hadamard(keys, st.rot_k)
        if st.rot_v:
            values = kv_quant.hadamard(values, st.rot_v)
        return keys, values, pos
