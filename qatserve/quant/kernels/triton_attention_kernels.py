"""Triton kernels of attention over the paged KV cache (engine/kv_cache.py), read in place.

Needs Triton; qatserve code calls them through triton_attention.py (importable without it), which also
documents the arguments, the launch plan and the roofline.

Cache rows. A slot buffer is [n_slots, n_kv, row] in the cache's type: f16 / bf16 / f32 values, or
llama.cpp's blocks of 32 values as uint8 (q8_0: fp16 d + 32 int8 codes = 34 B; q4_0: fp16 d + 16 B of
nibbles, byte j holding value j low and value j + 16 high = 18 B). Blocks are only 2-byte aligned (34 and
18 are not multiples of 4), so quantised buffers are read as int16 words: q8_0 is 17 words per block
(word 0 the scale, word 1 + i the codes 2i, 2i + 1), q4_0 9 words (word 0 the scale, word 1 + i the nibbles
of values 2i, 2i + 1 (low half) and 2i + 16, 2i + 17 (high half)).

Halves. Head vectors are handled as two halves of D/2 columns: column c of half h is element
(c // 16) * 32 + h * 16 + c % 16, the first and second 16 values of each 32-value block. That is what one
int16 word per thread decodes to with a single tl.join of two shifts (q4_0's low and high nibbles are the
two halves), so no shuffle is needed: p @ v accumulates two [rows, D/2] tiles, stored back at the same
columns, and float keys dot two halves.

q . k without rounding. An fp16 tensor-core dot rounds its operands to 11 bits, and the error of a logit
grows with the logit (Gemma 4's full layers: head dim 512, scale 1): measured ~1e-3 relative on the
output of random heads. So no operand of q . k is rounded:
* quantised keys: per 32-value block, the integer codes of k (exact in fp16) are dotted with q's codes
  (the engine rounds q to q8_0 for such keys, kv_quant.query_for_keys; done here in registers) in one
  batched tl.dot over blocks [NB, rows, 32] x [NB, 32, keys]: every product and sum is an integer below
  2^24, exact in the float32 accumulator; the block scales d_q * d_k (exact: 11 x 11 bits) multiply the
  block sums, which are then added in float32. Without q rounding, q's fp16 high and low parts are
  dotted with the codes (two dots, 22 bits of q).
* f16 keys: q's fp16 high and low parts, two dots; bf16 keys: in tf32, where bf16 is exact: q's bf16
  part and the rest (one dot when the engine rounds q to bf16 anyway); f32 keys: an IEEE float32 dot.
p @ v rounds p and v to fp16 (tf32 for bf16 / f32 values): those errors do not grow with the logits.

Keys in steps of KEYS (16 or 32) within the cache's blocks of BLOCK_N = 32 slots: the block table gives
the physical block, whose slots are contiguous in the buffer (KEYS 16 halves the K/V tiles' registers,
for head dim 512). Online softmax in float32 in the log2 domain; the running max
starts at a finite -1e30 so fully masked blocks are exact no-ops (p = 0, alpha = 1), and a row's result
does not depend on which other rows share its tile. Keys outside a row's range are masked in the score
and not loaded (other=0), so stale bytes in a partly written block can never reach the output.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _half_cols(NB: tl.constexpr, H: tl.constexpr):
    """Element index of each column of half H: [NB * 16]."""
    return tl.reshape(tl.arange(0, NB)[:, None] * 32 + H * 16 + tl.arange(0, 16)[None, :], (NB * 16,))


@triton.jit
def _block_codes(buf, base, smask, KIND: tl.constexpr, NB: tl.constexpr, ROWS: tl.constexpr):
    """Quantised rows at word offsets base [ROWS] -> (codes of half 0, of half 1 [ROWS, NB, 16] int32,
    signed; scales d [ROWS, NB] float32); rows where smask is False read as 0 (never loaded)."""
    WPB: tl.constexpr = 17 if KIND == 1 else 9  # int16 words per block
    blk = base[:, None] + tl.arange(0, NB)[None, :] * WPB  # [ROWS, NB]: the scale words
    d = tl.load(buf + blk, mask=smask[:, None], other=0).to(tl.float16, bitcast=True).to(tl.float32)
    wi = blk[:, :, None] + 1 + tl.arange(0, 8)[None, None, :]
    m3 = smask[:, None, None]
    if KIND == 1:
        # Words 1..8 hold codes 0..15 (half 0), words 9..16 codes 16..31; low byte first.
        w0 = tl.load(buf + wi, mask=m3, other=0).to(tl.int32)
        w1 = tl.load(buf + wi + 8, mask=m3, other=0).to(tl.int32)
        c0 = tl.join((w0 << 24) >> 24, w0 >> 8)  # sign-extended bytes (the word is sign-extended too)
        c1 = tl.join((w1 << 24) >> 24, w1 >> 8)
    else:
        w = tl.load(buf + wi, mask=m3, other=0).to(tl.int32)
        c0 = tl.join(w & 0xF, (w >> 8) & 0xF) - 8  # values 2i, 2i + 1
        c1 = tl.join((w >> 4) & 0xF, (w >> 12) & 0xF) - 8  # values 2i + 16, 2i + 17
    return tl.reshape(c0, (ROWS, NB, 16)), tl.reshape(c1, (ROWS, NB, 16)), d


@triton.jit
def _kv_tile(buf, slots, smask, hk, s_slot, s_head, KIND: tl.constexpr, NB: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """Rows `slots` [BLOCK_N] of KV head hk -> two halves [BLOCK_N, NB * 16] (float32 for quantised kinds,
    the stored dtype otherwise); rows where smask is False read as 0 (never loaded)."""
    base = slots.to(tl.int64) * s_slot + hk * s_head  # [BLOCK_N], in elements of buf's type
    if KIND == 0:
        c = tl.arange(0, NB)[:, None] * 32 + tl.arange(0, 16)[None, :]
        off = base[:, None, None] + c[None, :, :]
        m3 = smask[:, None, None]
        x0 = tl.load(buf + off, mask=m3, other=0.0)
        x1 = tl.load(buf + off + 16, mask=m3, other=0.0)
    else:
        c0, c1, d = _block_codes(buf, base, smask, KIND, NB, BLOCK_N)
        x0 = c0.to(tl.float32) * d[:, :, None]
        x1 = c1.to(tl.float32) * d[:, :, None]
    return tl.reshape(x0, (BLOCK_N, NB * 16)), tl.reshape(x1, (BLOCK_N, NB * 16))


@triton.jit
def _rint(y):
    """y (float32, |y| < 2^22) rounded to an integer, ties to even, as float32. In integer ops on the
    bits: `y + 1.5 * 2^23 - 1.5 * 2^23` would let the compiler fuse the product y was made by into an
    FMA (one rounding fewer, other codes at ties), and the interpreter has no rint."""
    b = y.to(tl.int32, bitcast=True)
    m = (b & 0x7FFFFF) | 0x800000  # significand; |y| = m * 2^(e - 23), e the unbiased exponent
    s1 = tl.minimum(tl.maximum(22 - (((b >> 23) & 0xFF) - 127), 0), 24)  # bits below the half bit
    r2 = m >> s1  # integer part and the half bit
    ip = r2 >> 1
    up = ((r2 & 1) == 1) & (((r2 << s1) != m) | ((ip & 1) == 1))  # above half, or a tie to odd
    r = ip + up.to(tl.int32)
    return tl.where(b < 0, -r, r).to(tl.float32)


@triton.jit
def _bf16_rne(x):
    """float32 x rounded to bf16 (nearest, ties to even) as float32, in integer ops: the same on every
    backend (Triton's CPU interpreter truncates in .to(tl.bfloat16)). Finite inputs."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _q8_codes(q0, q1, ROWS: tl.constexpr, NB: tl.constexpr):
    """Halves q0, q1 [ROWS, NB * 16] through x86 AVX2's quantize_row_q8_0 (kv_quant.query_for_keys):
    -> (codes of each half [ROWS, NB, 16] float32 integers, d [ROWS, NB] = fp16(amax / 127) as float32);
    codes = round-half-even(x * (127 / amax)). A block's amax is the max over both halves."""
    a0 = tl.reshape(q0, (ROWS, NB, 16))
    a1 = tl.reshape(q1, (ROWS, NB, 16))
    amax = tl.maximum(tl.max(tl.abs(a0), axis=2), tl.max(tl.abs(a1), axis=2))  # [ROWS, NB]
    big = tl.full((ROWS, NB), 127.0, dtype=tl.float32)
    d = tl.math.div_rn(amax, big).to(tl.float16).to(tl.float32)
    inv = tl.where(amax != 0, tl.math.div_rn(big, tl.where(amax != 0, amax, 1.0)), 0.0)[:, :, None]
    return _rint(a0 * inv), _rint(a1 * inv), d


@triton.jit
def _round_q(q0, q1, Q_ROUND: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr):
    """q halves as the engine dots them with the cache's keys (kv_quant.query_for_keys), as float32:
    Q_ROUND 1 = through q8_0 blocks (code * d, exact), 2 = rounded to bf16, 0 = as is."""
    if Q_ROUND == 1:
        c0, c1, d = _q8_codes(q0, q1, ROWS, NB)
        return (tl.reshape(c0 * d[:, :, None], (ROWS, NB * 16)),
                tl.reshape(c1 * d[:, :, None], (ROWS, NB * 16)))
    elif Q_ROUND == 2:
        return _bf16_rne(q0), _bf16_rne(q1)
    else:
        return q0, q1


@triton.jit
def _to_blocks(x0, x1, ROWS: tl.constexpr, NB: tl.constexpr):
    """Halves [ROWS, NB * 16] (or [ROWS, NB, 16]) -> [NB, ROWS, 32]: per block, its 32 values in the order
    (value in half, half) -- the order _k_blocks gives the keys, so a per-block dot pairs them right."""
    x = tl.join(tl.reshape(x0, (ROWS, NB, 16)), tl.reshape(x1, (ROWS, NB, 16)))
    return tl.permute(tl.reshape(x, (ROWS, NB, 32)), (1, 0, 2))


@triton.jit
def _prep_q(q0, q1, KIND_K: tl.constexpr, Q_ROUND: tl.constexpr, DOT_K: tl.constexpr, PREC_K: tl.constexpr,
            ROWS: tl.constexpr, NB: tl.constexpr):
    """q halves (float32, loaded) -> the operands `_scores` takes (see the module docstring):
    float keys: (hi half 0, hi half 1, lo half 0, lo half 1) in DOT_K, lo = q - hi (zeros when hi is all
    of q); quantised keys: (hi, lo [NB, ROWS, 32] fp16, block scale d_q [NB, ROWS], unused),
    hi = q's q8_0 codes and d_q their scale with Q_ROUND 1, else q's fp16 parts and d_q = 1."""
    if KIND_K == 0:
        q0, q1 = _round_q(q0, q1, Q_ROUND, ROWS, NB)
        if PREC_K == "ieee":  # f32 keys: q as is
            h0, h1 = q0, q1
        elif DOT_K == tl.float16:  # f16 keys
            h0, h1 = q0.to(tl.float16).to(tl.float32), q1.to(tl.float16).to(tl.float32)
        else:  # bf16 keys, dotted in tf32 (bf16 is exact there): q's bf16 part, then the rest
            h0, h1 = _bf16_rne(q0), _bf16_rne(q1)
        return h0.to(DOT_K), h1.to(DOT_K), (q0 - h0).to(DOT_K), (q1 - h1).to(DOT_K)
    else:
        if Q_ROUND == 1:
            c0, c1, d = _q8_codes(q0, q1, ROWS, NB)
            hi = _to_blocks(c0, c1, ROWS, NB).to(tl.float16)
            return hi, hi, tl.trans(d), d
        else:
            h0, h1 = q0.to(tl.float16), q1.to(tl.float16)
            l0, l1 = (q0 - h0.to(tl.float32)).to(tl.float16), (q1 - h1.to(tl.float32)).to(tl.float16)
            ones = tl.full((NB, ROWS), 1.0, dtype=tl.float32)
            return _to_blocks(h0, h1, ROWS, NB), _to_blocks(l0, l1, ROWS, NB), ones, ones


@triton.jit
def _scores(qa, qb, qc, qd, k_buf, slots, kmask, hk, s_ks, s_kh, KIND_K: tl.constexpr, NB: tl.constexpr,
            KEYS: tl.constexpr, Q_TERMS: tl.constexpr, DOT_K: tl.constexpr, PREC_K: tl.constexpr):
    """q . k [ROWS, KEYS] float32 of _prep_q's operands with the keys at `slots`."""
    if KIND_K == 0:
        k0, k1 = _kv_tile(k_buf, slots, kmask, hk, s_ks, s_kh, KIND_K, NB, KEYS)
        k0t, k1t = tl.trans(k0.to(DOT_K)), tl.trans(k1.to(DOT_K))
        s = tl.dot(qa, k0t, input_precision=PREC_K)
        s = tl.dot(qb, k1t, s, input_precision=PREC_K)
        if Q_TERMS == 2:
            s = tl.dot(qc, k0t, s, input_precision=PREC_K)
            s = tl.dot(qd, k1t, s, input_precision=PREC_K)
        return s
    else:
        base = slots.to(tl.int64) * s_ks + hk * s_kh
        c0, c1, dk = _block_codes(k_buf, base, kmask, KIND_K, NB, KEYS)
        kc = tl.permute(tl.reshape(tl.join(c0, c1), (KEYS, NB, 32)), (1, 2, 0)).to(tl.float16)  # [NB, 32, N]
        bd = tl.dot(qa, kc)  # [NB, ROWS, KEYS]: exact integer block sums with q8_0 q
        if Q_TERMS == 2:
            bd = tl.dot(qb, kc, bd)
        return tl.sum(bd * (qc[:, :, None] * tl.trans(dk)[:, None, :]), axis=0)


@triton.jit
def _attend_block(qa, qb, qc, qd, k_buf, v_buf, phys, kb, hk, qpos, klo, khi, m_i, l_i, acc0, acc1,
                  s_ks, s_kh, s_vs, s_vh, qk_scale, softcap, window,
                  KIND_K: tl.constexpr, KIND_V: tl.constexpr, NB: tl.constexpr, NBV: tl.constexpr,
                  BLOCK_N: tl.constexpr, KEYS: tl.constexpr, SOFTCAP: tl.constexpr, Q_TERMS: tl.constexpr,
                  DOT_K: tl.constexpr, PREC_K: tl.constexpr, DOT_V: tl.constexpr):
    """Keys [kb * KEYS, (kb + 1) * KEYS) (a whole cache block of BLOCK_N slots, physical block `phys`, or a
    part of it) for query rows at positions qpos [M]: the online softmax update of (m_i, l_i [M], acc0,
    acc1 [M, NBV * 16]). Keys outside [klo, khi] are not loaded."""
    kpos = kb * KEYS + tl.arange(0, KEYS)
    kmask = (kpos >= klo) & (kpos <= khi)
    slots = phys * BLOCK_N + kpos % BLOCK_N
    s = _scores(qa, qb, qc, qd, k_buf, slots, kmask, hk, s_ks, s_kh, KIND_K, NB, KEYS, Q_TERMS, DOT_K, PREC_K)
    if SOFTCAP:
        # softcap * tanh(x), x = s * scale / softcap; tanh from exp2 (portable, stable for large |x|).
        x = s * (qk_scale / softcap)
        t = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
        th = (1.0 - t) / (1.0 + t)
        s = tl.where(x < 0, -th, th) * (softcap * 1.4426950408889634)
    else:
        s = s * (qk_scale * 1.4426950408889634)
    vis = kmask[None, :] & (kpos[None, :] <= qpos[:, None])
    vis = vis & ((window <= 0) | (qpos[:, None] - kpos[None, :] < window))
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v0, v1 = _kv_tile(v_buf, slots, kmask, hk, s_vs, s_vh, KIND_V, NBV, KEYS)
    pd = p.to(DOT_V)
    acc0 = tl.dot(pd, v0.to(DOT_V), acc0 * alpha[:, None], input_precision="tf32")
    acc1 = tl.dot(pd, v1.to(DOT_V), acc1 * alpha[:, None], input_precision="tf32")
    return m_new, l_i, acc0, acc1


@triton.jit
def _split_range(qpos, window, max_splits, min_split_blocks, BLOCK_N: tl.constexpr):
    """(lo, first block, blocks per split, splits used) of a decode row at qpos. Depends only on the row
    and the two split parameters, so a row's result does not depend on the rest of the batch."""
    lo = tl.where(window > 0, tl.maximum(qpos - window + 1, 0), 0)
    first = lo // BLOCK_N
    nblk = qpos // BLOCK_N - first + 1
    bps = tl.maximum(tl.cdiv(nblk, max_splits), min_split_blocks)
    return lo, first, bps, tl.cdiv(nblk, bps)


@triton.jit
def _decode_kernel(q_ptr, k_buf, v_buf, tab_ptr, rows_ptr, pos_ptr, tix_ptr, out_ptr, ws_acc, ws_ml,
                   s_qr, s_qh, s_ks, s_kh, s_vs, s_vh, s_tab, s_or, s_oh,
                   H, G, qk_scale, softcap, window, max_splits, min_split_blocks, grid_splits,
                   KIND_K: tl.constexpr, KIND_V: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, KEYS: tl.constexpr, SOFTCAP: tl.constexpr,
                   Q_ROUND: tl.constexpr, Q_TERMS: tl.constexpr, DOT_K: tl.constexpr, PREC_K: tl.constexpr,
                   DOT_V: tl.constexpr, DIRECT: tl.constexpr):
    """Program (decode row r, KV head hk, split sp): the G query heads of hk against this split's key
    blocks. DIRECT (one split): writes the normalised output; else (m, l, acc) partials to the workspace."""
    r, hk, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NB: tl.constexpr = D // 32
    NBV: tl.constexpr = DV // 32
    SUB: tl.constexpr = BLOCK_N // KEYS  # key steps per cache block
    qpos = tl.load(pos_ptr + r)
    tix = tl.load(tix_ptr + r).to(tl.int64)
    row = tl.load(rows_ptr + r).to(tl.int64)
    lo, first, bps, _ = _split_range(qpos, window, max_splits, min_split_blocks, BLOCK_N)
    b0 = first + sp * bps
    b1 = tl.minimum(b0 + bps, qpos // BLOCK_N + 1)

    g = tl.arange(0, BLOCK_H)
    hmask = g < G
    heads = hk * G + g
    qoff = row * s_qr + heads[:, None] * s_qh
    q0 = tl.load(q_ptr + qoff + _half_cols(NB, 0)[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
    q1 = tl.load(q_ptr + qoff + _half_cols(NB, 1)[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
    qa, qb, qc, qd = _prep_q(q0, q1, KIND_K, Q_ROUND, DOT_K, PREC_K, BLOCK_H, NB)
    qv = tl.zeros((BLOCK_H,), dtype=tl.int32) + qpos

    m_i = tl.full((BLOCK_H,), -1.0e30, dtype=tl.float32)  # finite: see the module docstring
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_H, NBV * 16), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_H, NBV * 16), dtype=tl.float32)
    # key steps of KEYS keys over this split's blocks, without steps wholly outside [lo, qpos]
    for kb in range(tl.maximum(b0 * SUB, lo // KEYS), tl.minimum(b1 * SUB, qpos // KEYS + 1)):
        phys = tl.load(tab_ptr + tix * s_tab + kb // SUB)
        m_i, l_i, acc0, acc1 = _attend_block(qa, qb, qc, qd, k_buf, v_buf, phys, kb, hk, qv, lo, qpos, m_i, l_i,
                                             acc0, acc1, s_ks, s_kh, s_vs, s_vh, qk_scale, softcap, window,
                                             KIND_K, KIND_V, NB, NBV, BLOCK_N, KEYS, SOFTCAP, Q_TERMS, DOT_K,
                                             PREC_K, DOT_V)
    c0 = _half_cols(NBV, 0)[None, :]
    c1 = _half_cols(NBV, 1)[None, :]
    if DIRECT:
        # acc / l, as the reduce computes it for a one-split row: the same bits either way.
        ooff = row * s_or + heads[:, None] * s_oh
        oty = out_ptr.dtype.element_ty
        tl.store(out_ptr + ooff + c0, (acc0 / l_i[:, None]).to(oty), mask=hmask[:, None])
        tl.store(out_ptr + ooff + c1, (acc1 / l_i[:, None]).to(oty), mask=hmask[:, None])
    else:
        w = (r.to(tl.int64) * H + heads) * grid_splits + sp  # [BLOCK_H]
        tl.store(ws_acc + w[:, None] * DV + c0, acc0, mask=hmask[:, None])
        tl.store(ws_acc + w[:, None] * DV + c1, acc1, mask=hmask[:, None])
        tl.store(ws_ml + w * 2, m_i, mask=hmask)
        tl.store(ws_ml + w * 2 + 1, l_i, mask=hmask)


@triton.jit
def _reduce_kernel(ws_acc, ws_ml, rows_ptr, pos_ptr, out_ptr, H, window, max_splits, min_split_blocks, grid_splits,
                   s_or, s_oh, DV: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (decode row r, query head h): combines the row's used splits in split order."""
    r, h = tl.program_id(0), tl.program_id(1)
    qpos = tl.load(pos_ptr + r)
    row = tl.load(rows_ptr + r).to(tl.int64)
    _, _, _, used = _split_range(qpos, window, max_splits, min_split_blocks, BLOCK_N)
    sp = tl.arange(0, SPLITS_P2)
    smask = sp < used
    w = (r.to(tl.int64) * H + h) * grid_splits + sp
    m = tl.load(ws_ml + w * 2, mask=smask, other=float("-inf"))
    l_ = tl.load(ws_ml + w * 2 + 1, mask=smask, other=0.0)
    mx = tl.max(m, axis=0)
    e = tl.exp2(m - mx)  # 0 for unused splits
    den = tl.sum(e * l_, axis=0)
    dv = tl.arange(0, DV)
    acc = tl.load(ws_acc + w[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0)
    o = tl.sum(acc * e[:, None], axis=0) / den
    tl.store(out_ptr + row * s_or + h * s_oh + dv, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_kernel(q_ptr, k_buf, v_buf, tab_ptr, tiles_ptr, out_ptr,
                    s_qr, s_qh, s_ks, s_kh, s_vs, s_vh, s_tab, s_or, s_oh,
                    G, qk_scale, softcap, window,
                    KIND_K: tl.constexpr, KIND_V: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                    BLOCK_Q: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, KEYS: tl.constexpr,
                    SOFTCAP: tl.constexpr, Q_ROUND: tl.constexpr, Q_TERMS: tl.constexpr, DOT_K: tl.constexpr,
                    PREC_K: tl.constexpr, DOT_V: tl.constexpr):
    """Program (tile t, KV head hk): flash attention of a tile's query rows (consecutive positions of one
    sequence) x the G query heads of hk, packed as BLOCK_Q * GP rows (row-major: position, then head),
    against the key blocks any of them sees; K/V are read once per KV head."""
    t, hk = tl.program_id(0), tl.program_id(1)
    NB: tl.constexpr = D // 32
    NBV: tl.constexpr = DV // 32
    BLOCK_M: tl.constexpr = BLOCK_Q * GP
    row0 = tl.load(tiles_ptr + t * 4).to(tl.int64)
    n = tl.load(tiles_ptr + t * 4 + 1)
    pos0 = tl.load(tiles_ptr + t * 4 + 2)
    tix = tl.load(tiles_ptr + t * 4 + 3).to(tl.int64)

    mi = tl.arange(0, BLOCK_M)
    qi = mi // GP
    g = mi % GP
    valid = (qi < n) & (g < G)
    qpos = pos0 + qi
    qoff = (row0 + qi) * s_qr + (hk * G + g) * s_qh
    q0 = tl.load(q_ptr + qoff[:, None] + _half_cols(NB, 0)[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    q1 = tl.load(q_ptr + qoff[:, None] + _half_cols(NB, 1)[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    qa, qb, qc, qd = _prep_q(q0, q1, KIND_K, Q_ROUND, DOT_K, PREC_K, BLOCK_M, NB)

    last = pos0 + n - 1
    lo = tl.where(window > 0, tl.maximum(pos0 - window + 1, 0), 0)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, NBV * 16), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, NBV * 16), dtype=tl.float32)
    for kb in range(lo // KEYS, last // KEYS + 1):
        phys = tl.load(tab_ptr + tix * s_tab + kb // (BLOCK_N // KEYS))
        m_i, l_i, acc0, acc1 = _attend_block(qa, qb, qc, qd, k_buf, v_buf, phys, kb, hk, qpos, lo, last, m_i, l_i,
                                             acc0, acc1, s_ks, s_kh, s_vs, s_vh, qk_scale, softcap, window,
                                             KIND_K, KIND_V, NB, NBV, BLOCK_N, KEYS, SOFTCAP, Q_TERMS, DOT_K,
                                             PREC_K, DOT_V)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # padded rows may see nothing; they are not stored
    ooff = (row0 + qi) * s_or + (hk * G + g) * s_oh
    oty = out_ptr.dtype.element_ty
    tl.store(out_ptr + ooff[:, None] + _half_cols(NBV, 0)[None, :], (acc0 / l_safe[:, None]).to(oty),
             mask=valid[:, None])
    tl.store(out_ptr + ooff[:, None] + _half_cols(NBV, 1)[None, :], (acc1 / l_safe[:, None]).to(oty),
             mask=valid[:, None])


def launch_decode(grid, *args, **meta):
    _decode_kernel[grid](*args, **meta)


def launch_reduce(grid, *args, **meta):
    _reduce_kernel[grid](*args, **meta)


def launch_prefill(grid, *args, **meta):
    _prefill_kernel[grid](*args, **meta)
