"""Start an HTTP inference server as a child process and time it to /health 200; stop it.

Both servers of a bench run go through here (`qatserve serve` and llama.cpp's `llama-server`), so the
load-to-listening figure means the same for both: from just before the process is spawned until the first
/health answer with status 200 (polled every 20 ms), i.e. what a user waits before the first request runs.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_S = 0.02  # /health poll period: the timing resolution, cheap for the loaded server


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health 200 in time; the message ends with its last log lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(port: int, timeout: float = 1.0) -> int | None:
    """/health's status code, or None when nothing answers."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status
        finally:
            conn.close()
    except OSError:
        return None


def qatserve_argv(model: str | Path | None, port: int, extra: list[str]) -> list[str]:
    """`qatserve serve` under this interpreter (model None: the server's default model)."""
    model_args = ["-m", str(model)] if model is not None else []
    return [sys.executable, "-m", "qatserve", "serve", *model_args, "--host", "127.0.0.1", "--port", str(port), *extra]


def llama_server_argv(binary: str | Path, model: str | Path, port: int, extra: list[str]) -> list[str]:
    # --no-webui: nothing to serve to a browser; metrics/slots endpoints stay at their defaults.
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--no-webui", *extra]


class ServerProcess:
    """A server child process; `start()` returns the seconds to /health 200. Use as a context manager."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str] | None = None, name: str = "server"):
        self.argv, self.port, self.name = argv, port, name
        # The user's QATSERVE_API_KEY would make the child demand a key from us: the bench runs keyless on
        # 127.0.0.1. PYTHONUNBUFFERED: the log shows each line as it happens (read on failure).
        base = {k: v for k, v in os.environ.items() if k != "QATSERVE_API_KEY"}
        # The child imports the same qatserve as this process, wherever the working directory is.
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, base.get("PYTHONPATH")) if p)
        self.env = {**base, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")

    def start(self, timeout: float = 300.0) -> float:
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        except OSError as e:
            raise ServerStartError(f"{self.name}: cannot start {self.argv[0]}: {e.strerror or e}") from None
        while True:
            if health_status(self.port) == 200:
                return time.perf_counter() - t0
            if self.proc.poll() is not None:
                raise ServerStartError(f"{self.name} exited with code {self.proc.returncode} before /health "
                                       f"answered 200: {self.log_tail()}")
            if time.perf_counter() - t0 > timeout:
                raise ServerStartError(f"{self.name}: /health not 200 after {timeout:.0f} s: {self.log_tail()}")
            time.sleep(POLL_S)

    def log_tail(self, lines: int = 3) -> str:
        """The last non-empty lines of the server's output, joined with ' | '."""
        self._log.flush()
        self._log.seek(0)
        text = [ln.strip() for ln in self._log.read().splitlines() if ln.strip()]
        self._log.seek(0, 2)
        return " | ".join(text[-lines:]) or "(no output)"

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        out = self._log.read()
        self._log.seek(0, 2)
        return out

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
