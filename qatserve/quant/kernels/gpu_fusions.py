"""Which fused GPU kernels run (issue 8: fewer, larger launches per decode step), and when they apply.

Every fusion replaces a chain of small torch kernels (or a per-row launch) by one Triton launch that
computes the same thing; the torch path stays and runs whenever a fusion is off, Triton is missing, the
tensors are not on a CUDA device, or a shape does not fit. Importable without Triton or CUDA.

| name | replaces | hooked at | kernel module |
|---|---|---|---|
| `kv_store` | Hadamard of K and V + quantise (q8_0/q4_0) or cast + 2 index_put writes | PagedKVCache.store | triton_kv_store |
| `hadamard` | the torch butterfly of Q and of the attention output (~30 kernels each) | kv_quant.hadamard | triton_kv_store |
| `rms_norm` | F.rms_norm (plus the copy a strided q/k head view costs) | models.common.rms_norm | triton_fused |
| `rope` | x * cos + roll(x) * sin (4 kernels) | models.common.Rope.apply | triton_fused |
| `geglu` | gelu(gate) and * up on the gate|up halves (2 kernels) | models.common.gelu_tanh_glu | triton_fused |
| `splitk` | the torch sum of split-K partials (1 launch per split matrix) | triton_gemv (last program sums) | triton_gemv |
| `multirow` | one gemv program per row and weight tile (weights read once per row) | gpu_matmul decode plan | triton_gemv, triton_dense |

kv_store, hadamard, rope, splitk and multirow are bit-identical to the paths they replace (multirow:
each row's bits equal the row alone); rms_norm and geglu round differently from torch's CUDA kernels
(within float32 rounding) but are per row, so batch invariance holds.

Switches: QATSERVE_GPU_FUSIONS = "default" (when unset) | "all" | "none" | a comma list of names (read at
first use). The default is every fusion but `multirow`. On the H100 (2026-11-23, benchmarks/gpu/
fusions_bench.py and engine_bench.py on the Gemma 3 27B shape, Q4_0) the default took decode from 74.5 to
91.4 tok/s with f16 K/V and from 38.3 to 89.6 with q8_0 K/V (the K/V store alone: 123 us -> 2.4 us a layer),
and the 2-slot aggregate from 112 to 137. `multirow` stays opt-in: the multi-row gemv measured 0.8-1.1x the
one-row plan (the second row's weight reads hit L2), "all" gave 123 tok/s at 2 slots against the default's
137, and K-quant formats hold one row per program (triton_gemv.max_rows: 3 Q6_K rows per program did not
keep the one-row bits on sm_90). tests/unit/test_gpu_fusions.py checks each claim on the GPU.
`use(...)` changes them for a block (benchmarks/gpu/fusions_bench.py times each on and off). A captured
CUDA graph keeps the kernels that ran when it was captured: switch before building an engine.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from qatserve.errors import RequestError

FUSIONS = ("kv_store", "hadamard", "rms_norm", "rope", "geglu", "splitk", "multirow")


DEFAULT = tuple(n for n in FUSIONS if n != "multirow")  # measured on the H100: see the module docstring


def _parse(spec: str | None) -> frozenset[str]:
    s = (spec if spec is not None else "default").strip().lower()
    if s == "default":
        return frozenset(DEFAULT)
    if s in ("all", "1", "on"):
        return frozenset(FUSIONS)
    if s in ("", "none", "0", "off"):
        return frozenset()
    names = frozenset(n.strip() for n in s.split(",") if n.strip())
    unknown = sorted(names - set(FUSIONS))
    if unknown:
        raise RequestError(f"QATSERVE_GPU_FUSIONS: unknown GPU fusion {unknown[0]!r}; expected default, all, none "
                           f"or a comma list of {', '.join(FUSIONS)}")
    return names


_on: frozenset[str] | None = None  # parsed from the environment on first use (engine/device.to_device)


def _current() -> frozenset[str]:
    global _on
    if _on is None:
        _on = _parse(os.environ.get("QATSERVE_GPU_FUSIONS"))
    return _on


def enabled(name: str) -> bool:
    """Whether fusion `name` is switched on (it may still not apply to a given call)."""
    return name in _current()


def active() -> tuple[str, ...]:
    """The fusions switched on; a bad QATSERVE_GPU_FUSIONS is a RequestError here (to_device calls it
    when a model moves to the GPU, so the mistake is one line at load time)."""
    on = _current()
    return tuple(n for n in FUSIONS if n in on)


@contextmanager
def use(names="all"):
    """Within the block only the fusions `names` are on ("default", "all", "none", a comma string or an
    iterable)."""
    global _on
    prev = _current()
    _on = _parse(names) if isinstance(names, str) else _parse(",".join(names) or "none")
    try:
        yield
    finally:
        _on = prev


_MODULES: dict[str, object] = {}


def kernels(module: str):
    """The Triton kernel module `module` ("triton_kv_store", "triton_fused"), or None where Triton
    cannot be imported (CPU-only installs)."""
    if module not in _MODULES:
        try:
            import importlib

            _MODULES[module] = importlib.import_module(f"{__package__}.{module}")
        except Exception:  # noqa: BLE001 - a broken Triton install must not break the torch path
            _MODULES[module] = None
    return _MODULES[module]


_READY: dict[torch.device, bool] = {}


def _cuda_ready(t: torch.Tensor) -> bool:
    """A CUDA tensor and compiled (not interpreted) Triton kernels (asked once per device: the eager
    prompt path comes here ~10 times per layer)."""
    if not t.is_cuda:
        return False
    ready = _READY.get(t.device)
    if ready is None:
        from . import triton_qmatmul

        ready = _READY[t.device] = triton_qmatmul.available(t.device)
    return ready


_gpu_ready = _cuda_ready  # tests/engine/test_gpu_fusions_wiring.py points it at the interpreter on the CPU


def _pow2(n: int, lo: int = 1) -> bool:
    return n >= lo and not n & (n - 1)


def on_gpu(name: str, t: torch.Tensor, module: str) -> object | None:
    """The kernel module for fusion `name` when it is on and `t` lives where it can run, else None."""
    if not t.is_cuda and _gpu_ready is _cuda_ready:  # the CPU path's cost: one attribute test
        return None
    if name not in _current() or not _gpu_ready(t):
        return None
    return kernels(module)


def kv_store(st):
    """triton_kv_store when the fused store applies to a layer's store (kv_cache.LayerStore): its buffers
    on a CUDA device, power-of-two head dims >= 32 (quantised types hold whole blocks). The caller checks
    that the step's k/v are float32 (the torch path rounds a rotated fp16 row back to fp16 first)."""
    m = on_gpu("kv_store", st.k, "triton_kv_store")
    if m is None or not (_pow2(st.dk, 32) and _pow2(st.dv, 32)):
        return None
    return m


def hadamard(x: torch.Tensor, group: int):
    m = on_gpu("hadamard", x, "triton_kv_store")
    if m is None or not _pow2(group) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return m


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None):
    m = on_gpu("rms_norm", x, "triton_fused")
    if m is None or x.dtype != torch.float32 or x.dim() == 0 or x.shape[-1] > 65536:
        return None
    if weight is not None and (weight.dtype != torch.float32 or weight.shape != x.shape[-1:]
                               or not weight.is_contiguous()):
        return None
    return m


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int):
    """triton_fused for Rope.apply on x [T, H, D] float32 with float32 tables [T, 1, dim]: dim / 2 a
    power of two (the kernel's tile)."""
    m = on_gpu("rope", x, "triton_fused")
    if m is None or x.dim() != 3 or x.dtype != torch.float32 or cos.dtype != torch.float32 or sin.dtype != cos.dtype:
        return None
    if dim % 2 or not _pow2(dim // 2) or dim > x.shape[-1] or cos.shape[-1] != dim or sin.shape[-1] != dim:
        return None
    if cos.shape[0] != x.shape[0] or cos.numel() != x.shape[0] * dim or sin.numel() != cos.numel():
        return None
    return m


def geglu(gate: torch.Tensor, up: torch.Tensor):
    m = on_gpu("geglu", gate, "triton_fused")
    if m is None or gate.dim() != 2 or gate.shape != up.shape or gate.dtype != torch.float32 or up.dtype != gate.dtype:
        return None
    return m
