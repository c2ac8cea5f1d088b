"""One server run of one lane: start it, time it to /health 200, then the requests; the figures.

Definitions (the report's legend repeats them):
- load_s: spawn -> first /health 200 (servers.py).
- prefill_tps: the single request's prompt_n / prompt_ms (its prompt, no cache reuse).
- decode_tps: target rows verified per second in the single request's decode phase:
  (predicted_n - 1 + rejected drafts) / predicted_ms; without a drafter, the tokens generated per second.
- adjusted_tps: acceptance-adjusted decode, only the tokens that reach the user (accepted drafts and the
  target's own tokens): (predicted_n - 1) / predicted_ms. Equal to decode_tps without a drafter.
  Both servers' predicted_ms runs from the first generated token to the last, and the first token comes
  from the prompt's forward, hence n - 1 (llama.cpp's own predicted_per_second; qatserve's divides n).
  The rates are computed here from the raw counts and times, the same way for both servers.
- acceptance: draft_n_accepted / draft_n (None without drafts).
- wall_s: the issue's workload, normalised: REF_PROMPT / prefill_tps + REF_GEN / adjusted_tps, so it
  compares across runs of any --n-prompt / --n-gen (a generation cut short by end-of-text still counts).
- aggregate_tps: np requests streamed at once; the tokens of all of them that arrived while all were
  decoding (from the last first-token to the first last-token) per second of that window.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from qatserve.bench import REF_GEN, REF_PROMPT, client
from qatserve.bench.client import Completion
from qatserve.bench.prompt import build_prompt
from qatserve.bench.servers import ServerProcess, free_port

WARMUP_GEN = 4


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server for a lane: argv from a port, extra environment, a display name."""

    name: str
    argv: Callable[[int], list[str]]
    env: dict


class PromptBook:
    """The bench prompts, tokenised by the first server that runs and then fixed: every server and lane
    gets identical ids. `ids(k, n)` is prompt number k (its salt) of n tokens."""

    def __init__(self):
        self._texts: dict[tuple[str, bool], list[int]] = {}
        self._port: int | None = None

    def bind(self, port: int) -> None:
        self._port = port

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        key = (text, add_special)
        if key not in self._texts:
            self._texts[key] = client.tokenize(self._port, text, add_special)
        return self._texts[key]

    def ids(self, k: int, n_tokens: int) -> list[int]:
        return build_prompt(self._tokenize, n_tokens, k)


def single_figures(t: dict) -> dict:
    """The single request's columns from its timings block."""
    prompt_n, prompt_ms = int(t.get("prompt_n", 0)), float(t.get("prompt_ms", 0.0))
    predicted_n, predicted_ms = int(t.get("predicted_n", 0)), float(t.get("predicted_ms", 0.0))
    draft_n, accepted = int(t.get("draft_n", 0) or 0), int(t.get("draft_n_accepted", 0) or 0)
    steps = max(predicted_n - 1, 0)  # tokens that came from decode forwards
    rows = steps + draft_n - accepted

    def rate(n: int, ms: float) -> float:
        return 1000.0 * n / ms if n > 0 and ms > 0 else 0.0

    prefill, adjusted = rate(prompt_n, prompt_ms), rate(steps, predicted_ms)
    return {
        "prefill_tps": prefill or None,
        "decode_tps": rate(rows, predicted_ms) or None,
        "adjusted_tps": adjusted or None,
        "acceptance": accepted / draft_n if draft_n else None,
        "wall_s": REF_PROMPT / prefill + REF_GEN / adjusted if prefill > 0 and adjusted > 0 else None,
        "prompt_n": prompt_n, "predicted_n": predicted_n,
        "draft_n": draft_n, "draft_n_accepted": accepted,
    }


def aggregate_rate(streams: list[Completion]) -> float | None:
    """Tokens per second over the window where every stream was decoding; None when they never overlapped."""
    if any(not c.token_times for c in streams):
        return None
    start = max(c.token_times[0][0] for c in streams)
    end = min(c.token_times[-1][0] for c in streams)
    if end <= start:
        return None
    tokens = sum(n for c in streams for t, n in c.token_times if start < t <= end)
    return tokens / (end - start) if tokens else None


def _concurrent(port: int, prompts: list[list[int]], n_gen: int) -> list[Completion]:
    out: list[Completion | BaseException | None] = [None] * len(prompts)

    def one(i: int) -> None:
        try:
            out[i] = client.stream_complete(port, prompts[i], n_gen)
        except BaseException as e:  # re-raised below, in the caller's thread
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out  # type: ignore[return-value]


def run_server(spec: ServerSpec, book: PromptBook, n_prompt: int, n_gen: int, slots: int,
               aggregate: bool, startup_timeout: float, step: Callable[[str], None]) -> dict:
    """Start the server, measure, stop it. `step(phase)` reports progress after each phase.
    Raises ServerStartError / BenchRequestError (the caller records them in the lane's cell)."""
    port = free_port()
    with ServerProcess(spec.argv(port), port, env=spec.env, name=spec.name) as proc:
        figures: dict = {"load_s": proc.start(startup_timeout)}
        step("started")
        try:
            return _requests(port, figures, book, n_prompt, n_gen, slots, aggregate, step)
        except client.BenchRequestError as e:
            alive = "" if proc.proc.poll() is None else f"; it exited with code {proc.proc.returncode}"
            raise client.BenchRequestError(f"{e} ({spec.name}{alive}: {proc.log_tail()})") from None


def _requests(port: int, figures: dict, book: PromptBook, n_prompt: int, n_gen: int, slots: int,
              aggregate: bool, step: Callable[[str], None]) -> dict:
    book.bind(port)
    # Salts: 0 warm-up, 1 the single request, 2.. the concurrent ones (no shared prefixes).
    client.complete(port, book.ids(0, min(n_prompt, 64)), WARMUP_GEN)
    single = client.complete(port, book.ids(1, n_prompt), n_gen)
    figures.update(single_figures(single.timings))
    figures["request_wall_s"] = single.wall_s
    step("single")
    if aggregate and slots > 1:
        streams = _concurrent(port, [book.ids(2 + i, n_prompt) for i in range(slots)], n_gen)
        figures["aggregate_tps"] = aggregate_rate(streams)
        figures["aggregate_predicted_n"] = [c.n_tokens for c in streams]
        step("aggregate")
    else:
        figures["aggregate_tps"] = None
    return figures
