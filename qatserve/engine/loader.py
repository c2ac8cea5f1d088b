"""Open a GGUF file and build everything a generator needs from it: model, tokenizer, config."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qatserve.config import ModelConfig
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


def _open_and_build(path: str | Path, build: Callable[[GGUFFile], Any]) -> tuple[GGUFFile, Any, float]:
    """Open `path` and run `build` on it; the file is closed again if building fails."""
    t0 = time.perf_counter()
    gguf = open_gguf(path)
    try:
        built = build(gguf)
    except BaseException:
        gguf.close()
        raise
    return gguf, built, time.perf_counter() - t0


def load_model_file(path: str | Path, backend: str = "auto", numerics: str | None = None) -> LoadedModel:
    """Memory-map `path`, validate it, build the model and (when the file has a vocabulary) the tokenizer."""

    def build(gguf: GGUFFile) -> tuple[DecoderLM, Tokenizer | None]:
        model = build_model(gguf, backend=backend, numerics=numerics)
        has_vocab = "tokenizer.ggml.tokens" in gguf.metadata
        return model, Tokenizer.from_gguf_metadata(gguf.metadata) if has_vocab else None

    gguf, (model, tokenizer), seconds = _open_and_build(path, build)
    return LoadedModel(Path(path), gguf, model, tokenizer, seconds)


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
