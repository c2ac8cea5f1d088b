"""Open a GGUF file and build everything a generator needs from it: model, tokenizer, config."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

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


def load_model_file(path: str | Path, backend: str = "auto", numerics: str | None = None) -> LoadedModel:
    """Memory-map `path`, validate it, build the model and (when the file has a vocabulary) the tokenizer."""
    t0 = time.perf_counter()
    gguf = open_gguf(path)
    try:
        model = build_model(gguf, backend=backend, numerics=numerics)
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata) if "tokenizer.ggml.tokens" in gguf.metadata else None
    except BaseException:
        gguf.close()
        raise
    return LoadedModel(Path(path), gguf, model, tokenizer, time.perf_counter() - t0)


@dataclass
class LoadedAssistant:
    path: Path
    gguf: GGUFFile
    model: torch.nn.Module  # models.gemma4_assistant.Gemma4Assistant
    load_seconds: float


def load_assistant_file(path: str | Path, target: DecoderLM, backend: str = "auto", **options) -> LoadedAssistant:
    """Memory-map an MTP assistant GGUF and bind it to the loaded `target` model (see registry.build_assistant)."""
    t0 = time.perf_counter()
    gguf = open_gguf(path)
    try:
        model = build_assistant(gguf, target, backend=backend, **options)
    except BaseException:
        gguf.close()
        raise
    return LoadedAssistant(Path(path), gguf, model, time.perf_counter() - t0)
