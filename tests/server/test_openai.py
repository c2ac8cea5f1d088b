"""The OpenAI API as the official `openai` client sees it: chat and text completions, streaming and not,
usage, stop strings, seeds, log-probs; and 32 concurrent streams on 4 slots equal to sequential runs."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.server.conftest import API_KEY, request, sse_events, wait_slots_free

GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client, model_id):
    models = client.models.list().data
    assert [m.id for m in models] == [model_id]
    assert model_id.endswith(".gguf") and models[0].object == "model"


def test_chat_completion(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Say hello"}],
                                       **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model_id
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client, model_id):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}]
    whole = client.chat.completions.create(model=model_id, messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_completion_and_stream(client, model_id):
    prompt = "The capital of France is"
    whole = client.completions.create(model=model_id, prompt=prompt, **GREEDY)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8
    chunks = list(client.completions.create(model=model_id, prompt=prompt, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    # The final chunk carries usage even without stream_options (llama.cpp's behaviour).
    assert chunks[-1].usage.completion_tokens == 8


def test_completion_with_token_ids_equals_text(client, model_id, server):
    _, _, tok = request(server, "POST", "/tokenize", {"content": "1, 2, 3,", "add_special": True})
    by_text = client.completions.create(model=model_id, prompt="1, 2, 3,", **GREEDY)
    by_ids = client.completions.create(model=model_id, prompt=tok["tokens"], **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_stop_string_ends_generation(client, model_id):
    prompt = "1, 2, 3, 4, 5,"
    free = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=12).choices[0].text
    stop = free.strip().split(",")[1].strip()  # a number the model writes later on
    assert stop
    r = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=12, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text and free.startswith(r.choices[0].text)


def test_seed_makes_sampling_reproducible(client, model_id):
    kw = dict(model=model_id, prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_chat_logprobs(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                       logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 8
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token and entry.logprob <= 0
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content[:1])


def test_completion_logprobs(client, model_id):
    r = client.completions.create(model=model_id, prompt="The sky is", logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


def test_bad_key_is_401(server):
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_32_concurrent_streams_on_4_slots_equal_sequential(server, client, model_id):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(8)]
    sequential = [client.completions.create(model=model_id, prompt=p, **GREEDY).choices[0].text for p in prompts]

    async def one(aclient, prompt):
        text = ""
        stream = await aclient.completions.create(model=model_id, prompt=prompt, stream=True, **GREEDY)
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
        return text

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=300) as aclient:
            return await asyncio.gather(*(one(aclient, prompts[i % 8]) for i in range(32)))

    concurrent = asyncio.run(all_of_them())
    assert concurrent == [sequential[i % 8] for i in range(32)]
    wait_slots_free(server, 1.0)


def test_raw_sse_ends_with_done(server):
    events = sse_events(server, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "Hi"}], **GREEDY})
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert set(final["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
