"""Request fields -> the engine's SamplingParams, and the context-length policy.

Policy (documented in the README): a prompt must leave room for at least one token in a slot's
context (-c / -np); an explicit max_tokens must fit beside the prompt, else 400
`context_length_exceeded` with both counts and nothing is scheduled. Without max_tokens the request
may generate until the slot's context is full (finish_reason "length"), as llama.cpp's n_predict -1.
Unset sampling fields take llama.cpp's defaults (SamplingParams), also on the OpenAI routes.
"""

from __future__ import annotations

from qatserve.engine.sampler import SamplingParams
from qatserve.engine.speculative.config import SpeculativeOverrides
from qatserve.errors import RequestError
from qatserve.server.errors import bad_request, from_engine
from qatserve.server.schemas import SamplingFields

_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
           "presence_penalty", "frequency_penalty")


def max_new_tokens(n_prompt: int, requested: int | None, n_ctx_slot: int, param: str = "max_tokens",
                   prompt_param: str = "prompt") -> int:
    """How many tokens the request may generate, or APIError 400 when it cannot fit. `param` and
    `prompt_param` are the request's names for the limit and the prompt (for the error's `param`)."""
    if n_prompt == 0:
        raise bad_request("the prompt is empty: nothing to condition on", param=prompt_param)
    if n_prompt >= n_ctx_slot:
        raise bad_request(f"the prompt has {n_prompt} tokens, but a slot's context holds {n_ctx_slot} "
                          f"(prompt and at least one generated token must fit)",
                          param=prompt_param, code="context_length_exceeded")
    room = n_ctx_slot - n_prompt
    if requested is None:
        return room
    if requested > room:
        raise bad_request(f"{param}={requested} does not fit: the prompt has {n_prompt} tokens and a slot's "
                          f"context holds {n_ctx_slot} ({n_prompt} + {requested} > {n_ctx_slot})",
                          param=param, code="context_length_exceeded")
    return requested


def engine_options(body: SamplingFields, state) -> dict:
    """The engine's per-request keywords (Engine.add_request): llama.cpp's `id_slot` and the request's
    speculative block settings, checked against this server (400 naming the field)."""
    n_slots = state.engine.config.n_slots
    out: dict = {}
    if body.id_slot is not None and body.id_slot >= 0:
        if body.id_slot >= n_slots:
            raise bad_request(f"id_slot: this server has slots 0..{n_slots - 1}, got {body.id_slot}", param="id_slot")
        out["slot"] = body.id_slot
    given = (body.spec_n_max, body.spec_n_min, body.spec_p_min)
    spec = state.engine.config.spec if state.engine.spec is not None else None
    if spec is None or all(v is None for v in given):
        return out  # no drafter: the settings cannot change anything (drafting is lossless), so they are ignored
    block = body.spec_n_max if body.spec_n_max is not None else spec.block_max
    if body.spec_n_min is not None and body.spec_n_min > block:
        raise bad_request(f"speculative.n_min ({body.spec_n_min}) must not exceed the draft block "
                          f"({block}, speculative.n_max or the server's --draft-max)", param="speculative.n_min")
    out["speculative"] = SpeculativeOverrides(*given)
    return out


def sampling_params(body: SamplingFields, max_tokens: int, n_probs: int = 0,
                    eog_ids: frozenset[int] = frozenset()) -> SamplingParams:
    """The engine's parameters; a value the schema let through but the sampler refuses is a 400 too.
    eog_ids: the model's end-of-generation tokens, banned when the request sets `ignore_eos`."""
    kwargs = {f: getattr(body, f) for f in _FIELDS if getattr(body, f) is not None}
    if body.ignore_eos:
        kwargs["suppressed"] = tuple(sorted(eog_ids))
    seed = body.seed
    if seed is not None and seed < 0:
        if seed != -1:  # llama.cpp's "random"; other negatives are mistakes
            raise bad_request(f"seed: must be an integer in [0, 2^64) or -1 (random), got {seed}", param="seed")
        seed = None
    try:
        return SamplingParams(seed=seed, max_tokens=max_tokens, stop=tuple(body.stop), n_probs=n_probs, **kwargs)
    except RequestError as e:
        raise from_engine(e) from None
