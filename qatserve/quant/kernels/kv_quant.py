"""K/V cache storage formats (llama.cpp's -ctk/-ctv types) and its Hadamard rotation of attention.

Quantised rows use llama.cpp's block layouts (Q8_0: 34 B per 32 values, Q4_0: 18 B per 32) and are
bit-identical with gguf.quants.quantize / quantize_row_*_ref of the same float32 values: the block kernels
are those of legacy_blocks.py, called directly (no numpy round trip, no chunking), which is what a per-token
cache write needs. Measured for one decode row (8 x 256 values, 1 thread): ~150-220 us per row, about
15% under blocks.quantize; the kernels' ~20 eager ops, not the wrapper, dominate.

Rotation (llama.cpp PR #21038): when a K/V type is quantised and the head dim is a multiple of 64, Q, K
and V are multiplied by a normalised Walsh-Hadamard matrix H (groups of 64 along the head dim) before the
K/V store; attention runs on rotated vectors and its output is multiplied by H again. H is symmetric and
orthonormal (H @ H = I), so Q.K and the output are unchanged in exact arithmetic, while outlier channels are
spread over the group and quantise with a much smaller block scale.

Queries (query_for_keys): llama.cpp's CPU flash attention does not dot Q in float32 with a quantised or
bf16 K: it first converts each Q row to the K type's `vec_dot_type` (ggml-cpu type_traits: q8_0 blocks for
q8_0 and q4_0 keys, bf16 for bf16 keys) and takes the integer/bf16 dot. That rounding of Q is part of what a
K type costs in llama.cpp, and its perplexity/KLD figures include it: on the default model (README, audit
table) qatserve's mean KLD went from 0.00055 to 0.00069 for rotated q8_0 K/V (llama-perplexity: 0.00075) and
from 0.000035 to 0.000050 for bf16 (0.000051). The engine rounds Q the same way so the figures compare 1:1
(and an int8 K.Q kernel would compute exactly what the float path does).
"""

from __future__ import annotations

import math

import torch

from .. import legacy_blocks as L
from . import gpu_fusions
from .ggml_numerics import quantize_q8_0 as _avx2_q8_0

__all__ = [
    "KV_TYPES",
    "QUANTISED_KV_TYPES",
    "ROTATION_GROUP",
    "kv_row_bytes",
    "kv_storage_dtype",
    "quantize_kv",
    "dequantize_kv",
    "hadamard",
    "hadamard_matrix",
    "rotation_applies",
    "k_rotation_group",
    "QUERY_DOT_TYPES",
    "query_for_keys",
]

KV_TYPES = frozenset({"f32", "f16", "bf16", "q8_0", "q4_0"})
QUANTISED_KV_TYPES = frozenset({"q8_0", "q4_0"})
ROTATION_GROUP = 64  # llama.cpp's Hadamard group along the head dim

_FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# kind -> (values per block, bytes per block, quantiser [n, 32] f32 -> [n, B] u8, dequantiser)
_BLOCKS = {
    "q8_0": (L.QK, 34, L.q_q8_0, L.deq_q8_0),
    "q4_0": (L.QK, 18, L.q_q4_0, L.deq_q4_0),
}


def _kind(kind: str) -> str:
    k = str(kind).lower()
    if k not in KV_TYPES:
        raise ValueError(f"unknown K/V cache type {kind!r}; expected one of {sorted(KV_TYPES)}")
    return k


def kv_row_bytes(kind: str, n: int) -> int:
    """Bytes of one row of `n` values stored as `kind` (for q8_0/q4_0, n must be a multiple of 32)."""
    k = _kind(kind)
    if k in _FLOAT_DTYPES:
        return n * _FLOAT_DTYPES[k].itemsize
    bs, ts = _BLOCKS[k][:2]
    if n < 0 or n % bs:
        raise ValueError(f"{k} rows need a multiple of {bs} values, got {n}")
    return n // bs * ts


def kv_storage_dtype(kind: str) -> torch.dtype:
    """The torch dtype a cache buffer of `kind` holds (uint8 for block formats)."""
    k = _kind(kind)
    return _FLOAT_DTYPES.get(k, torch.uint8)


def quantize_kv(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Encode K or V rows for the cache.

    x: float tensor [..., D]. Returns, for f32/f16/bf16, x cast to that dtype (round-to-nearest-even),
    shape [..., D]; for q8_0/q4_0, uint8 [..., kv_row_bytes(kind, D)] of llama.cpp blocks, bit-identical
    with gguf.quants.quantize(x.float().numpy(), type).
    """
    k = _kind(kind)
    if k in _FLOAT_DTYPES:
        return x.to(_FLOAT_DTYPES[k])
    bs, ts, q, _ = _BLOCKS[k]
    if x.dim() == 0 or x.shape[-1] % bs:
        raise ValueError(f"{k} needs a last dim that is a multiple of {bs}, got shape {tuple(x.shape)}")
    lead, d = tuple(x.shape[:-1]), x.shape[-1]
    blocks = x.detach().to(torch.float32).reshape(-1, bs)
    if blocks.shape[0] == 0:
        return torch.empty((*lead, d // bs * ts), dtype=torch.uint8, device=x.device)
    return q(blocks).view(*lead, d // bs * ts)


def dequantize_kv(raw: torch.Tensor, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode cache rows to float32 of `shape` [..., D] (a new tensor, exact for every stored value).

    raw: what quantize_kv returned (any leading shape; only its element count matters).
    """
    k = _kind(kind)
    shape = tuple(int(s) for s in shape)
    if k in _FLOAT_DTYPES:
        # clone for f32: the caller owns the result, never a view into the cache buffer.
        return raw.reshape(shape).to(torch.float32, copy=True)
    bs, ts, _, deq = _BLOCKS[k]
    n_rows = math.prod(shape[:-1])
    nbytes = n_rows * kv_row_bytes(k, shape[-1])
    if raw.dtype != torch.uint8 or raw.numel() != nbytes:
        raise ValueError(f"{k} {shape} needs {nbytes} uint8 bytes, got {raw.numel()} of {raw.dtype}")
    if nbytes == 0:
        return torch.empty(shape, dtype=torch.float32, device=raw.device)
    return deq(raw.reshape(-1, ts)).view(shape)


def rotation_applies(head_dim: int, kind: str) -> bool:
    """Whether llama.cpp rotates this cache: a quantised type and a head dim that is a multiple of 64."""
    return _kind(kind) in QUANTISED_KV_TYPES and head_dim > 0 and head_dim % ROTATION_GROUP == 0


_H_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}


def hadamard_matrix(group: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised Sylvester Walsh-Hadamard matrix float32 [group, group] (group a power of two):
    H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]], scaled by 1/sqrt(group). Symmetric, H @ H = I."""
    if group < 1 or group & (group - 1):
        raise ValueError(f"Hadamard group must be a power of two, got {group}")
    key = (group, torch.device(device))
    h = _H_CACHE.get(key)
    if h is None:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < group:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        # Built in float64 and rounded once: entries are exactly +-1/sqrt(group) to float32 precision
        # (and exactly +-1/8 for llama.cpp's group of 64).
        h = (h / math.sqrt(group)).to(torch.float32, copy=True).to(key[1])
        _H_CACHE[key] = h
    return h


def hadamard(x: torch.Tensor, group: int = ROTATION_GROUP) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform of x [..., D] in independent groups of `group` along D.

    group: a power of two dividing D. Its own inverse: hadamard(hadamard(x)) == x up to rounding.
    Returns a new tensor of x's shape and dtype (computed in float32 for narrower float types).
    """
    d = x.shape[-1]
    if group < 1 or group & (group - 1) or d % group:
        raise ValueError(f"Hadamard group must be a power of two dividing the last dim {d}, got {group}")
    # A dense [group, group] matmul (what llama.cpp does too) rather than log2(group) butterfly stages:
    # measured on CPU (1 thread) it is ~7-10x faster from one decode row (8 heads x 256) up to a 512-token
    # prefill, because each butterfly stage is several eager ops over the whole tensor while the GEMM is one.
    if x.device.type == "cpu":
        # MLAS, not torch.matmul: each row's result must not depend on how many rows are rotated
        # together (a token's K is rotated in a prefill chunk or alone; kernels/dense.py).
        mm = _H_DENSE.get(group)
        if mm is None:
            from .dense import DenseMatmul

            mm = _H_DENSE[group] = DenseMatmul(hadamard_matrix(group))
        return mm(x.reshape(-1, group)).reshape(x.shape).to(x.dtype)
    fused = gpu_fusions.hadamard(x, group)
    if fused is not None:  # CUDA: the same stages in one Triton launch (triton_kv_store.py), same bits
        return fused.hadamard(x, group)
    return _butterfly(x, group)


def _butterfly(x: torch.Tensor, group: int) -> torch.Tensor:
    """The same transform as log2(group) elementwise add/sub stages (GPU). A matmul's rounding on a GPU
    can change with the number of rows (the library picks kernels by shape), and a token's rotated K must
    not depend on its batch; elementwise stages compute every row alike. Stage s pairs the entries whose
    indices differ in bit s: (a, b) -> (a + b, a - b), the Sylvester recursion of hadamard_matrix."""
    y = x.reshape(-1, group).to(torch.float32)
    h = 1
    while h < group:
        v = y.view(-1, group // (2 * h), 2, h)
        a, b = v[:, :, 0], v[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, group)
        h *= 2
    # One final scaling by 1/sqrt(group), rounded once (exactly 1/8 or 1/16 for llama.cpp's sizes).
    y = y * (1.0 / math.sqrt(group))
    return y.reshape(x.shape).to(x.dtype)


_H_DENSE: dict[int, object] = {}


def k_rotation_group(head_dim: int) -> int:
    """llama.cpp's K rotation size: the largest power of two (>= 64) dividing the head dim (256 for a
    256-wide head, 512 for 512). V always rotates in groups of ROTATION_GROUP (llama.cpp measured the
    smaller V rotation to be better; llama-kv-cache.cpp build_input_{k,v}_rot)."""
    n = ROTATION_GROUP
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


# K storage type -> the type ggml-cpu's flash attention converts Q to before the K.Q dot (type_traits_cpu
# [K].vec_dot_type) on every path: block types take Q as q8_0 blocks, bf16 as bf16. f32/f16 keys are absent
# on purpose: llama.cpp's prefill path (ggml_compute_forward_flash_attn_ext_tiled, >= GGML_FA_TILE_Q query
# rows, what llama-perplexity runs) keeps Q in float32 for them, as the engine does; only its one-row decode
# path rounds Q to f16 (and accumulates V in f16), which the default numerics do not copy
# (models/common.py GGML numerics emulate that path).
QUERY_DOT_TYPES = {"q8_0": "q8_0", "q4_0": "q8_0", "bf16": "bf16"}


def query_for_keys(q: torch.Tensor, kind: str) -> torch.Tensor:
    """Q as llama.cpp's CPU flash attention dots it with keys stored as `kind` (QUERY_DOT_TYPES).

    q: float tensor [..., D] (rotated already when K is; D a multiple of 32 for block K types).
    Returns, for q8_0/q4_0 keys, float32 [..., D] = the dequantised q8_0 blocks of q, rounded as x86
    AVX2's quantize_row_q8_0 does (what ggml converts Q with; multiplier 127/amax, ties to even, fp16
    block scale); for bf16 keys, q rounded to bf16 (round to nearest even) as float32; otherwise q itself.
    Row-wise (32 values at a time), so a row's result does not depend on the other rows (batch invariance).

    Why the stored d * q and not an integer dot: d * q is exact in float32, so Q.K over the dequantised
    blocks equals ggml's sum of d_q * d_k * (integer block dot) up to float32 accumulation order.
    """
    vt = QUERY_DOT_TYPES.get(_kind(kind))
    if vt is None:
        return q
    if vt == "bf16":
        return q.to(torch.bfloat16).to(torch.float32)
    d = q.shape[-1]
    if d % L.QK:
        raise ValueError(f"Q rows for {kind} keys need a multiple of {L.QK} values, got shape {tuple(q.shape)}")
    if q.numel() == 0:
        return q.to(torch.float32)
    qs, scale = _avx2_q8_0(q.to(torch.float32))
    return (qs * scale).flatten(-2)
