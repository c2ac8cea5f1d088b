"""Where a model runs: `--device auto|cpu|cuda`, and moving a built model onto a GPU.

A model is always built on the CPU over the memory-mapped GGUF (models/ never see a device); `to_device`
then uploads it without touching the model files: every QuantLinear / QuantEmbedding / ExpertFFN switches
to its GPU backend (weights uploaded once, in the Triton kernels' layout; an MoE layer's experts stacked), every plain tensor a module holds
(norm weights, scales) moves, and RoPE tables move. The model is marked with `run_device` and
`gpu_kernels`, which the KV cache and the engine read (model_device, uses_gpu_kernels).
"""

from __future__ import annotations

import torch

from qatserve.errors import RequestError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | None = "auto") -> torch.device:
    """The torch device for a --device value: "auto" is the first CUDA GPU when CUDA and the Triton
    kernels are usable, else the CPU; "cuda" without a usable GPU is a RequestError."""
    kind = (name or "auto").lower()
    if kind not in DEVICES and not kind.startswith("cuda:"):
        raise RequestError(f"unknown --device {name!r}; expected one of {', '.join(DEVICES)}")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")  # before importing the kernels: Triton's import costs a CPU start 0.2-0.3 s
    from qatserve.quant.kernels.gpu_matmul import gpu_available

    usable = torch.cuda.is_available() and gpu_available("cuda")
    if kind == "auto":
        return torch.device("cuda") if usable else torch.device("cpu")
    if not torch.cuda.is_available():
        raise RequestError("--device cuda: no CUDA GPU is visible to torch here")
    if not usable:
        raise RequestError("--device cuda: the Triton GPU kernels are unavailable (is triton installed?)")
    return torch.device(kind)


def model_device(model) -> torch.device:
    """The device a model's activations live on (CPU unless to_device moved it)."""
    return getattr(model, "run_device", torch.device("cpu"))


def uses_gpu_kernels(model) -> bool:
    """True once to_device gave the model its GPU backend (also on the CPU under Triton's interpreter)."""
    return bool(getattr(model, "gpu_kernels", False))


def to_device(model: torch.nn.Module, device) -> torch.nn.Module:
    """Move a built model onto `device` in place (see the module docstring) and return it."""
    from qatserve.models.common import Rope
    from qatserve.quant.kernels import gpu_fusions
    from qatserve.quant.experts import ExpertFFN
    from qatserve.quant.linear import QuantEmbedding, QuantLinear

    device = torch.device(device)
    gpu_fusions.active()  # a bad QATSERVE_GPU_FUSIONS: one RequestError now, not mid-step
    ropes: dict[int, Rope] = {}
    inside: set[int] = set()  # the experts' own QuantLinears: ExpertFFN uploads them stacked, once
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, ExpertFFN):
            m.to_device(device)
            inside.update(id(c) for c in m.modules() if c is not m)
            continue
        if isinstance(m, QuantLinear):
            m.to_device(device)
            continue
        if isinstance(m, QuantEmbedding):
            m.to_device(device)
            continue
        for name, value in list(vars(m).items()):
            if name.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                setattr(m, name, value.to(device))
            elif isinstance(value, Rope):
                ropes[id(value)] = value
    for rope in ropes.values():
        rope.to(device)
    model.run_device = device
    model.gpu_kernels = True
    return model


def ropes_of(model: torch.nn.Module) -> list:
    """Every distinct Rope the model's modules hold."""
    from qatserve.models.common import Rope

    out: dict[int, Rope] = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, Rope):
                out[id(value)] = value
    return list(out.values())
