"""Triton kernels of the routed experts (Gemma 4 26B-A4B): only the chosen experts' blocks are read, the
expert ids stay on the device (no host sync, so a decode step's MoE can live in a CUDA graph).

The experts of one matrix kind are one stacked buffer: gpu_layout planes of n_expert matrices [N, K]
concatenated along N (expert e's rows are e*N .. e*N + N - 1), or for float experts one [n_expert * N, K]
tensor in its dtype. A "pair" p = t * top_k + j is row t's j-th chosen expert (ids [T, top_k] flattened).

* `gather_gemv` (decode, kind "decode"): one program per (pair, tile of BLOCK_N output rows); it reads the
  expert id of its pair from the device, offsets the planes to that expert and runs the dense gemv's
  one-row arithmetic (triton_gemv._tile / _row_x / _row_fma: per sub-block float32 sums, scaled once).
  x is read per row t (gate|up: every chosen expert of a row sees the same input) or per pair (down).
  Output y [pairs, N]. A pair's result depends on its row and its expert only: batch-invariant.
* `grouped_dot` (prefill, kind "prompt"): pairs sorted by expert on the device (`group_pairs`: counts by
  scatter_add, stable sort, each expert's run padded to a multiple of BLOCK_M, a tile -> expert table by
  searchsorted); one program per (tile of BLOCK_M pairs of one expert, tile of BLOCK_N weight rows) decodes
  the expert's weight tile once for all its pairs and calls tl.dot (tf32, float32 accumulation), as the
  dense prompt plan does. The grid is the static upper bound cdiv(pairs + min(E, pairs) * (BLOCK_M - 1),
  BLOCK_M); tiles past the padded total return at once. Each weight tile is read once per M-tile of its
  expert instead of once per pair.
* `combine`: out[t] = sum_j w[t, j] * y[t * top_k + j] in j order (the routing-weighted sum, one fixed
  order per row, whatever else is in the batch).

Float experts (F16/BF16/F32, e.g. a tiny model's down projections of width 24, which no block format
holds) go through `gather_fgemv` for every row count: K masked, one fixed-order float32 sum per output.

Roofline (H100, ~3.0 TB/s measured copy rate): benchmarks/gpu/moe_bench.py's docstring has the 26B-A4B
decode byte count per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_gemv as tg
from .gpu_layout import Q8_0, PackedWeights


@triton.jit
def _expert_planes(base, lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_lo, s_hi, s_sc, s_d):
    """The six GGUF planes (gpu_layout) of the expert whose first stacked row is `base`; minv has the
    scale plane's shape, dmin the d plane's."""
    return (lo_ptr + base * s_lo, hi_ptr + base * s_hi, sc_ptr + base * s_sc, mn_ptr + base * s_sc,
            d_ptr + base * s_d, dm_ptr + base * s_d)


@triton.jit
def _gather_gemv_kernel(x_ptr, y_ptr, ids_ptr, lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                        N, TOP_K, s_xm, s_ym, s_lo, s_hi, s_sc, s_d, k_tiles, exp,
                        SB: tl.constexpr, CB: tl.constexpr, OFF: tl.constexpr, HI_BITS: tl.constexpr,
                        KQUANT: tl.constexpr, HAS_MIN: tl.constexpr, IS_Q8: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_PER_PAIR: tl.constexpr):
    """y[p, rows] = x[row of p] @ W_e[rows]^T with e = ids[p]: the dense gemv's one-row arithmetic over the
    planes of expert e (a base offset of e * N rows in every plane)."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    NB: tl.constexpr = BLOCK_K // SB
    base = tl.load(ids_ptr + p).to(tl.int64) * N  # the expert's first row in the stacked planes
    xrow = p if X_PER_PAIR else p // TOP_K
    lo, hi, sc, mn, dd, dm = _expert_planes(base, lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_lo, s_hi, s_sc, s_d)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    for kt in range(0, k_tiles):
        q, a, b = tg._tile(lo, hi, sc, mn, dd, dm, pid_n * BLOCK_N, N, kt, s_lo, s_hi, s_sc, s_d, exp,
                           SB, CB, HI_BITS, KQUANT, HAS_MIN, IS_Q8, BLOCK_N, BLOCK_K)
        x, xs = tg._row_x(x_ptr, xrow, 1, s_xm, kt, SB, NB, False)
        acc = tg._row_fma(acc, q, a, b, x, xs, CB, OFF, HAS_MIN)
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + p.to(tl.int64) * s_ym + rows, y, mask=rows < N)


@triton.jit
def _gather_fgemv_kernel(x_ptr, y_ptr, ids_ptr, w_ptr, N, K, TOP_K, s_xm, s_ym, s_wn,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_PER_PAIR: tl.constexpr):
    """As _gather_gemv_kernel for float experts w [n_expert * N, K]: float32 products, one sum per row."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    base = tl.load(ids_ptr + p).to(tl.int64) * N
    xrow = p if X_PER_PAIR else p // TOP_K
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        w = tl.load(w_ptr + (base + rows.to(tl.int64))[:, None] * s_wn + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + xrow * s_xm + ks, mask=kmask, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    tl.store(y_ptr + p.to(tl.int64) * s_ym + rows, tl.sum(acc, axis=1), mask=rmask)


@triton.jit
def _grouped_dot_kernel(x_ptr, y_ptr, pairs_ptr, tile_expert_ptr, lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                        N, TOP_K, N_EXPERT, s_xm, s_ym, s_lo, s_hi, s_sc, s_d, k_tiles, exp,
                        SB: tl.constexpr, CB: tl.constexpr, OFF: tl.constexpr, HI_BITS: tl.constexpr,
                        KQUANT: tl.constexpr, HAS_MIN: tl.constexpr, IS_Q8: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        X_PER_PAIR: tl.constexpr):
    """y[pairs of this M-tile, rows] = x rows @ W_e[rows]^T on tensor cores (tf32, float32 accumulation):
    W is operand A (weight rows fill the tensor-core M side), the tile's pairs are the N side."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= N_EXPERT:  # past the padded total: nothing to do
        return
    base = e.to(tl.int64) * N
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs)  # -1: padding of the expert's run
    valid = pair >= 0
    pair = tl.where(valid, pair, 0)
    xrow = pair if X_PER_PAIR else pair // TOP_K
    lo, hi, sc, mn, dd, dm = _expert_planes(base, lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_lo, s_hi, s_sc, s_d)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in range(0, k_tiles):
        q, a, b = tg._tile(lo, hi, sc, mn, dd, dm, pid_n * BLOCK_N, N, kt, s_lo, s_hi, s_sc, s_d, exp,
                           SB, CB, HI_BITS, KQUANT, HAS_MIN, IS_Q8, BLOCK_N, BLOCK_K)
        c = -((1 << CB) + OFF) * a  # exact (as in triton_gemv._qdot_kernel)
        if HAS_MIN:
            c = c + b
        w = tl.reshape(q * a[:, :, None] + c[:, :, None], (BLOCK_N, BLOCK_K))
        kk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + xrow.to(tl.int64)[None, :] * s_xm + kk[:, None], mask=valid[None, :], other=0.0)
        acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="tf32")
    y_off = pair.to(tl.int64)[None, :] * s_ym + rows[:, None]
    tl.store(y_ptr + y_off, acc, mask=(rows < N)[:, None] & valid[None, :])


@triton.jit
def _combine_kernel(y_ptr, w_ptr, out_ptr, N, s_y, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t, n] = sum_j w[t, j] * y[t * TOP_K + j, n], j = 0, 1, ... (one order for every batch)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        wj = tl.load(w_ptr + t * TOP_K + j).to(tl.float32)
        acc += wj * tl.load(y_ptr + (t * TOP_K + j) * s_y + offs, mask=mask, other=0.0)
    tl.store(out_ptr + t * N + offs, acc, mask=mask)


# ------------------------------------------------------------------------------------------- host side
def _planes(w: PackedWeights):
    """(the planes in kernel order, the strides, constexpr meta) of stacked packed weights."""
    f = w.fmt
    is_q8 = f.qtype == Q8_0
    lo = w.q8.view(torch.int32) if is_q8 else w.lo
    any_t = w.scale  # stands in for the planes a format lacks; never read
    planes = (lo, w.hi if w.hi is not None else any_t, w.scale, w.minv if w.minv is not None else any_t,
              w.d if w.d is not None else any_t, w.dmin if w.dmin is not None else any_t)
    strides = (lo.stride(0), w.hi.stride(0) if w.hi is not None else 1, w.scale.stride(0),
               w.d.stride(0) if w.d is not None else 1)
    meta = dict(SB=f.sb, CB=8 if is_q8 else 4 + f.hi_bits, OFF=128 if is_q8 else f.off, HI_BITS=f.hi_bits,
                KQUANT=f.kquant, HAS_MIN=f.has_min, IS_Q8=is_q8)
    return planes, strides, meta


def gather_gemv(w: PackedWeights, n_expert: int, x: torch.Tensor, ids: torch.Tensor, *, per_pair: bool,
                block_n: int = 32, block_k: int = 256, num_warps: int = 4) -> torch.Tensor:
    """y float32 [pairs, N] with y[p] = x[row of p] @ W_{ids[p]}^T. w: n_expert matrices [N, K] stacked
    (w.N = n_expert * N). ids: int [T, top_k] (or [pairs]) on the device. x: [T, K] (per_pair False:
    row p // top_k) or [pairs, K] (per_pair True), float32."""
    top_k = ids.shape[-1] if ids.dim() > 1 else 1
    ids = ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    n = w.N // n_expert
    P, K = ids.numel(), x.shape[1]
    if K != w.K:
        raise ValueError(f"x has {K} columns, the experts {w.K}")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((P, n), device=x.device, dtype=torch.float32)
    if P == 0:
        return y
    block_k, _ = tg.plan_k(K, block_k, 1)
    planes, (s_lo, s_hi, s_sc, s_d), meta = _planes(w)
    _gather_gemv_kernel[(P, triton.cdiv(n, block_n))](
        x, y, ids, *planes, n, top_k, x.stride(0), y.stride(0), s_lo, s_hi, s_sc, s_d, K // block_k,
        tg._exp_bits(w.fmt), BLOCK_N=block_n, BLOCK_K=block_k, X_PER_PAIR=per_pair, num_warps=num_warps,
        num_stages=1, **meta)
    return y


def gather_fgemv(w: torch.Tensor, n_expert: int, x: torch.Tensor, ids: torch.Tensor, *, per_pair: bool,
                 block_n: int = 32, block_k: int = 128, num_warps: int = 4) -> torch.Tensor:
    """gather_gemv for float experts w [n_expert * N, K] (fp16 / bf16 / fp32)."""
    top_k = ids.shape[-1] if ids.dim() > 1 else 1
    ids = ids.reshape(-1).contiguous()
    n = w.shape[0] // n_expert
    P, K = ids.numel(), x.shape[1]
    if K != w.shape[1]:
        raise ValueError(f"x has {K} columns, the experts {w.shape[1]}")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((P, n), device=x.device, dtype=torch.float32)
    if P == 0:
        return y
    block_k = min(block_k, triton.next_power_of_2(K))
    _gather_fgemv_kernel[(P, triton.cdiv(n, block_n))](
        x, y, ids, w, n, K, top_k, x.stride(0), y.stride(0), w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
        X_PER_PAIR=per_pair, num_warps=num_warps)
    return y


def group_pairs(ids: torch.Tensor, n_expert: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs int32 [tiles * block_m], tile_expert int32 [tiles]) for ids [T, top_k] on the device, with no
    host sync: the pairs p = t * top_k + j sorted by expert (stable: ascending p within an expert), each
    expert's run padded with -1 to a multiple of block_m; tile i holds pairs[i*block_m : (i+1)*block_m],
    all of expert tile_expert[i] (n_expert for tiles past the padded total). tiles is the static bound
    cdiv(P + min(n_expert, P) * (block_m - 1), block_m), so the launch grid never needs the counts."""
    flat = ids.reshape(-1)
    P = flat.numel()
    dev = flat.device
    counts = torch.zeros(n_expert, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    order = torch.sort(flat, stable=True).indices
    expert = flat[order]
    pos = (pad_end - padded)[expert] + torch.arange(P, device=dev) - start[expert]
    tiles = -(-(P + min(n_expert, P) * (block_m - 1)) // block_m)
    pairs = torch.full((tiles * block_m,), -1, dtype=torch.int32, device=dev)
    pairs[pos] = order.to(torch.int32)
    tile_start = torch.arange(tiles, device=dev) * block_m
    tile_expert = torch.searchsorted(pad_end, tile_start, right=True).to(torch.int32)
    return pairs, tile_expert


def grouped_dot(w: PackedWeights, n_expert: int, x: torch.Tensor, ids: torch.Tensor, *, per_pair: bool,
                block_n: int = 128, block_k: int = 64, block_m: int = 32, num_warps: int = 4,
                num_stages: int = 3, grouping: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """gather_gemv's result for many rows on tensor cores (tf32 operands, float32 sums), pairs grouped by
    expert (group_pairs; pass `grouping` to reuse one for the gate|up and down launches of a step)."""
    top_k = ids.shape[-1] if ids.dim() > 1 else 1
    n = w.N // n_expert
    P, K = ids.numel(), x.shape[1]
    if K != w.K:
        raise ValueError(f"x has {K} columns, the experts {w.K}")
    if min(block_m, block_n) < 16:
        raise ValueError("the dot kernel needs block_m and block_n >= 16 (tensor-core tile)")
    if x.stride(1) != 1:
        x = x.contiguous()
    if x.dtype != torch.float32:
        x = x.float()
    y = torch.empty((P, n), device=x.device, dtype=torch.float32)
    if P == 0:
        return y
    pairs, tile_expert = grouping if grouping is not None else group_pairs(ids, n_expert, block_m)
    block_k, _ = tg.plan_k(K, block_k, 1)
    planes, (s_lo, s_hi, s_sc, s_d), meta = _planes(w)
    _grouped_dot_kernel[(tile_expert.numel(), triton.cdiv(n, block_n))](
        x, y, pairs, tile_expert, *planes, n, top_k, n_expert, x.stride(0), y.stride(0), s_lo, s_hi, s_sc, s_d,
        K // block_k, tg._exp_bits(w.fmt), BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m,
        X_PER_PAIR=per_pair, num_warps=num_warps, num_stages=num_stages, **meta)
    return y


def combine(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out float32 [T, N] = sum_j weights[t, j] * y[t * top_k + j] in j order; y [T * top_k, N] float32,
    weights [T, top_k]."""
    T, top_k = weights.shape
    N = y.shape[1]
    w = weights.float().contiguous()
    out = torch.empty((T, N), device=y.device, dtype=torch.float32)
    if T == 0:
        return out
    if y.stride(1) != 1:
        y = y.contiguous()
    block = min(1024, triton.next_power_of_2(N))
    _combine_kernel[(T, triton.cdiv(N, block))](y, w, out, N, y.stride(0), TOP_K=top_k, BLOCK=block, num_warps=4)
    return out
