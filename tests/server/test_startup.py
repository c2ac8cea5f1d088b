"""Expected start-up failures of `qatserve serve`: one stderr line, a non-zero exit code, nothing listening.

The cases run as concurrent processes (each pays the interpreter's and torch's import once)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.server.conftest import free_port

CASES = {
    "missing model": (["-m", "/nonexistent/model.gguf"], 2, "cannot open"),
    "not a gguf": (["-m", "{bad}"], 2, "bad magic"),
    "port in use": (["--port", "{busy}"], 1, "cannot listen on"),
    "port out of range": (["--port", "70000"], 64, "--port"),
    "zero slots": (["-np", "0"], 64, "-np"),
    "bad host": (["--host", "no.such.host.invalid"], 1, "cannot resolve"),
    "missing assistant": (["--assistant", "/nonexistent/assistant.gguf"], 64, "--assistant"),
    "draft model not a gguf": (["-md", "{bad}"], 2, "bad magic"),
    "bad --draft-max": (["--lookup", "--draft-max", "many"], 64, "--draft-max"),
    "two drafters": (["--lookup", "-md", "{bad}"], 64, "choose one drafter"),
    "slot save path not a directory": (["--slot-save-path", "/nonexistent/slots"], 64, "--slot-save-path"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    bad = tmp_path_factory.mktemp("startup") / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 60)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    procs = {}
    for name, (argv, _, _) in CASES.items():
        argv = [a.format(bad=bad, busy=busy.getsockname()[1]) for a in argv]
        if "--port" not in argv:
            argv += ["--port", str(free_port())]
        procs[name] = subprocess.Popen([sys.executable, "-m", "qatserve", "serve", *argv],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield {name: (p.wait(120), *p.communicate()) for name, p in procs.items()}
    finally:
        busy.close()
        for p in procs.values():
            p.kill()


@pytest.mark.parametrize("name", CASES)
def test_startup_failure_is_one_line(outcomes, name):
    code, out, err = outcomes[name]
    _, want_code, want_text = CASES[name]
    assert code == want_code, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qatserve: error:") and want_text in lines[0], err
