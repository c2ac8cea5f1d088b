"""One generation request inside the engine: its tokens, sampling state, stop state, timings and outputs."""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from qatserve.engine.kv_cache import SeqKV
from qatserve.engine.sampler import Sampler, SamplingParams
from qatserve.engine.stop import StopMatcher


@dataclass
class TokenOut:
    """One generated token and the text it makes visible now ("" while held back).

    token == -1 marks the final text-only event that flushes what the stream decoder or the stop
    matcher still held back when generation ended."""

    token: int
    text: str
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Timings:
    """llama.cpp's `timings` block, plus speculative-decoding counts (draft_n, draft_n_accepted) and
    their summaries: acceptance rate (accepted / drafted) and mean accepted length (tokens emitted per
    verification forward, the bonus token included: 1 + accepted / verifications, vLLM's definition)."""

    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    cache_n: int = 0  # prompt tokens taken from the prefix cache
    draft_n: int = 0
    draft_n_accepted: int = 0
    draft_steps: int = 0  # verification forwards that carried a draft

    @property
    def draft_acceptance_rate(self) -> float:
        return self.draft_n_accepted / self.draft_n if self.draft_n else 0.0

    @property
    def draft_mean_accepted_length(self) -> float:
        return 1.0 + self.draft_n_accepted / self.draft_steps if self.draft_steps else 0.0

    @property
    def prompt_per_second(self) -> float:
        return 1000.0 * self.prompt_n / self.prompt_ms if self.prompt_ms else 0.0

    @property
    def predicted_per_second(self) -> float:
        return 1000.0 * self.predicted_n / self.predicted_ms if self.predicted_ms else 0.0

    def as_dict(self) -> dict:
        """llama.cpp's block; the draft fields only when the request drafted, as llama.cpp's server
        (server_slot_stats::to_json) adds draft_n / draft_n_accepted only when n_draft_tokens > 0."""
        d = {"prompt_n": self.prompt_n, "prompt_ms": self.prompt_ms,
                "prompt_per_token_ms": self.prompt_ms / self.prompt_n if self.prompt_n else 0.0,
                "prompt_per_second": self.prompt_per_second,
                "predicted_n": self.predicted_n, "predicted_ms": self.predicted_ms,
                "predicted_per_token_ms": self.predicted_ms / self.predicted_n if self.predicted_n else 0.0,
                "predicted_per_second": self.predicted_per_second, "cache_n": self.cache_n}
        if self.draft_n > 0:
            d.update(draft_n=self.draft_n, draft_n_accepted=self.draft_n_accepted,
                     draft_acceptance_rate=self.draft_acceptance_rate,
                     draft_mean_accepted_length=self.draft_mean_accepted_length)
        return d


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS/EOT/stop string), "length" (max tokens), "context" (context full),
    #                     "abort" (cancelled)
    timings: Timings
    prompt_tokens: int = 0
    stop_reason: str | int | None = None  # the stop string or token that ended it
    request_id: str = ""


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """Mutable per-request state owned by the engine thread."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, n_vocab: int,
                 tokenizer=None):
        self.id = request_id
        self.prompt = list(prompt)
        self.params = params
        self.sampler = Sampler(params, n_vocab)
        self.stops = StopMatcher(params.stop)
        self.decoder = tokenizer.stream_decoder(skip_special=True) if tokenizer is not None else None
        self.stop_ids = tokenizer.stop_ids if tokenizer is not None else frozenset()
        self.generated: list[int] = []
        self.text_parts: list[str] = []
        self.state = State.WAITING
        self.seq: SeqKV | None = None
        self.slot = -1
        self.computed = 0  # positions whose K/V are in the cache
        self.spec = None  # speculative decoding: engine.speculative.drafter.DraftState once it drafts
        self.spec_overrides = None  # the request's own block settings (speculative.config.SpeculativeOverrides)
        self.slot_wanted = -1  # the slot it must run in (llama.cpp's id_slot); -1 = any
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.timings = Timings(prompt_n=len(prompt))
        self.arrival = time.perf_counter()
        self.t_prompt_start: float | None = None
        self.t_first_token: float | None = None
        self.outputs: deque[TokenOut] = deque()  # for synchronous consumers (LLM)
        self.listener = None  # callable(request, TokenOut | None); None = finished (AsyncEngine)
        self.result: GenerationResult | None = None

    @property
    def history(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def in_prompt(self) -> bool:
        return self.computed < len(self.prompt)

    def emit(self, out: TokenOut | None) -> None:
        if out is not None:
            self.outputs.append(out)
        if self.listener is not None:
            self.listener(self, out)
