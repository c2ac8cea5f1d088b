"""The drafter interface every proposer implements, the per-request drafting state, and how a model
drafter turns its logits into a draft token.

A drafter proposes up to k tokens that continue a request's history (prompt + generated). It never
decides what is emitted: verification (verify.py) accepts or rejects against the target. For sampled
requests the drafter also reports q, the distribution each draft token was drawn from, which rejection
sampling needs; a drafter that picks deterministically (lookup, greedy argmax) reports None (one-hot q).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from qatserve.engine.sampler import Sampler

# q of one draft token: (ids [m] long, probs [m] float summing to 1), as Sampler.distribution returns.
Dist = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Draft:
    tokens: list[int]
    q: list[Dist] | None = None  # None: each token was picked deterministically (q one-hot on it)


@dataclass
class DraftState:
    """What one request's drafting carries from step to step (Request.spec holds it)."""

    controller: object  # controller.BlockController
    sampler: Sampler  # the request's sampling chain applied to draft logits (its own seed)
    hidden: torch.Tensor | None = None  # MTP: target post-norm hidden of the row that produced the newest token
    seq: object | None = None  # draft model: its SeqKV
    done: list[int] = field(default_factory=list)  # draft model: tokens whose K/V its cache holds
    ngrams: object | None = None  # lookup: its n-gram index (ngram.NgramIndex)
    n_min: int = 0  # drafts shorter than this are dropped (the request's speculative.n_min, else the server's)
    p_min: float | None = None  # the request's speculative.p_min (None: the drafter's own, i.e. the server's)


class Drafter:
    """Base class. `propose` is called once per engine step with every generating request that may
    draft, `observe` after every forward that produced a token, `release` when a request ends."""

    needs_hidden = False  # True: the engine passes the target's hidden rows to `observe`
    name = "none"

    def propose(self, requests: list, ks: list[int]) -> list[Draft]:
        """Up to ks[i] tokens continuing requests[i].history (fewer, or none, when unsure)."""
        raise NotImplementedError

    def observe(self, request, hidden: torch.Tensor) -> None:
        """hidden [n_embd]: the target's final-normed state of the row whose logits produced the newest
        token of `request` (only when `needs_hidden`)."""

    def release(self, request) -> None:
        """The request finished: drop what the drafter holds for it."""


def new_state(request, controller) -> DraftState:
    """Drafting state of a request: a copy of its sampler settings with a seed derived from its own, so
    a seeded request drafts reproducibly without consuming the target sampler's random stream."""
    seed = (request.sampler.seed * 0x9E3779B97F4A7C15 + 1) % 2**64
    return DraftState(controller, Sampler(replace(request.params, seed=seed), request.sampler.n_vocab))


def draw(weights: np.ndarray, generator: torch.Generator) -> int:
    """Index drawn with probability proportional to weights [n] >= 0 (one uniform from `generator`)."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    cum = np.cumsum(weights)
    # cum is flat over zero weights, so the first entry above u * total always has weight > 0.
    return min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(weights) - 1)


P_MIN_TOP = 10  # llama.cpp's draft sampler: top-k 10, p_min compared with the renormalised probability


def pick(logits: torch.Tensor, history: list[int], state: DraftState, p_min: float) -> tuple[int, Dist | None] | None:
    """Draft token from draft logits [V]: the argmax of the penalised logits (greedy request), else a draw
    from the request's own sampling chain applied to the draft logits, whose distribution is q. None when
    the pick's probability among the top 10 (softmax over those only, as llama.cpp) is below p_min."""
    if state.p_min is not None:
        p_min = state.p_min
    ids, probs = state.sampler.distribution(logits, history)
    if state.sampler.params.greedy:
        token, q = int(ids[0]), None
    else:
        token, q = int(ids[draw(probs.double().numpy(), state.sampler.generator)]), (ids, probs)
    if p_min > 0.0:
        vals, top = torch.topk(logits.float(), min(P_MIN_TOP, logits.shape[-1]))
        hit = (top == token).nonzero()
        p = float(torch.softmax(vals.double(), 0)[hit[0, 0]]) if hit.numel() else 0.0
        if p < p_min:
            return None
    return token, q
