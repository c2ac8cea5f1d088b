"""convert/vocab.py edge cases beyond what the llama.cpp interop fixtures cover: padding to the model's
vocab_size, user-defined added tokens, and no tokenizer at all (nothing written)."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest

from qatserve.convert.vocab import write_vocab
from qatserve.formats.gguf_reader import open_gguf
from tests.llamacpp_interop import TOKENIZER_DIR

TT = gguf.TokenType


def _write(tmp_path, arch: str, n_vocab: int):
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), arch)
    wrote = write_vocab(w, tmp_path, arch, n_vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = open_gguf(tmp_path / "v.gguf")
    meta = dict(f.metadata)
    f.close()
    return wrote, meta


def test_spm_vocab_is_padded_and_keeps_user_defined_tokens(tmp_path):
    shutil.copy(TOKENIZER_DIR / "tokenizer.model", tmp_path)
    cfg = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["300"] = {"content": "\u2581hello", "special": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    # No tokenizer.json: special ids come from config.json (gguf.SpecialVocab, as in llama.cpp).
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}))
    wrote, m = _write(tmp_path, "gemma3", 520)
    assert wrote and m["tokenizer.ggml.model"] == "llama" and m["tokenizer.ggml.pre"] == "default"
    tokens, types, scores = (list(m[f"tokenizer.ggml.{k}"]) for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == 520 and tokens[512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert set(types[512:]) == {TT.UNUSED} and set(scores[512:]) == {-10000.0}
    assert (tokens[300], types[300], scores[300]) == (" hello", TT.USER_DEFINED, -1000.0)
    assert types[:7] == [TT.CONTROL] * 7 and types[7] == TT.BYTE
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert m["tokenizer.ggml.add_space_prefix"] is False


def test_gemma4_vocab_from_tokenizer_json(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, tmp_path)
    wrote, m = _write(tmp_path, "gemma4", 512)
    assert wrote and m["tokenizer.ggml.model"] == "gemma4" and m["tokenizer.ggml.add_bos_token"] is True
    assert len(m["tokenizer.ggml.merges"]) > 0 and set(m["tokenizer.ggml.scores"]) == {-1000.0}


@pytest.mark.parametrize("arch", ["gemma3", "gemma4", "llama"])
def test_no_tokenizer_writes_nothing(tmp_path, arch):
    wrote, m = _write(tmp_path, arch, 512)
    assert not wrote and not any(k.startswith("tokenizer.") for k in m)
