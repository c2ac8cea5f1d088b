"""`qatserve quantize` and `qatserve audit` end to end on a tiny llama with a character vocabulary."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from qatserve.audit import RefFile, run_audit
from qatserve.cli import main
from qatserve.quantize import quantize_file
from tests.tiny_gguf import llama_tensors, write_llama

CTX = 64


def char_vocab() -> dict:
    """64 SentencePiece pieces: controls, '▁', letters and '▁'+letter, a few merges."""
    chars = list("abcdefghijklmnopqrstuvwxyz.,")
    toks = ["<unk>", "<s>", "</s>", "\u2581"] + chars + ["\u2581" + c for c in chars] + ["th", "he", "at", "\u2581the"]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": toks,
            "tokenizer.ggml.scores": [0.0] * 3 + [-float(i) for i in range(61)],
            "tokenizer.ggml.token_type": [2, 3, 3] + [1] * 61, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    model = write_llama(d / "m.gguf", meta=char_vocab(), tensors=llama_tensors(seed=3))
    q8 = quantize_file(model, d / "q8.gguf", "Q8_0").path
    rng = random.Random(0)
    words = "the cat sat on a mat and then a dog ran far away.".split()
    text = d / "text.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(260)) + "\n")
    return {"dir": d, "model": model, "q8": q8, "text": text}


def test_self_reference_gives_zero_kld_and_q8_a_small_positive_one(files):
    same = run_audit(files["model"], files["model"], files["text"], n_ctx=CTX)
    assert same.count >= 100  # enough tokens for llama.cpp's summary
    # Only the 16-bit coding of the reference log-probs separates the two: |KLD| ~ 1e-6.
    assert abs(same.kld[0]) < 1e-5 and same.kld_pct["max"] < 1e-4
    assert same.ratio[0] == pytest.approx(1.0, abs=1e-5)
    assert same.same_top[0] == 1.0 and same.right_to_wrong == same.wrong_to_right == 0
    q8 = run_audit(files["q8"], files["model"], files["text"], n_ctx=CTX)
    assert q8.count == same.count and q8.ppl_base == same.ppl_base
    assert 1e-5 < q8.kld[0] < 1e-2 and q8.kld[0] > 10 * abs(same.kld[0])
    assert 0.9 < q8.same_top[0] <= 1.0


def test_saved_reference_reproduces_the_audit_and_is_llama_cpp_shaped(files):
    ref = files["dir"] / "ref.kld"
    first = run_audit(files["q8"], files["model"], files["text"], n_ctx=CTX, chunks=3, save_ref=ref)
    rf = RefFile(ref)
    assert (rf.n_ctx, rf.n_vocab, rf.n_chunk) == (CTX, 64, 3) and rf.tokens[0] == 1  # BOS from the tokenizer
    again = run_audit(files["q8"], ref)  # no text needed: the file holds the tokens
    assert again.format() == first.format()
    assert np.array_equal(again.kld_values, first.kld_values)
    two = run_audit(files["q8"], ref, chunks=2)
    assert two.count == 2 * (CTX - 1 - CTX // 2)


def qatserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qatserve", *args], capture_output=True, text=True, timeout=300)


def test_cli_quantize_then_audit_with_plot(files, tmp_path):
    q4 = tmp_path / "q4.gguf"
    proc = qatserve("quantize", str(files["model"]), str(q4), "q4_0", "--tensor-type", "attn_v=q8_0")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and "Q4_0" in proc.stderr and proc.stdout == ""
    png = tmp_path / "kld.png"
    proc = qatserve("audit", "-m", str(q4), "--ref", str(files["model"]), "-f", str(files["text"]),
                    "-c", str(CTX), "--chunks", "4", "--plot", str(png), "-t", "1")
    assert proc.returncode == 0, proc.stderr
    for line in ("Mean PPL(Q)/PPL(base)         :", "Mean    KLD:", "Median  KLD:", "99.0%   KLD:",
                 "RMS Δp    :", "Same top p:", "Flips"):
        assert line in proc.stdout, line
    assert "chunk             PPL" in proc.stderr and "   4    " in proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_line(capsys, code: int, argv: list[str], *needles: str) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qatserve: error: "), err
    for n in needles:
        assert n in err[0]


def test_expected_failures_are_one_line(files, tmp_path, capsys):
    m, t = str(files["model"]), str(files["text"])
    _one_line(capsys, 64, ["audit", "-m", m, "--ref", m, "-f", t, "-ctk", "q5_1"], "q5_1", "unknown KV cache type")
    _one_line(capsys, 64, ["audit", "-m", m, "--ref", m, "-f", t, "-ctv", "q5_9"], "unknown KV cache type")
    _one_line(capsys, 2, ["audit", "-m", m, "--ref", str(tmp_path / "none.gguf"), "-f", t], "none.gguf")
    _one_line(capsys, 64, ["audit", "-m", m, "--ref", m], "-f TEXT")
    _one_line(capsys, 64, ["audit", "-m", m, "--ref", m, "-f", str(tmp_path / "no.txt")], "no.txt")
    _one_line(capsys, 64, ["audit", "-m", m, "--ref", m, "-f", t, "-c", "4096"], "at least 8192")
    _one_line(capsys, 64, ["quantize", m, str(tmp_path / "x.gguf"), "q4_k"], "q4_k")
    _one_line(capsys, 64, ["quantize", m, m, "q8_0"], "is the input")
    _one_line(capsys, 2, ["quantize", str(tmp_path / "none.gguf"), str(tmp_path / "x.gguf"), "q8_0"], "none.gguf")
    assert not (tmp_path / "x.gguf").exists()
