"""Maps a GGUF `general.architecture` to its model class and builds it from an open file."""

from __future__ import annotations

from qatserve.config import ModelConfig, model_config_from_gguf
from qatserve.errors import ModelError
from qatserve.formats.gguf_reader import GGUFFile
from qatserve.models.common import DecoderLM
from qatserve.models.gemma3 import Gemma3
from qatserve.models.gemma4 import Gemma4
from qatserve.models.llama import Llama
from qatserve.models.weights import WeightLoader

ARCHITECTURES: dict[str, type[DecoderLM]] = {"gemma3": Gemma3, "gemma4": Gemma4, "llama": Llama}


def read_model_config(gguf: GGUFFile) -> ModelConfig:
    embd = gguf.tensors.get("token_embd.weight")
    return model_config_from_gguf(gguf.metadata, n_vocab_tensor=embd.ne[-1] if embd is not None else None)


def build_model(gguf: GGUFFile, backend: str = "auto") -> DecoderLM:
    """Build the decoder a GGUF describes; ModelError names what does not fit."""
    arch = gguf.metadata.get("general.architecture")
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"architecture {arch!r} is not supported (supported: {known})")
    # Architectures whose hyper-parameters vary per layer (gemma4) parse their own config.
    cfg = cls.config_from_gguf(gguf) if hasattr(cls, "config_from_gguf") else read_model_config(gguf)
    loader = WeightLoader(gguf, backend=backend)
    model = cls(cfg, loader)
    unused = [n for n in loader.unused() if n != "rope_freqs.weight"]
    if unused:
        raise ModelError(f"{len(unused)} tensors not used by the {arch} model, e.g. {unused[0]!r}: unsupported variant")
    return model.eval()
