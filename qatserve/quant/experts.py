"""ExpertFFN: the routed experts of one mixture-of-experts layer (Gemma 4 26B-A4B), as QuantLinear is for one
matrix: the model calls it, the backend is chosen where the weights live.

- host (CPU, or a GPU whose expert format has no stacked kernel): one call per chosen expert, rows gathered
  per expert in ascending expert id (HF's loop; it reads the routed ids on the host).
- "gpu" after `to_device`: every expert's blocks stacked once per matrix kind on the device and run by
  the gathered Triton kernels (kernels/gpu_experts.py): no host sync, only the chosen experts' blocks read.
  The per-expert QuantLinears stay on the host (not uploaded twice) for `dequantized()` and the CPU path.
"""

from __future__ import annotations

import torch

from .linear import QuantLinear


def _parts(m: torch.nn.Module) -> list[tuple]:
    """(raw GGUF rows, qtype, in_features, out_features) of each matrix a projection concatenates: a
    QuantLinear (fused or not) or a module listing such `parts` (models.common.ParallelLinear)."""
    if isinstance(m, QuantLinear):
        ps = m._parts if m._parts is not None else [m]
        return [(p._raw, p.qtype, p.in_features, p.out_features) for p in ps]
    parts = getattr(m, "parts", None)
    if parts is None:
        raise ValueError(f"no GGUF blocks behind {type(m).__name__}")
    return [t for p in parts for t in _parts(p)]


class ExpertFFN(torch.nn.Module):
    """y[t] = sum_j weights[t, j] * down_e(glu(gate_up_e(x[t]))), e = ids[t, j].

    gate_up[e]: x [., n_embd] -> [., 2 ff] (gate rows first); down[e]: [., ff] -> [., n_embd]."""

    def __init__(self, gate_up: list[torch.nn.Module], down: list[torch.nn.Module]):
        super().__init__()
        if len(gate_up) != len(down):
            raise ValueError(f"{len(gate_up)} gate|up experts, {len(down)} down experts")
        self.gate_up = torch.nn.ModuleList(gate_up)
        self.down = torch.nn.ModuleList(down)
        self._gpu = None

    @property
    def reads_ids_on_host(self) -> bool:
        """True when forward syncs with the device (the per-expert loop): no CUDA graph can hold it."""
        return self._gpu is None

    def to_device(self, device) -> "ExpertFFN":
        """Run on `device` from now on: the stacked GPU kernels where the formats allow, else each expert's
        QuantLinear on its own GPU backend (the loop). `device`: CUDA, or the CPU under TRITON_INTERPRET=1."""
        from .kernels.gpu_experts import GPUExperts

        try:
            self._gpu = GPUExperts([_parts(m) for m in self.gate_up], [_parts(m) for m in self.down], device)
        except ValueError:
            for m in self.modules():
                if isinstance(m, QuantLinear):
                    m.to_device(device)
        return self

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, glu) -> torch.Tensor:
        """x [T, n_embd], weights [T, k], ids [T, k] -> [T, n_embd]; glu(gate, up) is the model's activation."""
        if self._gpu is not None:  # x, weights and ids live on the experts' device (the model moved with them)
            return self._gpu(x, weights, ids, glu).to(x.dtype)
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():  # ascending, as HF's loop: same summation order
            rows, slot = (ids == e).nonzero(as_tuple=True)
            y = self.down[e](glu(*self.gate_up[e](x[rows]).chunk(2, dim=-1)))
            out.index_add_(0, rows, y * weights[rows, slot, None].to(y.dtype))
        return out
