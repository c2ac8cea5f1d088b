"""Maps a GGUF `general.architecture` to its model class and builds it from an open file.

Drafters are not standalone models: `build_model` refuses them, and `build_assistant(gguf, target)`
binds one to an already built target (whose embedding it borrows and whose KV cache it reads).
"""

from __future__ import annotations

from qatserve.config import ModelConfig, model_config_from_gguf
from qatserve.errors import ModelError
from qatserve.formats.gguf_reader import GGUFFile
from qatserve.models.common import DecoderLM
from qatserve.models.gemma3 import Gemma3
from qatserve.models.gemma4 import Gemma4
from qatserve.models.gemma4_assistant import ARCHES as GEMMA4_ASSISTANT_ARCHES, Gemma4Assistant, is_assistant
from qatserve.models.llama import Llama
from qatserve.models.weights import WeightLoader

ARCHITECTURES: dict[str, type[DecoderLM]] = {"gemma3": Gemma3, "gemma4": Gemma4, "llama": Llama}
# Drafter archs -> (class, the target class it drafts for).
ASSISTANTS: dict[str, tuple[type[Gemma4Assistant], type[DecoderLM]]] = {
    a: (Gemma4Assistant, Gemma4) for a in GEMMA4_ASSISTANT_ARCHES}


def _assistant_arch(gguf: GGUFFile) -> str | None:
    arch = gguf.metadata.get("general.architecture")
    if arch in ASSISTANTS:
        return arch
    # Assistants written under the target's arch (spec 4.1): gemma4 + assistant metadata or tensors.
    return "gemma4-assistant" if arch == "gemma4" and is_assistant(gguf) else None


def read_model_config(gguf: GGUFFile) -> ModelConfig:
    embd = gguf.tensors.get("token_embd.weight")
    return model_config_from_gguf(gguf.metadata, n_vocab_tensor=embd.ne[-1] if embd is not None else None)


def build_model(gguf: GGUFFile, backend: str = "auto", numerics: str | None = None) -> DecoderLM:
    """Build the decoder a GGUF describes; ModelError names what does not fit.

    backend: QuantLinear backend ("auto", "ort", "torch", or "ggml" = llama.cpp's CPU numerics);
    numerics: "torch" | "ggml" for the non-matmul math, None = follow the backend.
    """
    arch = gguf.metadata.get("general.architecture")
    if _assistant_arch(gguf):
        raise ModelError(f"this file is an MTP assistant ({arch}), not a standalone model: load the target model "
                         "and bind the assistant to it (registry.build_assistant, engine.loader.load_assistant_file)")
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"architecture {arch!r} is not supported (supported: {known})")
    # Architectures whose hyper-parameters vary per layer (gemma4) parse their own config.
    cfg = cls.config_from_gguf(gguf) if hasattr(cls, "config_from_gguf") else read_model_config(gguf)
    loader = WeightLoader(gguf, backend=backend, numerics=numerics)
    model = cls(cfg, loader)
    unused = [n for n in loader.unused() if n != "rope_freqs.weight"]
    if unused:
        raise ModelError(f"{len(unused)} tensors not used by the {arch} model, e.g. {unused[0]!r}: unsupported variant")
    return model.eval()


def build_assistant(gguf: GGUFFile, target: DecoderLM, backend: str = "auto", **options) -> Gemma4Assistant:
    """Build the MTP assistant a GGUF describes, bound to `target` (built from its own file first).

    options go to the assistant class (Gemma4Assistant: semantics, head, mask_fill). ModelError when the
    file is no assistant, lacks something, or does not fit the target.
    """
    arch = _assistant_arch(gguf)
    if arch is None:
        raise ModelError(f"architecture {gguf.metadata.get('general.architecture')!r} is not an MTP assistant "
                         f"(supported: {', '.join(sorted(ASSISTANTS))}, or gemma4 with assistant metadata)")
    cls, target_cls = ASSISTANTS[arch]
    if not isinstance(target, target_cls):
        raise ModelError(f"a {arch} assistant drafts for a {target_cls.arch} target, got {type(target).__name__}")
    loader = WeightLoader(gguf, backend=backend)
    model = cls(cls.config_from_gguf(gguf), loader, target, **options)
    unused = [n for n in loader.unused() if n != "rope_freqs.weight"]
    if unused:
        raise ModelError(f"{len(unused)} tensors not used by the {arch} model, e.g. {unused[0]!r}: unsupported variant")
    return model.eval()
