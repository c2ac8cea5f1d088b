"""Well-formed GGUFs whose model is a lie (faults.md item 13) fail at build with ModelError naming it."""

from __future__ import annotations

import pytest
import torch

from qatserve.engine.generate import Generator
from qatserve.engine.loader import load_model_file
from qatserve.errors import ModelError
from tests.tiny_gguf import llama_tensors, write_llama


def _load_error(path) -> str:
    with pytest.raises(ModelError) as e:
        load_model_file(path)
    return str(e.value)


def test_tiny_llama_loads_and_runs(tmp_path):
    loaded = load_model_file(write_llama(tmp_path / "ok.gguf"))
    logits = Generator(loaded.model, None, n_ctx=32).logits_all([1, 2, 3])
    assert logits.shape == (3, 64) and torch.isfinite(logits).all()
    # -c 0 means the model's trained context (128 in this file), as in llama.cpp.
    assert Generator(loaded.model, None, n_ctx=0).n_ctx == 128


@pytest.mark.parametrize(
    "meta, expect",
    [
        ({"llama.block_count": 10**6}, "llama.block_count': expected 1..1024, got 1000000"),
        ({"llama.block_count": 3}, "missing required tensor 'blk.2.attn_norm.weight'"),
        ({"llama.attention.head_count": 0}, "llama.attention.head_count': expected 1..1024, got 0"),
        ({"llama.attention.head_count_kv": 3}, "does not divide head_count 4"),
        ({"llama.embedding_length": None}, "missing required metadata key 'llama.embedding_length'"),
        ({"llama.embedding_length": "wide"}, "expected an integer"),
        ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, "'yarn' is not supported"),
    ],
)
def test_semantic_lies_in_metadata(tmp_path, meta, expect):
    assert expect in _load_error(write_llama(tmp_path / "bad.gguf", meta=meta))


def test_missing_tensor(tmp_path):
    t = llama_tensors()
    del t["blk.1.ffn_up.weight"]
    assert "missing required tensor 'blk.1.ffn_up.weight'" in _load_error(write_llama(tmp_path / "m.gguf", tensors=t))


def test_shape_mismatch(tmp_path):
    t = llama_tensors()
    t["blk.0.attn_q.weight"] = t["blk.0.attn_q.weight"][:16]
    msg = _load_error(write_llama(tmp_path / "s.gguf", tensors=t))
    assert "tensor 'blk.0.attn_q.weight': expected shape [32, 32], got [32, 16]" in msg


def test_unknown_architecture_and_extra_tensor(tmp_path):
    assert "architecture 'mamba9' is not supported" in _load_error(write_llama(tmp_path / "a.gguf", arch="mamba9"))
    t = llama_tensors()
    t["blk.0.mystery.weight"] = t["output_norm.weight"]
    assert "'blk.0.mystery.weight'" in _load_error(write_llama(tmp_path / "x.gguf", tensors=t))
