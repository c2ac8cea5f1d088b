"""OpenAI response shapes: chat and text completions, their stream chunks, usage and log-probs.

Shapes follow the OpenAI API reference field for field (id prefixes, object names, choices[].message
/ delta, usage, `logprobs.content[]` for chat and the tokens/token_logprobs/top_logprobs/text_offset
form for completions). Two llama.cpp extensions ride along, ignored by OpenAI clients: `timings` on
the final answer or chunk, and usage on the final chunk even without stream_options.include_usage.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from qatserve import __version__
from qatserve.engine.request import GenerationResult, TokenOut
from qatserve.formats.tokenizer import Tokenizer

FINGERPRINT = f"qatserve-{__version__}"
# The engine's "context" (slot full) is OpenAI's "length": the answer was cut for want of room.
FINISH = {"stop": "stop", "length": "length", "context": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Reply:
    """What every chunk of one answer shares."""

    id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def head(self, chunk: bool = False) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}


def usage(result: GenerationResult) -> dict:
    n_gen = len(result.tokens)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n_gen,
            "total_tokens": result.prompt_tokens + n_gen,
            "prompt_tokens_details": {"cached_tokens": result.timings.cache_n}}


def _piece(tok: Tokenizer, token: int) -> tuple[str, list[int]]:
    raw = tok.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


# -- chat -------------------------------------------------------------------------------------------

def chat_logprob(tok: Tokenizer, out: TokenOut) -> dict:
    text, raw = _piece(tok, out.token)
    top = []
    for t, lp in out.top:
        t_text, t_raw = _piece(tok, t)
        top.append({"token": t_text, "logprob": lp, "bytes": t_raw})
    return {"token": text, "logprob": out.logprob, "bytes": raw, "top_logprobs": top}


def chat_body(reply: Reply, tok: Tokenizer, result: GenerationResult, outs: list[TokenOut] | None) -> dict:
    """The non-streaming answer; `outs` given when log-probs were asked for."""
    logprobs = {"content": [chat_logprob(tok, o) for o in outs if o.token >= 0]} if outs is not None else None
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": logprobs,
              "finish_reason": FINISH.get(result.finish_reason, "stop")}
    return {**reply.head(), "choices": [choice], "usage": usage(result), "timings": result.timings.as_dict()}


def chat_chunk(reply: Reply, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
    return {**reply.head(chunk=True),
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


# -- text completions -------------------------------------------------------------------------------

def completion_logprobs(tok: Tokenizer, outs: list[TokenOut], offset: int = 0) -> dict:
    """OpenAI's completions form; `offset` is where the first token's text starts (echo shifts it)."""
    tokens, lps, tops, offsets = [], [], [], []
    for o in outs:
        if o.token < 0:
            continue
        text, _ = _piece(tok, o.token)
        tokens.append(text)
        lps.append(o.logprob)
        tops.append({_piece(tok, t)[0]: lp for t, lp in o.top} if o.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_body(reply: Reply, tok: Tokenizer, result: GenerationResult, outs: list[TokenOut] | None,
                    echo: str = "") -> dict:
    lp = completion_logprobs(tok, outs, len(echo)) if outs is not None else None
    choice = {"index": 0, "text": echo + result.text, "logprobs": lp,
              "finish_reason": FINISH.get(result.finish_reason, "stop")}
    return {**reply.head(), "choices": [choice], "usage": usage(result), "timings": result.timings.as_dict()}


def completion_chunk(reply: Reply, text: str, logprobs: dict | None = None, finish: str | None = None) -> dict:
    return {**reply.head(chunk=True),
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
