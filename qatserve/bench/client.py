"""The bench's HTTP client: llama.cpp's /tokenize and /completion, which both servers speak.

`complete` returns the answer's `timings` block (prompt_n, prompt_per_second, predicted_n,
predicted_per_second, draft_n, draft_n_accepted) and the request's wall time; `stream_complete` also
stamps each streamed token with its arrival time, for the concurrent (aggregate) measurement.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field

TIMEOUT_S = 1800.0  # one request may decode thousands of tokens on a slow, shared CPU


class BenchRequestError(RuntimeError):
    """A request failed (HTTP error, broken answer); the message has the server's error text."""


@dataclass
class Completion:
    timings: dict
    wall_s: float
    n_tokens: int  # tokens generated, as the answer counts them
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, tokens) per frame
    t_start: float = 0.0


def _conn(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)


def _error_text(status: int, payload: bytes) -> str:
    try:
        err = json.loads(payload)
        msg = err.get("error", err)
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except ValueError:
        msg = payload.decode("utf-8", "replace")[:300]
    return f"HTTP {status}: {msg}"


def post_json(port: int, path: str, body: dict) -> dict:
    conn = _conn(port)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
    except OSError as e:
        raise BenchRequestError(f"POST {path}: {e}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise BenchRequestError(f"POST {path}: {_error_text(resp.status, payload)}")
    try:
        return json.loads(payload)
    except ValueError:
        raise BenchRequestError(f"POST {path}: the answer is not JSON") from None


def tokenize(port: int, text: str, add_special: bool = False) -> list[int]:
    out = post_json(port, "/tokenize", {"content": text, "add_special": add_special})
    return [t if isinstance(t, int) else t["id"] for t in out["tokens"]]


def _body(prompt: list[int], n_predict: int, stream: bool) -> dict:
    # Greedy, no prompt reuse between requests (cache_prompt false; the prompts also differ in their
    # first tokens, which defeats qatserve's server-wide prefix cache too).
    return {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "cache_prompt": False,
            "stream": stream, "seed": 1}


def complete(port: int, prompt: list[int], n_predict: int) -> Completion:
    t0 = time.perf_counter()
    out = post_json(port, "/completion", _body(prompt, n_predict, False))
    wall = time.perf_counter() - t0
    if not isinstance(out.get("timings"), dict):
        raise BenchRequestError("POST /completion: the answer has no timings block")
    return Completion(out["timings"], wall, int(out.get("tokens_predicted", out["timings"].get("predicted_n", 0))),
                      t_start=t0)


def stream_complete(port: int, prompt: list[int], n_predict: int) -> Completion:
    """One streamed /completion; each SSE frame with tokens is stamped on arrival."""
    conn = _conn(port)
    stamps: list[tuple[float, int]] = []
    final: dict | None = None
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/completion", body=json.dumps(_body(prompt, n_predict, True)),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise BenchRequestError(f"POST /completion (stream): {_error_text(resp.status, resp.read())}")
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            try:
                frame = json.loads(line[6:])
            except ValueError:
                continue  # "[DONE]" or a partial keep-alive line
            if "error" in frame:
                raise BenchRequestError(f"POST /completion (stream): {frame['error']}")
            if frame.get("stop"):
                final = frame
                break
            n = len(frame.get("tokens") or []) or (1 if frame.get("content") else 0)
            if n:
                stamps.append((now, n))
    except OSError as e:
        raise BenchRequestError(f"POST /completion (stream): {e}") from None
    finally:
        conn.close()
    if final is None or not isinstance(final.get("timings"), dict):
        raise BenchRequestError("POST /completion (stream): the stream ended without its final timings frame")
    return Completion(final["timings"], time.perf_counter() - t0, sum(n for _, n in stamps), stamps, t0)
