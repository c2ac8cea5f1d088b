"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, and the mapping from
qatserve's typed errors to HTTP statuses.

Every failure a client can cause ends here as an `APIError`; the handlers installed by `install`
turn it (and Starlette's own 404/405, pydantic's validation errors and any unexpected exception) into
that JSON, so no traceback ever reaches a client.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qatserve.errors import QatserveError, RequestError, TemplateError, TokenizerError

log = logging.getLogger("qatserve.server")

# llama.cpp's server names where OpenAI has none (authentication_error, not_found_error, unavailable_error).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
          411: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 501: "not_supported_error", 503: "unavailable_error"}


class ServerError(QatserveError):
    """The server cannot start (port in use, bad flag combination): one stderr line, exit code 1."""

    exit_code = 1


class APIError(Exception):
    """An error answer: HTTP status plus OpenAI's error fields (`param` names the offending field)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str) -> APIError:
    # Retry-After: a load balancer or the openai client backs off instead of hammering a busy server.
    return APIError(503, message, headers={"Retry-After": "1"})


# SamplingParams names the field as "sampling parameter NAME: ..."; the API calls some of them otherwise.
_PARAM_RE = re.compile(r"^sampling parameter (\w+):")
_API_NAMES = {"n_probs": "logprobs"}


def from_engine(e: Exception) -> APIError:
    """Map an error raised while validating or queueing a request to its HTTP answer."""
    from qatserve.engine.async_engine import EngineStopped
    from qatserve.engine.engine import QueueFull

    if isinstance(e, QueueFull):
        return APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineStopped):
        return unavailable(str(e))
    if isinstance(e, TemplateError):
        return bad_request(str(e), param="messages", code="invalid_chat_template")
    if isinstance(e, (RequestError, TokenizerError)):
        m = _PARAM_RE.match(str(e))
        param = _API_NAMES.get(m.group(1), m.group(1)) if m else None
        return bad_request(str(e), param=param)
    log.exception("unexpected error while handling a request")
    return APIError(500, f"internal error: {type(e).__name__}")


def _validation_message(err: dict) -> tuple[str, str | None]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")  # pydantic's wrapper of our ValueErrors
    return (f"{param}: {msg}" if param else msg), param


def from_validation(errors: list[dict]) -> APIError:
    """The first pydantic error as a 400 naming the field (OpenAI answers wrong types with 400)."""
    message, param = _validation_message(errors[0]) if errors else ("invalid request", None)
    return bad_request(message, param=param)


def install(app: FastAPI) -> None:
    """Register the handlers that give every error response the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}").response()
