"""Triton kernels for y[M, N] = x[M, K] @ W^T with W kept as GGUF codes (gpu_layout.PackedWeights).

Two kernels share one tile decoder, `_tile`: a [BLOCK_N, BLOCK_K] tile of W becomes float32 codes
[BLOCK_N, NB, SB] (NB = BLOCK_K / SB sub-blocks of SB values) and per-sub-block scales a, offsets b.

* `_gemv_kernel` (decode, CUDA cores): per sub-block it sums q_j * x_j in float32 and scales that
  partial once, so weights are never rounded: the error is float32 summation only (~5e-7 relative).
  A program holds ROWS = 1..MAX_ROWS rows of x (the multi-row decode plan, gpu_fusions `multirow`):
  each weight tile is decoded once and every row runs the one-row arithmetic on its own accumulator
  of the same shape, so a row's bits do not depend on ROWS (tests/unit/test_gpu_fusions.py checks
  M = 1 against 2..8 bitwise). Its FMAs grow with the rows, so it is the decode kernel, not prefill.
* `_qdot_kernel` (batched decode, M = 2..16, and prefill): dequantises the tile to the dot dtype and
  calls tl.dot with float32 accumulation (wgmma on Hopper). W is operand A ("swap AB"): 64-128 weight
  rows fill the tensor-core M side and the few token rows are the N side, padded to 16. Dot dtype:
  fp16 for fp16 x; tf32 for fp32 and bf16 x (fp16's mantissa without its range limit, since Gemma's
  activations overflow fp16). Each weight is rounded once to 11 significant bits: ~2e-4 relative.

Roofline, H100 SXM (a device-to-device copy measured ~3.0 TB/s here; the spec sheet says 3.35).
Gemma 3 27B, Q4_0 = 18 B per 32 weights = 0.5625 B/weight, n_embd 5376, n_ff 21504, q 32 x 128,
k/v 16 x 128:

| matrix (N x K) | weights | bytes | at 3.0 TB/s |
|---|---|---|---|
| q 4096 x 5376 | 22.0 M | 12.4 MB | 4.1 us |
| k, v 2048 x 5376 | 11.0 M | 6.2 MB | 2.1 us |
| o 5376 x 4096 | 22.0 M | 12.4 MB | 4.1 us |
| gate, up 21504 x 5376 | 115.6 M | 65.0 MB | 21.7 us |
| down 5376 x 21504 | 115.6 M | 65.0 MB | 21.7 us |
| one layer | 412.9 M | 232.2 MB | 77.4 us |
| 62 layers | 25.6 G | 14.40 GB | 4.80 ms |

Plus the output head 262144 x 5376 (Google's 27B QAT file: F16, 2.82 GB, 0.94 ms; llama.cpp's Q6_K:
1.16 GB): a 27B token streams ~17.2 GB, 5.7 ms at 3.0 TB/s = 174 tok/s; Gemma 4 31B (Q6_K head)
17.6 GB = 170 tok/s. So 170 tok/s needs the weight reads at ~the measured copy rate: every byte read
once, in 16-byte loads, with enough in flight; x (5376 x 2 B) stays in L1/L2 and costs nothing.

How the kernels aim at it:
* Bytes: the planes are the GGUF bytes, split (Q4_0: 16 B of codes and a 2 B scale per 32 weights).
  A tile row is BLOCK_K / 2 contiguous bytes; each thread loads 16 B (4 int32 words = 32 codes = one
  Q4_0 block), consecutive threads take consecutive words, so a warp reads whole 128-byte lines.
  K tiles always divide K (no K masks: a mask would split the 16-byte loads).
* In flight: ~2-3 MB (latency ~1 us x 3 TB/s), ~20 KB per SM: the default gemv tile gives each
  thread 4 16-byte loads per step and fits ~7 programs of 128 threads per SM (72 registers).
  Matrices with few row tiles (q, k, v, o, down) split K
  over SPLIT_K programs (float32 partials in a workspace) to fill 132 SMs. The partials are summed by
  one torch sum, or (`counters` given: gpu_fusions `splitk`) by the last program of each tile to
  arrive (an int32 counter per tile, atomically incremented, reset by that program), in split order:
  one launch per matrix instead of two, the same order for every row and every arrival order.
* ALU: 3 TB/s is 5.3e12 Q4_0 weights/s, ~20 weights per clock per SM at 1.98 GHz, so a weight may
  cost at most ~6 thread instructions (4 schedulers x 32 lanes / 20). Codes become floats without
  I2F (quarter rate): a shift and one LOP3 place u in the mantissa of 2^CB (`_val`); the base and the
  code offset come off once per sub-block via sum(x); tl.join expands each word inside the thread
  that loaded it. ptxas output for sm_90a (benchmarks/gpu/gemv_sass.py, no GPU needed; Triton 3.6
  as on the H100 image): the Q4_0 gemv loop costs 4.0 instructions per weight (BLOCK_N 64, BLOCK_K
  256, 4 warps, 72 registers, no spills), the dot kernel 6.3 (64 x 128 tile, wgmma), Q5_*/Q6_K
  ~7-8 in gemv (merging the high bits). benchmarks/gpu/gemv_notes.md has the history.

Multi-row decode (2-slot aggregate). The per-row gemv read every weight once per generated row, so 2
slots cost 2x the bytes (0.64x llama.cpp's 2-slot aggregate on the H100). With ROWS rows per program
the weights stream once per ROWS rows: Gemma 3 27B, 2 rows: 14.4 GB per step instead of 28.8 GB (F16
head, triton_dense ROWS = 2: 2.8 GB instead of 5.6 GB); launches unchanged. The ALU cost per weight
grows with the rows (Q4_0, float32 x, sm_90a, Triton 3.6: 3.8 instructions per weight at 1 row, 2.5 per
weight-row at 2, 2.0 at 4, i.e. ~5 and ~8 per weight against the ~6 that 3 TB/s allows), and registers
go from 80 to ~255 (2 programs per SM instead of 6, fewer bytes in flight): 2 rows should stay near the
copy rate, 4 rows trade some of it for 4x fewer bytes; not yet timed (fusions_bench.py). MAX_ROWS is 4:
8 accumulators spill.

Pointer args that a format does not use get any valid tensor (never dereferenced: the constexpr
branches remove those loads at compile time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gpu_layout import Q8_0, PackedWeights


@triton.jit
def _shl(t, n: tl.constexpr):
    """t << n for n >= 0, t >> -n otherwise (arithmetic; callers mask the bits they keep)."""
    if n >= 0:
        return t << n
    else:
        return t >> (-n)


@triton.jit
def _val(wd, hw, exp, S: tl.constexpr, CB: tl.constexpr, HI_BITS: tl.constexpr, IS_Q8: tl.constexpr):
    """Code S of each int32 word (a nibble, or a byte for Q8_0) as the float32 2^CB + u.

    u (CB bits) is OR-ed into the mantissa of 2^CB, which turns it into a float with one shift and one
    LOP3 instead of a quarter-rate int-to-float conversion; the 2^CB + off it carries is removed once
    per sub-block (callers subtract (2^CB + off) * sum(x)). Q5_*/Q6_K add the high bits from hw, whose
    bits 0.. hold this word's 8 fifth bits (or 8 bit pairs)."""
    MB: tl.constexpr = 23 - CB  # mantissa bit of u's LSB
    if IS_Q8:
        # u = byte ^ 0x80 (signed code + 128); exp also holds the 0x80 that flips the byte's sign bit.
        v = (_shl(wd, MB - 8 * S) & (0xFF << MB)) ^ exp
    else:
        v = _shl(wd, MB - 4 * S) & (0xF << MB)
        if HI_BITS == 1:
            v = v | (_shl(hw, MB + 4 - S) & (1 << (MB + 4)))
        if HI_BITS == 2:
            v = v | (_shl(hw, MB + 4 - 2 * S) & (3 << (MB + 4)))
        v = v | exp
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _tile(lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, row0, N, kt,
          s_lo, s_hi, s_sc, s_d, exp,
          SB: tl.constexpr, CB: tl.constexpr, HI_BITS: tl.constexpr, KQUANT: tl.constexpr,
          HAS_MIN: tl.constexpr, IS_Q8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """K-tile kt of rows row0.. -> (q [BLOCK_N, NB, SB] float32 2^CB + u, a [BLOCK_N, NB], b [BLOCK_N, NB]):
    value = a * (q - 2^CB - off) + b; b is meaningful only with HAS_MIN. Rows >= N read as zeros.

    Codes are expanded from their int32 words with tl.join, which adds each new axis inside the
    thread that loaded the word: a 16-byte load stays in one thread, and the per-sub-block sums
    below need no cross-thread traffic (a broadcast shift over a new axis would spread it)."""
    NB: tl.constexpr = BLOCK_K // SB
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if IS_Q8:
        W: tl.constexpr = BLOCK_K // 4
        kw = kt * W + tl.arange(0, W)
        wd = tl.load(lo_ptr + rows[:, None] * s_lo + kw[None, :], mask=rmask[:, None], other=0)
        # join(join(b0, b2), join(b1, b3)) flattens to b0 b1 b2 b3: natural value order.
        z = tl.join(tl.join(_val(wd, wd, exp, 0, CB, 0, True), _val(wd, wd, exp, 2, CB, 0, True)),
                    tl.join(_val(wd, wd, exp, 1, CB, 0, True), _val(wd, wd, exp, 3, CB, 0, True)))
    else:
        W: tl.constexpr = BLOCK_K // 8
        kw = kt * W + tl.arange(0, W)
        wd = tl.load(lo_ptr + rows[:, None] * s_lo + kw[None, :], mask=rmask[:, None], other=0)
        hw = wd
        if HI_BITS == 1:
            # One word of fifth bits per 32 values (4 code words); byte j belongs to code word j. The
            # trailing unit axis caps the load at 4 bytes per thread, so the word lands in the thread
            # that holds its 4 code words (a 16-byte load would give one thread 4 sub-blocks' words).
            kh = kt * NB + tl.arange(0, NB)
            h = tl.load(hi_ptr + rows[:, None, None] * s_hi + kh[None, :, None] + tl.arange(0, 1)[None, None, :],
                        mask=rmask[:, None, None], other=0)
            hw = tl.reshape(tl.join(tl.join(h, h >> 16), tl.join(h >> 8, h >> 24)), (BLOCK_N, W))
        if HI_BITS == 2:
            # One word of bit pairs per 16 values (2 code words); half j belongs to code word j. A thread
            # must load the pair of words (8 bytes) that covers its 4 code words: a [rows * pairs, 2]
            # tile (rows flattened into the first axis) gets exactly that layout from the coalescer,
            # where a [rows, pairs, 2] one ties the two outer axes and Triton 3.6 put lanes along rows.
            P: tl.constexpr = NB // 2
            i = tl.arange(0, BLOCK_N * P)
            r = row0 + i // P
            h = tl.load(hi_ptr + r[:, None] * s_hi + ((kt * P + i % P) * 2)[:, None] + tl.arange(0, 2)[None, :],
                        mask=(r < N)[:, None], other=0)
            hw = tl.reshape(tl.join(h, h >> 16), (BLOCK_N, W))
        # Leaves in the order that makes the nested joins flatten to codes 0..7 of each word.
        v0, v1 = _val(wd, hw, exp, 0, CB, HI_BITS, False), _val(wd, hw, exp, 1, CB, HI_BITS, False)
        v2, v3 = _val(wd, hw, exp, 2, CB, HI_BITS, False), _val(wd, hw, exp, 3, CB, HI_BITS, False)
        v4, v5 = _val(wd, hw, exp, 4, CB, HI_BITS, False), _val(wd, hw, exp, 5, CB, HI_BITS, False)
        v6, v7 = _val(wd, hw, exp, 6, CB, HI_BITS, False), _val(wd, hw, exp, 7, CB, HI_BITS, False)
        z = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    q = tl.reshape(z, (BLOCK_N, NB, SB))

    # Scales: R per thread (the sub-blocks of the 32 codes it holds), loaded through a trailing axis
    # of R so that they land where their codes are (see HI_BITS == 1 above).
    R: tl.constexpr = 32 // SB
    kb = kt * NB + (tl.arange(0, NB // R)[:, None] * R + tl.arange(0, R)[None, :])
    s_off = rows[:, None, None] * s_sc + kb[None, :, :]
    a = tl.reshape(tl.load(sc_ptr + s_off, mask=rmask[:, None, None], other=0), (BLOCK_N, NB)).to(tl.float32)
    b = a  # placeholder: read only with HAS_MIN
    if KQUANT:
        # fp16 super-block d times the 6/8-bit integer sub-scale: exact in float32, as in ggml.
        d_off = rows[:, None, None] * s_d + kb[None, :, :] // (256 // SB)
        dd = tl.reshape(tl.load(d_ptr + d_off, mask=rmask[:, None, None], other=0), (BLOCK_N, NB))
        a = dd.to(tl.float32) * a
        if HAS_MIN:
            m = tl.reshape(tl.load(mn_ptr + s_off, mask=rmask[:, None, None], other=0), (BLOCK_N, NB))
            dm = tl.reshape(tl.load(dm_ptr + d_off, mask=rmask[:, None, None], other=0), (BLOCK_N, NB))
            b = -(dm.to(tl.float32) * m.to(tl.float32))
    elif HAS_MIN:
        b = tl.reshape(tl.load(mn_ptr + s_off, mask=rmask[:, None, None], other=0), (BLOCK_N, NB)).to(tl.float32)
    return q, a, b


@triton.jit
def _row_x(x_ptr, m, M, s_xm, kt, SB: tl.constexpr, NB: tl.constexpr, MASKED: tl.constexpr):
    """Row m's K tile kt as float32 [NB, SB] and its sub-block sums [NB]."""
    kb = kt * NB + tl.arange(0, NB)
    xp = x_ptr + m * s_xm + kb[:, None] * SB + tl.arange(0, SB)[None, :]
    if MASKED:  # the last group of rows may run past M: those rows read zeros and store nothing
        # (full-shape masks: Triton's interpreter rejects a broadcast 0-d one)
        x = tl.load(xp, mask=(tl.zeros((NB, SB), dtype=tl.int32) + m) < M, other=0.0).to(tl.float32)
    else:
        x = tl.load(xp).to(tl.float32)
    return x, tl.sum(x, axis=1)  # the sums are shared by all weight rows


@triton.jit
def _row_fma(acc, q, a, b, x, xs, CB: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr):
    """acc [BLOCK_N, NB] += one row's share of a K tile against the decoded tile (q, a, b): the one-row
    arithmetic, whatever the number of rows the program holds."""
    # Per sub-block: sum_j (2^CB + u_j) x_j - (2^CB + off) sum_j x_j = sum_j (u_j - off) x_j. A small
    # base (2^CB, not 2^23) keeps the cancellation to ~CB of float32's 24 bits.
    part = tl.sum(q * x[None, :, :], axis=2) - ((1 << CB) + OFF) * xs[None, :]
    acc += a * part
    if HAS_MIN:
        acc += b * xs[None, :]
    return acc


@triton.jit
def _row_out(acc, out_ptr, m, M, N, pid_k, rows, rmask, MASKED: tl.constexpr):
    """Row m's sum over its accumulator into out [n_split, M, N] at this program's K split."""
    y = tl.sum(acc, axis=1)
    # int64: M * N exceeds 2^31 for a long prefill through the 262144-row output head.
    off = (pid_k.to(tl.int64) * M + m) * N + rows
    mask = rmask & ((rows * 0 + m) < M) if MASKED else rmask
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_reduce(ws_ptr, y_ptr, m, M, N, n_split, rows, rmask, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """y[m, rows] = sum of the n_split partials of row m, in split order (the row's order alone)."""
    mask = rmask & ((rows * 0 + m) < M) if MASKED else rmask
    tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, n_split):
        # .cg: from L2, where the other programs' stores landed (never a stale L1 line)
        tot += tl.load(ws_ptr + (k * M + m).to(tl.int64) * N + rows, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(y_ptr + m.to(tl.int64) * N + rows, tot.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, y_ptr, lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, ws_ptr, cnt_ptr,
                 M, N, s_xm, s_lo, s_hi, s_sc, s_d, tiles_per_split, n_split, exp,
                 SB: tl.constexpr, CB: tl.constexpr, OFF: tl.constexpr, HI_BITS: tl.constexpr,
                 KQUANT: tl.constexpr, HAS_MIN: tl.constexpr, IS_Q8: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr = 1,
                 MASKED: tl.constexpr = False, REDUCE: tl.constexpr = False):
    """This K split of x[m] @ W[rows]^T on CUDA cores for the ROWS (1..4) rows m = pid_0 * ROWS + r.

    Each weight tile is decoded once for all ROWS rows (the multi-row decode plan reads the weights once
    per step, not once per row); every row runs the one-row arithmetic on its own accumulator of the
    same shape (_row_fma), so its bits do not depend on ROWS or on the other rows.
    Output: without REDUCE, y [n_split, M, N] (the partials, or y itself when n_split is 1); with REDUCE
    (n_split > 1), the partials go to ws [n_split, M, N] and the last program of each (row group, tile)
    to arrive (a counter in cnt, reset by it) sums them in split order into y [M, N]: the one-launch
    split-K of gpu_fusions' `splitk`."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NB: tl.constexpr = BLOCK_K // SB
    m0 = pid_m * ROWS
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    a0 = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    for t in range(0, tiles_per_split):
        kt = pid_k * tiles_per_split + t
        if ROWS == 1:
            q, a, b = _tile(lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, pid_n * BLOCK_N, N, kt, s_lo, s_hi, s_sc,
                            s_d, exp, SB, CB, HI_BITS, KQUANT, HAS_MIN, IS_Q8, BLOCK_N, BLOCK_K)
            x0, s0 = _row_x(x_ptr, m0, M, s_xm, kt, SB, NB, MASKED)
            a0 = _row_fma(a0, q, a, b, x0, s0, CB, OFF, HAS_MIN)
        else:
            # The rows' x tiles first: their layout conversions (shared memory + barriers) then all come
            # before the tile is decoded, so no barrier sits between the rows' uses of the decoded codes.
            x0, s0 = _row_x(x_ptr, m0, M, s_xm, kt, SB, NB, MASKED)
            x1, s1 = _row_x(x_ptr, m0 + 1, M, s_xm, kt, SB, NB, MASKED)
            if ROWS > 2:
                x2, s2 = _row_x(x_ptr, m0 + 2, M, s_xm, kt, SB, NB, MASKED)
            if ROWS > 3:
                x3, s3 = _row_x(x_ptr, m0 + 3, M, s_xm, kt, SB, NB, MASKED)
            q, a, b = _tile(lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, pid_n * BLOCK_N, N, kt, s_lo, s_hi, s_sc,
                            s_d, exp, SB, CB, HI_BITS, KQUANT, HAS_MIN, IS_Q8, BLOCK_N, BLOCK_K)
            a0 = _row_fma(a0, q, a, b, x0, s0, CB, OFF, HAS_MIN)
            a1 = _row_fma(a1, q, a, b, x1, s1, CB, OFF, HAS_MIN)
            if ROWS > 2:
                a2 = _row_fma(a2, q, a, b, x2, s2, CB, OFF, HAS_MIN)
            if ROWS > 3:
                a3 = _row_fma(a3, q, a, b, x3, s3, CB, OFF, HAS_MIN)
    out = ws_ptr if REDUCE else y_ptr
    _row_out(a0, out, m0, M, N, pid_k, rows, rmask, MASKED)
    if ROWS > 1:
        _row_out(a1, out, m0 + 1, M, N, pid_k, rows, rmask, MASKED)
    if ROWS > 2:
        _row_out(a2, out, m0 + 2, M, N, pid_k, rows, rmask, MASKED)
    if ROWS > 3:
        _row_out(a3, out, m0 + 3, M, N, pid_k, rows, rmask, MASKED)
    if REDUCE:
        # Every thread's partial stores are issued before thread 0's release (the barrier orders them, as
        # CUTLASS's semaphore does); the acquire side is the same atomic in the last program.
        tl.debug_barrier()
        cnt = cnt_ptr + pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == n_split - 1:
            for r in tl.static_range(ROWS):
                _row_reduce(ws_ptr, y_ptr, m0 + r, M, N, n_split, rows, rmask, BLOCK_N, MASKED)
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")  # ready for the next launch (graph replays)


@triton.jit
def _qdot_kernel(x_ptr, y_ptr, lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                 M, N, s_xm, s_lo, s_hi, s_sc, s_d, tiles_per_split, exp,
                 SB: tl.constexpr, CB: tl.constexpr, OFF: tl.constexpr, HI_BITS: tl.constexpr,
                 KQUANT: tl.constexpr, HAS_MIN: tl.constexpr, IS_Q8: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 DOT_DTYPE: tl.constexpr):
    """y[pid_k, m, n] as _gemv_kernel for BLOCK_M rows at once, on tensor cores: acc[n, m] += W_tile @ x^T."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        kt = pid_k * tiles_per_split + t
        q, a, b = _tile(lo_ptr, hi_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, pid_n * BLOCK_N, N, kt, s_lo, s_hi, s_sc,
                        s_d, exp, SB, CB, HI_BITS, KQUANT, HAS_MIN, IS_Q8, BLOCK_N, BLOCK_K)
        c = -((1 << CB) + OFF) * a  # exact: 3 * 2^k times a
        if HAS_MIN:
            c = c + b
        # One FMA per weight (rounded once), then the one rounding that matters: to the dot dtype.
        w = tl.reshape(q * a[:, :, None] + c[:, :, None], (BLOCK_N, BLOCK_K)).to(DOT_DTYPE)
        kk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[None, :] * s_xm + kk[:, None], mask=mmask[None, :], other=0.0)
        acc = tl.dot(w, xt.to(DOT_DTYPE), acc, input_precision="tf32")  # precision: float32 operands only
    y_off = (pid_k.to(tl.int64) * M + offs_m.to(tl.int64)[None, :]) * N + rows[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & mmask[None, :])


_DOT_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.float32, torch.float32: tl.float32}


def _exp_bits(f) -> int:
    """The float 2^CB as int32 bits (and, for Q8_0, the 0x80 that flips each byte's sign), passed as
    a kernel argument rather than a constant: with the mask also an immediate, ptxas (Triton 3.6) spent a
    second LOP3 per code on `(t & mask) | exp`; a register operand lets one LOP3 do both."""
    cb = 8 if f.qtype == Q8_0 else 4 + f.hi_bits
    return ((127 + cb) << 23) | ((0x80 << (23 - cb)) if f.qtype == Q8_0 else 0)


def _block_k(K: int, want: int) -> int:
    """Largest power of two <= want that divides K (K is a multiple of 32): tiles never straddle K's end,
    so the kernels need no K masks (a mask would also split the 16-byte loads)."""
    bk = 1 << (max(int(want), 32).bit_length() - 1)
    while bk > 32 and K % bk:
        bk //= 2
    return bk


def plan_k(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(block_k, split_k) as launched: block_k lowered to divide K, split_k to divide the K tiles."""
    block_k = max(_block_k(K, block_k), 32)
    k_tiles = K // block_k
    split = max(1, min(int(split_k), k_tiles))
    while k_tiles % split:  # equal slices: no K bounds in the kernels
        split -= 1
    return block_k, split


MAX_ROWS = 4  # rows one gemv program holds (one accumulator each)


def max_rows(fmt) -> int:
    """Rows per gemv program the decode plan uses for a format. Q4_0-style formats: MAX_ROWS (the H100
    showed each row's bits equal to the row alone at 2, 3 and 8 rows). K-quants: 1, because on sm_90 the
    3-row Q6_K program's bits differed from the 1-row program's (the larger program is scheduled and
    contracted differently), which would break batch invariance. Registers (benchmarks/gpu/
    fusions_sass.py, Triton 3.6): 1 row 80-167; 2-3 rows ~255 without spills; 4 rows spill 32-64 B for
    Q4_0/Q4_1. Speed: on the H100 the multi-row gemv measured 0.8-1.1x the one-row plan at 27B shapes
    (fusions_bench.py), which is why gpu_fusions leaves `multirow` off by default."""
    return 1 if fmt.kquant else MAX_ROWS


def counters_needed(M: int, N: int, block_n: int, rows: int) -> int:
    """int32 counters the in-kernel split-K reduction of an M-row launch uses (zeroed once, reset by it)."""
    return -(-M // rows) * -(-N // block_n)


def launch(w: PackedWeights, x: torch.Tensor, *, kernel: str, block_n: int, block_k: int, block_m: int = 16,
           split_k: int = 1, num_warps: int = 4, num_stages: int = 1,
           out_dtype: torch.dtype | None = None, rows: int = 1,
           counters: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T with one of the kernels: "gemv" (`rows` rows of x per program and tile
    of block_n weight rows; each row's bits are those of rows = 1) or "dot" (block_m rows of x per
    program; block_m, block_n >= 16).

    x: fp32 / fp16 / bf16 [M, K] on W's device. block_*: powers of two; block_k is lowered to the largest
    power of two that divides K and holds whole sub-blocks. split_k > 1 splits K across programs and
    sums the slices in a float32 workspace: in the gemv kernel itself when `counters` (int32 zeros on the
    device, at least counters_needed(...); the kernel leaves them zero) is given, else by a torch sum.
    out_dtype defaults to x's dtype."""
    f = w.fmt
    M, K = x.shape
    if K != w.K:
        raise ValueError(f"x has {K} columns, the matrix {w.K}")
    if kernel == "dot" and min(block_m, block_n) < 16:
        raise ValueError("the dot kernel needs block_m and block_n >= 16 (tensor-core tile)")
    if not 1 <= rows <= MAX_ROWS or (rows > 1 and kernel != "gemv"):
        raise ValueError(f"rows per program must be 1..{MAX_ROWS} (gemv only), got {rows}")
    if x.stride(1) != 1:
        x = x.contiguous()
    out_dtype = out_dtype or x.dtype
    block_k, split = plan_k(K, block_k, split_k)
    k_tiles = K // block_k
    reduce = (kernel == "gemv" and split > 1 and counters is not None
              and counters.numel() >= counters_needed(M, w.N, block_n, rows))
    y = torch.empty((split, M, w.N) if split > 1 and not reduce else (M, w.N), device=x.device,
                    dtype=torch.float32 if split > 1 and not reduce else out_dtype)
    ws = torch.empty((split, M, w.N), device=x.device, dtype=torch.float32) if reduce else y
    is_q8 = f.qtype == Q8_0
    lo = w.q8.view(torch.int32) if is_q8 else w.lo
    any_t = w.scale  # stands in for the planes a format lacks; never read
    planes = (lo, w.hi if w.hi is not None else any_t, w.scale, w.minv if w.minv is not None else any_t,
              w.d if w.d is not None else any_t, w.dmin if w.dmin is not None else any_t)
    dims = (M, w.N, x.stride(0), lo.stride(0), w.hi.stride(0) if w.hi is not None else 1, w.scale.stride(0),
            w.d.stride(0) if w.d is not None else 1, k_tiles // split)
    meta = dict(SB=f.sb, CB=8 if is_q8 else 4 + f.hi_bits, OFF=128 if is_q8 else f.off, HI_BITS=f.hi_bits,
                KQUANT=f.kquant, HAS_MIN=f.has_min, IS_Q8=is_q8, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=num_warps, num_stages=num_stages)
    if kernel == "gemv":
        _gemv_kernel[(triton.cdiv(M, rows), triton.cdiv(w.N, block_n), split)](
            x, y, *planes, ws, counters if reduce else any_t, *dims, split, _exp_bits(f),
            ROWS=rows, MASKED=M % rows != 0, REDUCE=reduce, **meta)
    elif kernel == "dot":
        _qdot_kernel[(triton.cdiv(M, block_m), triton.cdiv(w.N, block_n), split)](
            x, y, *planes, *dims, _exp_bits(f), BLOCK_M=block_m, DOT_DTYPE=_DOT_DTYPE[x.dtype], **meta)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return y.sum(0, dtype=torch.float32).to(out_dtype) if split > 1 and not reduce else y
