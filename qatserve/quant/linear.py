"""QuantLinear / QuantEmbedding: layers whose weights stay in GGUF block format.

Backends (chosen per matrix, `backend="auto"`):
- "ort": onnxruntime MatMulNBits on an exact repacking of the blocks (kernels/cpu.py). Used for
  Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
- "torch": weights dequantised once to float32, torch matmul. Fallback for every other type
  (F32/F16/BF16, Q2_K, Q3_K, IQ*), and for tensors on a non-CPU device.
- "gpu": after `to_device(cuda)`: the weights uploaded once in the GPU kernels' layout and run by the
  Triton kernels (kernels/gpu_matmul.py; float32 activations in and out, batch-invariant plans).
- "ggml": llama.cpp's x86 CPU numerics (kernels/ggml_matmul.py): activations quantised to the weight
  type's vec_dot_type, exact integer block dots, llama.cpp's float32 accumulation order. Slow; for
  reproducing llama.cpp token for token (tests/golden), never chosen by "auto".

Threading (2-core CPU; numbers in benchmarks/cpu_matmul.py): an intra-op thread-pool hand-off costs
~50-150 us, more than a whole small matvec, so small matrices get single-threaded sessions and a
batch of rows is split over a Python thread pool (ORT releases the GIL) instead; only big matrices
(the output head) get an intra-op pool of `set_cpu_threads(n)` threads.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from . import blocks
from .kernels.cpu import ACCURACY_LEVEL  # MatMulNBits' accuracy_level (kernels/cpu.py says why 4)
# Matrices with at least BIG_MATRIX weights get an intra-op pool (hand-off cost is amortised). Defined
# beside the kernels: the server picks the threads of the kernels it queues before torch is imported.
from .kernels.cpu import BIG_MATRIX

# Batches of at least this many rows are split across the Python thread pool.
SPLIT_ROWS = 16

_threads = max(1, min(2, torch.get_num_threads()))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def set_cpu_threads(n: int) -> None:
    """Thread count for torch and for onnxruntime sessions created or first used after this call."""
    global _threads, _pool
    n = max(1, int(n))
    torch.set_num_threads(n)
    with _pool_lock:
        _threads = n
        if _pool is not None:
            _pool.shutdown(wait=False)
            _pool = None


def _row_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, _threads - 1), thread_name_prefix="qlinear")
        return _pool


def _as_numpy(raw) -> np.ndarray:
    if isinstance(raw, torch.Tensor):
        raw = raw.cpu().numpy()
    return np.asarray(raw).view(np.uint8).reshape(-1)


class QuantLinear(torch.nn.Module):
    """y = x @ W^T with W [out_features, in_features] kept as GGUF blocks (or an exact repacking).

    raw: uint8 (may be a read-only np.memmap view), out_features * row_bytes(qtype, in_features) bytes,
    one GGUF row per output feature. backend: "auto" | "ort" | "torch". Sessions are built lazily on
    the first forward (or by `prepare()`), so constructing a whole model costs no repacking.
    """

    def __init__(self, raw: np.ndarray, qtype, in_features: int, out_features: int, *,
                 backend: str = "auto", accuracy_level: int | None = None):
        super().__init__()
        from .kernels import cpu

        self.qtype = T(qtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.accuracy_level = ACCURACY_LEVEL if accuracy_level is None else int(accuracy_level)
        self._raw = _as_numpy(raw)
        want = self.out_features * blocks.row_bytes(self.qtype, self.in_features)
        if self._raw.size != want:
            raise ValueError(f"QuantLinear {self.qtype.name} {out_features}x{in_features}: "
                             f"{self._raw.size} bytes, want {want}")
        if backend == "auto":
            backend = "ort" if self.qtype in cpu.SUPPORTED else "torch"
        if backend == "ort" and self.qtype not in cpu.SUPPORTED:
            raise ValueError(f"backend 'ort' has no exact mapping for {self.qtype.name}")
        if backend not in ("ort", "torch", "ggml"):
            raise ValueError(f"unknown backend {backend!r}")
        self.backend_name = backend
        self._parts: list[QuantLinear] | None = None
        self._sess = None
        self._dense: torch.Tensor | None = None
        self._rowwise = None
        self._pad_single = False
        self._ggml = None
        self._gpu = None
        self._lock = threading.Lock()

    @classmethod
    def fused(cls, parts: list["QuantLinear"]) -> "QuantLinear":
        """One layer computing torch.cat([p(x) for p in parts], -1) in a single kernel call (q|k|v, gate|up).

        Saves the per-call overhead that dominates small batch-1 matmuls. Needs parts with the same
        in_features whose formats share a MatMulNBits layout (Q5_0/Q5_1/Q8_0/Q5_K/Q6_K... by bits and
        block; cpu.concat checks); raises ValueError otherwise, so callers can keep the parts separate.
        """
        from .kernels import cpu

        if len({p.in_features for p in parts}) != 1 or any(p.backend_name != "ort" for p in parts):
            raise ValueError("fused needs 'ort' parts with equal in_features")
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        p0 = parts[0]
        self.qtype, self.in_features = p0.qtype, p0.in_features
        self.out_features = sum(p.out_features for p in parts)
        self.accuracy_level, self.backend_name = p0.accuracy_level, "ort"
        self._raw, self._parts, self._sess, self._dense = None, list(parts), None, None
        self._ggml, self._rowwise, self._pad_single, self._gpu = None, None, False, None
        self._lock = threading.Lock()
        if len({cpu.LAYOUT[p.qtype] for p in parts}) != 1:
            raise ValueError(f"fused: formats {[p.qtype.name for p in parts]} have different layouts")
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={self.qtype.name}, backend={self.backend_name}, accuracy_level={self.accuracy_level}")

    def dequantized(self) -> torch.Tensor:
        """float32 [out_features, in_features]: the GGUF dequantisation of the weight."""
        if self._parts is not None:
            return torch.cat([p.dequantized() for p in self._parts])
        return blocks.dequantize(self._raw, self.qtype, (self.out_features, self.in_features))

    def prepare(self) -> "QuantLinear":
        """Repack and build the session (or dense weight) now instead of on the first forward."""
        with self._lock:
            if self._gpu is not None:
                pass  # uploaded by to_device
            elif self.backend_name == "ggml":
                if self._ggml is None:
                    from .kernels.ggml_matmul import GGMLQuantMatmul

                    self._ggml = GGMLQuantMatmul(self._raw, self.qtype, self.in_features, self.out_features,
                                                 dense=self.dequantized)
            elif self.backend_name == "torch":
                if self._dense is None:
                    self._dense = self.dequantized()
            elif self._sess is None:
                from .kernels import cpu

                big = self.in_features * self.out_features >= BIG_MATRIX
                threads = _threads if big else 1
                sess = None if self._parts is not None else cpu.take_early(
                    self._raw, self.qtype, self.in_features, self.out_features, self.accuracy_level, threads)
                if sess is None:
                    if self._parts is not None:
                        w = cpu.concat([cpu.repack(p._raw, p.qtype, p.in_features, p.out_features)
                                        for p in self._parts])
                    else:
                        w = cpu.repack(self._raw, self.qtype, self.in_features, self.out_features)
                    sess = cpu.make_session(w, self.accuracy_level, threads)
                # MLAS's 4-bit kernel has an M = 1 path whose rounding differs from M >= 2; a lone row
                # is run as two so that a token's result never depends on the batch it is in
                # (kernels/dense.py says why that matters). Measured cost: ~15% on a 4-bit matvec.
                self._pad_single = cpu.LAYOUT[self.qtype][0] == 4
                self._sess = sess
                self._big = big
                # Skip InferenceSession.run's per-call Python validation (~5 us x 127 calls per token).
                self._run = self._sess._sess.run
        return self

    def to_device(self, device) -> "QuantLinear":
        """Run this layer on `device` from now on: the GGUF blocks (every part of a fused layer) are
        uploaded once in the GPU kernels' layout (kernels/gpu_matmul.py). `device`: a CUDA GPU, or the
        CPU under TRITON_INTERPRET=1 (tests). The host blocks stay mapped for dequantized()."""
        from .kernels.gpu_matmul import GPUMatmul

        parts = self._parts if self._parts is not None else [self]
        with self._lock:
            self._gpu = GPUMatmul([(p._raw, p.qtype, p.in_features, p.out_features) for p in parts], device)
            self.backend_name = "gpu"
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 [..., in_features] -> float32 [..., out_features]."""
        if self._gpu is not None:
            return self._gpu(x)
        lead = x.shape[:-1]
        if self.backend_name == "ggml":
            if self._ggml is None:
                self.prepare()
            return self._ggml(x.detach().cpu().float()).to(x.device)
        if self.backend_name == "torch" or x.device.type != "cpu":
            if self._dense is None:
                self.prepare()
            if x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
                # Inference on the CPU: MLAS, whose rows do not depend on the batch (kernels/dense.py).
                if self._rowwise is None:
                    from .kernels.dense import DenseMatmul

                    self._rowwise = DenseMatmul(self._dense.t(), threads=_threads)
                return self._rowwise(x)
            return torch.nn.functional.linear(x, self._dense.to(device=x.device, dtype=x.dtype))
        if self._sess is None:
            self.prepare()
        # Hot path (127 calls per decode token): plain numpy views, no torch ops (each costs a few us).
        if x.dtype == torch.float32 and not x.requires_grad and x.is_contiguous():
            a = x.numpy().reshape(-1, self.in_features)
        else:
            a = x.detach().to(torch.float32).contiguous().numpy().reshape(-1, self.in_features)
        m = a.shape[0]
        if m >= SPLIT_ROWS and _threads > 1 and not self._big:
            # Rows split over threads: per-thread single-threaded sessions beat a 2-thread pool here.
            parts = np.array_split(a, _threads)
            futs = [_row_pool().submit(self._run, ["Y"], {"X": p}, None) for p in parts[1:]]
            y = np.concatenate([self._run(["Y"], {"X": parts[0]}, None)[0]] + [f.result()[0] for f in futs])
        elif m == 1 and self._pad_single:
            y = self._run(["Y"], {"X": np.concatenate([a, a])}, None)[0][:1].copy()
        else:
            y = self._run(["Y"], {"X": a}, None)[0]
            if not self._big:
                # Letting torch hold ORT's output buffer measured ~15 us slower per call than a copy
                # (ORT's allocator cannot recycle the block); small outputs copy in ~1 us.
                y = y.copy()
        return torch.from_numpy(y.reshape(*lead, self.out_features))


class QuantEmbedding(torch.nn.Module):
    """Embedding table kept as GGUF blocks; forward dequantises only the gathered rows."""

    def __init__(self, raw, qtype, n_vocab: int, dim: int):
        super().__init__()
        self.qtype = T(qtype)
        self.n_vocab, self.dim = int(n_vocab), int(dim)
        self._row_bytes = blocks.row_bytes(self.qtype, self.dim)
        self._rows = _as_numpy(raw).reshape(self.n_vocab, self._row_bytes)
        self._dev_rows: torch.Tensor | None = None

    def to_device(self, device) -> "QuantEmbedding":
        """Keep the table's blocks on `device` (uploaded once) and gather/decode rows there."""
        from .kernels.gpu_matmul import upload

        self._dev_rows = upload(self._rows, device).view(self.n_vocab, self._row_bytes)
        return self

    def extra_repr(self) -> str:
        return f"n_vocab={self.n_vocab}, dim={self.dim}, qtype={self.qtype.name}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [...] -> float32 [..., dim], bit-identical to the dequantised table's rows."""
        if self._dev_rows is not None:
            # On the device: gather the rows' blocks there and decode them (no host sync, so a CUDA
            # graph can hold it).
            idx = ids.detach().reshape(-1).to(self._dev_rows.device)
            rows = self._dev_rows.index_select(0, idx)
            return blocks.dequantize(rows, self.qtype, (idx.shape[0], self.dim)).view(*ids.shape, self.dim)
        idx = ids.detach().cpu().reshape(-1).numpy()
        rows = self._rows[idx]  # fancy indexing copies just these rows out of the (memmapped) table
        out = blocks.dequantize(rows, self.qtype, (idx.size, self.dim))
        return out.reshape(*ids.shape, self.dim).to(ids.device)
