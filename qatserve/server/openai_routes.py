"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (also without /v1)."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from qatserve.engine.async_engine import RequestHandle
from qatserve.server import generation, sse
from qatserve.server.body import parse_body
from qatserve.server.errors import APIError
from qatserve.server.openai_format import (FINISH, Reply, chat_body, chat_chunk, chat_logprob, completion_body,
                                           completion_chunk, completion_logprobs, new_id, usage)
from qatserve.server.prompts import chat_prompt, text_or_ids
from qatserve.server.sampling import engine_options, max_new_tokens, sampling_params
from qatserve.server.schemas import ChatCompletionRequest, CompletionRequest
from qatserve.server.state import ServerState, state_of

router = APIRouter()

# The status a client that went away "gets" (nginx's convention); nothing reaches it anyway.
CLIENT_CLOSED = 499


def check_model(state: ServerState, name: str | None) -> None:
    """A request may name the served model (id, file name, stem or path) or leave it out."""
    if name is not None and name not in state.model_names:
        raise APIError(404, f"model {name[:200]!r} is not served here; this server has {state.model_id!r}",
                       param="model", code="model_not_found")


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request) -> dict:
    state = state_of(request)
    cfg = state.loaded.config
    meta = {"n_vocab": cfg.n_vocab, "n_ctx_train": cfg.context_length, "n_embd": cfg.n_embd,
            "size": state.loaded.path.stat().st_size, "arch": cfg.arch}
    return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                        "owned_by": "qatserve", "meta": meta}]}


@router.post("/v1/chat/completions")
@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    check_model(state, body.model)
    ids = await chat_prompt(state.tokenizer, state.loaded.config.arch, body.messages)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    limit = max_new_tokens(len(ids), body.max_completion_tokens or body.max_tokens, state.n_ctx_slot, param,
                           prompt_param="messages")
    params = sampling_params(body, limit, n_probs=body.top_logprobs or 0, eog_ids=state.tokenizer.stop_ids)
    reply = Reply(new_id("chatcmpl"), state.model_id, chat=True)
    handle = await generation.submit(state, ids, params, reply.id, **engine_options(body, state))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.sse_response(_chat_frames(state, handle, reply, body.logprobs, include_usage),
                                on_close=lambda: generation.release(state, handle))
    got = await generation.collect(state, request, handle)
    if got is None:
        return Response(status_code=CLIENT_CLOSED)
    outs, result = got
    return JSONResponse(chat_body(reply, state.tokenizer, result, outs if body.logprobs else None))


async def _chat_frames(state: ServerState, handle: RequestHandle, reply: Reply, logprobs: bool,
                       include_usage: bool) -> AsyncIterator[bytes]:
    tok = state.tokenizer
    yield sse.event(chat_chunk(reply, {"role": "assistant", "content": ""}))
    async for out in generation.stream(state, handle):
        lp = {"content": [chat_logprob(tok, out)]} if logprobs and out.token >= 0 else None
        if out.text or lp:
            yield sse.event(chat_chunk(reply, {"content": out.text}, lp))
    result = handle.result
    if err := generation.end_error(state, result):
        yield sse.error_event(err)
        return
    last = chat_chunk(reply, {}, finish=FINISH.get(result.finish_reason, "stop"))
    yield sse.event({**last, "usage": usage(result), "timings": result.timings.as_dict()})
    if include_usage:
        yield sse.event({**reply.head(chunk=True), "choices": [], "usage": usage(result)})
    yield sse.DONE


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = state_of(request)
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    check_model(state, body.model)
    ids = await text_or_ids(state.tokenizer, body.prompt)
    params = sampling_params(body, max_new_tokens(len(ids), body.max_tokens, state.n_ctx_slot),
                             n_probs=body.logprobs or 0, eog_ids=state.tokenizer.stop_ids)
    reply = Reply(new_id("cmpl"), state.model_id, chat=False)
    echo = state.tokenizer.decode(ids, skip_special=True) if body.echo else ""
    handle = await generation.submit(state, ids, params, reply.id, **engine_options(body, state))
    want_lp = body.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.sse_response(_completion_frames(state, handle, reply, want_lp, include_usage, echo),
                                on_close=lambda: generation.release(state, handle))
    got = await generation.collect(state, request, handle)
    if got is None:
        return Response(status_code=CLIENT_CLOSED)
    outs, result = got
    return JSONResponse(completion_body(reply, state.tokenizer, result, outs if want_lp else None, echo))


async def _completion_frames(state: ServerState, handle: RequestHandle, reply: Reply, logprobs: bool,
                             include_usage: bool, echo: str) -> AsyncIterator[bytes]:
    tok = state.tokenizer
    offset = len(echo)
    if echo:
        yield sse.event(completion_chunk(reply, echo))
    async for out in generation.stream(state, handle):
        lp = completion_logprobs(tok, [out], offset) if logprobs and out.token >= 0 else None
        offset += len(lp["tokens"][0]) if lp else 0
        if out.text or lp:
            yield sse.event(completion_chunk(reply, out.text, lp))
    result = handle.result
    if err := generation.end_error(state, result):
        yield sse.error_event(err)
        return
    last = completion_chunk(reply, "", finish=FINISH.get(result.finish_reason, "stop"))
    yield sse.event({**last, "usage": usage(result), "timings": result.timings.as_dict()})
    if include_usage:
        yield sse.event({**reply.head(chunk=True), "choices": [], "usage": usage(result)})
    yield sse.DONE
