"""llama.cpp's server API: /completion with its timings block, streaming, /tokenize, /detokenize,
/slots, /props, /health and the Prometheus /metrics."""

from __future__ import annotations

from tests.server.conftest import request, sse_events

TIMINGS = {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"}
DRAFT = {"draft_n", "draft_n_accepted"}  # llama.cpp adds them only when the request drafted (test_speculative.py)


def test_completion_has_llamacpp_fields(server):
    status, _, r = request(server, "POST", "/completion",
                           {"prompt": "The capital of France is", "n_predict": 6, "temperature": 0,
                            "n_probs": 2, "return_tokens": True})
    assert status == 200, r
    assert r["stop"] is True and r["stop_type"] == "limit" and r["tokens_predicted"] == 6
    assert len(r["tokens"]) == 6 and r["tokens_evaluated"] > 1
    t = r["timings"]
    assert TIMINGS <= set(t) and t["predicted_n"] == 6 and t["predicted_per_second"] > 0
    assert not DRAFT & set(t)  # no drafter on this server
    assert t["prompt_n"] + t["cache_n"] == r["tokens_evaluated"]
    probs = r["completion_probabilities"]
    assert len(probs) == 6 and all(len(p["top_logprobs"]) == 2 for p in probs)
    assert [p["id"] for p in probs] == r["tokens"]
    assert r["generation_settings"]["n_predict"] == 6 and r["generation_settings"]["temperature"] == 0


def test_completion_stream_equals_whole(server):
    body = {"prompt": "Water boils at", "n_predict": 6, "temperature": 0}
    _, _, whole = request(server, "POST", "/completion", body)
    events = sse_events(server, "/completion", body)
    assert "[DONE]" not in events  # llama.cpp's native stream has no [DONE]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == whole["content"]
    assert TIMINGS <= set(events[-1]["timings"])


def test_completion_stop_word_and_seed(server):
    free = request(server, "POST", "/completion", {"prompt": "1, 2, 3,", "n_predict": 8, "temperature": 0})[2]
    word = free["content"].split(",")[1]
    r = request(server, "POST", "/completion", {"prompt": "1, 2, 3,", "n_predict": 8, "temperature": 0,
                                                "stop": [word]})[2]
    assert r["stop_type"] == "word" and r["stopping_word"] == word and word not in r["content"]
    sampled = {"prompt": "Once upon a time", "n_predict": 6, "temperature": 1.0, "seed": 42}
    assert request(server, "POST", "/completion", sampled)[2]["content"] == \
        request(server, "POST", "/completion", sampled)[2]["content"]


def test_tokenize_detokenize_round_trip(server):
    text = "Hello, wörld! 你好"
    _, _, tok = request(server, "POST", "/tokenize", {"content": text})
    assert tok["tokens"] and all(isinstance(t, int) for t in tok["tokens"])
    _, _, with_bos = request(server, "POST", "/tokenize", {"content": text, "add_special": True})
    assert with_bos["tokens"] == [2] + tok["tokens"]  # Gemma's BOS
    _, _, pieces = request(server, "POST", "/tokenize", {"content": text, "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == tok["tokens"]
    _, _, back = request(server, "POST", "/detokenize", {"tokens": tok["tokens"]})
    assert back["content"] == text


def test_slots_and_props(server):
    status, _, slots = request(server, "GET", "/slots")
    assert status == 200 and len(slots) == 4
    assert all(s["n_ctx"] == 1024 and s["is_processing"] is False for s in slots)
    _, _, props = request(server, "GET", "/props")
    assert props["total_slots"] == 4 and props["default_generation_settings"]["n_ctx"] == 1024
    assert "<start_of_turn>" in props["chat_template"] and props["bos_token"] == "<bos>"
    assert props["startup_seconds"]["ready"] > 0


def test_metrics(server):
    request(server, "POST", "/completion", {"prompt": "Hi", "n_predict": 2})
    status, headers, text = request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    for name in ("qatserve_prompt_tokens_total", "qatserve_generated_tokens_total",
                 "qatserve_generation_tokens_per_second", "qatserve_requests_waiting", "qatserve_requests_running",
                 "qatserve_kv_cache_usage_ratio", "qatserve_draft_acceptance_ratio", "qatserve_draft_tokens_total"):
        assert name in values, name
    assert values["qatserve_generated_tokens_total"] >= 2 and values["qatserve_generation_tokens_per_second"] > 0
    assert values["qatserve_slots_total"] == 4



def test_ignore_eos_is_a_boolean_that_bans_end_of_generation(server):
    # The behaviour (a request that would end at <|im_end|> runs to its limit) is tested on SmolLM2 in
    # tests/cli/test_cli.py; here: the server maps the field onto the sampler and validates it.
    from qatserve.server.sampling import sampling_params
    from qatserve.server.schemas import LlamaCompletionRequest

    body = LlamaCompletionRequest.model_validate({"prompt": "Hi", "ignore_eos": True})
    assert sampling_params(body, 8, eog_ids=frozenset({106, 1})).suppressed == (1, 106)
    assert sampling_params(body.model_copy(update={"ignore_eos": False}), 8, eog_ids=frozenset({1})).suppressed == ()
    status, _, r = request(server, "POST", "/completion", {"prompt": "Hi", "n_predict": 3, "ignore_eos": "yes"})
    assert status == 400 and r["error"]["param"] == "ignore_eos", r
    status, _, r = request(server, "POST", "/completion",
                           {"prompt": "Hi", "n_predict": 5, "ignore_eos": True, "temperature": 0})
    assert status == 200 and r["tokens_predicted"] == 5, r
