"""Request prompts -> token ids: chat messages through the model's chat template, text, or token ids.

Text is tokenised on a worker thread (asyncio.to_thread): a prompt of a few megabytes takes most of a
second to encode, and the event loop must keep answering /health and other clients meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qatserve.errors import TemplateError
from qatserve.formats.chat_template import chat_prompt_ids
from qatserve.formats.tokenizer import Tokenizer
from qatserve.server.errors import bad_request, from_engine
from qatserve.server.schemas import ChatMessage


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_ids(ids: list[Any], n_vocab: int, param: str) -> list[int]:
    """Token ids from JSON: each an integer in [0, n_vocab); 400 naming the position otherwise."""
    for i, t in enumerate(ids):
        # type() is int, not isinstance: JSON true/false arrive as bool, a subclass of int.
        if type(t) is not int or not 0 <= t < n_vocab:
            raise bad_request(f"{param}[{i}]: token id {_short(t)} is not an integer in [0, {n_vocab})", param=param)
    return list(ids)


def _messages(messages: list[ChatMessage]) -> list[dict]:
    # OpenAI's "developer" role is the newer name of "system"; templates only know the latter.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]


async def chat_prompt(tok: Tokenizer, arch: str, messages: list[ChatMessage]) -> list[int]:
    """Render (the model's template, as `qatserve run --chat`) and tokenise a conversation, ending with
    the assistant's turn opened."""
    try:
        return await asyncio.to_thread(chat_prompt_ids, tok, arch, _messages(messages))
    except TemplateError as e:
        raise from_engine(e) from None


async def text_or_ids(tok: Tokenizer, prompt: Any, param: str = "prompt", mixed: bool = False) -> list[int]:
    """OpenAI's `prompt`: a string, a list of one string, token ids, or a list of one token-id list.
    With `mixed` (llama.cpp's /completion), a list may interleave strings and token ids; only a leading
    string gets BOS."""
    n_vocab = tok.n_vocab
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if prompt == "" or prompt == []:
        # Refused although BOS alone could be conditioned on: an empty prompt is nearly always a bug.
        raise bad_request("the prompt is empty", param=param)
    if isinstance(prompt, str):
        return await asyncio.to_thread(tok.encode, prompt)
    if not isinstance(prompt, list):
        raise bad_request(f"{param} must be a string or an array of token ids", param=param)
    if any(isinstance(p, list) for p in prompt) or (not mixed and any(isinstance(p, str) for p in prompt)):
        raise bad_request(f"{param}: one prompt per request (a batch of several is not supported)", param=param)
    if not mixed or not any(isinstance(p, str) for p in prompt):
        return check_ids(prompt, n_vocab, param)
    out: list[int] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.extend(await asyncio.to_thread(tok.encode, p, None if i == 0 else False))
        elif type(p) is int and 0 <= p < n_vocab:
            out.append(p)
        else:
            raise bad_request(f"{param}[{i}]: expected a string or a token id in [0, {n_vocab}), got {_short(p)}",
                              param=param)
    return out
