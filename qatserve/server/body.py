"""Reading a request body as one JSON object, with bounded memory and time.

The size is checked from Content-Length before anything is read, and again while a chunked body
streams in, so a 100 MB upload costs at most `limit` bytes. Malformed JSON, a 10^5-deep nesting
(json raises RecursionError), a 10^6-digit number (ValueError since Python 3.11) and a top-level
array or scalar are all 400s.
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import ClientDisconnect, Request

from qatserve.server.errors import APIError, bad_request


_JSON_NAMES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


async def _read_limited(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    # Connection: close, because the rest of the body is never read and the connection cannot be reused.
    return APIError(413, f"request body exceeds the server's limit of {limit} bytes (--body-limit)",
                    code="request_too_large", headers={"Connection": "close"})


async def read_json_object(request: Request, limit: int, timeout: float) -> dict:
    """The body parsed as a JSON object; APIError 400/408/411/413 otherwise."""
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if length is None and not chunked:
        raise APIError(411, "a request body with Content-Length (or chunked transfer encoding) is required",
                       code="length_required")
    if length is not None:
        if not length.isdigit():
            raise bad_request(f"invalid Content-Length {length[:32]!r}")
        if int(length) > limit:
            raise _too_large(limit)
    try:
        # A client that trickles its body (slow-loris on the body) is cut after `timeout` seconds.
        raw = await asyncio.wait_for(_read_limited(request, limit), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"request body not received within {timeout:g} s", code="timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise APIError(400, "client disconnected while sending the body") from None
    if not raw.strip():
        raise bad_request("request body is empty: expected a JSON object")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise bad_request("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        if "integer string conversion" in str(e):  # Python's 4300-digit cap on int parsing
            raise bad_request("request body has a number with more than 4300 digits") from None
        raise bad_request(f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got a JSON {_JSON_NAMES.get(type(data), 'value')}")
    return data


async def parse_body(request: Request, model: type):
    """Read, parse and validate the body of a POST route against a schemas model."""
    from qatserve.server.schemas import parse

    cfg = request.app.state.qs.config
    return parse(model, await read_json_object(request, cfg.body_limit, cfg.timeout))
