"""Verification of a draft against the target's logits: what a speculative step emits.

The engine runs the newest token and the k draft tokens d1..dk as k + 1 rows of one forward; row i's
logits are the target's next-token logits after history + d1..di, bit-identical to plain decoding
(engine/batch.py). From them:

- greedy requests: row i's argmax (through the request's own sampler, penalties included) is emitted; the
  draft continues while it equals d(i+1). This is plain decoding's token at every position, so greedy
  output is identical with and without a drafter, by construction.
- sampled requests: standard speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).
  With p = the target's final sampling distribution at row i (Sampler.distribution: penalties, top-k,
  top-p, min-p, temperature, with the accepted drafts in the history) and q = the distribution the drafter
  drew d(i+1) from, d(i+1) is accepted with probability min(1, p(d)/q(d)); on rejection the token is drawn
  from max(0, p - q) renormalised and the step ends; if every draft is accepted, one more token is drawn
  from row k as plain decoding would. Each emitted token is then distributed exactly as p. A
  deterministic drafter (lookup, greedy model drafts) has a one-hot q: accept with probability p(d), else
  draw from p without d.

The uniforms come from the request's own generator, so a seeded request is reproducible (its tokens are
not the ones it draws without drafting: only their distribution is the same).
"""

from __future__ import annotations

import numpy as np
import torch

from qatserve.engine.sampler import SampleResult, Sampler, apply_penalties
from qatserve.engine.speculative.drafter import Dist, Draft, draw


def verify(sampler: Sampler, logits: torch.Tensor, history: list[int], draft: Draft) -> list[SampleResult]:
    """logits [len(draft.tokens) + 1, V]: the target's rows for [newest token, d1..dk].

    Returns the tokens to emit, in order: the accepted drafts, then the target's own token (the correction
    at the first rejection, or the bonus after the last draft). len(result) - 1 drafts were accepted."""
    k = len(draft.tokens)
    if logits.shape[0] != k + 1:
        raise ValueError(f"{k} draft tokens need {k + 1} rows of logits, got {logits.shape[0]}")
    hist = list(history)
    out: list[SampleResult] = []
    greedy = sampler.params.greedy
    for i, d in enumerate(draft.tokens):
        if greedy:
            res = sampler.sample(logits[i], hist)
            out.append(res)
            if res.token != d:
                return out
        else:
            q = None if draft.q is None else draft.q[i]
            token, accepted = _rejection_step(sampler, logits[i], hist, d, q)
            out.append(result(sampler, logits[i], hist, token))
            if not accepted:
                return out
        hist.append(d)
    out.append(sampler.sample(logits[k], hist))
    return out


def _rejection_step(sampler: Sampler, logits: torch.Tensor, hist: list[int], d: int, q: Dist | None
                    ) -> tuple[int, bool]:
    """One position of rejection sampling: (emitted token, whether it is the accepted draft d).
    The arithmetic is float64 numpy over the vocabulary (cheap next to the forward that made the logits)."""
    ids, probs = sampler.distribution(logits, hist)
    p = np.zeros(sampler.n_vocab)
    p[ids.numpy()] = probs.double().numpy()
    qd = np.zeros(sampler.n_vocab)
    if q is None:
        qd[d] = 1.0
    else:
        qd[q[0].numpy()] = q[1].double().numpy()
    u = float(torch.rand((), generator=sampler.generator, dtype=torch.float64))
    # Accept with probability min(1, p(d) / q(d)); written without the division (q(d) > 0: d came from q).
    if u * qd[d] < p[d]:
        return d, True
    resid = np.maximum(p - qd, 0.0)
    if resid.sum() <= 0.0:
        # p <= q everywhere means p == q up to rounding, where acceptance is certain in exact arithmetic:
        # only rounding gets here, and p itself is then the right distribution.
        resid = p
    return draw(resid, sampler.generator), False


def result(sampler: Sampler, logits: torch.Tensor, hist: list[int], token: int) -> SampleResult:
    """The SampleResult plain sampling would report for `token` (log-probs of the penalised logits over
    the whole vocabulary, before truncation and temperature; the request's n_probs alternatives)."""
    x = apply_penalties(logits.float(), hist, sampler.params)
    log_z = torch.logsumexp(x, dim=0)
    top: list[tuple[int, float]] = []
    if sampler.params.n_probs > 0:
        vals, ids = torch.topk(x, min(sampler.params.n_probs, sampler.n_vocab))
        top = list(zip(ids.tolist(), (vals - log_z).tolist()))
    return SampleResult(token=token, logprob=float(x[token] - log_z), top=top)
