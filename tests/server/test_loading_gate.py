"""/health and every other route answer 503 until the start-up work the server waits for is done, then 200.

In-process (the app from create_app with a warm-up held on an event): a subprocess server builds its
kernels beside the model and tokenizer (server/launch.py), so whether any 503 is left to see once it
listens depends on the machine's speed; here the window is held open on purpose."""

from __future__ import annotations

import threading
import time

import pytest
from starlette.testclient import TestClient

from qatserve.engine.engine import Engine, EngineConfig
from qatserve.engine.loader import load_model_file
from qatserve.server.app import create_app
from qatserve.server.state import ServerConfig, ServerState


@pytest.fixture(scope="module")
def loaded(gemma_path):
    loaded = load_model_file(gemma_path)
    yield loaded
    loaded.gguf.close()


def test_503_until_warm_up_is_done_then_200(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(n_ctx=256, n_slots=1))
    release, entered = threading.Event(), threading.Event()
    ready_calls: list[float] = []

    def warm_up() -> None:
        entered.set()
        assert release.wait(30)

    app = create_app(ServerState(loaded, engine, ServerConfig()), warm_up=warm_up,
                     on_ready=lambda st: ready_calls.append(time.monotonic()))
    with TestClient(app) as client:
        assert entered.wait(30)
        health = client.get("/health")
        assert health.status_code == 503 and "Loading model" in health.json()["error"]["message"]
        assert client.get("/v1/models").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 503 and not ready_calls
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "not ready 30 s after the warm-up finished"
            time.sleep(0.01)
        assert len(ready_calls) == 1
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
