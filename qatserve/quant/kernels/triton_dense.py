"""Triton matrix-vector product for float weights (F16 / BF16 / F32) with float32 activations and sums.

The GPU path's float matrices are few (the F16 token embedding that Gemma's QAT files tie to the output
head, 1-D-heavy test models), but the head is the largest matmul of a decode step, so it must stream
its 2 bytes per weight once: cuBLAS would need x rounded to fp16 (Gemma's activations overflow fp16) or
a float32 copy of W (twice the bytes). Here x stays float32, each weight is widened in registers, and
every output row is one program's fixed-order sum: a row's result never depends on how many rows
(M) are in the call, which the engine's batch invariance needs (quant/kernels/gpu_matmul.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dense_acc(acc, x_ptr, m, M, s_xm, ks, kmask, w, MASKED: tl.constexpr):
    """acc [BLOCK_N, BLOCK_K] += W tile * x[m] tile: the one-row arithmetic for any number of rows."""
    if MASKED:
        x = tl.load(x_ptr + m * s_xm + ks, mask=kmask & ((ks * 0 + m) < M), other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + m * s_xm + ks, mask=kmask, other=0.0).to(tl.float32)
    acc += w * x[None, :]
    return acc


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, s_xm, s_wn, s_ym,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr = 1,
                       MASKED: tl.constexpr = False):
    """y[m, rows] = x[m] @ W[rows]^T for the ROWS (1 or 2) rows m = pid_0 * ROWS + r and BLOCK_N weight
    rows; float32 sums. The W tile is loaded once for both rows; each row keeps its own accumulator of
    the one-row shape, so its bits do not depend on ROWS (more rows would spill: 64 registers each)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m0 = pid_m * ROWS
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = acc0
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        # int64 row offsets: the 262144 x 5376 head has 1.4e9 weights, close to 2^31.
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * s_wn + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc0 = _dense_acc(acc0, x_ptr, m0, M, s_xm, ks, kmask, w, MASKED)
        if ROWS > 1:
            acc1 = _dense_acc(acc1, x_ptr, m0 + 1, M, s_xm, ks, kmask, w, MASKED)
    y = tl.sum(acc0, axis=1)
    if MASKED:
        tl.store(y_ptr + m0.to(tl.int64) * s_ym + rows, y, mask=rmask & ((rows * 0 + m0) < M))
    else:
        tl.store(y_ptr + m0.to(tl.int64) * s_ym + rows, y, mask=rmask)
    if ROWS > 1:
        y1 = tl.sum(acc1, axis=1)
        if MASKED:
            tl.store(y_ptr + (m0 + 1).to(tl.int64) * s_ym + rows, y1, mask=rmask & ((rows * 0 + m0 + 1) < M))
        else:
            tl.store(y_ptr + (m0 + 1).to(tl.int64) * s_ym + rows, y1, mask=rmask)


def dense_gemv(w: torch.Tensor, x: torch.Tensor, *, block_n: int = 32, block_k: int = 256,
               num_warps: int = 4, rows: int = 1) -> torch.Tensor:
    """y float32 [M, N] = x [M, K] @ w^T for w fp16 / bf16 / fp32 [N, K] (row-major) on x's device.
    rows: rows of x per program (1 or 2; 2 reads each weight once per pair of rows, same bits)."""
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"x has {K} columns, the matrix {w.shape[1]}")
    if rows not in (1, 2):
        raise ValueError(f"rows per program must be 1 or 2, got {rows}")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((M, N), device=x.device, dtype=torch.float32)
    if M == 0:
        return y
    rows = min(rows, M)
    _dense_gemv_kernel[(triton.cdiv(M, rows), triton.cdiv(N, block_n))](
        x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, ROWS=rows,
        MASKED=M % rows != 0, num_warps=num_warps)
    return y
