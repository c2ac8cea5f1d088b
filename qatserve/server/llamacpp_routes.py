"""llama.cpp-server-compatible routes: /completion, /tokenize, /detokenize, /health, /slots, /props.

Field names follow llama.cpp's tools/server (README of the server): `content`, `stop`, `stop_type`,
`tokens_predicted`, `tokens_evaluated`, `timings` with prompt_n / prompt_per_second / predicted_n /
predicted_per_second and the draft counts (draft_n, draft_n_accepted), `completion_probabilities`.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from qatserve import __version__
from qatserve.engine.async_engine import RequestHandle
from qatserve.engine.request import GenerationResult, TokenOut
from qatserve.engine.sampler import SamplingParams
from qatserve.server import generation, sse
from qatserve.server.body import parse_body
from qatserve.server.errors import APIError
from qatserve.server.openai_format import new_id
from qatserve.server.openai_routes import CLIENT_CLOSED
from qatserve.server.prompts import check_ids, text_or_ids
from qatserve.server.sampling import engine_options, max_new_tokens, sampling_params
from qatserve.server.schemas import DetokenizeRequest, LlamaCompletionRequest, TokenizeRequest
from qatserve.server.state import ServerState, state_of

router = APIRouter()


# -- health and introspection -----------------------------------------------------------------------

@router.get("/health")
@router.get("/v1/health")
async def health(request: Request) -> JSONResponse:
    status, message = state_of(request).health()
    if status == 200:
        return JSONResponse({"status": "ok"})
    return APIError(status, message, headers={"Retry-After": "1"}).response()


@router.get("/slots")
async def slots(request: Request) -> list[dict]:
    # Read from the event loop while the engine thread steps: each field is one attribute read, so a
    # reply may mix two step boundaries but never sees a torn value.
    return state_of(request).engine.slot_info()


def _settings(state: ServerState, params: SamplingParams | None = None) -> dict:
    p = params or SamplingParams()
    return {"n_ctx": state.n_ctx_slot, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
            "min_p": p.min_p, "repeat_penalty": p.repeat_penalty, "repeat_last_n": p.repeat_last_n,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "seed": p.seed if p.seed is not None else -1, "n_predict": p.max_tokens, "stop": list(p.stop),
            "n_probs": p.n_probs, **_speculative_settings(state)}


def _speculative_settings(state: ServerState) -> dict:
    # llama.cpp's names in generation_settings (the server's defaults; a request may override the block)
    spec = state.engine.config.spec
    if spec is None or state.engine.spec is None:
        return {"speculative.type": "none"}
    return {"speculative.type": spec.type, "speculative.n_max": "auto" if spec.auto else spec.n_max,
            "speculative.n_min": spec.n_min, "speculative.p_min": spec.p_min}


@router.get("/props")
async def props(request: Request) -> dict:
    state = state_of(request)
    tok, eng = state.tokenizer, state.engine
    kv = eng.config.kv
    return {
        "default_generation_settings": {"n_ctx": state.n_ctx_slot, "params": _settings(state)},
        "total_slots": eng.config.n_slots,
        "model_path": str(state.loaded.path),
        "model_alias": state.model_id,
        "chat_template": state.chat_template,
        "bos_token": tok.token_piece(tok.bos_id) if tok.bos_id is not None else "",
        "eos_token": tok.token_piece(tok.eos_id) if tok.eos_id is not None else "",
        "build_info": f"qatserve {__version__}",
        "modalities": {"vision": False, "audio": False},
        "n_ctx": eng.cache.n_ctx,
        "kv_cache": {"type_k": kv.type_k, "type_v": kv.type_v, "rotate": kv.rotate,
                     "prefix_cache": kv.prefix_cache, "bytes_per_token": eng.cache.bytes_per_token()["total"]},
        "startup_seconds": state.startup,
    }


# -- tokens -----------------------------------------------------------------------------------------

@router.post("/tokenize")
async def tokenize(request: Request) -> dict:
    state = state_of(request)
    body: TokenizeRequest = await parse_body(request, TokenizeRequest)
    tok = state.tokenizer
    ids = await asyncio.to_thread(tok.encode, body.content, body.add_special, body.parse_special)
    if not body.with_pieces:
        return {"tokens": ids}
    pieces = []
    for t in ids:
        raw = tok.token_bytes(t)
        try:
            pieces.append({"id": t, "piece": raw.decode("utf-8")})
        except UnicodeDecodeError:  # a byte-fallback token: llama.cpp gives the bytes as a list
            pieces.append({"id": t, "piece": list(raw)})
    return {"tokens": pieces}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict:
    state = state_of(request)
    body: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
    ids = check_ids(body.tokens, state.tokenizer.n_vocab, "tokens")
    return {"content": await asyncio.to_thread(state.tokenizer.decode, ids)}


# -- /completion ------------------------------------------------------------------------------------

def _stop_type(result: GenerationResult) -> tuple[str, str]:
    if result.finish_reason == "stop":
        return ("word", result.stop_reason) if isinstance(result.stop_reason, str) else ("eos", "")
    if result.finish_reason in ("length", "context"):
        return "limit", ""
    return "none", ""


def _probs(state: ServerState, out: TokenOut) -> dict:
    tok = state.tokenizer

    def entry(t: int, lp: float) -> dict:
        raw = tok.token_bytes(t)
        return {"id": t, "token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": lp}

    return {**entry(out.token, out.logprob), "top_logprobs": [entry(t, lp) for t, lp in out.top]}


class _Completion:
    """The pieces of one /completion answer."""

    def __init__(self, state: ServerState, body: LlamaCompletionRequest, ids: list[int], params: SamplingParams,
                 handle: RequestHandle):
        self.state, self.body, self.ids, self.params, self.handle = state, body, ids, params, handle

    @property
    def slot(self) -> int:
        return self.handle.request.slot if self.handle.request is not None else -1

    def final(self, result: GenerationResult, content: str, outs: list[TokenOut] | None) -> dict:
        stop_type, word = _stop_type(result)
        tok = self.state.tokenizer
        d = {"index": 0, "content": content, "tokens": result.tokens if self.body.return_tokens else [],
             "id_slot": self.slot, "stop": True, "model": self.state.model_id,
             "tokens_predicted": len(result.tokens), "tokens_evaluated": result.prompt_tokens,
             "generation_settings": _settings(self.state, self.params),
             "prompt": tok.decode(self.ids), "has_new_line": "\n" in result.text, "truncated": False,
             "stop_type": stop_type, "stopping_word": word,
             "tokens_cached": result.prompt_tokens + len(result.tokens), "timings": result.timings.as_dict()}
        if outs is not None:
            d["completion_probabilities"] = [_probs(self.state, o) for o in outs if o.token >= 0]
        return d

    async def frames(self) -> AsyncIterator[bytes]:
        n = 0
        async for out in generation.stream(self.state, self.handle):
            n += out.token >= 0
            d = {"index": 0, "content": out.text, "tokens": [out.token] if out.token >= 0 else [],
                 "stop": False, "id_slot": self.slot, "tokens_predicted": n, "tokens_evaluated": len(self.ids)}
            if self.body.n_probs and out.token >= 0:
                d["completion_probabilities"] = [_probs(self.state, out)]
            yield sse.event(d)
        result = self.handle.result
        if err := generation.end_error(self.state, result):
            yield sse.error_event(err)
            return
        # llama.cpp's final frame carries an empty content (the text went out already) and no [DONE].
        yield sse.event(self.final(result, "", None))


@router.post("/completion")
@router.post("/completions")
async def completion(request: Request) -> Response:
    state = state_of(request)
    body: LlamaCompletionRequest = await parse_body(request, LlamaCompletionRequest)
    ids = await text_or_ids(state.tokenizer, body.prompt, mixed=True)
    requested = None if body.n_predict in (None, -1) else body.n_predict
    params = sampling_params(body, max_new_tokens(len(ids), requested, state.n_ctx_slot, "n_predict"),
                             n_probs=body.n_probs, eog_ids=state.tokenizer.stop_ids)
    handle = await generation.submit(state, ids, params, new_id("cmpl"), **engine_options(body, state))
    job = _Completion(state, body, ids, params, handle)
    if body.stream:
        return sse.sse_response(job.frames(), on_close=lambda: generation.release(state, handle))
    got = await generation.collect(state, request, handle)
    if got is None:
        return Response(status_code=CLIENT_CLOSED)
    outs, result = got
    return JSONResponse(job.final(result, result.text, outs if body.n_probs else None))
