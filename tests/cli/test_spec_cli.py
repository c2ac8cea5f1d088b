"""`qatserve run` with speculative decoding, as a user runs it: prompt lookup under llama.cpp's current
and older flag names prints exactly the plain greedy text; bad flags are one line and an exit code."""

from __future__ import annotations

from qatserve.engine.llm import LLM
from qatserve.engine.loader import load_model_file
from qatserve.engine.sampler import SamplingParams
from tests.cli.test_cli import _one_line_error, qatserve
from tests.engine.spec_util import one_thread

PROMPT = "red, green, blue, red, green, blue, red, green, blue, red,"


def test_lookup_prints_the_plain_text_under_both_flag_names(gemma_path):
    loaded = load_model_file(gemma_path)
    with one_thread():  # as the command with -t 1: the same engine, the same kernels
        want = LLM(loaded).generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0].text
    loaded.gguf.close()
    for flags in (["--lookup", "--draft-max", "auto"],
                  ["--spec-type", "ngram-simple", "--spec-draft-n-max", "3", "--spec-draft-n-min", "1"]):
        proc = qatserve("run", "-t", "1", "-n", "12", "--temp", "0", *flags, PROMPT)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == want + "\n"
        assert "qatserve: draft (ngram-simple)" in proc.stderr and "accepted" in proc.stderr


def test_speculative_flag_errors(gemma_path):
    _one_line_error(qatserve("run", "--lookup", "--draft-max", "many", PROMPT), 64, "--draft-max", "integer")
    _one_line_error(qatserve("run", "--draft-min", "2", PROMPT), 64, "needs a drafter")
    # The assistant binds to the loaded target, so this error comes after the "loaded" line: a Gemma 3 file
    # is no MTP assistant.
    proc = qatserve("run", "--assistant", str(gemma_path), PROMPT)
    assert proc.returncode == 3 and proc.stdout == "" and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qatserve: error: ") and "MTP assistant" in last
