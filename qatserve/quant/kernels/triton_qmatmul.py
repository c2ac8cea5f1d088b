"""TritonQuantMatmul: y = x @ W^T on the GPU straight from GGUF blocks (gpu_layout + triton_gemv).

Importable without Triton or CUDA: `available()` says whether the kernels can run here. Kernel choice
by the number of rows M of x (tokens in the step):

| M | kernel | default tile |
|---|---|---|
| 1 .. GEMV_MAX_M | `gemv` (CUDA cores, one program per row and 64 weight rows) | BLOCK_N 64, BLOCK_K 256, 4 warps |
| .. 16 | `dot`, decode tile (one program holds all rows, padded to 16) | 64 x 16 x 128, 4 warps, 2 stages |
| > 16 | `dot`, prefill tile | 128 x 64 x 64, 4 warps, 3 stages |

The defaults are first guesses from the compiler's resource report; benchmarks/gpu/gemv_bench.py
measures them (and a sweep) on the H100, and `configs=` overrides them per instance.
Split-K is chosen per call so that a launch has at least SPLIT_TARGET programs per SM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from . import gpu_layout

try:  # Triton is optional (CPU-only installs); any failure to import it means "unavailable".
    from . import triton_gemv
    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # noqa: BLE001 - a broken Triton install must not break importing qatserve
    triton_gemv = None  # type: ignore[assignment]
    _IMPORT_ERROR = e

GEMV_MAX_M = 1
SPLIT_TARGET = 4  # programs per SM below which K is split


@dataclass(frozen=True)
class Config:
    """One launch configuration (see triton_gemv.launch). split_k None: chosen per call."""

    kernel: str
    block_n: int
    block_k: int
    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 1
    split_k: int | None = None
    rows: int = 1  # gemv: rows of x per program (the multi-row decode plan; each row's bits as alone)


DEFAULT_CONFIGS = {
    "gemv": Config("gemv", block_n=64, block_k=256, num_warps=4, num_stages=1),
    "decode": Config("dot", block_n=64, block_k=128, block_m=16, num_warps=4, num_stages=2),
    "prefill": Config("dot", block_n=128, block_k=64, block_m=64, num_warps=4, num_stages=3),
}


def interpreting() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if triton_gemv is None:
        return False
    return type(triton_gemv._gemv_kernel).__name__ == "InterpretedFunction"


def available(device=None) -> bool:
    """Whether TritonQuantMatmul can run on `device` (default: CUDA if present, else CPU): Triton
    imports, and the device is a CUDA GPU, or the CPU under the Triton interpreter."""
    if triton_gemv is None:
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return dev.type == "cpu" and interpreting()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return int(os.environ.get("QATSERVE_SM_COUNT", "132"))  # interpreter: pretend H100


class TritonQuantMatmul:
    """y = x @ W^T with W [out_features, in_features] given as GGUF rows of `qtype` blocks.

    raw: uint8 bytes (np.ndarray / read-only memmap / torch tensor / bytes), repacked once onto
    `device` (gpu_layout.repack; exact). Supported: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
    out_dtype: default dtype of y (None: x's dtype). configs: overrides of DEFAULT_CONFIGS entries.
    """

    def __init__(self, raw, qtype, in_features: int, out_features: int, device=None, *,
                 out_dtype: torch.dtype | None = None, configs: dict[str, Config] | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
        self._init(gpu_layout.repack(raw, qtype, in_features, out_features, device), out_dtype, configs)

    @classmethod
    def from_packed(cls, weights: gpu_layout.PackedWeights, *, out_dtype: torch.dtype | None = None,
                    configs: dict[str, Config] | None = None) -> "TritonQuantMatmul":
        """Wrap already repacked weights (e.g. a concatenation made by the caller)."""
        self = cls.__new__(cls)
        self._init(weights, out_dtype, configs)
        return self

    def _init(self, weights: gpu_layout.PackedWeights, out_dtype, configs) -> None:
        if triton_gemv is None:
            raise RuntimeError(f"Triton kernels unavailable: {_IMPORT_ERROR!r}")
        if not available(weights.device):
            raise RuntimeError(f"Triton kernels cannot run on {weights.device} here "
                               "(CUDA, or the CPU with TRITON_INTERPRET=1 set before Triton is imported)")
        self.weights = weights
        self.in_features, self.out_features = weights.K, weights.N
        self.out_dtype = out_dtype
        self.configs = {**DEFAULT_CONFIGS, **(configs or {})}
        self._sms = _sm_count(weights.device)

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes

    def config_for(self, m: int) -> Config:
        """The launch configuration for m rows, with split_k resolved."""
        cfg = self.configs["gemv" if m <= GEMV_MAX_M else "decode" if m <= 16 else "prefill"]
        if cfg.split_k is not None:
            return cfg
        m_progs = m if cfg.kernel == "gemv" else -(-m // cfg.block_m)
        progs = m_progs * -(-self.out_features // cfg.block_n)
        k_tiles = max(1, self.in_features // cfg.block_k)
        split = min(k_tiles, max(1, -(-SPLIT_TARGET * self._sms // progs)))
        return replace(cfg, split_k=split)

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype | None = None,
                 config: Config | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in_features] (fp32 / fp16 / bf16, on the weights' device) -> y [..., out_features].
        counters: int32 zeros for the gemv kernel's in-kernel split-K sum (triton_gemv.launch)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            x2 = x2.float()
        out_dtype = out_dtype or self.out_dtype or x2.dtype
        m = x2.shape[0]
        if m == 0:
            return torch.empty(*lead, self.out_features, dtype=out_dtype, device=x.device)
        cfg = config or self.config_for(m)
        y = triton_gemv.launch(self.weights, x2, kernel=cfg.kernel, block_n=cfg.block_n, block_k=cfg.block_k,
                               block_m=cfg.block_m, split_k=cfg.split_k or 1, num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages, out_dtype=out_dtype, rows=cfg.rows,
                               counters=counters)
        return y.view(*lead, self.out_features)
