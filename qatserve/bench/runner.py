"""`qatserve bench`'s plan: every lane on qatserve (and the peer), -r times, then the block-size sweep.

Order: repetition-major (lane 1 qatserve, lane 1 peer, lane 2 ..., then again), so drifting load on a
shared machine spreads over every lane instead of landing on the last ones. Each server run is a fresh
process. A lane that fails on one server (start-up error, refused flag, failed request) records the
reason in that cell and the bench goes on. The result is one JSON-able dict, which report.py and
plot.py render.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qatserve import __version__
from qatserve.bench import REF_GEN, REF_PROMPT
from qatserve.bench.client import BenchRequestError
from qatserve.bench.lanes import Lane, PeerUnsupported, parse_lane
from qatserve.bench.measure import PromptBook, ServerSpec, run_server
from qatserve.bench.servers import ServerStartError, llama_server_argv, qatserve_argv

QATSERVE, PEER = "qatserve", "llama.cpp"
METRICS = ("load_s", "prefill_tps", "decode_tps", "wall_s", "aggregate_tps", "acceptance", "adjusted_tps")
CTX_MARGIN = 80  # tokens beyond prompt + generation per slot: a draft block's rows and llama.cpp's 2 spare


@dataclass
class BenchConfig:
    model: Path
    lanes: list[Lane]
    n_prompt: int = REF_PROMPT
    n_gen: int = REF_GEN
    threads: int | None = None
    reps: int = 1
    peer: Path | None = None  # llama-server binary
    sweep: list[int] = field(default_factory=list)
    startup_timeout: float = 300.0
    command: str = ""


def model_context(path: Path) -> int | None:
    """The model's trained context (`<arch>.context_length`), None when the file does not say."""
    from qatserve.formats.gguf_reader import open_gguf

    with open_gguf(path) as f:
        arch = f.get("general.architecture")
        n = f.get(f"{arch}.context_length")
    return int(n) if isinstance(n, int) and n > 0 else None


def peer_version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    line = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")), "")
    return line.removeprefix("version:").strip() or "unknown"


def summarise(runs: list[dict]) -> dict:
    """Median, min and max of each metric over the runs that produced it."""
    out: dict = {}
    for m in METRICS:
        values = [r[m] for r in runs if r.get(m) is not None]
        if values:
            out[m] = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
    return out


class Bench:
    def __init__(self, cfg: BenchConfig, progress=None):
        self.cfg = cfg
        self.progress = progress  # report.Progress-like: start(total), advance(label), note(text)
        self.book = PromptBook()
        ctx = model_context(cfg.model)
        self.notes: list[str] = []
        self.n_gen = cfg.n_gen
        if ctx is not None and cfg.n_prompt + cfg.n_gen + CTX_MARGIN > ctx:
            self.n_gen = ctx - cfg.n_prompt - CTX_MARGIN
            self.notes.append(f"--n-gen {cfg.n_gen} does not fit the model's context of {ctx} tokens beside the "
                              f"{cfg.n_prompt}-token prompt: {self.n_gen} generated instead")
        self.model_ctx = ctx

    # -- server specs ---------------------------------------------------------------------------------

    def _ctx(self, lane: Lane) -> int:
        return lane.slots * (self.cfg.n_prompt + self.n_gen + CTX_MARGIN)

    def _common(self, lane: Lane) -> list[str]:
        threads = ["-t", str(self.cfg.threads)] if self.cfg.threads else []
        return ["-c", str(self._ctx(lane)), *threads]

    def qatserve_spec(self, lane: Lane) -> ServerSpec:
        extra = [*self._common(lane), *lane.qatserve_args()]
        return ServerSpec(QATSERVE, lambda port: qatserve_argv(self.cfg.model, port, extra), {})

    def peer_spec(self, lane: Lane) -> ServerSpec:
        args, env = lane.llama_server_args()  # PeerUnsupported propagates
        extra = [*self._common(lane), *args]
        return ServerSpec(PEER, lambda port: llama_server_argv(self.cfg.peer, self.cfg.model, port, extra), env)

    # -- running --------------------------------------------------------------------------------------

    def _servers(self) -> list[str]:
        return [QATSERVE, PEER] if self.cfg.peer else [QATSERVE]

    def _steps(self, lane: Lane, aggregate: bool) -> int:
        return 2 + (aggregate and lane.slots > 1)

    def sweep_base(self) -> Lane | None:
        if not self.cfg.sweep:
            return None
        return next((ln for ln in self.cfg.lanes if ln.drafter is not None), None) or parse_lane("lookup")

    def run(self) -> dict:
        cfg = self.cfg
        base = self.sweep_base()
        sweep_lanes = [base.with_draft_max(k) for k in cfg.sweep] if base is not None else []
        total = cfg.reps * len(self._servers()) * (sum(self._steps(ln, True) for ln in cfg.lanes)
                                                  + sum(self._steps(ln, False) for ln in sweep_lanes))
        if self.progress:
            self.progress.start(total)
        t0, load0 = time.time(), _loadavg()
        lanes = {ln.name: {s: {"runs": []} for s in self._servers()} for ln in cfg.lanes}
        sweep = {ln.name: {s: {"runs": []} for s in self._servers()} for ln in sweep_lanes}
        for rep in range(cfg.reps):
            for ln in cfg.lanes:
                for server in self._servers():
                    self._one(lanes[ln.name][server], ln, server, rep, aggregate=True)
            for ln in sweep_lanes:
                for server in self._servers():
                    self._one(sweep[ln.name][server], ln, server, rep, aggregate=False)
        for table in (lanes, sweep):
            for cells in table.values():
                for cell in cells.values():
                    cell["summary"] = summarise(cell["runs"])
        return {
            "command": cfg.command,
            "model": str(cfg.model), "model_context": self.model_ctx,
            "n_prompt": cfg.n_prompt, "n_gen": self.n_gen, "ref_prompt": REF_PROMPT, "ref_gen": REF_GEN,
            "threads": cfg.threads, "reps": cfg.reps,
            "servers": {QATSERVE: {"version": __version__},
                        **({PEER: {"path": str(cfg.peer), "version": peer_version(cfg.peer)}} if cfg.peer else {})},
            "machine": {"cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": _loadavg(),
                        "platform": sys.platform},
            "seconds": round(time.time() - t0, 1),
            "notes": self.notes,
            "lanes": [{"lane": ln.name, "settings": ln.settings, "slots": ln.slots, "results": lanes[ln.name]}
                      for ln in cfg.lanes],
            "sweep": ({"base": base.name, "draft_max": cfg.sweep,
                       "rows": [{"draft_max": k, "lane": ln.name, "results": sweep[ln.name]}
                                for k, ln in zip(cfg.sweep, sweep_lanes)]} if base is not None else None),
        }

    def _one(self, cell: dict, lane: Lane, server: str, rep: int, aggregate: bool) -> None:
        steps = self._steps(lane, aggregate)
        label = f"{lane.name} · {server} · run {rep + 1}/{self.cfg.reps}"
        done = 0

        def step(phase: str) -> None:
            nonlocal done
            done += 1
            if self.progress:
                self.progress.advance(f"{label} · {phase}")

        if "error" in cell or "unsupported" in cell:  # failed or impossible in an earlier repetition
            self._skip(steps, label)
            return
        try:
            spec = self.qatserve_spec(lane) if server == QATSERVE else self.peer_spec(lane)
            cell.setdefault("argv", spec.argv(0))  # as run, with port 0 standing for the free port taken
            if spec.env:
                cell["env"] = spec.env
            if self.progress:
                self.progress.label(f"{label} · starting")
            figures = run_server(spec, self.book, self.cfg.n_prompt, self.n_gen, lane.slots, aggregate,
                                 self.cfg.startup_timeout, step)
            cell["runs"].append(figures)
            if self.progress:
                self.progress.note(_run_line(label, figures))
        except PeerUnsupported as e:
            cell["unsupported"] = str(e)
        except (ServerStartError, BenchRequestError) as e:
            cell["error"] = str(e)
            if self.progress:
                self.progress.note(f"{label}: failed: {e}")
        self._skip(steps - done, label)

    def _skip(self, n: int, label: str) -> None:
        if self.progress:
            for _ in range(n):
                self.progress.advance(label)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _run_line(label: str, f: dict) -> str:
    def fmt(key: str, unit: str, scale: float = 1.0) -> str:
        v = f.get(key)
        return f"{v * scale:.1f}{unit}" if v is not None else "-"

    acc = f" · acceptance {fmt('acceptance', '%', 100)}" if f.get("acceptance") is not None else ""
    return (f"{label}: load {fmt('load_s', ' s')} · prefill {fmt('prefill_tps', ' tok/s')} · decode "
            f"{fmt('adjusted_tps', ' tok/s')}{acc} · aggregate {fmt('aggregate_tps', ' tok/s')}")
