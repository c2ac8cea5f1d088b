"""Continuous batching must not change a single token: every request's greedy output is identical run
alone or among others, with prefix caching on or off, for every K/V type (engine/batch.py says how)."""

from __future__ import annotations

import pytest

from qatserve.engine.engine import Engine, EngineConfig
from qatserve.engine.kv_cache import KVCacheOptions
from qatserve.engine.sampler import SamplingParams
from tests.engine.conftest import WINDOW, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
# Mixed lengths: shorter than a block, several windows long (WINDOW = 16), and not block-aligned.
LENGTHS = [3, 17, 40, 100, 5, 64, 150, 33]


def run(model, prompts, *, n_slots, kv="f16", prefix=True, batch=64, params=GREEDY):
    eng = Engine(model, None, EngineConfig(n_ctx=512 * n_slots, n_slots=n_slots, max_batch_tokens=batch,
                                          kv=KVCacheOptions(kv, kv, prefix_cache=prefix)))
    reqs = [eng.add_request(p, params) for p in prompts]
    eng.run_until_done()
    return [r.result.tokens for r in reqs], eng


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_concurrent_equals_alone(tiny_gemma3, kv):
    model = tiny_gemma3.model
    prompts = random_prompts(LENGTHS, seed=1)
    assert max(LENGTHS) > WINDOW
    alone = [run(model, [p], n_slots=1, kv=kv, prefix=False)[0][0] for p in prompts]
    together, eng = run(model, prompts, n_slots=8, kv=kv, prefix=False)
    assert together == alone
    assert all(len(t) == GREEDY.max_tokens for t in alone)
    assert eng.stats.steps < sum(len(p) for p in prompts)  # it really batched
    # Fewer slots than requests: requests wait, join as slots free up, and still match.
    assert run(model, prompts, n_slots=3, kv=kv, prefix=False)[0] == alone


def test_prefix_cache_on_equals_off(tiny_gemma3):
    model = tiny_gemma3.model
    shared = random_prompts([70], seed=2)[0]
    tails = random_prompts([1, 9, 30, 45, 2, 64, 12, 33], seed=3)
    prompts = [shared + t for t in tails] + [shared[:40], shared[:64] + tails[0]]
    off, _ = run(model, prompts, n_slots=4, prefix=False)
    on, eng = run(model, prompts, n_slots=4, prefix=True)
    assert on == off
    assert eng.stats.cached_tokens >= 64 * 3  # later requests really reused the shared blocks
    # Sequentially (every later request finds the blocks), with a tiny batch so prompts span many steps.
    seq = [run(model, [p], n_slots=1, prefix=False, batch=32)[0][0] for p in prompts]
    assert seq == off


def test_prefix_cache_reuses_blocks_across_requests(tiny_gemma3):
    eng = Engine(tiny_gemma3.model, None, EngineConfig(n_ctx=1024, n_slots=2))
    prompt = random_prompts([100], seed=4)[0]
    first = eng.add_request(prompt, GREEDY)
    eng.run_until_done()
    second = eng.add_request(prompt + [5, 6], GREEDY)
    eng.run_until_done()
    assert first.result.timings.cache_n == 0
    assert second.result.timings.cache_n == 96  # three whole 32-token blocks of the shared prompt
    assert second.result.timings.prompt_n == len(prompt) + 2 - 96


def test_long_prompt_does_not_stall_generating_slot(tiny_gemma3):
    """Chunked prefill: while a long prompt is read over several steps, a generating slot still gets a
    token every step."""
    eng = Engine(tiny_gemma3.model, None, EngineConfig(n_ctx=1024, n_slots=2, max_batch_tokens=32))
    short = eng.add_request(random_prompts([4], seed=5)[0], SamplingParams(temperature=0.0, max_tokens=20))
    eng.step()  # reads the short prompt and samples its first token
    long = eng.add_request(random_prompts([300], seed=6)[0], GREEDY)
    for _ in range(5):
        before = len(short.generated)
        eng.step()
        assert len(short.generated) == before + 1
        assert long.in_prompt
    # 1 generating row + the oldest prompt's next 32-row sub-block per step (the budget is 32).
    assert long.computed == 5 * 32


def test_real_model_concurrent_equals_alone(gemma_path):
    """The default model (Q4_K/Q5_0/Q6_K/Q8_0 kernels, sliding window 512): 8 requests, two of them longer
    than the window, give the same greedy tokens together as alone."""
    from qatserve.engine.llm import LLM

    llm = LLM(gemma_path, n_ctx=8 * 1024, n_slots=8)
    text = open("/usr/share/common-licenses/GPL-3").read()
    prompts = [llm.tokenize(text[i * 500 : i * 500 + n]) for i, n in enumerate([2400, 40, 300, 2700, 9, 120, 800, 60])]
    assert sum(len(p) > 512 for p in prompts) == 2
    params = SamplingParams(temperature=0.0, max_tokens=8)
    together = [r.tokens for r in llm.generate(prompts, params)]
    alone = []
    for p in prompts:
        eng = Engine(llm.model, llm.tokenizer, EngineConfig(n_ctx=1024, n_slots=1,
                                                            kv=KVCacheOptions(prefix_cache=False)))
        req = eng.add_request(p, params)
        eng.run_until_done()
        alone.append(req.result.tokens)
    assert together == alone
