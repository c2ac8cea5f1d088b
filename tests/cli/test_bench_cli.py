"""`qatserve bench` as a user runs it: a real `qatserve serve` on the default model with tiny sizes, the
table on stdout, the JSON and the plot; the llama.cpp peer when a binary is given
(QATSERVE_TEST_LLAMA_SERVER=/path/to/llama-server); bad flags and lanes are one line and an exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cli.test_cli import _one_line_error, qatserve

PEER = os.environ.get("QATSERVE_TEST_LLAMA_SERVER")
COLUMNS = 9  # lane, server, and the seven figures


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qatserve", "bench", *args], capture_output=True, text=True,
                          timeout=900)


def table_rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| `")]


def positive(cell: str) -> float:
    value = float(cell.rstrip("%×"))
    assert value > 0, cell
    return value


def test_bench_errors(tmp_path):
    _one_line_error(qatserve("bench", "f17"), 64, "lane 'f17'", "did you mean 'f16'")
    _one_line_error(qatserve("bench", "lookup,draft-max=0"), 64, "draft-max must be 1..64")
    _one_line_error(qatserve("bench", "--peer", "ollama=/bin/true"), 64, "expected llama-server=PATH")
    _one_line_error(qatserve("bench", "--peer", f"llama-server={tmp_path}/none"), 64, "no such file")
    _one_line_error(qatserve("bench", "-p", "10"), 64, "--n-prompt must be at least 64")
    _one_line_error(qatserve("bench", "--plot", str(tmp_path / "p.txt")), 64, "must end in .png")
    _one_line_error(qatserve("bench", "--json", str(tmp_path / "no" / "b.json")), 64, "does not exist")
    _one_line_error(qatserve("bench", "--sweep", "np=1..2"), 64, "only draft-max can be swept")
    _one_line_error(qatserve("bench", "-m", str(tmp_path / "none.gguf")), 64, "no such file")


def test_bench_runs_the_real_server(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = bench("-t", "1", "-p", "96", "-n", "8", "lookup", "--json", str(out_json), "--plot", str(out_png))
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert [r[:2] for r in rows] == [["`lookup`", "qatserve"]]
    row = rows[0]
    assert len(row) == COLUMNS
    load, prefill, decode, wall, aggregate, adjusted = (positive(c) for i, c in enumerate(row[2:]) if i != 5)
    assert decode >= adjusted  # rows verified include the rejected drafts
    assert wall == pytest.approx(1150 / prefill + 2000 / adjusted, rel=0.02)  # the normalised workload
    assert "qatserve bench: lookup · qatserve · run 1/1: load" in proc.stderr

    data = json.loads(out_json.read_text())
    assert (data["n_prompt"], data["n_gen"], data["reps"]) == (96, 8, 1)
    cell = data["lanes"][0]["results"]["qatserve"]
    run = cell["runs"][0]
    assert run["prompt_n"] == 96 and run["predicted_n"] == 8  # the exact prompt ids; no prefix cache reuse
    assert run["aggregate_predicted_n"] == [8, 8]
    assert "--lookup" in cell["argv"] and cell["argv"][cell["argv"].index("-np") + 1] == "2"
    # The code-edit prompt: its continuation repeats the module, which prompt lookup drafts from.
    assert run["draft_n"] > 0 and row[7] == f"{100 * run['acceptance']:.1f}%"
    assert run["draft_n_accepted"] == round(run["acceptance"] * run["draft_n"])
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not PEER, reason="set QATSERVE_TEST_LLAMA_SERVER to a llama-server binary")
def test_bench_beside_llama_server():
    proc = bench("-t", "1", "-p", "96", "-n", "8", "ctk=q8_0,ctv=q8_0", "--peer", f"llama-server={PEER}")
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert [r[1] for r in rows] == ["qatserve", "llama.cpp", "ratio qatserve / llama.cpp"]
    ours, theirs, ratio = ([positive(c) for i, c in enumerate(r[2:]) if i != 5] for r in rows)
    for a, b, r in zip(ours, theirs, ratio):
        assert r == pytest.approx(a / b, rel=0.05, abs=0.01)  # of the printed (rounded) medians
