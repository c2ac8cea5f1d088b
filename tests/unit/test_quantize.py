"""`qatserve quantize`: bytes equal gguf.quants on the dequantised input, llama-quantize's type rules,
metadata kept, and failures that leave nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from qatserve.errors import GGUFError, RequestError
from qatserve.formats.gguf_reader import open_gguf
from qatserve.quantize import _Writer, quantize_file
from tests.tiny_gguf import llama_tensors, write_llama

VOCAB_META = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [f"t{i}" for i in range(64)],
              "tokenizer.ggml.scores": [float(-i) for i in range(64)], "tokenizer.ggml.token_type": [1] * 64,
              "general.name": "tiny"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Tiny llama (n_embd 32, n_ff 48: ffn_down rows of 48 fit no 32-block) with a vocabulary."""
    return write_llama(tmp_path_factory.mktemp("q") / "src.gguf", meta=VOCAB_META)


def _types(path) -> dict[str, str]:
    with open_gguf(path) as f:
        return {n: t.ggml_type.name for n, t in f.tensors.items()}


def _expected(raw: np.ndarray, src_type: T, dst_type: T, shape) -> np.ndarray:
    x = quants.dequantize(raw, src_type).reshape(shape)
    return quants.quantize(x, dst_type) if dst_type != T.F32 else x.astype(np.float32)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"])
def test_tensors_equal_gguf_quants_of_the_input(src, tmp_path, qtype):
    out = quantize_file(src, tmp_path / "out.gguf", qtype).path
    with open_gguf(src) as fi, open_gguf(out) as fo:
        assert list(fo.tensors) == list(fi.tensors)
        for name, ti in fi.tensors.items():
            to = fo.tensors[name]
            assert to.ne == ti.ne
            got = fo.tensor_bytes(name)
            if to.ggml_type == ti.ggml_type:
                np.testing.assert_array_equal(got, fi.tensor_bytes(name))  # copied byte for byte
            else:
                want = _expected(fi.tensor_bytes(name), ti.ggml_type, to.ggml_type, ti.shape)
                np.testing.assert_array_equal(got, want.reshape(-1).view(np.uint8), err_msg=name)


def test_requantising_a_quantised_file_goes_through_exact_dequantisation(src, tmp_path):
    q51 = quantize_file(src, tmp_path / "q51.gguf", "Q5_1").path
    q40 = quantize_file(q51, tmp_path / "q40.gguf", "Q4_0").path
    with open_gguf(q51) as fi, open_gguf(q40) as fo:
        ti, to = fi.tensors["blk.0.attn_q.weight"], fo.tensors["blk.0.attn_q.weight"]
        assert (ti.ggml_type, to.ggml_type) == (T.Q5_1, T.Q4_0)
        want = _expected(fi.tensor_bytes(ti.name), T.Q5_1, T.Q4_0, ti.shape)
        np.testing.assert_array_equal(fo.tensor_bytes(to.name), want.reshape(-1))


def test_llama_quantize_type_rules(src, tmp_path):
    t = _types(quantize_file(src, tmp_path / "a.gguf", "q4_0").path)
    assert t["output_norm.weight"] == t["blk.0.attn_norm.weight"] == "F32"  # norms / 1-D keep their type
    assert t["blk.0.attn_q.weight"] == "Q4_0"
    assert t["blk.0.ffn_down.weight"] == "F16"  # 48 columns: no 32-block fits -> F16
    assert t["token_embd.weight"] == "Q8_0"  # tied embedding: llama.cpp's Q6_K slot, which we write as Q8_0
    # With a separate output.weight, token_embd is an ordinary tensor and output gets the Q8_0.
    tensors = llama_tensors()
    tensors["output.weight"] = tensors["token_embd.weight"].copy()
    untied = write_llama(tmp_path / "untied.gguf", tensors=tensors)
    t = _types(quantize_file(untied, tmp_path / "b.gguf", "Q5_0").path)
    assert (t["token_embd.weight"], t["output.weight"]) == ("Q5_0", "Q8_0")
    # --keep-embeddings and --tensor-type (first matching pattern wins; a misfit still falls back).
    r = quantize_file(src, tmp_path / "c.gguf", "Q4_0", keep_embeddings="f16",
                      tensor_types=("ATTN_[QK]=q8_0", "attn_q=q5_1", "ffn_down=q8_0", r"blk\.1\.ffn_up=bf16"))
    t = _types(r.path)
    assert t["token_embd.weight"] == "F16"
    assert t["blk.0.attn_q.weight"] == t["blk.1.attn_k.weight"] == "Q8_0"
    assert t["blk.0.attn_v.weight"] == "Q4_0"
    assert t["blk.0.ffn_down.weight"] == "F16" and t["blk.1.ffn_up.weight"] == "BF16"
    assert t["blk.0.ffn_up.weight"] == "Q4_0"
    notes = {p.info.name: p.note for p in r.plans if p.note}
    assert set(notes) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    # A float target converts every quantisable tensor and ignores --tensor-type, as llama.cpp.
    t = _types(quantize_file(src, tmp_path / "d.gguf", "BF16", tensor_types=("attn_q=q8_0",)).path)
    assert t["blk.0.attn_q.weight"] == t["token_embd.weight"] == t["blk.0.ffn_down.weight"] == "BF16"
    assert t["output_norm.weight"] == "F32"


def test_metadata_is_copied_in_order(src, tmp_path):
    out = quantize_file(src, tmp_path / "m.gguf", "Q8_0").path
    with open_gguf(src) as fi, open_gguf(out) as fo:
        assert [k for k in fo.metadata if k not in ("general.file_type", "general.quantization_version")] \
            == list(fi.metadata)
        for k, v in fi.metadata.items():
            w = fo.metadata[k]
            assert (np.array_equal(v, w) if isinstance(v, np.ndarray) else v == w), k
            assert fo.metadata_types[k] == fi.metadata_types[k], k
        assert fo.metadata["general.file_type"] == 7 and fo.metadata["general.quantization_version"] == 2


def test_empty_metadata_arrays_survive(tmp_path):
    from gguf import GGUFValueType as V

    w = _Writer(tmp_path / "e.gguf", "llama")
    w.add_key_value("tokenizer.ggml.merges", [], V.ARRAY, sub_type=V.STRING)
    for name, arr in llama_tensors().items():
        w.add_tensor(name, arr)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = quantize_file(tmp_path / "e.gguf", tmp_path / "e8.gguf", "Q8_0").path
    with open_gguf(out) as f:
        assert f.metadata["tokenizer.ggml.merges"] == []


def test_bad_input_is_one_clear_error_and_nothing_is_written(src, tmp_path, monkeypatch):
    out = tmp_path / "o.gguf"
    with pytest.raises(GGUFError, match="cannot open"):
        quantize_file(tmp_path / "missing.gguf", out, "Q8_0")
    for bad in ("Q4_K", "q7", ""):
        with pytest.raises(RequestError, match="unsupported type"):
            quantize_file(src, out, bad)
    with pytest.raises(RequestError, match="bad regular expression"):
        quantize_file(src, out, "Q8_0", tensor_types=("attn_(q=q8_0",))
    with pytest.raises(RequestError, match="REGEX=TYPE"):
        quantize_file(src, out, "Q8_0", tensor_types=("attn_q",))
    with pytest.raises(RequestError, match="--keep-embeddings"):
        quantize_file(src, out, "Q8_0", keep_embeddings="iq4_xs")
    before = src.read_bytes()
    with pytest.raises(RequestError, match="is the input"):
        quantize_file(src, src, "Q8_0")
    assert src.read_bytes() == before
    # A failure halfway through the tensor data leaves neither OUT nor a partial file.
    import qatserve.quantize as qmod

    calls = {"n": 0}
    real = qmod.blocks.quantize

    def flaky(x, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(x, qtype)

    monkeypatch.setattr(qmod.blocks, "quantize", flaky)
    with pytest.raises(RequestError, match="No space left"):
        quantize_file(src, out, "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
