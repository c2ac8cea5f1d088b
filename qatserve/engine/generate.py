"""Single-sequence generation loop: chunked prefill, decode, sampling, stop conditions, timings.

The batched, paged engine (continuous batching) builds on the same model call; this loop is what
`qatserve run` and the golden tests use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from qatserve.engine.kv_cache import ContiguousKVCache
from qatserve.engine.sampler import Sampler, SamplingParams
from qatserve.engine.stop import StopMatcher
from qatserve.errors import RequestError
from qatserve.formats.tokenizer import Tokenizer
from qatserve.models.common import DecoderLM


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
    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0

    @property
    def prompt_per_second(self) -> float:
        return 1000.0 * self.prompt_n / self.prompt_ms if self.prompt_ms else 0.0

    @property
    def predicted_per_second(self) -> float:
        return 1000.0 * self.predicted_n / self.predicted_ms if self.predicted_ms else 0.0


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS/EOT/stop string), "length" (max tokens), "context" (context full)
    timings: Timings


class Generator:
    """Runs one request at a time against a model with its own KV cache."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer | None, n_ctx: int = 4096, prefill_chunk: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        # n_ctx <= 0: the model's trained context, as llama.cpp's -c 0.
        self.n_ctx = model.config.context_length if n_ctx <= 0 else n_ctx
        self.prefill_chunk = prefill_chunk
        self.cache = ContiguousKVCache(model.config, self.n_ctx)
        self.last: GenerationResult | None = None

    def prefill(self, prompt: list[int], start: int = 0) -> torch.Tensor:
        """Run prompt[start:] through the model (cache already holds prompt[:start]); last logits [V]."""
        logits = None
        for lo in range(start, len(prompt), self.prefill_chunk):
            chunk = torch.tensor(prompt[lo : lo + self.prefill_chunk], dtype=torch.long)
            logits = self.model(chunk, torch.arange(lo, lo + chunk.numel()), self.cache)
        assert logits is not None
        return logits[-1]

    def logits_all(self, tokens: list[int]) -> torch.Tensor:
        """Logits at every position of `tokens` from an empty cache: [T, V] (for audits and tests)."""
        self.cache.truncate(0)
        out = []
        for lo in range(0, len(tokens), self.prefill_chunk):
            chunk = torch.tensor(tokens[lo : lo + self.prefill_chunk], dtype=torch.long)
            out.append(self.model(chunk, torch.arange(lo, lo + chunk.numel()), self.cache, all_logits=True))
        return torch.cat(out)

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[TokenOut]:
        """Yield tokens as they are generated; the summary lands in self.last when the iterator ends."""
        if not prompt:
            raise RequestError("empty prompt: nothing to condition on")
        n_vocab = self.model.config.n_vocab
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
        if len(prompt) >= self.n_ctx:
            raise RequestError(f"prompt of {len(prompt)} tokens does not fit in a context of {self.n_ctx}")
        sampler = Sampler(params, n_vocab)
        stops = StopMatcher(params.stop)
        decoder = self.tokenizer.stream_decoder(skip_special=True) if self.tokenizer else None
        stop_ids = self.tokenizer.stop_ids if self.tokenizer else frozenset()
        timings = Timings(prompt_n=len(prompt))
        history = list(prompt)
        generated: list[int] = []
        text_parts: list[str] = []
        finish = "length"

        self.cache.truncate(0)
        t0 = time.perf_counter()
        logits = self.prefill(prompt)
        timings.prompt_ms = 1000 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        while True:
            res = sampler.sample(logits, history)
            generated.append(res.token)
            history.append(res.token)
            timings.predicted_n += 1
            if res.token in stop_ids:
                finish = "stop"
                break
            text = stops.push(decoder.push(res.token)) if decoder else ""
            text_parts.append(text)
            yield TokenOut(res.token, text, res.logprob, res.top)
            if stops.stopped:
                finish = "stop"
                break
            if len(generated) >= params.max_tokens:
                break
            if len(history) >= self.n_ctx:
                finish = "context"
                break
            pos = len(history) - 1
            logits = self.model(torch.tensor([res.token]), torch.tensor([pos]), self.cache)[-1]
        timings.predicted_ms = 1000 * (time.perf_counter() - t0)
        if decoder and not stops.stopped:
            tail = stops.push(decoder.flush()) + stops.flush()
            if tail:
                text_parts.append(tail)
                yield TokenOut(-1, tail, 0.0)
        self.last = GenerationResult(generated, "".join(text_parts), finish, timings)

    def generate(self, prompt: list[int], params: SamplingParams) -> GenerationResult:
        for _ in self.stream(prompt, params):
            pass
        assert self.last is not None
        return self.last
