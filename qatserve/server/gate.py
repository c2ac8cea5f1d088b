"""Who may talk to the server, and when: the API key, and 503 until the model is ready.

A pure ASGI middleware, so a refused request is answered before its body is read. Every route but
/health needs `Authorization: Bearer KEY` (or llama.cpp's `X-Api-Key: KEY`) when --api-key is set:
admin routes (/slots, /metrics, /props, /tokenize) included. A key in the query string is not
accepted: URLs end up in logs. The compare is constant-time (hmac.compare_digest), so response
timing does not leak how much of a guessed key was right.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from qatserve.server.errors import APIError, unavailable
from qatserve.server.state import ServerState

OPEN_PATHS = frozenset({"/health", "/v1/health"})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


def key_matches(scope: Scope, key: bytes) -> bool:
    auth = _header(scope, b"authorization") or b""
    scheme, _, token = auth.partition(b" ")
    given = token.strip() if scheme.lower() == b"bearer" else (_header(scope, b"x-api-key") or b"")
    return hmac.compare_digest(given, key)


class Gate:
    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state
        self.key = state.config.api_key.encode() if state.config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.key is not None and not key_matches(scope, self.key):
            err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await err.response()(scope, receive, send)
        status, message = self.state.health()
        if status != 200 and not (self.state.draining and self.state.ready):
            # While draining, in-flight work continues and new generations get 503 from the engine.
            return await unavailable(message).response()(scope, receive, send)
        return await self.app(scope, receive, send)
