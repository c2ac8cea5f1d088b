"""Server-sent events: `data: <json>\\n\\n` frames, OpenAI's `data: [DONE]`, and the streaming response.

Starlette's StreamingResponse listens for http.disconnect while it streams and cancels the body
iterator when the client goes away; the iterators built on generation.stream abort their engine
request in a finally, so a killed client frees its slot within one engine step.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Callable

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from qatserve.server.errors import APIError

log = logging.getLogger("qatserve.server")

DONE = b"data: [DONE]\n\n"


def event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def error_event(err: APIError) -> bytes:
    """An error after the 200 header went out: OpenAI's clients raise on a `data: {"error": ...}` frame."""
    return event(err.body())


async def _guarded(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # A bug inside a stream must end that stream with an error frame, not a truncated chunked body.
    try:
        async for frame in frames:
            yield frame
    except APIError as e:
        yield error_event(e)
    except Exception:
        log.exception("error while streaming a response")
        yield error_event(APIError(500, "internal error while streaming"))


def sse_response(frames: AsyncIterator[bytes], on_close: Callable[[], None]) -> StreamingResponse:
    """Stream `frames`; `on_close` runs once the response is over, however it ended: a client that
    disconnects before the first frame cancels the stream before the iterator ever starts, so its
    finally cannot be the only place that releases the engine request."""
    async def close() -> None:  # async, so Starlette runs it on the event loop, not in a worker thread
        on_close()

    # X-Accel-Buffering: a proxy such as nginx would otherwise hold tokens back in its buffer.
    return StreamingResponse(_guarded(frames), media_type="text/event-stream", background=BackgroundTask(close),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
