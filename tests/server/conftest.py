"""A real `qatserve serve` process on 127.0.0.1 with the default model, and small raw-HTTP helpers.

The main server (-np 4, an API key, a 3 s connection timeout so the slow-loris test is quick) is
started once per test session and shared by the modules; tests that stop a server start their own.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
READY_TIMEOUT = 180.0  # s; a loaded 2-core CI machine can take a while to import torch and build kernels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m qatserve serve ...` as a subprocess; stderr goes to a log file read on failure."""

    def __init__(self, tmp: Path, *args: str, key: str | None = API_KEY):
        self.port = free_port()
        self.log_path = tmp / f"server-{self.port}.log"
        argv = [sys.executable, "-m", "qatserve", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        if key:
            argv += ["--api-key", key]
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=Path(__file__).resolve().parents[2])
        self.base = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll /health until 200; `self.loading_seen` keeps (health status, /v1/models status) seen before."""
        deadline = time.monotonic() + timeout
        self.loading_seen: list[tuple[int, int]] = getattr(self, "loading_seen", [])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, _ = request(self, "GET", "/health", timeout=2)
                if status == 200:
                    return
                self.loading_seen.append((status, request(self, "GET", "/v1/models", timeout=2)[0]))
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def request(server: Server, method: str, path: str, body=None, headers: dict | None = None,
            raw: bytes | None = None, timeout: float = 120) -> tuple[int, dict, object]:
    """One HTTP request on a fresh connection: (status, headers lower-cased, JSON or text body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={**AUTH, **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = payload.decode("utf-8", "replace")
    return resp.status, hdrs, parsed


def sse_events(server: Server, path: str, body: dict, timeout: float = 120) -> list:
    """POST with stream: true; the decoded `data:` payloads in order ('[DONE]' kept as a string)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers=AUTH)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("content-type", "").startswith("text/event-stream")
        text = resp.read().decode()
    finally:
        conn.close()
    out = []
    for frame in text.split("\n\n"):
        if frame.startswith("data: "):
            data = frame[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def slots_free(server: Server) -> bool:
    status, _, slots = request(server, "GET", "/slots")
    assert status == 200
    return not any(s["is_processing"] for s in slots)


def wait_slots_free(server: Server, within: float) -> float:
    """Poll /slots until no slot is busy; the seconds it took (fails after `within`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if slots_free(server):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"a slot is still busy after {within} s: {request(server, 'GET', '/slots')[2]}")


def _running(srv: Server):
    """A session fixture's body: the server ready for the tests, then stopped with a clean exit."""
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, f"server exit code {code}:\n{srv.log()}"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    # -b 128: a long prompt is read over several short steps, so a client can leave mid-prompt.
    srv = Server(tmp_path_factory.mktemp("server"), "-np", "4", "-c", "4096", "-b", "128", "--max-queue", "64",
                 "--timeout", "3", "-t", "2")
    yield from _running(srv)


@pytest.fixture(scope="session")
def spec_server(tmp_path_factory):
    """`--lookup` on 2 slots with slot files in `srv.slot_dir` (test_speculative.py, test_slot_files.py)."""
    tmp = tmp_path_factory.mktemp("spec")
    slot_dir = tmp / "slots"
    slot_dir.mkdir()
    srv = Server(tmp, "--lookup", "-np", "2", "-c", "2048", "-t", "2", "--slot-save-path", str(slot_dir))
    srv.slot_dir = slot_dir
    yield from _running(srv)
