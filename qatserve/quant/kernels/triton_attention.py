"""Attention over the paged KV cache on the GPU: Triton kernels that read the cache's slot buffers in place.

Importable without Triton or CUDA, and imports Triton only on first use: `available()` says whether the
kernels can run here (a CUDA GPU, or the CPU under TRITON_INTERPRET=1 set before the kernels are first
loaded). The kernels are in triton_attention_kernels.py; this module plans and launches them.

What it computes: exactly `StepBatch.attend`'s attention (engine/batch.py) for every row of one step,
reading K/V from `PagedKVCache.layers[layer].k / .v` (f16 / bf16 / f32 values, or llama.cpp's q8_0 /
q4_0 blocks dequantised in registers), with GQA, causal masking, an optional sliding window and logit
soft-cap. A key at position j is visible from a query at position i when j <= i and, with a window,
i - j < window (models/common.attention's rule).

* Decode (generated rows: decode and draft verification, one query row each): flash-decoding. Program
  (row, KV head, split): the G query heads sharing that KV head (padded to 16 rows of the dots) against one
  contiguous range of the row's visible key blocks, so K/V are read once per KV head; partial (max,
  sum, acc) per split go to a float32 workspace and a second kernel combines them in split order. The
  split of a row depends only on its own visible range and `max_splits` / `min_split_blocks`, never on
  the other rows: a row's output is the same whatever the batch (and a draft-verification row gets the
  bits a plain decode row would). A row that needs one split takes the same path either way.
* Prefill (prompt rows): flash attention. Program (tile, KV head): up to BLOCK_Q consecutive prompt
  positions of one sequence (tiles start at multiples of BLOCK_Q, like the CPU's 32-row sub-blocks)
  times the G heads of the KV head, packed into one BLOCK_Q * GP-row tile, over every key block any of
  them sees; fully masked blocks are exact no-ops, so a row's result does not depend on its tile.

Rounding. q is first rounded as the engine rounds it for the cache's K type (kv_quant.query_for_keys:
q8_0 blocks for q8_0/q4_0 keys, bf16 for bf16 keys; in registers, bit-identical), unless round_q=False.
q . k then rounds nothing (q8_0 codes x key codes per block in exact integer sums, or q in a high and a
low fp16 part; the kernels' docstring); p @ v rounds p and v to fp16 (tf32 for bf16/f32 values); softmax
and accumulation in float32. Relative error vs float64 of the same rounded q: 1e-5 to 2e-4 (from p and
the dequantised v in fp16; the most with q8_0/q4_0 values and flat softmaxes), also with head dim 512 and
scale 1, where an fp16 q . k would be ~1e-3 (tests/unit/test_triton_attention.py checks < 1e-3). q's parts, K and V must fit fp16's range with f16 /
q8_0 / q4_0 caches (Gemma's q/k are RMS-normed; an f16 cache holds V as f16 anyway).

Integration (what StepBatch.attend does on CUDA tensors, per layer; `st = cache.layers[layer]`):

    plan = AttentionPlan.from_segments(step.segments, st.group, q.device)   # once per step and group
    if k is not None:                      # as now: rotate k/v if st.rot_k/rot_v, then cache.write(...)
        ...
    if st.rot_k:
        q = kv_quant.hadamard(q, st.rot_k)
    # no kv_quant.query_for_keys here: the kernels round q themselves (round_q=True)
    out = paged_attention(q, st.k, st.v, plan, type_k=opts.type_k, type_v=opts.type_v,
                          scale=scale, window=window, softcap=softcap)         # [T, H * Dv]
    if st.rot_v:
        out = kv_quant.hadamard(out.view(T, -1, st.dv), st.rot_v).view(T, -1)

The plan holds the block tables (int32, -1 for blocks a sliding group released) and the per-row
metadata as device tensors, built once per step and group and shared by the group's layers. For CUDA
graphs: make the plan directly on fixed device tensors, `AttentionPlan(tables, rows, pos, table_idx, [],
n_rows)` (no host rows: nothing is checked or synced), and pass `grid_splits=max_splits`, so the launch
grid and workspace do not depend on the step's positions (engine/gpu_runner.py does this).

Roofline. A decode step reads, per layer and sequence, n_kv * n_keys * (row bytes of K + row bytes of V)
(`decode_bytes`); q, the partials and the output are < 1% at these shapes. At the ~3.0 TB/s measured
on the H100 (benchmarks/gpu/attention_bench.py prints the achieved GB/s against it):

| shape, layer (n_kv x head dim) | keys | f16 | q8_0 | q4_0 |
|---|---|---|---|---|
| Gemma 3 27B, any layer (16 x 128) | 1k | 8.39 MB, 2.8 us | 4.46 MB, 1.5 us | 2.36 MB, 0.8 us |
| Gemma 3 27B, full layer | 4k | 33.6 MB, 11.2 us | 17.8 MB, 5.9 us | 9.4 MB, 3.1 us |
| Gemma 3 27B, full layer | 16k | 134 MB, 44.7 us | 71.3 MB, 23.8 us | 37.7 MB, 12.6 us |
| Gemma 4 31B, sliding layer (16 x 256) | <= 1k | 16.8 MB, 5.6 us | 8.9 MB, 3.0 us | 4.7 MB, 1.6 us |
| Gemma 4 31B, full layer (4 x 512) | 16k | 134 MB, 44.7 us | 71.3 MB, 23.8 us | 37.7 MB, 12.6 us |

Whole 27B token (52 sliding layers of window 1024 + 10 full): 0.17 / 0.26 / 0.59 ms at 1k / 4k / 16k
context with f16 K/V, 0.05 / 0.07 / 0.17 ms with q4_0, beside 5.7 ms of weights: q8_0 K/V halves and
q4_0 quarters the attention share. Quantised blocks are 2-byte aligned (34 / 18 B), so they are read as
int16 words (the kernels' docstring): 9-17 loads per 32 values, well within the load units' rate.
Each decode program streams one KV head's keys of its split; the decode step launches rows x n_kv x
splits programs (27B, one row, 16k keys: 16 x 32 = 512) plus the reduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import kv_quant

# The kernels module (and Triton) is imported on first use, not with this module: engine/batch.py imports
# this one, and importing Triton there would cost ~1 s on CPU-only runs and fix Triton's interpreter
# setting (TRITON_INTERPRET, read when a kernel is decorated) before a test could choose it.
K = None  # triton_attention_kernels once loaded; None = not loaded yet, or Triton unavailable
_IMPORT_ERROR: Exception | None = None
_LOADED = False


def _kernels():
    """The kernels module, imported on the first call; None when Triton is unavailable."""
    global K, _IMPORT_ERROR, _LOADED
    if not _LOADED:
        _LOADED = True
        try:  # Triton is optional (CPU-only installs); any failure to import it means "unavailable".
            from . import triton_attention_kernels as mod

            K = mod
        except Exception as e:  # noqa: BLE001 - a broken Triton install must not break qatserve
            _IMPORT_ERROR = e
    return K

BLOCK_N = 32  # slots per block of the cache (engine/kv_cache.BLOCK_SIZE; block tables count these)
DEFAULT_MAX_SPLITS = 32  # decode: most key ranges one row is split into
DEFAULT_MIN_SPLIT_BLOCKS = 2  # decode: fewest key blocks per split (the partials cost ~G*Dv*8 B each)


@dataclass(frozen=True)
class Tuning:
    """Launch parameters; None = the default for the head dim (`resolved`). Chosen from ptxas's register
    report for sm_90a (benchmarks/gpu/attention_sass.py): no spills with either Triton 3.6 (the H100
    image: decode 96-128 registers at head dim 128/256, 165-172 at 512) or 3.9 (143-190); not yet timed:
    benchmarks/gpu/attention_bench.py --sweep times the decode ones on the H100.

    keys: keys per loop step (16 or 32: a cache block or half of one); block_m: query rows x heads per
    prefill tile."""

    decode_warps: int | None = None
    decode_keys: int | None = None
    decode_stages: int | None = None  # None: Triton's default
    prefill_block_m: int | None = None
    prefill_warps: int | None = None
    prefill_keys: int | None = None
    prefill_stages: int | None = None

    def resolved(self, head_dim: int) -> "Tuning":
        """| head dim | decode warps, keys | prefill block_m, warps, keys |: <= 128: 4, 32 | 64, 8, 32;
        256: 8, 32 | 32, 8, 32; 512: 8, 16 | 32, 8, 16."""
        small, big = head_dim <= 128, head_dim > 256
        pick = {"decode_warps": 4 if small else 8, "decode_keys": 16 if big else 32,
                "prefill_block_m": 64 if small else 32, "prefill_warps": 8, "prefill_keys": 16 if big else 32}
        return replace(self, **{k: v for k, v in pick.items() if getattr(self, k) is None})


DEFAULT_TUNING = Tuning()

_KIND = {"f16": 0, "bf16": 0, "f32": 0, "q8_0": 1, "q4_0": 2}
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
_Q_ROUND = {"": 0, "q8_0": 1, "bf16": 2}  # kv_quant.QUERY_DOT_TYPES value -> the kernels' Q_ROUND


def interpreting() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    k = _kernels()
    return k is not None and type(k._decode_kernel).__name__ == "InterpretedFunction"


def available(device=None) -> bool:
    """Whether paged_attention can run on `device` (default: CUDA if present, else CPU): Triton imports,
    and the device is a CUDA GPU, or the CPU under the Triton interpreter."""
    if _kernels() is None:
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return dev.type == "cpu" and interpreting()


def decode_bytes(n_kv: int, head_dim_k: int, head_dim_v: int, n_keys: int, type_k: str, type_v: str) -> int:
    """K/V bytes one decode row reads in one layer: n_kv * n_keys * (K row + V row), in the cache's types."""
    return n_kv * n_keys * (kv_quant.kv_row_bytes(type_k, head_dim_k) + kv_quant.kv_row_bytes(type_v, head_dim_v))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass
class AttentionPlan:
    """The rows of one step as the kernels see them, for one layer group (one block table per sequence).

    block_tables: int32 [n_tables, max_blocks] on the device (-1: released or absent).
    decode_rows / decode_pos / decode_table: int32 [Rd]: row of q, position, table index of each
    generated row. runs: prompt runs (row0, n, pos0, table) on the host; tiles per BLOCK_Q are made
    from them on first use. n_rows: rows of q in the step.
    """

    block_tables: torch.Tensor
    decode_rows: torch.Tensor
    decode_pos: torch.Tensor
    decode_table: torch.Tensor
    runs: list[tuple[int, int, int, int]]
    n_rows: int
    decode_pos_host: list[int] = field(default_factory=list)
    decode_table_host: list[int] = field(default_factory=list)
    tables_host: torch.Tensor | None = None  # block_tables on the CPU (build() keeps it), for the checks
    _tiles: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _checked: dict[int, int] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, tables: list[list[int | None]], segments: list[tuple[int, int, int, int, bool]],
              device, n_rows: int | None = None) -> "AttentionPlan":
        """tables: block ids per sequence (None = released). segments: (table index, row0, pos0, n,
        prompt) per run of rows: rows row0.. are positions pos0.. of that sequence; prompt rows go to the
        prefill kernel, the others (generated, draft verification) one by one to the decode kernel."""
        width = max([len(t) for t in tables] + [1])
        tab = torch.full((max(len(tables), 1), width), -1, dtype=torch.int32)
        for i, t in enumerate(tables):
            if t:
                tab[i, : len(t)] = torch.tensor([-1 if b is None else b for b in t], dtype=torch.int32)
        rows, pos, tix, runs = [], [], [], []
        total = 0
        for ti, row0, pos0, n, prompt in segments:
            if not 0 <= ti < len(tables):
                raise ValueError(f"segment names table {ti}, but there are {len(tables)}")
            need = -(-(pos0 + n) // BLOCK_N)
            if need > len(tables[ti]):
                raise ValueError(f"positions up to {pos0 + n - 1} need {need} blocks, table {ti} has "
                                 f"{len(tables[ti])}")
            if prompt:
                runs.append((row0, n, pos0, ti))
            else:
                rows += range(row0, row0 + n)
                pos += range(pos0, pos0 + n)
                tix += [ti] * n
            total = max(total, row0 + n)

        def dev(x):
            return torch.tensor(x, dtype=torch.int32).to(device)
        return cls(tab.to(device), dev(rows), dev(pos), dev(tix), runs,
                   total if n_rows is None else n_rows, list(pos), list(tix), tab)

    @classmethod
    def from_segments(cls, segments, group: int, device) -> "AttentionPlan":
        """From engine.batch.Segment objects (seq.tables, row0, pos0, n, prompt) for layer group `group`."""
        return cls.build([s.seq.tables[group] for s in segments],
                         [(i, s.row0, s.pos0, s.n, s.prompt) for i, s in enumerate(segments)], device,
                         sum(s.n for s in segments))

    def tiles(self, block_q: int) -> torch.Tensor:
        """int32 [n_tiles, 4] (row0, n, pos0, table) of the prompt runs cut at multiples of block_q."""
        t = self._tiles.get(block_q)
        if t is None:
            out = []
            for row0, n, pos0, ti in self.runs:
                a = pos0
                while a < pos0 + n:
                    b = min(pos0 + n, (a // block_q + 1) * block_q)
                    out.append((row0 + a - pos0, b - a, a, ti))
                    a = b
            t = torch.tensor(out, dtype=torch.int32).reshape(-1, 4).to(self.block_tables.device)
            self._tiles[block_q] = t
        return t

    def max_decode_blocks(self, window: int) -> int:
        """Most key blocks any decode row sees (host arithmetic; sizes the split grid). Checks first, once
        per window, that every block a row of the plan sees is in its table (a released block would be
        read at a negative slot). A plan made directly on device tensors (no host rows, e.g. a CUDA-graph
        decode step that passes grid_splits) has nothing to check or size here: 0, and no device sync."""
        got = self._checked.get(window)
        if got is None:
            tables = self.tables_host
            if tables is None:
                if self.decode_pos_host or self.runs:
                    raise ValueError("a plan with host rows needs tables_host (AttentionPlan.build keeps it)")
                return 0
            # (first row's position, last row's, table): a run's rows together see the first one's
            # window start up to the last one's position
            rows = [(p, p, ti) for p, ti in zip(self.decode_pos_host, self.decode_table_host)]
            rows += [(pos0, pos0 + n - 1, ti) for _, n, pos0, ti in self.runs]
            got = 0
            for p0, p, ti in rows:
                lo = max(0, p0 - window + 1) if window > 0 else 0
                if bool((tables[ti, lo // BLOCK_N : p // BLOCK_N + 1] < 0).any()):
                    raise ValueError(f"a block that position {p} of table {ti} sees (window {window}) is "
                                     "released or missing")
            for p in self.decode_pos_host:
                lo = max(0, p - window + 1) if window > 0 else 0
                got = max(got, p // BLOCK_N - lo // BLOCK_N + 1)
            self._checked[window] = got
        return got


def _cache_operand(buf: torch.Tensor, kind: str, name: str) -> tuple[torch.Tensor, int]:
    """(buffer as the kernels address it, head dim) of a slot buffer [n_slots, n_kv, row]."""
    if kind not in _KIND:
        raise ValueError(f"unknown {name} cache type {kind!r}; expected one of {sorted(_KIND)}")
    if buf.dim() != 3 or not buf.is_contiguous():
        raise ValueError(f"{name} cache must be a contiguous [slots, n_kv, row] buffer, got {tuple(buf.shape)}")
    want = kv_quant.kv_storage_dtype(kind)
    if buf.dtype != want:
        raise ValueError(f"{name} cache of type {kind} must hold {want}, got {buf.dtype}")
    if kind in _BLOCK_BYTES:
        width = buf.shape[2]
        if width % _BLOCK_BYTES[kind]:
            raise ValueError(f"{name} cache row of {width} bytes is not whole {kind} blocks")
        # Blocks are 2-byte aligned (34 / 18 B): the kernels read int16 words.
        return buf.view(torch.int16), width // _BLOCK_BYTES[kind] * 32
    return buf, buf.shape[2]


def _qk_operands(type_k: str, q_round: int) -> dict:
    """How q . k is computed for keys of type_k (triton_attention_kernels' docstring): the dtype keys and
    q's parts enter the dot in, its precision, and in how many parts q goes (2: high + low)."""
    import triton.language as tl

    if type_k == "f32":
        return dict(DOT_K=tl.float32, PREC_K="ieee", Q_TERMS=1)
    if type_k == "bf16":
        return dict(DOT_K=tl.float32, PREC_K="tf32", Q_TERMS=1 if q_round == 2 else 2)
    # f16 keys: q's fp16 high and low parts; block keys: q's q8_0 codes (q_round 1) or its fp16 parts
    return dict(DOT_K=tl.float16, PREC_K="tf32", Q_TERMS=1 if q_round == 1 else 2)


def _dot_v(kind: str):
    import triton.language as tl

    return tl.float16 if kind in ("f16", "q8_0", "q4_0") else tl.float32


def kernel_meta(kernel: str, type_k: str, type_v: str, dk: int, dv: int, G: int, *, softcap: bool, round_q: bool,
                tuning: Tuning, direct: bool = False) -> dict:
    """The constexpr arguments and launch options of the "decode" or "prefill" kernel (tuning resolved);
    also what benchmarks/gpu/attention_sass.py compiles."""
    q_round = _Q_ROUND[kv_quant.QUERY_DOT_TYPES.get(type_k, "")] if round_q else 0
    meta = dict(KIND_K=_KIND[type_k], KIND_V=_KIND[type_v], D=dk, DV=dv, BLOCK_N=BLOCK_N, SOFTCAP=bool(softcap),
                Q_ROUND=q_round, DOT_V=_dot_v(type_v), **_qk_operands(type_k, q_round))
    if kernel == "decode":
        meta.update(BLOCK_H=max(16, _pow2(G)), KEYS=tuning.decode_keys, DIRECT=direct, num_warps=tuning.decode_warps)
        stages = tuning.decode_stages
    else:
        gp = _pow2(G)
        # >= 16 rows per tile (the tensor-core minimum)
        meta.update(BLOCK_Q=max(1, tuning.prefill_block_m // gp, -(-16 // gp)), GP=gp, KEYS=tuning.prefill_keys,
                    num_warps=tuning.prefill_warps)
        stages = tuning.prefill_stages
    if stages is not None:
        meta["num_stages"] = stages
    return meta


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan, *,
                    type_k: str, type_v: str, scale: float, window: int = 0, softcap: float = 0.0,
                    out_dtype: torch.dtype | None = None, max_splits: int = DEFAULT_MAX_SPLITS,
                    min_split_blocks: int = DEFAULT_MIN_SPLIT_BLOCKS, grid_splits: int | None = None,
                    round_q: bool = True, tuning: Tuning = DEFAULT_TUNING) -> torch.Tensor:
    """Attention of q [T, H, D] (rotated as the cache's K, if it is) over one layer's cache buffers
    k_cache / v_cache ([n_slots, n_kv, D] floats or [n_slots, n_kv, row bytes] uint8 blocks, exactly
    `LayerStore.k / .v`) for the rows in `plan` -> [T, H * Dv] in out_dtype (default: q's dtype), in the
    basis V is stored in (rotate back if V is rotated).

    round_q: round q as the engine does before its K.Q dot (kv_quant.query_for_keys: through q8_0 blocks
    for q8_0/q4_0 keys, to bf16 for bf16 keys), inside the kernels; False: q as given.
    Every row of q must be in the plan (T == plan.n_rows) and its K/V already written to the cache.
    Head dims must be powers of two >= 32 and H a multiple of n_kv. max_splits / min_split_blocks: how a
    decode row's keys are split (each split gets ceil(blocks / max_splits), at least min_split_blocks,
    blocks); grid_splits: the split dimension of the launch grid (default: what the plan's longest row
    needs; pass max_splits for a graph-capturable launch).
    """
    if _kernels() is None:
        raise RuntimeError(f"Triton kernels unavailable: {_IMPORT_ERROR!r}")
    if not available(q.device):
        raise RuntimeError(f"Triton kernels cannot run on {q.device} here "
                           "(CUDA, or the CPU with TRITON_INTERPRET=1 set before Triton is imported)")
    kb, dk = _cache_operand(k_cache, type_k, "K")
    vb, dv = _cache_operand(v_cache, type_v, "V")
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got {tuple(q.shape)}")
    T, H, D = q.shape
    n_kv = k_cache.shape[1]
    if D != dk:
        raise ValueError(f"q has head dim {D}, the K cache {dk}")
    if v_cache.shape[0] != k_cache.shape[0] or v_cache.shape[1] != n_kv:
        raise ValueError("K and V caches differ in slots or KV heads")
    for name, d in (("K", dk), ("V", dv)):
        if d < 32 or d & (d - 1):
            raise ValueError(f"{name} head dim {d} is not a power of two >= 32")
    if n_kv < 1 or H % n_kv:
        raise ValueError(f"{H} query heads do not share {n_kv} KV heads evenly")
    if T != plan.n_rows:
        raise ValueError(f"q has {T} rows, the plan {plan.n_rows}")
    if max_splits < 1 or min_split_blocks < 1:
        raise ValueError("max_splits and min_split_blocks must be >= 1")
    if q.stride(2) != 1:
        q = q.contiguous()
    tuning = tuning.resolved(max(dk, dv))
    for keys in (tuning.decode_keys, tuning.prefill_keys):
        if keys not in (16, 32):
            raise ValueError(f"keys per step must be 16 or 32, got {keys}")
    G = H // n_kv
    out = torch.empty((T, H, dv), dtype=out_dtype or q.dtype, device=q.device)
    window = int(window) if window and window > 0 else 0
    softcap = float(softcap) if softcap and softcap > 0 else 0.0
    tab = plan.block_tables
    strides = (k_cache_s := kb.stride())[0], k_cache_s[1], vb.stride(0), vb.stride(1)

    rd = plan.decode_rows.shape[0]
    if rd:
        # A row's split depends only on its own block count and (max_splits, min_split_blocks); the grid
        # must cover the most splits any row of the plan uses.
        need = -(-plan.max_decode_blocks(window) // min_split_blocks)
        need = max(1, min(max_splits, need))
        grid = need if grid_splits is None else int(grid_splits)
        if grid < need:
            raise ValueError(f"grid_splits {grid} is below the {need} splits the longest row uses")
        direct = grid == 1
        if direct:
            ws_acc = ws_ml = out  # unused
        else:
            ws_acc = torch.empty((rd, H, grid, dv), dtype=torch.float32, device=q.device)
            ws_ml = torch.empty((rd, H, grid, 2), dtype=torch.float32, device=q.device)
        meta = kernel_meta("decode", type_k, type_v, dk, dv, G, softcap=softcap > 0, round_q=round_q,
                           tuning=tuning, direct=direct)
        K.launch_decode((rd, n_kv, grid), q, kb, vb, tab, plan.decode_rows, plan.decode_pos, plan.decode_table,
                        out, ws_acc, ws_ml, q.stride(0), q.stride(1), *strides, tab.stride(0),
                        out.stride(0), out.stride(1), H, G, float(scale), softcap, window,
                        max_splits, min_split_blocks, grid, **meta)
        if not direct:
            K.launch_reduce((rd, H), ws_acc, ws_ml, plan.decode_rows, plan.decode_pos, out, H, window,
                            max_splits, min_split_blocks, grid, out.stride(0), out.stride(1), DV=dv,
                            SPLITS_P2=_pow2(grid), BLOCK_N=BLOCK_N, num_warps=4)

    if plan.runs:
        plan.max_decode_blocks(window)  # checks the runs' blocks (memoised per window)
        meta = kernel_meta("prefill", type_k, type_v, dk, dv, G, softcap=softcap > 0, round_q=round_q,
                           tuning=tuning)
        tiles = plan.tiles(meta["BLOCK_Q"])
        K.launch_prefill((tiles.shape[0], n_kv), q, kb, vb, tab, tiles, out, q.stride(0), q.stride(1), *strides,
                         tab.stride(0), out.stride(0), out.stride(1), G, float(scale), softcap, window, **meta)
    return out.view(T, H * dv)

