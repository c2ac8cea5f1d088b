"""Quantised matmuls exactly as llama.cpp's x86 AVX2 CPU kernels round them.

The real models amplify a one-ulp difference in a matmul output into different int8 activation quants
a few layers later (and ~0.3 in final log-probs), so matching llama.cpp needs its float32 accumulation
order, not just its quantisation. Every kernel here computes exact integer block dot products (float32
or float64 matmuls of small integers are exact), then replays the kernel's float32 accumulation:

- Q4_0/Q5_0/Q8_0 (ggml_vec_dot_q*_0_q8_0 and llamafile's tinyBLAS_Q0_AVX, which agree) and
  Q4_1/Q5_1 (ggml_vec_dot_q*_1_q8_1): 8 float32 lanes, lane j holding the int sum of values 4j..4j+3
  of each 32-block; per block lane = fma(d_w * d_x, isum, lane); then hsum_float_8. The _1 types add
  the block mins as a scalar fma chain m_w * s_x.
- Q4_K (repacked q4_K_8x8 gemv/gemm, used on AVX2 when out_features % 8 == 0): one accumulator per
  output: per super-block acc = fma(isum, d_w * d_x, acc), mins likewise, result acc - acc_min.
- Q6_K (ggml_vec_dot_q6_K_q8_K): 8 int32 lanes per super-block (lane L: values c*32 + 4L..4L+3 of the
  eight 32-chunks, times their scales, minus 32 * the scaled bsums of values 32L..32L+31), then
  lane = fma(d_x * d_w, float(isum), lane); hsum_float_8.

Other types fall back to `fake-quantised activations @ dequantised weights` in float64 (right up to
float32 summation order).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..k_blocks import _planes, _scale_min_k4
from ..legacy_blocks import _high_bits, _nibbles, f16_col
from . import ggml_numerics as gn

# Output features per chunk: bounds the [groups, T, chunk] lane tensors of the big output head.
_CHUNK = 16384


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fma(a, b, c): the float64 product of two float32 values is exact, one final rounding."""
    return (a.double() * b.double() + c.double()).float()


def hsum8(x: torch.Tensor) -> torch.Tensor:
    """hsum_float_8 over the last dim (8 lanes): high half + low half, then (0+2) + (1+3)."""
    t = x[..., 4:] + x[..., :4]
    return (t[..., 0] + t[..., 2]) + (t[..., 1] + t[..., 3])


def _blocks(raw, out_features: int, type_size: int) -> torch.Tensor:
    a = np.asarray(raw).reshape(-1)
    if not a.flags.writeable:  # read-only memmap: torch wants a writable buffer (we never write)
        a = a.copy()
    return torch.from_numpy(a).view(-1, type_size)


def _lane_sums(xq: torch.Tensor, wq: torch.Tensor, group: int, dtype=torch.float32) -> torch.Tensor:
    """Integer dot products over consecutive groups of `group` values.

    xq [T, n], wq [O, n] (small integers as float) -> [T, O, n / group]."""
    Tn, n = xq.shape
    g = n // group
    xr = xq.to(dtype).view(Tn, g, group).permute(1, 0, 2)   # [g, T, group]
    wr = wq.to(dtype).view(-1, g, group).permute(1, 2, 0)   # [g, group, O]
    return torch.bmm(xr, wr).permute(1, 2, 0)               # [T, O, g]


class GGMLQuantMatmul:
    """y = x @ W^T for one GGUF weight, rounded as llama.cpp's AVX2 CPU kernels round it.

    raw: uint8 GGUF rows [out_features, row_bytes]. Call with x float32 [..., in_features]. Types
    outside EXACT (and Q4_K with out_features % 8 != 0, which llama.cpp does not repack) use a float64
    fallback on `dense`: the dequantised weight, or a callable returning it.
    """

    EXACT = frozenset({T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_1, T.Q5_1, T.Q4_K, T.Q6_K})

    def __init__(self, raw, weight_type, in_features: int, out_features: int, dense=None):
        self.t = T(weight_type)
        self.n, self.o = int(in_features), int(out_features)
        self.kind = "dense"
        b = None
        if self.t in (T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_1, T.Q5_1):
            from gguf.constants import GGML_QUANT_SIZES
            b = _blocks(raw, self.o, GGML_QUANT_SIZES[self.t][1])
            d = f16_col(b[:, :2]).view(self.o, -1)
            if self.t == T.Q4_0:
                q = _nibbles(b[:, 2:]).view(torch.int8) - 8
            elif self.t == T.Q5_0:
                q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)).view(torch.int8) - 16
            elif self.t == T.Q8_0:
                q = b[:, 2:].view(torch.int8)
            elif self.t == T.Q4_1:
                q = _nibbles(b[:, 4:])
            else:
                q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
            self.kind = "q0" if self.t in (T.Q4_0, T.Q5_0, T.Q8_0) else "q1"
            self.wq = q.to(torch.int8).reshape(self.o, self.n)        # codes kept small; cast per chunk
            self.dw = d                                           # [O, nb] float32
            if self.kind == "q1":
                self.mw = f16_col(b[:, 2:4]).view(self.o, -1)     # [O, nb]
        elif self.t == T.Q4_K and self.o % 8 == 0:
            b = _blocks(raw, self.o, 144)
            nbk = b.shape[0]
            sc, m = _scale_min_k4(b[:, 4:16])                      # [n, 8] each
            q = _planes(b[:, 16:144].view(nbk, 4, 32), [0, 4], 0x0F).reshape(nbk, 8, 32)
            self.kind = "q4k"
            self.wq = (q.to(torch.int16) * sc.to(torch.int16)[:, :, None]).reshape(self.o, self.n)
            self.mw = m.float().view(self.o, -1, 8)                # [O, nb, 8]
            self.dw = f16_col(b[:, 0:2]).view(self.o, -1)
            self.dminw = f16_col(b[:, 2:4]).view(self.o, -1)
        elif self.t == T.Q6_K:
            b = _blocks(raw, self.o, 210)
            nbk = b.shape[0]
            sc = b[:, 192:208].view(torch.int8).float()            # [n, 16]
            ql = _planes(b[:, :128].view(nbk, 2, 64), [0, 4], 0x0F).reshape(nbk, 8, 32)
            qh = _planes(b[:, 128:192].view(nbk, 2, 32), [0, 2, 4, 6], 3).reshape(nbk, 8, 32)
            qu = (ql | (qh << 4)).float().reshape(nbk, 256)        # unsigned codes 0..63
            sce = sc.repeat_interleave(16, dim=1)                  # scale of each value
            # Lane L of a super-block: values c*32 + 4L + a (c = 0..7, a = 0..3), contiguous after this
            # permutation.
            perm = torch.tensor([c * 32 + 4 * L + a for L in range(8) for c in range(8) for a in range(4)])
            self.perm = perm
            self.kind = "q6k"
            self.wq = (qu * sce)[:, perm].to(torch.int16).reshape(self.o, self.n)
            self.ws = sce.to(torch.int16).reshape(self.o, self.n)
            self.dw = f16_col(b[:, 208:210]).view(self.o, -1)
        if self.kind == "dense":
            if callable(dense):
                dense = dense()
            if dense is None:
                raise ValueError(f"no exact kernel for {self.t.name}; pass the dequantised weight")
            ws, wm = gn.split_min(raw, self.t, self.o, self.n, dense)
            self._fallback = gn.GGMLMatmul(self.t, ws, wm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.n).float()
        if self.kind == "dense":
            y = self._fallback(x2)
        else:
            y = torch.cat([self._run(x2, lo, min(lo + _CHUNK, self.o)) for lo in range(0, self.o, _CHUNK)], dim=-1)
        return y.reshape(*lead, self.o)

    def _run(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        Tn = x.shape[0]
        if self.kind in ("q0", "q1"):
            if self.kind == "q0":
                q, dx = gn.quantize_q8_0(x)
            else:
                q, dx, s = gn.quantize_q8_1(x)
            lanes = _lane_sums(q.reshape(Tn, -1), self.wq[lo:hi], 4)          # [T, O, nb*8]
            nb = self.n // 32
            lanes = lanes.view(Tn, hi - lo, nb, 8)
            d = self.dw[lo:hi][None] * dx.view(Tn, 1, nb)                     # [T, O, nb] float32
            acc = torch.zeros(Tn, hi - lo, 8)
            for ib in range(nb):
                acc = fma32(d[:, :, ib, None], lanes[:, :, ib], acc)
            y = hsum8(acc)
            if self.kind == "q1":
                sx = s.view(Tn, 1, nb)
                summs = torch.zeros(Tn, hi - lo)
                m = self.mw[lo:hi][None]
                for ib in range(nb):
                    summs = fma32(m[:, :, ib], sx[:, :, ib], summs)
                y = y + summs
            return y
        q, dx = gn.quantize_q8_k(x)                                           # [T, nb, 256], [T, nb, 1]
        nb = self.n // 256
        dx = dx.view(Tn, 1, nb)
        if self.kind == "q4k":
            isum = _lane_sums(q.reshape(Tn, -1), self.wq[lo:hi], 256, torch.float64)   # [T, O, nb]
            bs32 = q.view(Tn, nb, 8, 32).sum(-1).double()                              # [T, nb, 8]
            imin = torch.einsum("tbj,obj->tob", bs32, self.mw[lo:hi].double())
            dd = self.dw[lo:hi][None] * dx
            dm = self.dminw[lo:hi][None] * dx
            acc = torch.zeros(Tn, hi - lo)
            accm = torch.zeros(Tn, hi - lo)
            for ib in range(nb):
                acc = fma32(isum[:, :, ib].float(), dd[:, :, ib], acc)
                accm = fma32(imin[:, :, ib].float(), dm[:, :, ib], accm)
            return acc - accm
        # q6k
        qp = q.view(Tn, nb, 256)[:, :, self.perm].reshape(Tn, -1)
        p = _lane_sums(qp, self.wq[lo:hi], 32, torch.float64)                 # [T, O, nb*8]
        bsub = _lane_sums(q.reshape(Tn, -1), self.ws[lo:hi], 32, torch.float64)
        lanes = (p - 32.0 * bsub).float().view(Tn, hi - lo, nb, 8)
        d = dx * self.dw[lo:hi][None]
        acc = torch.zeros(Tn, hi - lo, 8)
        for ib in range(nb):
            acc = fma32(d[:, :, ib, None], lanes[:, :, ib], acc)
        return hsum8(acc)
