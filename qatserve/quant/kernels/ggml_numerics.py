"""Emulation of llama.cpp's CPU (ggml-cpu, x86 AVX2) numerics in vectorised torch.

The real models are sensitive enough that float32-exact math differs from llama.cpp by ~0.3 in
log-probs; what llama.cpp computes is a specific rounding of it. These primitives reproduce that
rounding op by op, so that `backend="ggml"` models agree with llama.cpp's CPU build to float32
accumulation-order noise:

- activations are quantised to the weight type's `vec_dot_type` before every quantised matmul
  (Q8_0 for Q4_0/Q5_0/Q8_0/IQ4_NL, Q8_1 for Q4_1/Q5_1, Q8_K for K-quants; F16 for F16 weights), with
  the AVX2 rounding of quantize_row_q8_0/q8_1 (multiplier 127/amax, round-half-even) and the
  reference rounding of quantize_row_q8_K (multiplier -127/max, nearest_int);
- the matmul is exact integer block dot products scaled by both block scales; ggml_matmul.py replays
  each x86 kernel's float32 accumulation order (GGMLMatmul here is the float64 fallback for other types);
- GELU goes through ggml's fp16 lookup table (GGML_GELU_FP16, also used by the fused GEGLU op), built
  with the C library's tanhf; SwiGLU uses ggml's AVX2 polynomial exp (ggml_v_expf);
- cosf/sinf/expf/tanhf are the C library's (ctypes), not numpy/torch ones, which differ by an ulp often
  enough to flip later fp16/int8 roundings;
- RMSNorm sums squares in double and scales by 1/sqrtf(mean + eps);
- RoPE angles are p * base^(-2/d) accumulated by repeated float32 multiplication;
- attention is the CPU flash-attention kernel with an F16 KV cache: Q rounded to F16, K.Q dots of
  F16 values in float32, online softmax with a running max, and the V accumulator kept in F16 (each
  update rounded to F16), divided by the float32 sum at the end.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

# Weight type -> the type activations are quantised to for its dot product (ggml-cpu type_traits).
VEC_DOT_TYPE: dict[T, T] = {
    T.Q4_0: T.Q8_0, T.Q5_0: T.Q8_0, T.Q8_0: T.Q8_0, T.IQ4_NL: T.Q8_0,
    T.Q4_1: T.Q8_1, T.Q5_1: T.Q8_1,
    T.Q2_K: T.Q8_K, T.Q3_K: T.Q8_K, T.Q4_K: T.Q8_K, T.Q5_K: T.Q8_K, T.Q6_K: T.Q8_K,
    T.F16: T.F16, T.F32: T.F32, T.BF16: T.BF16,
}


def _load_libm():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        for name in ("cosf", "sinf", "expf", "tanhf"):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
        return lib
    except (OSError, AttributeError):
        return None


# llama.cpp calls the C library's cosf/sinf/expf/tanhf; glibc's are not always correctly rounded (about
# 2% of RoPE angles, 0.1% of exp arguments differ by an ulp from a correctly rounded result, and numpy's
# float32 tanh differs from tanhf in ~20% of fp16 inputs), and one ulp is enough to flip an fp16 or
# int8 rounding downstream. So the same libm functions are called here, element by element.
_LIBM = _load_libm()


def libm(name: str, x: torch.Tensor) -> torch.Tensor:
    """float32 libm function `name` (cosf, sinf, expf, tanhf) applied elementwise; correctly rounded
    float64 evaluation when no C library can be loaded."""
    xf = x.detach().float().cpu()
    if _LIBM is None:
        return getattr(torch, {"cosf": "cos", "sinf": "sin", "expf": "exp", "tanhf": "tanh"}[name])(xf.double()).float()
    fn = getattr(_LIBM, name)
    vals = xf.reshape(-1).tolist()
    out = np.fromiter((fn(v) for v in vals), dtype=np.float32, count=len(vals))
    return torch.from_numpy(out).view(x.shape)


def f16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest fp16 (ties to even, as F16C's _cvtps_ph) and back to float32."""
    return x.to(torch.float16).to(x.dtype)


def _rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """num / t correctly rounded. Why: torch evaluates `scalar / tensor` as reciprocal(t) * scalar,
    two roundings, which moves quants sitting on a rounding boundary (and there are such in practice)."""
    return torch.full_like(t, num) / t


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AVX2 quantize_row_q8_0. x float32 [..., n] (n % 32 == 0) -> (q float32 [..., n/32, 32] integers
    in [-127, 127], d float32 [..., n/32, 1] already rounded to fp16 as stored in the block).

    Why not gguf's reference: the AVX2 path multiplies by 127/amax (not 1/(amax/127)) and rounds half
    to even (not away from zero); both change some quants.
    """
    xb = x.float().unflatten(-1, (-1, 32))
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)
    inv = torch.where(amax != 0, _rdiv(127.0, amax), torch.zeros_like(amax))
    q = torch.round(xb * inv)
    return q, f16(d)


def quantize_q8_0_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q8_0_ref (the scalar C reference, = gguf.quants): id = 1/d, roundf (half away)."""
    xb = x.float().unflatten(-1, (-1, 32))
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)
    inv = torch.where(d != 0, _rdiv(1.0, d), torch.zeros_like(d))
    v = xb * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return q, f16(d)


def quantize_q8_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AVX2 quantize_row_q8_1 -> (q, d as fp16, s = fp16(d_float32 * sum(q))), shapes as quantize_q8_0.

    s is what vec_dot_q4_1_q8_1 multiplies the weight block's min by; it is rounded from the
    unrounded float32 d, so it is not d_fp16 * sum(q).
    """
    xb = x.float().unflatten(-1, (-1, 32))
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)
    inv = torch.where(amax != 0, _rdiv(127.0, amax), torch.zeros_like(amax))
    q = torch.round(xb * inv)
    s = f16(d * q.sum(-1, keepdim=True))
    return q, f16(d), s


def quantize_q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q8_K_ref (what x86 uses, also the AVX2 4-row repack variant up to +-max ties).

    x float32 [..., n] (n % 256 == 0) -> (q float32 [..., n/256, 256], d float32 [..., n/256, 1]);
    d stays float32 (Q8_K blocks store a float scale).
    """
    xb = x.float().unflatten(-1, (-1, 256))
    idx = xb.abs().argmax(-1, keepdim=True)  # first occurrence, as the C loop's strict '>'
    mx = xb.gather(-1, idx)
    iscale = torch.where(mx != 0, _rdiv(-127.0, mx), torch.zeros_like(mx))
    q = torch.round(iscale * xb).clamp(max=127.0)  # nearest_int rounds half to even
    d = torch.where(mx != 0, _rdiv(1.0, iscale), torch.zeros_like(iscale))
    return q, d


def fake_quant_activation(x: torch.Tensor, weight_type: T) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x float32 [..., n] -> (x as the matmul sees it, float64 [..., n]; per-block Q8_1 sums s or None).

    For Q8_1 the matmul also needs s (float64 [..., n/32]) to apply the weight mins exactly.
    """
    vt = VEC_DOT_TYPE.get(T(weight_type), T.F32)
    if vt == T.Q8_0:
        q, d = quantize_q8_0(x)
        return (q.double() * d.double()).flatten(-2), None
    if vt == T.Q8_1:
        q, d, s = quantize_q8_1(x)
        return (q.double() * d.double()).flatten(-2), s.double().squeeze(-1)
    if vt == T.Q8_K:
        q, d = quantize_q8_k(x)
        return (q.double() * d.double()).flatten(-2), None
    if vt == T.F16:
        return f16(x.float()).double(), None
    if vt == T.BF16:
        return x.float().to(torch.bfloat16).double(), None
    return x.double(), None


class GGMLMatmul:
    """y = x @ W^T as ggml-cpu computes it for one weight matrix.

    w_scaled float64 [out, in]: the part of the dequantised weight proportional to the block scale
    (the whole weight, except for Q4_1/Q5_1 whose block min m is split off into `w_min`
    float64 [out, in/32]: vec_dot_q4_1_q8_1 adds m * s_x per block, with s_x from quantize_q8_1).
    """

    def __init__(self, weight_type: T, w_scaled: torch.Tensor, w_min: torch.Tensor | None = None):
        self.weight_type = T(weight_type)
        self.w_scaled = w_scaled.double()
        self.w_min = None if w_min is None else w_min.double()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 [..., in] -> float32 [..., out]."""
        xq, s = fake_quant_activation(x, self.weight_type)
        y = xq @ self.w_scaled.T
        if self.w_min is not None:
            y = y + s @ self.w_min.T
        return y.float()


def split_min(raw: torch.Tensor, weight_type: T, out_features: int, in_features: int,
              dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a dequantised Q4_1/Q5_1 weight into (d*q part, per-block min m); other types: (dense, None).

    raw: uint8 GGUF rows; both formats start each block with fp16 d then fp16 m.
    """
    t = T(weight_type)
    if t not in (T.Q4_1, T.Q5_1):
        return dense.double(), None
    nb = in_features // 32
    bsize = 20 if t == T.Q4_1 else 24
    b = np.asarray(raw).reshape(out_features, nb, bsize)
    m = torch.from_numpy(np.ascontiguousarray(b[:, :, 2:4]).view(np.float16).astype(np.float64)).reshape(out_features, nb)
    scaled = dense.double() - m.repeat_interleave(32, dim=1)
    return scaled, m


# --- element-wise ops -------------------------------------------------------------------------------

_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)
_GELU_COEF_A = np.float32(0.044715)


def _gelu_table() -> torch.Tensor:
    """ggml_table_gelu_f16: for each fp16 bit pattern h, fp16(gelu_f32(h)) as float32 [65536]."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        # 0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x))), evaluated left to right
        # in float32 as the C expression is; tanhf from the C library.
        inner = np.float32(1.0) + _GELU_COEF_A * h * h
        arg = (_SQRT_2_OVER_PI * h) * inner
        fin = np.isfinite(arg)
        t = np.tanh(arg)
        t[fin] = libm("tanhf", torch.from_numpy(arg[fin])).numpy()
        g = (np.float32(0.5) * h) * (np.float32(1.0) + t)
    return torch.from_numpy(g.astype(np.float16).astype(np.float32))


_GELU_TABLE: torch.Tensor | None = None


def gelu_fp16_table(x: torch.Tensor) -> torch.Tensor:
    """ggml_vec_gelu_f32 with GGML_GELU_FP16: 0 below -10, identity above 10, else table[fp16(x)]."""
    global _GELU_TABLE
    if _GELU_TABLE is None:
        _GELU_TABLE = _gelu_table()
    idx = x.float().to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    y = _GELU_TABLE[idx]
    y = torch.where(x <= -10.0, torch.zeros_like(y), y)
    return torch.where(x >= 10.0, x.float(), y)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ggml_vec_geglu_f32 (the fused GEGLU op uses the same fp16 table): gelu_table(gate) * up."""
    x = gate.float()
    return torch.where(x >= 10.0, x * up, gelu_fp16_table(x) * up)


def _fma(a, b, c) -> torch.Tensor:
    """float32 fma via float64 (the product of two float32 values is exact in float64)."""
    return (torch.as_tensor(a).double() * torch.as_tensor(b).double() + torch.as_tensor(c).double()).float()


def _f(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _h(hexfloat: str) -> torch.Tensor:
    """A C hex-float constant (0x1.8p23f) as a float32 scalar tensor."""
    return _f(float.fromhex(hexfloat))


def v_expf(x: torch.Tensor) -> torch.Tensor:
    """ggml_v_expf, the AVX2+FMA polynomial exp (max error ~1.5 ulp) that ggml's SIMD silu uses."""
    x = x.float()
    r = _h("0x1.8p23")
    z = _fma(x, _h("0x1.715476p+0"), r)
    n = z - r
    b = _fma(-n, _h("0x1.7f7d1cp-20"), _fma(-n, _h("0x1.62e4p-1"), x))
    e = z.view(torch.int32) << 23
    k = (e + _f(1.0).view(torch.int32)).view(torch.float32)
    c = n.abs() > 126
    u = b * b
    j = _fma(_fma(_fma(_h("0x1.0e4020p-7"), b, _h("0x1.573e2ep-5")), u, _fma(_h("0x1.555e66p-3"), b, _h("0x1.fffdb6p-2"))),
             u, _h("0x1.ffffecp-1") * b)
    out = _fma(k, j, k)
    if bool(c.any()):
        g = torch.where(n <= 0, torch.tensor(0x82000000 - (1 << 32), dtype=torch.int32), torch.tensor(0, dtype=torch.int32))
        s1 = (g + 0x7F000000).view(torch.float32)
        s2 = (e - g).view(torch.float32)
        d = n.abs() > 192
        big = torch.where(d, s1 * s1, _fma(s2, j, s2) * s1)
        out = torch.where(c, big, out)
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ggml_vec_swiglu_f32 on AVX2: x / (1 + v_expf(-x)) * g, in float32 (rows are multiples of 8)."""
    x = gate.float()
    return (x / (1.0 + v_expf(-x))) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ggml RMS_NORM then MUL: sum of float32 squares in double, scale = 1/sqrtf(mean + eps)."""
    x = x.float()
    mean = ((x * x).double().sum(-1, keepdim=True) / x.shape[-1]).float()
    scale = _rdiv(1.0, torch.sqrt(mean + eps))
    return (x * scale) * weight


def rope_angles(positions: torch.Tensor, n_dims: int, base: float, freq_scale: float = 1.0) -> torch.Tensor:
    """ggml_rope_cache_init angles, float32 [T, n_dims/2]: theta_0 = p, theta_{i+1} = theta_i * base^(-2/d)
    in float32, then times freq_scale."""
    theta_scale = np.power(np.float32(base), np.float32(-2.0) / np.float32(n_dims), dtype=np.float32)
    th = positions.to(torch.float32).numpy().astype(np.float32)
    out = np.empty((th.size, n_dims // 2), dtype=np.float32)
    for i in range(n_dims // 2):
        out[:, i] = np.float32(freq_scale) * th
        th = th * theta_scale
    return torch.from_numpy(out)


def rope_cos_sin(positions: torch.Tensor, n_dims: int, base: float, freq_scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cosf/sinf (the C library's) of rope_angles, float32 [T, n_dims/2] each."""
    a = rope_angles(positions, n_dims, base, freq_scale)
    return libm("cosf", a), libm("sinf", a)


# --- attention ----------------------------------------------------------------------------------------

def vec_dot_f16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ggml_vec_dot_f16 on AVX2 (F16C + FMA): a [..., D], b [..., D] fp16 values (held in float32),
    D % 32 == 0 -> float32 [...].

    Four 8-lane float32 accumulators take fused multiply-adds over the row in steps of 32 (the products
    of two fp16 values are exact in float32, so each step is one float32 add), then
    GGML_F32x8_REDUCE: acc0+acc2, acc1+acc3, their sum, the two 128-bit halves, two horizontal adds.
    Reproducing this order matters: the scores feed fp16 rounding downstream.
    """
    D = a.shape[-1]
    prod = (a.float() * b.float()).unflatten(-1, (D // 32, 4, 8))
    acc = prod[..., 0, :, :].clone()
    for i in range(1, D // 32):
        acc = acc + prod[..., i, :, :]
    c = (acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])
    t0 = c[..., :4] + c[..., 4:]
    return (t0[..., 0] + t0[..., 1]) + (t0[..., 2] + t0[..., 3])


def expf(x: torch.Tensor) -> torch.Tensor:
    """The C library's expf, elementwise (exp(-inf) = 0 needs no call)."""
    out = torch.zeros_like(x)
    fin = torch.isfinite(x)
    if bool(fin.any()):
        out[fin] = libm("expf", x[fin])
    return out


def flash_attn_f16(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """ggml_compute_forward_flash_attn_ext_f16 (one_chunk path) with an F16 K/V cache.

    q [T, H, D], k [S, Hkv, D], v [S, Hkv, Dv], q_pos [T], k_pos [S] -> [T, H * Dv].
    Keys are visited in cache order; masked keys are skipped entirely (the kernel `continue`s on a
    -inf mask). The V accumulator is fp16: every rescale and every multiply-add is rounded to fp16.
    """
    T_, H, D = q.shape
    S, Hkv, Dv = v.shape
    group = H // Hkv
    qh = f16(q.float())                                   # Q converted to K's vec_dot_type
    kh = f16(k.float()).repeat_interleave(group, dim=1)   # [S, H, D]
    vh = f16(v.float()).repeat_interleave(group, dim=1)   # [S, H, Dv]
    s_all = vec_dot_f16(qh[:, None], kh[None])            # [T, S, H]
    visible = k_pos[None, :] <= q_pos[:, None]
    if window > 0:
        visible &= (q_pos[:, None] - k_pos[None, :]) < window
    cap = float(softcap)
    sc = float(np.float32(scale / cap)) if cap else float(np.float32(scale))
    M = torch.full((T_, H), float("-inf"))
    Ssum = torch.zeros((T_, H))
    acc = torch.zeros((T_, H, Dv))  # fp16 values held in float32
    one = torch.ones((T_, H))
    for ic in range(S):
        vis = visible[:, ic][:, None].expand(T_, H)
        if not bool(vis.any()):
            continue
        s = s_all[:, ic, :] * sc
        if cap:
            s = float(np.float32(cap)) * torch.tanh(s)
        new_max = s > M
        M_new = torch.where(new_max, s, M)
        ms = torch.where(new_max, expf(M - M_new), one)
        vs = torch.where(new_max, one, expf(s - M_new))
        # ggml_vec_scale_f16 then ggml_vec_mad_f16: fp16(acc * ms), then fp16(fma(v, vs, acc)) (the
        # float64 product is exact, so one rounding to float32 reproduces the fma).
        scaled = torch.where(new_max[..., None], f16(acc * ms[..., None]), acc)
        upd = f16((scaled.double() + vh[ic][None].double() * vs[..., None].double()).float())
        acc = torch.where(vis[..., None], upd, acc)
        # S = S*ms + vs, contracted to an fma by the compiler.
        Ssum = torch.where(vis, (Ssum.double() * ms.double() + vs.double()).float(), Ssum)
        M = torch.where(vis, M_new, M)
    inv = torch.where(Ssum == 0, torch.zeros_like(Ssum), _rdiv(1.0, Ssum))
    return (acc * inv[..., None]).reshape(T_, H * Dv)
