"""The `qatserve` command as a user runs it: real processes, real files, stdout/stderr/exit codes."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np

from qatserve.engine.generate import Generator
from qatserve.engine.loader import load_model_file
from qatserve.engine.sampler import SamplingParams
from tests.tiny_gguf import llama_tensors, write_llama

PROMPT = "Paris is the capital of"


def qatserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qatserve", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qatserve: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for n in needles:
        assert n in lines[0]


def test_run_streams_exactly_the_generated_text(gemma_path):
    proc = qatserve("run", "-n", "12", "--temp", "0", PROMPT)
    assert proc.returncode == 0, proc.stderr
    loaded = load_model_file(gemma_path)
    want = Generator(loaded.model, loaded.tokenizer, n_ctx=4096).generate(
        loaded.tokenizer.encode(PROMPT), SamplingParams(temperature=0, max_tokens=12))
    assert want.text and proc.stdout == want.text + "\n"  # only the continuation, no prompt echo
    assert "tok/s" in proc.stderr and "loaded" in proc.stderr


def test_run_reads_stdin_and_seeded_sampling_is_reproducible():
    a = qatserve("run", "-n", "8", "--temp", "1.0", "-s", "1234", stdin="Once upon a time")
    b = qatserve("run", "-n", "8", "--temp", "1.0", "-s", "1234", "-", stdin="Once upon a time")
    c = qatserve("run", "-n", "8", "--temp", "1.0", "-s", "1234", "Once upon a time")
    d = qatserve("run", "-n", "8", "--temp", "1.0", "-s", "4321", "Once upon a time")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    assert a.stdout == b.stdout == c.stdout and a.stdout.strip()
    assert d.stdout != a.stdout  # the seed matters


def test_chat_uses_the_template(smollm_path):
    proc = qatserve("run", "-m", str(smollm_path), "--chat", "-n", "16", "--temp", "0", "--verbose-prompt",
                    "What is 2+2?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    # ChatML from the file's template: <|im_start|> is token 1 in SmolLM2's vocabulary.
    assert "prompt tokens [1, " in proc.stderr


def test_ignore_eos_generates_exactly_n(smollm_path):
    # SmolLM2-Instruct ends this answer with <|im_end|> after ~24 tokens; --ignore-eos bans the
    # end-of-generation tokens (llama.cpp's flag), so the same greedy run goes on to -n and starts alike.
    args = ("run", "-m", str(smollm_path), "--chat", "-n", "48", "--temp", "0", "Say hello.")
    plain, full = qatserve(*args), qatserve(*args, "--ignore-eos")
    assert plain.returncode == full.returncode == 0, plain.stderr + full.stderr
    assert "stop: stop" in plain.stderr and "generated 48 tokens" not in plain.stderr
    assert "stop: length" in full.stderr and "generated 48 tokens" in full.stderr
    assert full.stdout.startswith(plain.stdout.rstrip("\n"))


def test_missing_and_broken_model_files(tmp_path):
    _one_line_error(qatserve("run", "-m", str(tmp_path / "nope.gguf"), "hi"), 2, "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    _one_line_error(qatserve("run", "-m", str(junk), "hi"), 2)
    _one_line_error(qatserve("inspect", str(tmp_path)), 2)


def test_bad_flags_are_one_line_errors(tmp_path):
    _one_line_error(qatserve("run", "--temp", "nan", "hi"), 64, "temperature")
    _one_line_error(qatserve("run", "-n", "0", "hi"), 64, "max_tokens")
    _one_line_error(qatserve("run", "--top-p", "1.5", "hi"), 64, "top_p")
    model = write_llama(tmp_path / "novocab.gguf")
    _one_line_error(qatserve("run", "-m", str(model), "hi"), 64, "no tokenizer")


def test_inspect_shows_the_architecture(gemma_path):
    proc = qatserve("inspect", str(gemma_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("architecture      gemma3", "layers            18", "heads (q / kv)    4 / 1",
                   "sliding window    512", "token_embd.weight", "Q8_0", "Q4_K", "tokenizer.ggml.tokens = ["):
        assert needle in out, needle


def test_check_tensors_names_non_finite_scales(tmp_path):
    t = llama_tensors()
    q = t.pop("blk.0.attn_q.weight")
    raw = gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0)
    raw[3, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # row 3's scale := NaN
    path = write_llama(tmp_path / "nan.gguf", tensors=t, raw={"blk.0.attn_q.weight": (raw, gguf.GGMLQuantizationType.Q8_0)})
    proc = qatserve("inspect", "--check-tensors", str(path))
    assert proc.returncode == 1
    assert "blk.0.attn_q.weight: 32 non-finite values" in proc.stdout
    assert f"check-tensors: {len(t)}/{len(t) + 1} tensors finite" in proc.stdout
