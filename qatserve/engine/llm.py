"""`LLM`: the Python API. Load a GGUF once, then generate for one prompt or many at a time.

    llm = LLM("model.gguf", n_slots=4, cache_type_k="q8_0")
    results = llm.generate(["The capital of France is", "1, 2, 3,"], SamplingParams(temperature=0))
    for piece in llm.stream("Once upon a time", SamplingParams(max_tokens=64)):
        print(piece.text, end="")

Prompts are text (tokenised with the model's vocabulary, BOS added as the GGUF says) or token-id lists.
`generate` submits every prompt at once and the engine batches them over its slots; results come back
in prompt order.

Speculative decoding: `LLM(..., speculative=SpeculativeConfig("ngram-simple", n_max=4))` (prompt lookup),
`SpeculativeConfig("draft-mtp", assistant="assistant.gguf")` or `SpeculativeConfig("draft-simple",
draft_model="small.gguf")`; greedy output is the same token for token, sampled output the same distribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from qatserve.engine.engine import Engine, EngineConfig
from qatserve.engine.kv_cache import KVCacheOptions
from qatserve.engine.loader import LoadedModel, load_model_file
from qatserve.engine.request import GenerationResult, TokenOut
from qatserve.engine.sampler import SamplingParams
from qatserve.engine.speculative.config import SpeculativeConfig
from qatserve.errors import RequestError

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model: str | Path | LoadedModel | None = None, *, n_ctx: int = 4096, n_slots: int = 1,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", kv_rotation: bool = True,
                 prefix_cache: bool = True, max_batch_tokens: int = 512, n_threads: int | None = None,
                 backend: str = "auto", speculative: SpeculativeConfig | None = None):
        if n_threads is not None:
            from qatserve.quant.linear import set_cpu_threads

            set_cpu_threads(n_threads)
        if isinstance(model, LoadedModel):
            self.loaded = model
        else:
            if model is None:
                from qatserve.default_model import default_model_path

                model = default_model_path()
            self.loaded = load_model_file(model, backend=backend)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        kv = KVCacheOptions(cache_type_k, cache_type_v, rotate=kv_rotation, prefix_cache=prefix_cache)
        self.engine = Engine(self.model, self.tokenizer,
                             EngineConfig(n_ctx=n_ctx, n_slots=n_slots, max_batch_tokens=max_batch_tokens, kv=kv,
                                          spec=speculative))

    def prepare(self) -> "LLM":
        """Build every kernel session now (otherwise the first request pays for it)."""
        from qatserve.quant.linear import QuantLinear

        for m in self.model.modules():
            if isinstance(m, QuantLinear):
                m.prepare()
        return self

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model file has no vocabulary: pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> list[GenerationResult]:
        """Run every prompt (batched over the slots) to completion; one result per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        reqs = [self.engine.add_request(self.tokenize(p), params) for p in prompts]
        try:
            self.engine.run_until_done()
        finally:
            for r in reqs:
                if r.result is None:
                    self.engine.abort(r.id)
        return [r.result for r in reqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[TokenOut]:
        """Yield tokens of one prompt as they come; `last_result` holds the summary afterwards."""
        req = self.engine.add_request(self.tokenize(prompt), params)
        yield from self.engine.stream(req)
        self.last_result = req.result
