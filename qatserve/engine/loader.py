"""Open a GGUF file and build everything a generator needs from it: model, tokenizer, config."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qatserve.config import ModelConfig
from qatserve.errors import RequestError
from qatserve.formats.gguf_reader import GGUFFile, open_gguf
from qatserve.formats.tokenizer import Tokenizer
from qatserve.models.common import DecoderLM
from qatserve.models.registry import build_assistant, build_model


@dataclass
class LoadedModel:
    path: Path
    gguf: GGUFFile
    model: DecoderLM
    tokenizer: Tokenizer | None
    load_seconds: float

    @property
    def config(self) -> ModelConfig:
        return self.model.config  # type: ignore[return-value]


def _open_and_build(path: str | Path | GGUFFile, build: Callable[[GGUFFile], Any]) -> tuple[GGUFFile, Any, float]:
    """Open `path` (or take the already open file) and run `build` on it; the file is closed again if
    building fails."""
    t0 = time.perf_counter()
    gguf = path if isinstance(path, GGUFFile) else open_gguf(path)
    try:
        built = build(gguf)
    except BaseException:
        gguf.close()
        raise
    return gguf, built, time.perf_counter() - t0


def load_model_file(path: str | Path | GGUFFile, backend: str = "auto", numerics: str | None = None,
                    on_model: Callable[[DecoderLM], None] | None = None, device: str | None = None) -> LoadedModel:
    """Memory-map `path`, validate it, build the model and (when the file has a vocabulary) the tokenizer.
    `on_model(model)` runs between the two (the server starts building kernels there, beside the tokenizer).
    device: "auto" (the GPU when CUDA and the Triton kernels are usable), "cpu" or "cuda"
    (engine/device.py); None: "auto" with the "auto" backend, the CPU with an explicit CPU backend."""
    from qatserve.engine.device import resolve_device, to_device

    where = resolve_device(device if device is not None else ("auto" if backend == "auto" else "cpu"))
    if where.type != "cpu" and backend != "auto":
        raise RequestError(f"backend {backend!r} runs on the CPU only; use the default backend on {where}")

    def build(gguf: GGUFFile) -> tuple[DecoderLM, Tokenizer | None]:
        model = build_model(gguf, backend=backend, numerics=numerics)
        if where.type != "cpu":
            to_device(model, where)
        if on_model is not None:
            on_model(model)
        has_vocab = "tokenizer.ggml.tokens" in gguf.metadata
        return model, Tokenizer.from_gguf_metadata(gguf.metadata) if has_vocab else None

    gguf, (model, tokenizer), seconds = _open_and_build(path, build)
    return LoadedModel(Path(gguf.path), gguf, model, tokenizer, seconds)


@dataclass
class LoadedAssistant:
    path: Path
    gguf: GGUFFile
    model: torch.nn.Module  # models.gemma4_assistant.Gemma4Assistant
    load_seconds: float


def load_assistant_file(path: str | Path, target: DecoderLM, backend: str = "auto", **options) -> LoadedAssistant:
    """Memory-map an MTP assistant GGUF and bind it to the loaded `target` model (see registry.build_assistant)."""
    gguf, model, seconds = _open_and_build(path, lambda g: build_assistant(g, target, backend=backend, **options))
    return LoadedAssistant(Path(path), gguf, model, seconds)
