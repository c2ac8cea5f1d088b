"""The bench result as markdown: the lane table (with the peer's row and the ratio row), the block-size
sweep, the legend and the notes. Renders the dict runner.Bench.run returns (or its JSON), nothing else.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

QATSERVE, PEER = "qatserve", "llama.cpp"

# (metric, header); the headers of load and wall say what their figure is.
COLUMNS = (("load_s", "load-to-listening (s)"), ("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"),
           ("wall_s", "wall {rp}+{rg} (s)"), ("aggregate_tps", "{slots} aggregate decode tok/s"),
           ("acceptance", "draft acceptance"), ("adjusted_tps", "acceptance-adjusted decode tok/s"))


def fmt_value(metric: str, v: float) -> str:
    if metric == "acceptance":
        return f"{100 * v:.1f}%"
    if metric.endswith("_s"):
        return f"{v:.2f}" if v < 10 else f"{v:.1f}"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_stat(metric: str, stat: dict | None, spread: bool) -> str:
    if stat is None:
        return "—"
    text = fmt_value(metric, stat["median"])
    lo, hi = fmt_value(metric, stat["min"]), fmt_value(metric, stat["max"])
    if spread and stat["n"] > 1 and lo != hi:
        text += f" ({lo}–{hi})"
    return text


class _Footnotes:
    def __init__(self):
        self.items: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.items:
            self.items.append(text)
        return f"[{self.items.index(text) + 1}]"

    def render(self) -> list[str]:
        return [f"[{i + 1}] {t}" for i, t in enumerate(self.items)]


def _cell_row(lane: dict, server: str, cell: dict, notes: _Footnotes, spread: bool) -> list[str]:
    if "unsupported" in cell:
        mark = notes.mark(f"{lane['lane']} on {server}: not run: {cell['unsupported']}")
        return [f"n/a {mark}"] * len(COLUMNS)
    summary = cell.get("summary", {})
    if "error" in cell and not summary:
        mark = notes.mark(f"{lane['lane']} on {server}: {cell['error']}")
        return [f"failed {mark}"] * len(COLUMNS)
    out = []
    for metric, _ in COLUMNS:
        if metric == "aggregate_tps" and lane.get("slots", 2) < 2:
            out.append("— (1 slot)")
        else:
            out.append(fmt_stat(metric, summary.get(metric), spread))
    if "error" in cell:  # some repetitions ran, a later one failed
        out[0] += " " + notes.mark(f"{lane['lane']} on {server}: a repetition failed: {cell['error']}")
    return out


def _ratio_row(cells: dict) -> list[str]:
    a, b = cells[QATSERVE].get("summary", {}), cells[PEER].get("summary", {})
    out = []
    for metric, _ in COLUMNS:
        x, y = a.get(metric), b.get(metric)
        out.append(f"{x['median'] / y['median']:.2f}×" if x and y and y["median"] else "—")
    return out


def _headers(data: dict) -> list[str]:
    slots = {ln.get("slots", 2) for ln in data["lanes"]} - {1}  # a 1-slot lane's cell says so itself
    agg = f"{slots.pop()}-slot" if len(slots) == 1 else "np-slot"
    return [h.format(rp=data["ref_prompt"], rg=data["ref_gen"], slots=agg) for _, h in COLUMNS]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _preamble(data: dict) -> list[str]:
    m = data.get("machine", {})
    load = ""
    if m.get("loadavg_start") and m.get("loadavg_end"):
        load = f", load average {m['loadavg_start'][0]:.1f} → {m['loadavg_end'][0]:.1f}"
    runs = f"median of {data['reps']} runs (min–max)" if data["reps"] > 1 else "1 run"
    threads = f"-t {data['threads']}" if data.get("threads") else "threads: servers' default"
    peer = data["servers"].get(PEER)
    peer_text = f"; peer llama.cpp {peer['version']}" if peer else ""
    lines = []
    if data.get("command"):
        lines.append(f"`{data['command']}`\n")
    lines.append(f"{Path(data['model']).name}, {threads}, prompt {data['n_prompt']} tokens, {data['n_gen']} "
                 f"generated per request, greedy; {runs}; qatserve {data['servers'][QATSERVE]['version']}"
                 f"{peer_text}; {m.get('cpus', '?')} CPUs{load}.\n")
    return lines


def legend(data: dict) -> list[str]:
    rp, rg = data["ref_prompt"], data["ref_gen"]
    return [
        "load-to-listening: process spawn to the first /health 200. prefill: the request's "
        "`timings` prompt_n / prompt_ms. decode: target rows verified per second of the decode phase "
        "(tokens from decode forwards + rejected drafts; = generated tok/s without a drafter). "
        "acceptance-adjusted decode: the tokens that reach the user per second, (predicted_n − 1) / "
        "predicted_ms, as llama.cpp's predicted_per_second (the first token comes from the prompt's forward). "
        f"wall {rp}+{rg}: normalised, {rp} / prefill + {rg} / acceptance-adjusted decode, whatever "
        "--n-prompt/--n-gen the rates were measured with. aggregate: np requests streamed at once, tokens of "
        "all per second while all were decoding. draft acceptance: accepted / drafted tokens. "
        "Ratio row: qatserve's median / llama.cpp's (above 1 is better for the rates, below 1 for load and wall)."]


def markdown(data: dict) -> str:
    spread = data["reps"] > 1
    notes = _Footnotes()
    servers = list(data["servers"])
    rows = []
    for lane in data["lanes"]:
        cells = lane["results"]
        for server in servers:
            rows.append([f"`{lane['lane']}`", server, *_cell_row(lane, server, cells[server], notes, spread)])
        if PEER in cells:
            rows.append([f"`{lane['lane']}`", "ratio qatserve / llama.cpp", *_ratio_row(cells)])
    lines = _preamble(data) + _table(["lane", "server", *_headers(data)], rows)
    lines += [""] + legend(data)
    if data.get("sweep"):
        lines += ["", *sweep_markdown(data, notes, spread)]
    extra = [*data.get("notes", []), *notes.render()]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines) + "\n"


def sweep_markdown(data: dict, notes: _Footnotes | None = None, spread: bool = False) -> list[str]:
    sw = data["sweep"]
    notes = notes or _Footnotes()
    servers = list(data["servers"])
    header = ["draft-max"]
    for s in servers:
        header += [f"{s} decode tok/s", f"{s} acceptance", f"{s} adjusted tok/s"]
    if PEER in servers:
        header.append("adjusted ratio")
    rows = []
    for row in sw["rows"]:
        r = [str(row["draft_max"])]
        for s in servers:
            cell = row["results"][s]
            lane = {"lane": row["lane"], "slots": 1}
            if "unsupported" in cell or ("error" in cell and not cell.get("summary")):
                r += _cell_row(lane, s, cell, notes, spread)[:3]
                continue
            summ = cell.get("summary", {})
            r += [fmt_stat(m, summ.get(m), spread) for m in ("decode_tps", "acceptance", "adjusted_tps")]
        if PEER in servers:
            a = row["results"][QATSERVE].get("summary", {}).get("adjusted_tps")
            b = row["results"][PEER].get("summary", {}).get("adjusted_tps")
            r.append(f"{a['median'] / b['median']:.2f}×" if a and b else "—")
        rows.append(r)
    return [f"Block-size sweep of `{sw['base']}` (single request, decode vs acceptance):\n", *_table(header, rows)]


def command_lines(data: dict) -> list[str]:
    """Each server's exact command line per lane (port 0 = the free port taken at run time)."""
    out = []
    for lane in data["lanes"]:
        for server, cell in lane["results"].items():
            if "argv" in cell:
                env = " ".join(f"{k}={v}" for k, v in cell.get("env", {}).items())
                out.append(f"{lane['lane']} / {server}: {(env + ' ') if env else ''}{shlex.join(cell['argv'])}")
    return out


def write_json(data: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
