"""Single-sequence generation: the engine with one slot, plus whole-sequence scoring.

`Generator` keeps the simple API the CLI's first version, the golden tests and the benchmarks use; it
defaults to an f32 KV cache (the exact reference path that the logits tests compare with transformers).
`LLM` (engine/llm.py) is the user-facing API with llama.cpp's defaults (f16 KV).
"""

from __future__ import annotations

from typing import Iterator

import torch

from qatserve.engine.batch import SequenceView
from qatserve.engine.device import model_device
from qatserve.engine.engine import Engine, EngineConfig
from qatserve.engine.kv_cache import KVCacheOptions
from qatserve.engine.request import GenerationResult, Timings, TokenOut
from qatserve.engine.sampler import SamplingParams
from qatserve.formats.tokenizer import Tokenizer
from qatserve.models.common import DecoderLM

__all__ = ["Generator", "TokenOut", "Timings", "GenerationResult", "score_tokens"]

F32 = KVCacheOptions("f32", "f32")


def score_tokens(model: DecoderLM, tokens: list[int], kv: KVCacheOptions | None = None,
                 chunk: int = 512) -> torch.Tensor:
    """Logits at every position of `tokens` from an empty cache: float32 [T, V] (audits, tests).

    `kv` picks the K/V storage (default f32); prompt rows run exactly as in the engine."""
    view = SequenceView.for_model(model, max(len(tokens), 1), kv or F32)
    dev = model_device(model)
    out = []
    with torch.inference_mode():
        for lo in range(0, len(tokens), chunk):
            ids = torch.tensor(tokens[lo : lo + chunk], dtype=torch.long, device=dev)
            out.append(model(ids, torch.arange(lo, lo + ids.numel(), device=dev), view, all_logits=True).cpu())
    return torch.cat(out)


class Generator:
    """Runs one request at a time (an engine with one slot)."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer | None, n_ctx: int = 4096, prefill_chunk: int = 512,
                 kv: KVCacheOptions | None = None):
        self.model = model
        self.tokenizer = tokenizer
        # n_ctx <= 0: the model's trained context, as llama.cpp's -c 0.
        self.n_ctx = model.config.context_length if n_ctx <= 0 else n_ctx
        self.prefill_chunk = prefill_chunk
        self.kv = kv or F32
        self.engine = Engine(model, tokenizer, EngineConfig(
            n_ctx=self.n_ctx, n_slots=1, max_batch_tokens=max(32, -(-prefill_chunk // 32) * 32), kv=self.kv))
        self._view: SequenceView | None = None
        self.last: GenerationResult | None = None

    @property
    def cache(self) -> SequenceView:
        """A single-sequence cache for driving the model by hand (tests, benchmarks)."""
        if self._view is None:
            self._view = SequenceView.for_model(self.model, self.n_ctx, self.kv)
        return self._view

    def prefill(self, prompt: list[int], start: int = 0) -> torch.Tensor:
        """Run prompt[start:] through `self.cache` (which holds prompt[:start]); last logits [V]."""
        logits = None
        for lo in range(start, len(prompt), self.prefill_chunk):
            chunk = torch.tensor(prompt[lo : lo + self.prefill_chunk], dtype=torch.long)
            logits = self.model(chunk, torch.arange(lo, lo + chunk.numel()), self.cache)
        assert logits is not None
        return logits[-1]

    def logits_all(self, tokens: list[int]) -> torch.Tensor:
        """Logits at every position of `tokens` from an empty cache: [T, V] (for audits and tests)."""
        return score_tokens(self.model, tokens, self.kv, self.prefill_chunk)

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[TokenOut]:
        """Yield tokens as they are generated; the summary lands in self.last when the iterator ends."""
        req = self.engine.add_request(prompt, params)
        yield from self.engine.stream(req)
        self.last = req.result

    def generate(self, prompt: list[int], params: SamplingParams) -> GenerationResult:
        for _ in self.stream(prompt, params):
            pass
        assert self.last is not None
        return self.last
