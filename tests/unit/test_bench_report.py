"""`qatserve bench` figures and rendering from fixed measurements: the per-request figures from a timings
block, the concurrent window rate, the summary over runs, and the markdown / JSON / plot of a result."""

from __future__ import annotations

import json

import pytest

from qatserve.bench.client import Completion
from qatserve.bench.measure import aggregate_rate, single_figures
from qatserve.bench.report import markdown, write_json
from qatserve.bench.runner import summarise


def test_single_figures_from_timings():
    # 11 tokens out (1 from the prompt's forward + 10 from decode forwards) in 2 s, 8 drafted, 6 accepted.
    t = {"prompt_n": 1150, "prompt_ms": 2300.0, "predicted_n": 11, "predicted_ms": 2000.0,
         "draft_n": 8, "draft_n_accepted": 6, "predicted_per_second": 999.0}
    f = single_figures(t)
    assert f["prefill_tps"] == pytest.approx(500.0)
    assert f["adjusted_tps"] == pytest.approx(5.0)  # (11 - 1) / 2 s, not the server's own figure
    assert f["decode_tps"] == pytest.approx(6.0)  # + 2 rejected rows
    assert f["acceptance"] == pytest.approx(0.75)
    assert f["wall_s"] == pytest.approx(1150 / 500 + 2000 / 5)
    plain = single_figures({"prompt_n": 10, "prompt_ms": 100.0, "predicted_n": 5, "predicted_ms": 400.0})
    assert plain["acceptance"] is None and plain["decode_tps"] == plain["adjusted_tps"] == pytest.approx(10.0)
    assert single_figures({"prompt_n": 10, "prompt_ms": 100.0, "predicted_n": 1, "predicted_ms": 0.0})["wall_s"] is None


def test_aggregate_rate_counts_the_window_where_all_decode():
    a = Completion({}, 0.0, 5, [(1.0, 1), (2.0, 1), (3.0, 2), (4.0, 1), (9.0, 1)])
    b = Completion({}, 0.0, 4, [(2.5, 1), (3.5, 1), (5.0, 2), (6.0, 1)])
    # Window (2.5, 6.0]: a has 3.0 (2) + 4.0 (1), b has 3.5 (1) + 5.0 (2) + 6.0 (1) -> 7 tokens in 3.5 s.
    assert aggregate_rate([a, b]) == pytest.approx(7 / 3.5)
    late = Completion({}, 0.0, 1, [(10.0, 1), (11.0, 1)])
    assert aggregate_rate([a, late]) is None  # never decoding at the same time
    assert aggregate_rate([a, Completion({}, 0.0, 0, [])]) is None


def _run(scale: float, **kw) -> dict:
    f = {"load_s": 4.0 * scale, "prefill_tps": 500.0 * scale, "decode_tps": 50.0 * scale, "adjusted_tps": 40.0 * scale,
         "wall_s": 52.3 / scale, "aggregate_tps": 70.0 * scale, "acceptance": None}
    f.update(kw)
    return f


def _cell(runs: list[dict], **extra) -> dict:
    return {"runs": runs, "summary": summarise(runs), "argv": ["srv", "--port", "0"], **extra}


@pytest.fixture()
def data() -> dict:
    q = [_run(1.0, acceptance=0.5), _run(1.1, acceptance=0.6), _run(0.9, acceptance=0.4)]
    p = [_run(2.0, acceptance=0.8)] * 3
    return {
        "command": "qatserve bench -r 3 f16 lookup np=1 lookup,draft-max=auto --peer llama-server=/x",
        "model": "/m/gemma.gguf", "model_context": 32768, "n_prompt": 1150, "n_gen": 64, "ref_prompt": 1150,
        "ref_gen": 2000, "threads": 2, "reps": 3,
        "servers": {"qatserve": {"version": "0.1.0"}, "llama.cpp": {"path": "/x", "version": "b1"}},
        "machine": {"cpus": 2, "loadavg_start": [1.0, 1, 1], "loadavg_end": [2.5, 1, 1]},
        "notes": ["a note"],
        "lanes": [
            {"lane": "f16", "slots": 2, "results": {"qatserve": _cell([_run(1.0)] * 3),
                                                    "llama.cpp": _cell([], error="llama-server exited with code 1")}},
            {"lane": "lookup", "slots": 2, "results": {"qatserve": _cell(q), "llama.cpp": _cell(p)}},
            {"lane": "np=1", "slots": 1, "results": {"qatserve": _cell([_run(1.0, aggregate_tps=None)] * 3),
                                                     "llama.cpp": _cell([_run(1.0, aggregate_tps=None)] * 3)}},
            {"lane": "lookup,draft-max=auto", "slots": 2,
             "results": {"qatserve": _cell([_run(1.0)] * 3), "llama.cpp": {"runs": [], "unsupported": "no auto"}}},
        ],
        "sweep": {"base": "lookup", "draft_max": [1, 2], "rows": [
            {"draft_max": 1, "lane": "lookup,draft-max=1",
             "results": {"qatserve": _cell([_run(1.0, acceptance=0.7)] * 3), "llama.cpp": _cell([_run(2.0)] * 3)}},
            {"draft_max": 2, "lane": "lookup,draft-max=2",
             "results": {"qatserve": _cell([_run(1.0, acceptance=0.6)] * 3), "llama.cpp": _cell([], error="boom")}},
        ]},
    }


def _rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_markdown_table(data):
    text = markdown(data)
    header = _rows(text, "lane")[0]
    assert header == ["lane", "server", "load-to-listening (s)", "prefill tok/s", "decode tok/s", "wall 1150+2000 (s)",
                      "2-slot aggregate decode tok/s", "draft acceptance", "acceptance-adjusted decode tok/s"]
    lookup = _rows(text, "`lookup`")
    assert [r[1] for r in lookup] == ["qatserve", "llama.cpp", "ratio qatserve / llama.cpp"]
    # Median and min–max over the 3 runs; the ratio of medians per column.
    assert lookup[0][3] == "500 (450–550)" and lookup[0][7] == "50.0% (40.0%–60.0%)"
    assert lookup[1][3] == "1000" and lookup[1][7] == "80.0%"
    assert lookup[2][2:] == ["0.50×", "0.50×", "0.50×", "2.00×", "0.50×", "0.62×", "0.50×"]
    f16 = _rows(text, "`f16`")
    assert f16[1][2:] == ["failed [1]"] * 7 and f16[2][2:] == ["—"] * 7
    assert "[1] f16 on llama.cpp: llama-server exited with code 1" in text
    assert _rows(text, "`np=1`")[0][6] == "— (1 slot)"
    auto = _rows(text, "`lookup,draft-max=auto`")
    assert auto[1][2].startswith("n/a [2]") and "[2] lookup,draft-max=auto on llama.cpp: not run: no auto" in text
    assert text.startswith(f"`{data['command']}`") and "load average 1.0 → 2.5" in text and "a note" in text


def test_markdown_sweep(data):
    rows = _rows(markdown(data), "1") + _rows(markdown(data), "2")
    assert rows[0] == ["1", "50.0", "70.0%", "40.0", "100", "—", "80.0", "0.50×"]
    assert rows[1][4:7] == ["failed [3]"] * 3 and rows[1][7] == "—"


def test_json_round_trip(data, tmp_path):
    path = tmp_path / "bench.json"
    write_json(data, path)
    assert markdown(json.loads(path.read_text())) == markdown(data)


def test_plot(data, tmp_path):
    import matplotlib.image

    from qatserve.bench.plot import plot

    out = plot(data, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 200_000
    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (int(3 * 3.2 * 90), 900)  # 3 rows of panels (the sweep adds one), 10 in wide, 90 dpi
    no_sweep = dict(data, sweep=None)
    assert matplotlib.image.imread(plot(no_sweep, tmp_path / "b2.png")).shape[0] == int(2 * 3.2 * 90)
