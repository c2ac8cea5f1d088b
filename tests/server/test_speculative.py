"""`qatserve serve --lookup`: greedy output identical to the plain server, llama.cpp's draft fields in
`timings` (native and OpenAI responses, streamed and not), per-slot drafting state in /slots, the draft
counters in /metrics, and the per-request `speculative.*` fields with their validation."""

from __future__ import annotations

import pytest

from tests.server.conftest import request, slots_free, sse_events
from tests.server.test_errors import assert_error

# Prompts whose continuation repeats what came before, so prompt lookup has something to propose.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick brown",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
]
FOX = PROMPTS[0]
N = 24


def greedy(prompt, **extra) -> dict:
    return {"prompt": prompt, "n_predict": N, "temperature": 0, "return_tokens": True, **extra}


def check_draft_fields(t: dict) -> None:
    """llama.cpp's draft_n / draft_n_accepted and qatserve's two summaries, consistent with each other."""
    assert t["draft_n"] > 0 and 0 <= t["draft_n_accepted"] <= t["draft_n"], t
    assert t["draft_acceptance_rate"] == pytest.approx(t["draft_n_accepted"] / t["draft_n"])
    # tokens per verification forward: at least the target's own token, at most a whole block (3) + 1
    assert 1.0 <= t["draft_mean_accepted_length"] <= 4.0
    assert t["draft_n_accepted"] <= t["predicted_n"]


def metric_values(server) -> dict[str, float]:
    status, _, text = request(server, "GET", "/metrics")
    assert status == 200
    return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


@pytest.fixture(scope="module")
def pairs(server, spec_server):
    """(plain answer, --lookup answer) of every prompt, greedy."""
    out = []
    for p in PROMPTS:
        plain = request(server, "POST", "/completion", greedy(p))
        spec = request(spec_server, "POST", "/completion", greedy(p))
        assert plain[0] == 200 and spec[0] == 200, (plain, spec)
        out.append((plain[2], spec[2]))
    return out


def test_lookup_output_equals_plain(pairs):
    for plain, spec in pairs:
        assert spec["tokens"] == plain["tokens"] and len(spec["tokens"]) == N
        assert spec["content"] == plain["content"]


def test_lookup_timings_carry_draft_statistics(pairs):
    drafted = [spec["timings"] for _, spec in pairs if "draft_n" in spec["timings"]]
    assert len(drafted) >= 2, [spec["timings"] for _, spec in pairs]
    for t in drafted:
        check_draft_fields(t)
    assert sum(t["draft_n_accepted"] for t in drafted) > 0
    fox = pairs[0][1]
    assert fox["generation_settings"]["speculative.type"] == "ngram-simple"
    assert fox["generation_settings"]["speculative.n_max"] == 3


def test_openai_answers_carry_draft_timings(spec_server):
    body = {"prompt": FOX, "max_tokens": N, "temperature": 0}
    status, _, whole = request(spec_server, "POST", "/v1/completions", body)
    assert status == 200, whole
    check_draft_fields(whole["timings"])
    events = sse_events(spec_server, "/v1/completions", body)
    last = [e for e in events if e != "[DONE]" and e.get("choices") and e["choices"][0]["finish_reason"]][-1]
    assert last["timings"]["draft_n"] == whole["timings"]["draft_n"]  # the same tokens draft the same way
    assert "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"]) == \
        whole["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "Repeat this line three times: " + FOX}],
            "max_tokens": N, "temperature": 0}
    status, _, answer = request(spec_server, "POST", "/v1/chat/completions", chat)
    assert status == 200, answer
    check_draft_fields(answer["timings"])


def test_metrics_count_the_drafts(spec_server):
    before = metric_values(spec_server)
    _, _, r = request(spec_server, "POST", "/completion", greedy(FOX))
    after = metric_values(spec_server)
    t = r["timings"]
    assert after["qatserve_draft_tokens_total"] - before["qatserve_draft_tokens_total"] == t["draft_n"]
    assert after["qatserve_draft_tokens_accepted_total"] - before["qatserve_draft_tokens_accepted_total"] == \
        t["draft_n_accepted"]
    steps = after["qatserve_draft_verifications_total"] - before["qatserve_draft_verifications_total"]
    assert steps > 0 and t["draft_mean_accepted_length"] == pytest.approx(1 + t["draft_n_accepted"] / steps)
    assert after["qatserve_draft_acceptance_ratio"] == pytest.approx(
        after["qatserve_draft_tokens_accepted_total"] / after["qatserve_draft_tokens_total"])
    assert after["qatserve_draft_mean_accepted_length"] == pytest.approx(
        1 + after["qatserve_draft_tokens_accepted_total"] / after["qatserve_draft_verifications_total"])


def test_slots_show_each_slots_drafting(spec_server):
    _, _, r = request(spec_server, "POST", "/completion", greedy(FOX, id_slot=1))
    assert r["id_slot"] == 1
    status, _, slots = request(spec_server, "GET", "/slots")
    assert status == 200 and [s["speculative"] for s in slots] == [True, True]
    state = slots[1]["speculative_state"]  # the slot's last request
    assert state["type"] == "ngram-simple" and state["n_max"] == 3
    assert (state["draft_n"], state["draft_n_accepted"]) == (r["timings"]["draft_n"], r["timings"]["draft_n_accepted"])
    assert 0.0 < state["acceptance_estimate"] < 1.0 and state["drafting"] == (state["block"] > 0)


def test_request_block_settings_change_speed_not_output(spec_server, pairs):
    want = pairs[0][1]["tokens"]
    _, _, off = request(spec_server, "POST", "/completion", greedy(FOX, **{"speculative.n_max": 0}))
    assert off["tokens"] == want and "draft_n" not in off["timings"]  # no draft at all
    _, _, one = request(spec_server, "POST", "/completion", greedy(FOX, **{"speculative.n_max": 1}))
    assert one["tokens"] == want
    check_draft_fields(one["timings"])
    assert one["timings"]["draft_mean_accepted_length"] <= 2.0  # one draft token per verification at most
    _, _, picky = request(spec_server, "POST", "/completion",
                          greedy(FOX, **{"speculative.n_max": 4, "speculative.n_min": 4, "speculative.p_min": 0.5}))
    assert picky["tokens"] == want  # p_min does not apply to lookup drafts; n_min drops short ones
    assert picky["timings"].get("draft_n", 0) % 4 == 0  # only whole 4-token drafts were verified


BAD_FIELDS = [
    ({"speculative.n_max": -1}, "speculative.n_max"),
    ({"speculative.n_max": 65}, "speculative.n_max"),
    ({"speculative.n_max": "3"}, "speculative.n_max"),
    ({"speculative.n_max": 2.5}, "speculative.n_max"),
    ({"speculative.n_max": True}, "speculative.n_max"),
    ({"speculative.n_min": -1}, "speculative.n_min"),
    ({"speculative.n_min": 4}, "speculative.n_min"),  # above the server's block of 3
    ({"speculative.n_max": 2, "speculative.n_min": 3}, "speculative.n_min"),
    ({"speculative.p_min": 1.5}, "speculative.p_min"),
    ({"speculative.p_min": -0.1}, "speculative.p_min"),
    ({"speculative.p_min": "high"}, "speculative.p_min"),
    ({"id_slot": 2}, "id_slot"),  # -np 2: slots 0 and 1
    ({"id_slot": -2}, "id_slot"),
    ({"id_slot": "0"}, "id_slot"),
]


@pytest.mark.parametrize("route", ["/completion", "/v1/completions", "/v1/chat/completions"])
def test_bad_speculative_fields_are_400_with_param(spec_server, route):
    for fields, param in BAD_FIELDS:
        if route == "/v1/chat/completions":
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
        else:
            body = {"prompt": "hi", "max_tokens" if route.startswith("/v1") else "n_predict": 2, **fields}
        assert_error(request(spec_server, "POST", route, body), 400, param=param)
    assert slots_free(spec_server)
    assert request(spec_server, "GET", "/health")[0] == 200


def test_plain_server_accepts_and_ignores_block_settings(server):
    # Drafting is lossless: without a drafter the settings change nothing, so they are not an error.
    status, _, r = request(server, "POST", "/completion", {"prompt": "hi", "n_predict": 2, "speculative.n_max": 4})
    assert status == 200 and "draft_n" not in r["timings"]
    assert r["generation_settings"]["speculative.type"] == "none"
    assert_error(request(server, "POST", "/completion", {"prompt": "hi", "speculative.n_max": -1}), 400,
                 param="speculative.n_max")
