"""Interop with llama.cpp on tiny random Gemma 3 / Gemma 4 models (dense K=V, PLE + KV sharing, MoE).

Fixtures (tests/fixtures/llamacpp-interop/, recorded once by tests/fixtures/make_llamacpp_interop.py with the
llama.cpp build they name): llama.cpp's log-softmax at every prompt position on the GGUF qatserve wrote, and
the GGUF llama.cpp's own convert_hf_to_gguf.py wrote for the same seeded model. No llama.cpp needed here.
(a) qatserve's file: llama.cpp's logits = qatserve's (log-softmax within 1e-3), and the file equals
    llama.cpp's conversion (same metadata bar a named few keys, bit-identical tensors, same vocabulary).
(b) llama.cpp's file: qatserve loads it and gives transformers' logits (1e-4) and llama.cpp's (1e-3).
Both files tokenise a sample text to the ids llama.cpp's tokenizer gave.

llama.cpp ran with float32 K/V and no flash attention, so its one departure from float32 math is the CPU
GELU, which reads an fp16 table (GGML_GELU_FP16: input and output rounded to fp16). On these models that
alone moves log-probs by up to ~7e-3, so the 1e-3 comparisons run qatserve with that same GELU
(`ggml_gelu`); with exact GELU the recorded gap is bounded separately (EXACT_GELU_GAP).
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from qatserve.convert.hf_to_gguf import convert  # noqa: E402
from qatserve.engine.generate import Generator  # noqa: E402
from qatserve.engine.loader import load_model_file  # noqa: E402
from qatserve.formats.gguf_reader import open_gguf  # noqa: E402
from tests.llamacpp_interop import FIXTURES, MODELS, VOCAB, build, hf_logits, load_fixture, tokens  # noqa: E402

NAMES = sorted(MODELS)
EXACT_GELU_GAP = 1e-2
# Metadata the two converters write differently on purpose (value, or presence):
KNOWN_DIFFERENCES = {
    "gemma3.rope.freq_base_swa",  # llama.cpp writes the default 10000; qatserve only a non-default base
    "gemma3.vocab_size",  # qatserve writes it; llama.cpp reads the token list's length
    # llama.cpp's converter omits it when HF has no soft-cap, and its loader then applies 30 (the
    # gemma4-ple model): qatserve writes 0 so that the file means what the checkpoint does.
    "gemma4.final_logit_softcapping",
}


@pytest.fixture
def ggml_gelu(monkeypatch):
    """torch's GELU -> llama.cpp's CPU GELU (fp16 table), for every caller of F.gelu (Gemma's gated MLP,
    Gemma 4's per-layer-input gate)."""
    from qatserve.quant.kernels.ggml_numerics import gelu_fp16_table

    def gelu(x, approximate="none"):
        assert approximate == "tanh", "Gemma uses the tanh GELU"
        return gelu_fp16_table(x)

    monkeypatch.setattr(torch.nn.functional, "gelu", gelu)


def _rows(fx: dict, key: str) -> torch.Tensor:
    a = np.frombuffer(base64.b64decode(fx[key]), dtype="<f4").reshape(len(fx["tokens"]), VOCAB)
    return torch.from_numpy(a.astype(np.float64))


def _run(path, ids):
    """(logits [T, V] float32, tokenizer) of qatserve on one GGUF."""
    loaded = load_model_file(path, backend="torch")
    try:
        return Generator(loaded.model, None, n_ctx=128, prefill_chunk=8).logits_all(ids), loaded.tokenizer
    finally:
        loaded.gguf.close()


def _metadata(path) -> dict:
    f = open_gguf(path)
    try:
        meta = {k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in f.metadata.items()
                if not k.startswith("general.")}
        tensors = {n: (t.ggml_type, tuple(t.ne), bytes(f.tensor_bytes(n))) for n, t in f.tensors.items()}
        return {"meta": meta, "tensors": tensors}
    finally:
        f.close()


@pytest.fixture(scope="module", params=NAMES)
def case(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    model = build(name, tmp / "hf")
    ids = tokens(name)
    fx = load_fixture(name)
    assert fx["tokens"] == ids, "the seeded prompt changed: re-record the fixtures"
    return name, model, ids, fx, convert(tmp / "hf", tmp / "qatserve.gguf")


def test_qatserve_gguf_gives_transformers_logits(case):
    """qatserve on its own file = transformers (1e-4); llama.cpp's recorded log-probs on that file are
    within EXACT_GELU_GAP of it (the fp16-table GELU); the vocabulary tokenises as llama.cpp's does."""
    name, model, ids, fx, path = case
    got, tok = _run(path, ids)
    torch.testing.assert_close(got, hf_logits(model, ids), atol=1e-4, rtol=0)
    gap = (torch.log_softmax(got.double(), -1) - _rows(fx, "llamacpp_on_qatserve_gguf")).abs().max().item()
    assert gap < EXACT_GELU_GAP, gap
    assert tok is not None
    for sample in fx["tokenize"]:
        assert tok.encode(sample["text"]) == sample["ids"], sample["text"]


def test_qatserve_gguf_gives_llamacpp_logits(case, ggml_gelu):
    """(a) llama.cpp on qatserve's file, recorded, = qatserve on the same file with llama.cpp's GELU."""
    name, _, ids, fx, path = case
    got, _ = _run(path, ids)
    ref = _rows(fx, "llamacpp_on_qatserve_gguf")
    torch.testing.assert_close(torch.log_softmax(got.double(), -1), ref, atol=1e-3, rtol=0)


def test_qatserve_gguf_equals_llamacpp_conversion(case):
    """Same metadata (bar KNOWN_DIFFERENCES), vocabulary and bit-identical tensors as llama.cpp's converter."""
    name, _, _, _, path = case
    ours, theirs = _metadata(path), _metadata(FIXTURES / f"{name}.llamacpp.gguf")
    keys = (set(ours["meta"]) | set(theirs["meta"])) - KNOWN_DIFFERENCES
    diff = {k: (ours["meta"].get(k), theirs["meta"].get(k)) for k in keys
            if ours["meta"].get(k) != theirs["meta"].get(k)}
    assert not diff, {k: (str(a)[:60], str(b)[:60]) for k, (a, b) in diff.items()}
    assert set(ours["tensors"]) == set(theirs["tensors"])
    for n, t in ours["tensors"].items():
        assert t[:2] == theirs["tensors"][n][:2], n
        assert t[2] == theirs["tensors"][n][2], f"{n}: data differs"


def test_llamacpp_gguf_loads_in_qatserve(case):
    """(b) qatserve on llama.cpp's file gives transformers' logits (1e-4) and tokenises as llama.cpp."""
    name, model, ids, fx, _ = case
    got, tok = _run(FIXTURES / f"{name}.llamacpp.gguf", ids)
    ref = hf_logits(model, ids)
    if name.startswith("gemma4") and MODELS[name][2]["final_logit_softcapping"] is None:
        # llama.cpp's converter drops the key when HF has no soft-cap, and llama.cpp's loader then caps
        # at 30; qatserve reads the file as llama.cpp does.
        ref = 30.0 * torch.tanh(ref / 30.0)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert tok is not None
    for sample in fx["tokenize"]:
        assert tok.encode(sample["text"]) == sample["ids"], sample["text"]


def test_llamacpp_gguf_gives_llamacpp_logits_in_qatserve(case, ggml_gelu):
    """(b) qatserve on llama.cpp's file = llama.cpp on it (recorded), with llama.cpp's GELU."""
    name, _, ids, fx, _ = case
    got, _ = _run(FIXTURES / f"{name}.llamacpp.gguf", ids)
    key = "llamacpp_on_llamacpp_gguf" if "llamacpp_on_llamacpp_gguf" in fx else "llamacpp_on_qatserve_gguf"
    torch.testing.assert_close(torch.log_softmax(got.double(), -1), _rows(fx, key), atol=1e-3, rtol=0)


def test_fixtures_name_the_build():
    for name in NAMES:
        fx = load_fixture(name)
        assert fx["llama_cpp_build"] and fx["model"]["weight_seed"] == MODELS[name][3]
