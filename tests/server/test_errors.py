"""Every bad input of the issue and of faults.md items 15-19 and 22, over raw HTTP: an OpenAI-shaped
error with the right status (and `param` where a field is at fault), and a server that is still
healthy, with every slot free, afterwards."""

from __future__ import annotations

import json
import socket

import pytest

from tests.server.conftest import AUTH, request, slots_free

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def assert_error(resp, status: int, param: str | None = None, code: str | None = None) -> dict:
    got, headers, body = resp
    assert got == status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def raw_exchange(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or stays quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:  # the server may answer and close before it has read everything
            pass
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b'"error"' in b"".join(chunks):
                    break
        except OSError:
            pass
    return b"".join(chunks)


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# -- 15: the body itself -----------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2, 3]", b"42", b'"a string"', b"null", b"\xff\xfe{}", b""])
def test_body_not_a_json_object(server, raw):
    assert_error(request(server, "POST", CHAT, raw=raw), 400)


def test_deep_nesting(server):
    raw = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(request(server, "POST", CHAT, raw=raw), 400)


def test_huge_number(server):
    assert_error(request(server, "POST", COMPLETIONS, raw=b'{"prompt": "x", "max_tokens": ' + b"9" * 100_000 + b"}"), 400)


def test_oversized_body_by_content_length(server):
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * 2**20}\r\n\r\n").encode()
    status, body = status_and_json(raw_exchange(server.port, head + b"{" + b" " * 2**20))
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_oversized_chunked_body(server):
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b" " * 2**20
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(10)) + b"0\r\n\r\n"
    status, _ = status_and_json(raw_exchange(server.port, head + body))
    assert status == 413


def test_missing_content_length(server):
    raw = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n\r\n".encode()
    status, body = status_and_json(raw_exchange(server.port, raw))
    assert status == 411 and body["error"]["type"] == "invalid_request_error"


# -- 16: wrong values and types ----------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1e12), ("max_tokens", "10"),
    ("temperature", -1), ("temperature", "hot"), ("top_p", 1.5), ("top_k", -5), ("n", 1000),
    ("seed", 2**80), ("min_p", 2), ("presence_penalty", 5), ("stream", "yes"), ("top_logprobs", 10**6),
])
def test_bad_chat_field(server, field, value):
    body = {"messages": USER, "max_tokens": 4, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    assert_error(request(server, "POST", CHAT, body), 400, param=field)


def test_nan_temperature(server):
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    assert_error(request(server, "POST", CHAT, raw=raw), 400, param="temperature")


@pytest.mark.parametrize("field, value", [("logprobs", 10**6), ("max_tokens", 10**12), ("echo", 1)])
def test_bad_completion_field(server, field, value):
    err = assert_error(request(server, "POST", COMPLETIONS, {"prompt": "hi", field: value}), 400, param=field)
    if field == "max_tokens":
        assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("field, value", [("n_keep", -5), ("n_discard", -1), ("n_predict", 0), ("n_probs", 10**6),
                                          ("seed", -2)])
def test_bad_llamacpp_field(server, field, value):
    assert_error(request(server, "POST", "/completion", {"prompt": "hi", "n_predict": 2, field: value}), 400,
                 param=field)


# -- 17: context -------------------------------------------------------------------------------------

def test_prompt_longer_than_context(server):
    err = assert_error(request(server, "POST", COMPLETIONS, {"prompt": "hello " * 1500, "max_tokens": 4}), 400,
                       code="context_length_exceeded")
    assert "1024" in err["message"]  # the slot context of -c 4096 / -np 4


def test_chat_longer_than_context(server):
    messages = [{"role": "user", "content": "hello " * 1500}]
    assert_error(request(server, "POST", CHAT, {"messages": messages}), 400, param="messages",
                 code="context_length_exceeded")


def test_prompt_plus_max_tokens_over_context(server):
    err = assert_error(request(server, "POST", CHAT, {"messages": USER, "max_tokens": 1020}), 400,
                       param="max_tokens", code="context_length_exceeded")
    assert "1020" in err["message"] and "1024" in err["message"]


# -- 18: prompts and messages ------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [[-1], [262144], [2**40], [2, True], [], "", [[1, 2], [3, 4]], {"a": 1}])
def test_bad_prompt(server, prompt):
    assert_error(request(server, "POST", COMPLETIONS, {"prompt": prompt, "max_tokens": 2}), 400, param="prompt")


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "wizard", "content": "hi"}], "messages.0.role"),
    ([{"role": "tool", "content": "hi"}], "messages.0.role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages.0.content"),
    ([{"role": "user", "content": 42}], "messages.0.content"),
    ("hello", "messages"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages"),  # the template refuses
])
def test_bad_messages(server, messages, param):
    assert_error(request(server, "POST", CHAT, {"messages": messages, "max_tokens": 2}), 400, param=param)


def test_text_parts_are_accepted(server):
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]
    status, _, body = request(server, "POST", CHAT, {"messages": [{"role": "user", "content": parts}],
                                                     "max_tokens": 2, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_bad_token_ids_to_detokenize(server):
    assert_error(request(server, "POST", "/detokenize", {"tokens": [1, -1]}), 400, param="tokens")


# -- 19: caps and unsupported features ---------------------------------------------------------------

@pytest.mark.parametrize("stop", [["x"] * 10_000, "y" * 2**20, [""], [1, 2]])
def test_stop_caps(server, stop):
    assert_error(request(server, "POST", CHAT, {"messages": USER, "max_tokens": 2, "stop": stop}), 400, param="stop")


@pytest.mark.parametrize("path, field, value", [
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]),
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    (CHAT, "grammar", "root ::= " + "(" * 1000),
    ("/completion", "grammar", "%llguidance {}"),
    ("/completion", "json_schema", {"type": "object"}),
    (COMPLETIONS, "suffix", "end"),
])
def test_unsupported_features(server, path, field, value):
    body = {"max_tokens": 2, "n_predict": 2, field: value}
    body.update({"messages": USER} if path == CHAT else {"prompt": "hi"})
    assert_error(request(server, "POST", path, body), 400, param=field, code="unsupported_parameter")


# -- 22: authentication ------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", CHAT), ("POST", COMPLETIONS),
                                          ("POST", "/completion"), ("GET", "/slots"), ("GET", "/metrics"),
                                          ("GET", "/props"), ("POST", "/tokenize"), ("POST", "/detokenize")])
@pytest.mark.parametrize("headers", [{"Authorization": ""}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic dGVzdC1rZXk="}, {"Authorization": "test-key"}])
def test_auth_everywhere(server, method, path, headers):
    err = assert_error(request(server, method, path, {"messages": USER}, headers=headers), 401)
    assert err["type"] == "authentication_error"


def test_key_in_query_string_is_refused(server):
    assert_error(request(server, "GET", "/v1/models?api_key=test-key", headers={"Authorization": ""}), 401)


def test_x_api_key_header_is_accepted(server):
    status, _, _ = request(server, "GET", "/v1/models", headers={"Authorization": "", "X-Api-Key": "test-key"})
    assert status == 200


def test_health_needs_no_key(server):
    status, _, body = request(server, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and body == {"status": "ok"}


# -- routing -----------------------------------------------------------------------------------------

def test_unknown_route_and_method(server):
    assert_error(request(server, "GET", "/v1/nothing-here"), 404)
    assert_error(request(server, "GET", CHAT), 405)
    assert_error(request(server, "POST", COMPLETIONS, {"prompt": "hi", "model": "nope"}), 404, param="model",
                 code="model_not_found")


def test_server_unharmed(server):
    """Runs after the cases above (file order): still healthy, no slot held, no KV block leaked."""
    assert request(server, "GET", "/health")[0] == 200
    assert slots_free(server)
    _, _, metrics = request(server, "GET", "/metrics")
    usage = [ln for ln in metrics.splitlines() if ln.startswith("qatserve_kv_cache_usage_ratio")]
    assert usage == ["qatserve_kv_cache_usage_ratio 0.0"], usage
    status, _, body = request(server, "POST", COMPLETIONS, {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
