"""Requests through the engine and its APIs: stop conditions, cancellation, LLM and AsyncEngine."""

from __future__ import annotations

import asyncio
import copy

import pytest

from qatserve.engine.async_engine import AsyncEngine
from qatserve.engine.engine import Engine, EngineConfig, QueueFull
from qatserve.engine.llm import LLM
from qatserve.engine.sampler import SamplingParams
from qatserve.errors import RequestError
from tests.engine.conftest import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def llm(gemma_path):
    return LLM(gemma_path, n_ctx=2048, n_slots=2)


def test_llm_generate_batches_and_keeps_order(llm):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Water boils at"]
    together = llm.generate(prompts, GREEDY)
    alone = [llm.generate(p, GREEDY)[0] for p in prompts]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert together[1].text.startswith(" 5, 6")
    assert all(r.finish_reason == "length" and len(r.tokens) == 24 for r in together)


def test_stop_string_across_tokens(llm):
    full = llm.generate("1, 2, 3, 4,", GREEDY)[0].text
    assert full.startswith(" 5, 6, 7")
    # ", 6," spans several tokens; the text stops right before it and nothing after leaks out.
    res = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0.0, max_tokens=24, stop=[", 6,"]))[0]
    assert res.finish_reason == "stop" and res.stop_reason == ", 6,"
    assert res.text == " 5"
    streamed = "".join(t.text for t in llm.stream("1, 2, 3, 4,", SamplingParams(temperature=0.0, max_tokens=24,
                                                                                 stop=[", 6,"])))
    assert streamed == " 5"


def test_eos_ends_generation(llm):
    """A token in the vocabulary's stop set (EOS, end-of-turn) ends the request and shows no text. The
    default model is a base model that rarely emits one, so the third greedy token is made the EOS."""
    assert {1, 106} <= llm.tokenizer.stop_ids  # <eos> and <end_of_turn> from the GGUF
    plain = llm.generate("The three primary colours are", GREEDY)[0]
    tok = copy.copy(llm.tokenizer)
    tok.stop_ids = frozenset({plain.tokens[2]})
    eng = Engine(llm.model, tok, EngineConfig(n_ctx=512))
    req = eng.add_request(tok.encode("The three primary colours are"), GREEDY)
    eng.run_until_done()
    res = req.result
    assert res.finish_reason == "stop" and res.stop_reason == plain.tokens[2]
    assert res.tokens == plain.tokens[:3]
    assert res.text == tok.decode(plain.tokens[:2])


def test_closing_a_stream_cancels(llm):
    eng = llm.engine
    it = llm.stream("Once upon a time", SamplingParams(temperature=0.0, max_tokens=200))
    next(it)
    next(it)
    assert eng.n_running() == 1
    it.close()
    assert eng.n_running() == 0 and not eng.requests


def test_bad_requests_are_refused_whole(tiny_gemma3):
    eng = Engine(tiny_gemma3.model, None, EngineConfig(n_ctx=256, n_slots=1, max_queue=1))
    with pytest.raises(RequestError, match="empty prompt"):
        eng.add_request([], GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request([1, 512], GREEDY)
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    a = eng.add_request([1, 2, 3], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request([7], GREEDY, request_id=a.id)
    eng.step()  # a takes the slot
    eng.add_request([4, 5], GREEDY)  # waits
    with pytest.raises(QueueFull):
        eng.add_request([6], GREEDY)
    eng.run_until_done()
    assert a.result.finish_reason == "length"


def test_async_engine_streams_and_aborts(tiny_gemma3):
    eng = Engine(tiny_gemma3.model, None, EngineConfig(n_ctx=1024, n_slots=2))
    aeng = AsyncEngine(eng).start()
    prompts = random_prompts([5, 40, 12], seed=12)

    async def main():
        handles = [await aeng.submit(p, GREEDY) for p in prompts]
        results = await asyncio.gather(*(h.wait() for h in handles))
        long = await aeng.submit(prompts[0], SamplingParams(temperature=0.0, max_tokens=500))
        n = 0
        async for _ in long:
            n += 1
            if n == 3:
                long.abort()
        with pytest.raises(RequestError):
            await aeng.submit([], GREEDY)
        return results, long.result

    results, aborted = asyncio.run(main())
    aeng.shutdown()
    assert not aeng.running
    alone = [Engine(tiny_gemma3.model, None, EngineConfig(n_ctx=1024)) for _ in prompts]
    for e, p, r in zip(alone, prompts, results):
        req = e.add_request(p, GREEDY)
        e.run_until_done()
        assert r.tokens == req.result.tokens
    assert aborted.finish_reason == "abort" and 3 <= len(aborted.tokens) < 500
    assert eng.n_running() == 0
