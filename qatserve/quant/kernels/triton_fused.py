"""Triton kernels for the elementwise and per-row work between a decode step's matmuls: RMSNorm, RoPE, GeGLU.

Hooked at models/common.py's helpers (rms_norm, Rope.apply, gelu_tanh_glu) when their input is on a CUDA
device (gpu_fusions says when); the model files do not change and the CPU keeps torch.

* `rms_norm(x, w, eps)`: one program per row, y = x * (1 / sqrt(mean(x^2) + eps)) * w in float32, the row
  read once. GGUF already stores Gemma's norm weights as 1 + w (convert/ and llama.cpp's converter add the
  one), so this is plain RMSNorm for every architecture here. Strided head views (q/k of a fused q|k|v
  projection, [T, H, D] with row stride > H * D) are read in place: torch's fused kernel needs them
  contiguous first (one copy kernel). The row's sum of squares is one fixed-order reduction over a tile that
  depends only on the row length, so a row's result does not depend on the other rows (batch invariance);
  it rounds differently from torch's CUDA kernel (within float32 rounding; mean by a correctly rounded
  division, 1/sqrt by sqrt_rn + div_rn).
* `rope(x, cos, sin, dim, neox)`: x * cos + swap(x) * sin over the first `dim` features with the tables
  Rope.tables gathered for the step (sin carries the sign of the first member), one launch instead of four
  (mul, roll/flip, mul, add). Compiled without FMA contraction: the two products and the sum are rounded as
  torch's three kernels round them, so the result is bit-identical to Rope.apply.
* `geglu(gate, up)`: gelu_tanh(gate) * up read straight from the two halves of the gate|up output, one
  launch instead of two. gelu_tanh(g) = 0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi)(g + 0.044715
  g^3): the sigmoid form needs only exp (portable, no libdevice tanh) and has no cancellation for u << 0.
  Within a few float32 ulps of torch's tanh form.

Roofline (H100, Gemma 3 27B decode, one row, per layer; bytes are tiny, launches are the cost at ~2-3 us
each inside a CUDA graph, 62 layers):
| op | torch launches | fused | bytes (fused) |
|---|---|---|---|
| 4 RMSNorms of n_embd 5376 | 4 | 4 | 4 x 43 KB |
| q / k head norms (32 + 16 heads x 128, strided views) | 2 + 2 copies | 2 | 49 KB |
| RoPE of q and k | 8 | 2 | 49 KB |
| GeGLU over 21504 | 2 | 1 | 258 KB |
| per layer | 18 | 9 | ~0.5 MB (0.17 us at 3 TB/s) |
i.e. ~9 launches x 62 layers = ~560 fewer launches per token, ~1.1-1.7 ms of the 12.7 ms step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_inner, s_outer, s_inner, N, n_f, eps,
                     BLOCK: tl.constexpr, HAS_W: tl.constexpr):
    """Row r = pid of x viewed as [outer, inner, N] (strides s_outer, s_inner, 1) -> y[r] contiguous."""
    r = tl.program_id(0).to(tl.int64)
    src = x_ptr + (r // n_inner) * s_outer + (r % n_inner) * s_inner
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    ss = tl.sum(x * x, axis=0)
    mean = tl.math.div_rn(ss, n_f)  # n_f = float(N), exact below 2^24
    rstd = tl.math.div_rn(tl.full((), 1.0, tl.float32), tl.math.sqrt_rn(mean + eps))
    y = x * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * N + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (N,), weight, eps) for x [..., N] (last dim contiguous; up to two strided leading
    levels are read in place) -> a new contiguous tensor of x's shape and dtype."""
    n = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        outer, inner, s_o, s_i = 1, 1, n, 0
    elif x.dim() == 2:
        outer, inner, s_o, s_i = x.shape[0], 1, x.stride(0), 0
    elif x.dim() == 3:
        outer, inner, s_o, s_i = x.shape[0], x.shape[1], x.stride(0), x.stride(1)
    else:
        x = x.reshape(-1, n)
        outer, inner, s_o, s_i = x.shape[0], 1, x.stride(0), 0
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = outer * inner
    if rows == 0 or n == 0:
        return y
    block = triton.next_power_of_2(n)
    warps = 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
    w = weight if weight is not None else x
    _rms_norm_kernel[(rows,)](x, w, y, inner, s_o, s_i, n, float(n), float(eps), BLOCK=block, HAS_W=weight is not None,
                              num_warps=warps)
    return y


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, s_xt, s_xh, s_ct, s_st,
                 D: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr, NEOX: tl.constexpr):
    """Row t = pid 0, head h = pid 1: y = x * cos + swap(x) * sin on the first 2 * HALF features."""
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    src = x_ptr + t * s_xt + h * s_xh
    dst = y_ptr + (t * H + h) * D
    i = tl.arange(0, HALF)
    if NEOX:  # pairs (i, i + HALF)
        a_off, b_off = i, i + HALF
    else:  # pairs (2i, 2i + 1)
        a_off, b_off = 2 * i, 2 * i + 1
    xa = tl.load(src + a_off)
    xb = tl.load(src + b_off)
    ca, cb = tl.load(cos_ptr + t * s_ct + a_off), tl.load(cos_ptr + t * s_ct + b_off)
    sa, sb = tl.load(sin_ptr + t * s_st + a_off), tl.load(sin_ptr + t * s_st + b_off)
    # swap(x) at a is x_b and at b is x_a; sin's first member carries the minus sign (Rope._grow).
    tl.store(dst + a_off, xa * ca + xb * sa)
    tl.store(dst + b_off, xb * cb + xa * sb)
    if REST > 0:  # features past the rotated ones are copied
        j = 2 * HALF + tl.arange(0, REST)
        tl.store(dst + j, tl.load(src + j, mask=j < D), mask=j < D)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int, neox: bool) -> torch.Tensor:
    """Rope.apply(x, (cos, sin)) for x float32 [T, H, D] (last dim contiguous) and the tables [T, 1, dim]
    -> a new contiguous [T, H, D], bit-identical to the torch expression."""
    T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return y
    rest = D - dim
    _rope_kernel[(T, H)](x, cos, sin, y, H, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                         D=D, HALF=dim // 2, REST=triton.next_power_of_2(rest) if rest else 0, NEOX=neox,
                         num_warps=1 if D <= 256 else 2, enable_fp_fusion=False)
    return y


@triton.jit
def _geglu_kernel(g_ptr, u_ptr, y_ptr, F, s_g, s_u, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(g_ptr + t * s_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + t * s_u + offs, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))
    # = 0.5 g (1 + tanh(inner)); the clamp keeps exp finite (gelu is then ~1e-34 g instead of 0)
    gelu = g / (1.0 + tl.exp(tl.minimum(-2.0 * inner, 80.0)))
    tl.store(y_ptr + t * F + offs, (gelu * u).to(y_ptr.dtype.element_ty), mask=mask)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate, up [T, F] (last dim contiguous, any row strides: the halves of the
    gate|up output) -> a new contiguous [T, F]."""
    T, F = gate.shape
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    if up.stride(-1) != 1:
        up = up.contiguous()
    y = torch.empty((T, F), dtype=gate.dtype, device=gate.device)
    if T == 0 or F == 0:
        return y
    block = 1024
    _geglu_kernel[(T, triton.cdiv(F, block))](gate, up, y, F, gate.stride(0), up.stride(0), BLOCK=block,
                                              num_warps=4)
    return y
