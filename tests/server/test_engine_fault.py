"""faults.md item 24: an exception inside an engine step mid-batch. The requests in flight end with a
500 or an SSE error frame (no hang), /health turns 503, and new requests are refused at once.

In-process (the app from create_app over a real engine with an injected fault), because a subprocess
server has no way to inject one."""

from __future__ import annotations

import json
import threading

import pytest
from starlette.testclient import TestClient

from qatserve.engine.engine import Engine, EngineConfig
from qatserve.engine.loader import load_model_file
from qatserve.server.app import create_app
from qatserve.server.state import ServerConfig, ServerState


@pytest.fixture(scope="module")
def faulty_app(gemma_path):
    loaded = load_model_file(gemma_path)
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(n_ctx=512, n_slots=2))
    real_step, calls = engine.step, [0]

    def step():
        calls[0] += 1
        if calls[0] == 4:  # after prompt and a few tokens of both requests
            raise RuntimeError("injected engine fault")
        return real_step()

    engine.step = step
    yield create_app(ServerState(loaded, engine, ServerConfig()))
    loaded.gguf.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_engine_fault_fails_requests_cleanly(faulty_app):
    body = {"prompt": "Tell me a story", "max_tokens": 50, "temperature": 0}
    with TestClient(faulty_app) as client:
        assert client.get("/health").status_code == 200
        plain: list = []
        t = threading.Thread(target=lambda: plain.append(client.post("/v1/completions", json=body)))
        t.start()
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            frames = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        t.join(60)
        last = json.loads(frames[-1])
        assert last["error"]["type"] == "server_error" and last["error"]["code"] == "engine_failed"
        assert plain[0].status_code == 500 and plain[0].json()["error"]["code"] == "engine_failed"
        health = client.get("/health")
        assert health.status_code == 503 and "engine" in health.json()["error"]["message"]
        again = client.post("/v1/completions", json=body)
        assert again.status_code == 503 and set(again.json()["error"]) == {"message", "type", "param", "code"}
