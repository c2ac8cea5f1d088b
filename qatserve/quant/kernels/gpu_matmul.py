"""The GPU backend of QuantLinear: weights uploaded once, y = x @ W^T through the Triton kernels.

`GPUMatmul` holds one or more GGUF matrices of equal in_features (a fused q|k|v or gate|up) on a
device: formats with a GPU layout (gpu_layout.FORMATS: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
are repacked into its planes and run by TritonQuantMatmul (parts of one format share a single
launch: their planes are concatenated along N); F16 / BF16 / F32 stay in their dtype and run by
triton_dense; any other type is dequantised once to float32 (correct, not fast).

Batch invariance. A token's result must not depend on the other rows of the call (engine/batch.py
says why). Both Triton kernels compute each output element in an order fixed by the launch plan
alone, so a row is invariant as long as the plan does not change with M. Two plans, each fixed per
matrix:
- "decode": the CUDA-core gemv, split-K chosen once for M = 1 (one program per row and weight tile, or,
  with gpu_fusions' `multirow`, per 2-4 rows and tile, each row with the one-row arithmetic; with
  `splitk` the K slices are summed in the kernel, in split order);
- "prompt": the tensor-core dot with the prefill tile, no split-K (each row rounded once to tf32).
The engine's GPU runner says which rows a forward carries with `row_kind("decode" | "prompt")`; without
it the plan follows M (decode up to GEMV_ROWS rows), as for one-off callers (score_tokens, tests).
The float kernel is per row for every M.

Importable without Triton or CUDA; `gpu_available()` says whether this backend can run.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from . import gpu_fusions, gpu_layout
from . import triton_qmatmul as tq

GEMV_ROWS = 16  # without a row kind: calls of up to this many rows take the decode plan
COUNTER_ROWS = 64  # in-kernel split-K covers decode calls of up to this many row groups (else a torch sum)
_UPLOAD_CHUNK = 256 << 20  # bytes per host -> device copy of a float matrix or embedding table
_FLOAT_DTYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML type ids F32, F16, BF16

_state = threading.local()


@contextmanager
def row_kind(kind: str | None):
    """Within the block, every GPUMatmul on this thread uses the plan of `kind` ("decode": generated
    rows, one token each; "prompt": prompt rows; None: by row count)."""
    if kind not in (None, "decode", "prompt"):
        raise ValueError(f"unknown row kind {kind!r}")
    prev = getattr(_state, "kind", None)
    _state.kind = kind
    try:
        yield
    finally:
        _state.kind = prev


def current_row_kind() -> str | None:
    return getattr(_state, "kind", None)


def gpu_available(device=None) -> bool:
    """Whether the Triton kernels run on `device` (default: the CUDA GPU if present; the CPU only under
    TRITON_INTERPRET=1, for tests)."""
    return tq.available(device)


def upload(arr, device, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A host array (np.ndarray, possibly a read-only memmap) as a new contiguous tensor of `dtype` on
    `device`, copied in chunks so that host temporaries stay small."""
    a = np.asarray(arr)
    flat = a.reshape(-1).view(np.uint8)
    out = torch.empty(flat.size, dtype=torch.uint8, device=device)
    for i in range(0, flat.size, _UPLOAD_CHUNK):
        out[i : i + _UPLOAD_CHUNK].copy_(torch.from_numpy(flat[i : i + _UPLOAD_CHUNK].copy()))
    return out.view(dtype)


def _concat(packed: list[gpu_layout.PackedWeights]) -> gpu_layout.PackedWeights:
    """Row-concatenation of matrices of one format and K (q|k|v, gate|up) as one PackedWeights."""
    if len(packed) == 1:
        return packed[0]
    p0 = packed[0]

    def cat(name):
        ts = [getattr(p, name) for p in packed]
        return None if ts[0] is None else torch.cat(ts)

    return gpu_layout.PackedWeights(p0.fmt, sum(p.N for p in packed), p0.K, cat("lo"), cat("q8"), cat("hi"),
                                    cat("scale"), cat("minv"), cat("d"), cat("dmin"))


class _Quant:
    """One launch over GGUF-layout planes, with the two fixed plans.

    The decode plan's gemv holds up to 4 rows per program when `multirow` is on (gpu_fusions):
    the weights are read once per step instead of once per row, and each row's arithmetic is the one-row
    kernel's, so its bits are the same as alone. With `splitk` on, its K slices are summed inside the
    kernel (fixed split order) instead of by a torch sum: one launch per matrix, not two."""

    def __init__(self, packed: gpu_layout.PackedWeights):
        self.mm = tq.TritonQuantMatmul.from_packed(packed, out_dtype=torch.float32)
        self.decode = self.mm.config_for(1)
        self.prompt = replace(self.mm.configs["prefill"], split_k=1)
        self.counters = None
        if (self.decode.split_k or 1) > 1 and tq.triton_gemv is not None:
            # Zeroed once; each launch leaves them zero again, so CUDA graphs replay them as they are.
            self.counters = torch.zeros(
                tq.triton_gemv.counters_needed(COUNTER_ROWS, packed.N, self.decode.block_n, 1),
                dtype=torch.int32, device=packed.device)

    def __call__(self, x: torch.Tensor, kind: str | None) -> torch.Tensor:
        if kind is None:
            kind = "decode" if x.shape[0] <= GEMV_ROWS else "prompt"
        if kind != "decode":
            return self.mm(x, config=self.prompt)
        cfg = self.decode
        if x.shape[0] > 1 and gpu_fusions.enabled("multirow"):
            cfg = replace(cfg, rows=min(x.shape[0], tq.triton_gemv.max_rows(self.mm.weights.fmt)))
        return self.mm(x, config=cfg, counters=self.counters if gpu_fusions.enabled("splitk") else None)


class _Dense:
    """A float matrix [N, K] in its stored dtype, run by the float kernel (any M, per-row sums)."""

    def __init__(self, w: torch.Tensor):
        from . import triton_dense

        self.w = w.contiguous()
        self._gemv = triton_dense.dense_gemv

    def __call__(self, x: torch.Tensor, kind: str | None) -> torch.Tensor:
        rows = 2 if x.shape[0] > 1 and gpu_fusions.enabled("multirow") else 1
        return self._gemv(self.w, x, rows=rows)


class GPUMatmul:
    """y = cat([x @ W_i^T for each part], -1) on `device`; parts: (raw GGUF rows, qtype, K, N)."""

    def __init__(self, parts: list[tuple[object, int, int, int]], device):
        if not gpu_available(device):
            raise RuntimeError(f"the Triton GPU kernels cannot run on {device} here")
        self.device = torch.device(device)
        if len({int(k) for _, _, k, _ in parts}) != 1:
            raise ValueError("GPUMatmul parts need equal in_features")
        self.in_features = int(parts[0][2])
        self.out_features = sum(int(n) for _, _, _, n in parts)
        # Consecutive parts of one launchable kind (same GPU format, or all float) share one launch.
        runs: list[tuple[object, list]] = []
        for raw, qtype, k, n in parts:
            key = int(qtype) if int(qtype) in gpu_layout.FORMATS else "float"
            if runs and runs[-1][0] == key:
                runs[-1][1].append((raw, qtype, k, n))
            else:
                runs.append((key, [(raw, qtype, k, n)]))
        self.launches = [self._build(key, group) for key, group in runs]

    def _build(self, key, group):
        if key != "float":
            return _Quant(_concat([gpu_layout.repack(raw, qt, k, n, self.device) for raw, qt, k, n in group]))
        mats = []
        for raw, qt, k, n in group:
            dt = _FLOAT_DTYPES.get(int(qt))
            if dt is not None:
                mats.append(upload(raw, self.device, dt).view(n, k))
            else:  # no GPU layout for this type: dequantise once (float32, exact)
                from ..blocks import dequantize

                mats.append(dequantize(raw, qt, (n, k)).to(self.device))
        if len({m.dtype for m in mats}) > 1:
            mats = [m.float() for m in mats]
        return _Dense(torch.cat(mats) if len(mats) > 1 else mats[0])

    @property
    def nbytes(self) -> int:
        total = 0
        for la in self.launches:
            total += la.mm.nbytes if isinstance(la, _Quant) else la.w.numel() * la.w.element_size()
        return total

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] (any float dtype, on the device) -> float32 [..., N]."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        kind = current_row_kind()
        ys = [la(x2, kind) for la in self.launches]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        return y.view(*lead, self.out_features)
