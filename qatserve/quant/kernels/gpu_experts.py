"""The GPU backend of quant/experts.py's ExpertFFN: every expert of a layer in one stacked device buffer per
matrix kind (gate|up, down), run by the gathered kernels of triton_moe with the expert ids on the device.

One forward over T rows with ids / weights [T, top_k]:
    gate|up  y1 [T*top_k, 2ff] = x[t] @ GU_e^T for each pair (t, e = ids[t, j])
    glu      h  [T*top_k, ff]  = the model's GLU on the halves (models.common.gelu_tanh_glu: gpu_fusions'
                                 `geglu` kernel when that switch is on, torch otherwise)
    down     y2 [T*top_k, N]   = h[pair] @ D_e^T
    combine  out [T, N]        = sum_j weights[t, j] * y2[t*top_k + j], in j order
Plans, as GPUMatmul's (gpu_matmul.row_kind): "decode" rows take the CUDA-core gathered gemv (a pair's bits do
not depend on the other rows: batch-invariant), "prompt" rows the tensor-core grouped dot (pairs sorted by
expert on the device; tf32 like the dense prompt plan); without a row kind, by row count (GEMV_ROWS).
Nothing here reads a device value on the host, so a decode step's MoE can be captured in a CUDA graph.

Stacks: formats with a GPU layout (gpu_layout.FORMATS) are repacked expert-major (expert e's rows at
e*N ..), floats (F16/BF16/F32) uploaded in their dtype; any other type raises ValueError at build time and
ExpertFFN keeps the per-expert loop. A gate|up given as separate gate and up tensors is stacked per expert
as [gate_e; up_e] (one launch) when both share a layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import gpu_layout
from .gpu_matmul import GEMV_ROWS, current_row_kind, gpu_available, upload

_FLOAT_DTYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML type ids F32, F16, BF16


@dataclass(frozen=True)
class MoEConfig:
    """Launch tiles (benchmarks/gpu/moe_bench.py sweeps them on the H100). Changing them changes the
    kernels' summation order only between configurations, never between batches."""

    gemv_block_n: int = 32
    gemv_block_k: int = 256
    gemv_warps: int = 4
    dot_block_n: int = 128
    dot_block_k: int = 64
    dot_block_m: int = 32
    dot_warps: int = 4
    dot_stages: int = 3


DEFAULT_CONFIG = MoEConfig()


class _Stack:
    """n_expert matrices [N, K] of one kind on the device: PackedWeights (N = n_expert * rows) or a float
    tensor [n_expert * rows, K]."""

    def __init__(self, experts: list[list[tuple]], device):
        n_expert = len(experts)
        kinds = [(int(qt), int(k), int(n)) for _, qt, k, n in experts[0]]
        if any([(int(qt), int(k), int(n)) for _, qt, k, n in parts] != kinds for parts in experts):
            raise ValueError("experts of one tensor differ in their parts")
        if len({k for _, k, _ in kinds}) != 1:
            raise ValueError("expert parts need equal in_features")
        self.n_expert, self.K = n_expert, kinds[0][1]
        self.rows = sum(n for _, _, n in kinds)  # output rows per expert
        qtypes = {qt for qt, _, _ in kinds}
        stacked = [np.concatenate([np.asarray(parts[i][0]).reshape(-1).view(np.uint8) for parts in experts])
                   for i in range(len(kinds))]
        if all(qt in gpu_layout.FORMATS for qt in qtypes) and len(qtypes) == 1:
            packed = [gpu_layout.repack(raw, qt, k, n_expert * n, device) for raw, (qt, k, n) in zip(stacked, kinds)]
            self.packed = packed[0] if len(packed) == 1 else _interleave(packed, n_expert)
            self.float_w = None
        elif all(qt in _FLOAT_DTYPES for qt in qtypes):
            mats = [upload(raw, device, _FLOAT_DTYPES[qt]).view(n_expert, n, k)
                    for raw, (qt, k, n) in zip(stacked, kinds)]
            if len({m.dtype for m in mats}) > 1:
                mats = [m.float() for m in mats]
            self.float_w = torch.cat(mats, dim=1).reshape(n_expert * self.rows, self.K) if len(mats) > 1 \
                else mats[0].reshape(n_expert * self.rows, self.K)
            self.packed = None
        else:
            names = sorted(gpu_layout.FORMATS.get(qt).name if qt in gpu_layout.FORMATS else str(qt) for qt in qtypes)
            raise ValueError(f"no stacked GPU expert kernel for types {names}")

    @property
    def nbytes_per_expert(self) -> int:
        if self.packed is not None:
            return self.packed.nbytes // self.n_expert
        return self.float_w.numel() * self.float_w.element_size() // self.n_expert

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, *, per_pair: bool, kind: str, cfg: MoEConfig,
                 grouping) -> torch.Tensor:
        from . import triton_moe as tm

        if self.float_w is not None:  # every row count: the float kernel (tiny test models' widths)
            return tm.gather_fgemv(self.float_w, self.n_expert, x, ids, per_pair=per_pair)
        if kind == "decode":
            return tm.gather_gemv(self.packed, self.n_expert, x, ids, per_pair=per_pair, block_n=cfg.gemv_block_n,
                                  block_k=cfg.gemv_block_k, num_warps=cfg.gemv_warps)
        return tm.grouped_dot(self.packed, self.n_expert, x, ids, per_pair=per_pair, block_n=cfg.dot_block_n,
                              block_k=cfg.dot_block_k, block_m=cfg.dot_block_m, num_warps=cfg.dot_warps,
                              num_stages=cfg.dot_stages, grouping=grouping)


def _interleave(packed: list[gpu_layout.PackedWeights], n_expert: int) -> gpu_layout.PackedWeights:
    """Stacks of parts (gate [E*ff], up [E*ff]) -> one stack with expert e's rows [gate_e; up_e]."""
    p0 = packed[0]
    if len({p.fmt.qtype for p in packed}) != 1:
        raise ValueError("expert parts of different formats")

    def cat(name):
        ts = [getattr(p, name) for p in packed]
        if ts[0] is None:
            return None
        return torch.cat([t.view(n_expert, -1, t.shape[1]) for t in ts], dim=1).reshape(-1, ts[0].shape[1])

    return gpu_layout.PackedWeights(p0.fmt, sum(p.N for p in packed), p0.K, cat("lo"), cat("q8"), cat("hi"),
                                    cat("scale"), cat("minv"), cat("d"), cat("dmin"))


class GPUExperts:
    """gate|up and down stacks of one layer on `device`; parts: per expert [(raw GGUF rows, qtype, K, N)]."""

    def __init__(self, gate_up: list[list[tuple]], down: list[list[tuple]], device, config: MoEConfig | None = None):
        if not gpu_available(device):
            raise RuntimeError(f"the Triton GPU kernels cannot run on {device} here")
        if len(gate_up) != len(down) or not down:
            raise ValueError("gate|up and down need the same (non-zero) number of experts")
        self.device = torch.device(device)
        self.config = config or DEFAULT_CONFIG
        self.gate_up = _Stack(gate_up, self.device)
        self.down = _Stack(down, self.device)
        if self.gate_up.rows % 2 or self.down.K != self.gate_up.rows // 2:
            raise ValueError(f"gate|up gives {self.gate_up.rows} rows, down takes {self.down.K}")
        self.n_expert, self.ff = self.down.n_expert, self.down.K

    @property
    def nbytes_per_expert(self) -> int:
        """Bytes one chosen expert costs a decode row (gate|up + down)."""
        return self.gate_up.nbytes_per_expert + self.down.nbytes_per_expert

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, glu) -> torch.Tensor:
        """x [T, K] (any float dtype), weights float [T, top_k], ids int [T, top_k] (all on the device)
        -> float32 [T, N]."""
        from . import triton_moe as tm

        if x.dtype != torch.float32:
            x = x.float()
        x = x.contiguous()
        ids = ids.contiguous()
        kind = current_row_kind() or ("decode" if x.shape[0] <= GEMV_ROWS else "prompt")
        cfg = self.config
        grouping = None
        if kind != "decode" and (self.gate_up.packed is not None or self.down.packed is not None):
            grouping = tm.group_pairs(ids, self.n_expert, cfg.dot_block_m)  # one sort for both launches
        gu = self.gate_up(x, ids, per_pair=False, kind=kind, cfg=cfg, grouping=grouping)
        h = glu(gu[:, : self.ff], gu[:, self.ff :])
        y = self.down(h, ids, per_pair=True, kind=kind, cfg=cfg, grouping=grouping)
        return tm.combine(y, weights)
