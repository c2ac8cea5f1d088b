"""Token sampler: llama.cpp's common sampler chain for one sequence.

Chain (llama.cpp common/sampling.cpp, default order restricted to the stages we support):
penalties -> top_k -> top_p -> min_p -> temperature -> draw.
Temperature <= 0 (or top_k == 1) is greedy: argmax of the penalised logits.

Reported log-probs follow OpenAI, not llama.cpp: they are ``log_softmax`` of the *penalised* logits over
the whole vocabulary, before truncation and before temperature. llama.cpp's server reports the
post-sampling probabilities instead; OpenAI clients expect the model's own distribution.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qatserve.errors import RequestError

__all__ = ["SamplingParams", "SampleResult", "Sampler", "apply_penalties"]

_MAX_SEED = 2**64 - 1
_MAX_N_PROBS = 20
# First prefix length tried when top_k is disabled but top_p/min_p need sorted candidates; it grows
# 8x until the cut is known to lie inside the prefix, so a peaked distribution never sorts the vocab.
_FIRST_PREFIX = 1024


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad(name: str, rule: str, value: object) -> RequestError:
    return RequestError(f"sampling parameter {name}: {rule}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings with llama.cpp's defaults; validated on construction.

    Conventions: ``temperature <= 0`` is greedy (llama.cpp), ``top_k <= 0`` disables top-k (negative
    values are accepted, as in llama.cpp), ``top_p == 1`` and ``min_p == 0`` disable those stages,
    ``repeat_last_n == -1`` penalises over the whole history and ``0`` disables the penalties,
    ``seed=None`` draws a random seed. ``stop`` may be given as one string or any sequence of strings;
    it is stored as a tuple.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = field(default=())
    n_probs: int = 0
    # Token ids that can never be drawn (llama.cpp's logit bias of -inf; its `ignore_eos` bans the
    # end-of-generation tokens this way, so a request runs to max_tokens). Stored sorted.
    suppressed: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Sequence) and not isinstance(stop, tuple):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        if isinstance(self.suppressed, (Sequence, frozenset, set)) and not isinstance(self.suppressed, str):
            object.__setattr__(self, "suppressed", tuple(self.suppressed))
        self.validate()
        object.__setattr__(self, "suppressed", tuple(sorted(set(self.suppressed))))

    def validate(self) -> None:
        """Raise RequestError naming the first invalid field."""
        if not _finite(self.temperature):
            raise _bad("temperature", "must be a finite number (<= 0 means greedy)", self.temperature)
        if not _int(self.top_k):
            raise _bad("top_k", "must be an integer (<= 0 disables it)", self.top_k)
        if not (_finite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise _bad("top_p", "must be in (0, 1]", self.top_p)
        if not (_finite(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise _bad("min_p", "must be in [0, 1]", self.min_p)
        if not (_finite(self.repeat_penalty) and self.repeat_penalty > 0.0):
            raise _bad("repeat_penalty", "must be a finite number > 0 (1 disables it)", self.repeat_penalty)
        if not (_int(self.repeat_last_n) and self.repeat_last_n >= -1):
            raise _bad("repeat_last_n", "must be an integer >= -1", self.repeat_last_n)
        if not _finite(self.presence_penalty):
            raise _bad("presence_penalty", "must be a finite number", self.presence_penalty)
        if not _finite(self.frequency_penalty):
            raise _bad("frequency_penalty", "must be a finite number", self.frequency_penalty)
        if self.seed is not None and not (_int(self.seed) and 0 <= self.seed <= _MAX_SEED):
            raise _bad("seed", f"must be an integer in [0, {_MAX_SEED}] or None", self.seed)
        if not (_int(self.max_tokens) and self.max_tokens >= 1):
            raise _bad("max_tokens", "must be an integer >= 1", self.max_tokens)
        if not (isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop)):
            raise _bad("stop", "must be a sequence of non-empty strings", self.stop)
        if not (_int(self.n_probs) and 0 <= self.n_probs <= _MAX_N_PROBS):
            raise _bad("n_probs", f"must be an integer in [0, {_MAX_N_PROBS}]", self.n_probs)
        if not (isinstance(self.suppressed, tuple) and all(_int(t) and t >= 0 for t in self.suppressed)):
            raise _bad("suppressed", "must be a sequence of token ids >= 0", self.suppressed)

    @property
    def greedy(self) -> bool:
        """True when the draw is deterministic: argmax of the penalised logits."""
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """True when the penalty stage can change any logit."""
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


@dataclass
class SampleResult:
    """One drawn token. ``logprob`` and ``top`` come from log_softmax of the penalised logits
    (whole vocabulary, before truncation and temperature); ``top`` holds the ``n_probs`` most likely
    (token, logprob) pairs, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def apply_penalties(
    logits: torch.Tensor, history: Sequence[int] | torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """Return logits with llama.cpp's penalties applied (a copy; the input is untouched when they apply).

    logits: [n_vocab]. The window is the last ``repeat_last_n`` ids of ``history`` (all of it for -1).
    For each distinct id in the window with count c: a positive logit is divided by repeat_penalty,
    a non-positive one multiplied by it, then ``c * frequency_penalty + presence_penalty`` is subtracted.
    ``params.suppressed`` ids get -inf first (llama.cpp applies its logit bias before the penalties).
    """
    if params.suppressed:
        logits = logits.clone()
        logits[list(params.suppressed)] = -math.inf
    n = params.repeat_last_n
    if not params.penalised or len(history) == 0:
        return logits
    window = history if n == -1 else history[max(0, len(history) - n) :]
    if not isinstance(window, torch.Tensor):
        window = torch.tensor(list(window), dtype=torch.long)
    ids, counts = torch.unique(window.to(device=logits.device, dtype=torch.long), return_counts=True)
    x = logits.clone()
    v = x[ids]
    # Dividing positives and multiplying non-positives both push the logit down for penalty > 1.
    v = torch.where(v <= 0, v * params.repeat_penalty, v / params.repeat_penalty)
    v = v - counts.to(v.dtype) * params.frequency_penalty - params.presence_penalty
    x[ids] = v
    return x


class Sampler:
    """Draws tokens for one sequence; owns its RNG, so a fixed seed gives a reproducible sequence."""

    def __init__(self, params: SamplingParams, n_vocab: int):
        if n_vocab < 1:
            raise ValueError(f"n_vocab must be >= 1, got {n_vocab}")
        if params.suppressed and (params.suppressed[-1] >= n_vocab or len(params.suppressed) >= n_vocab):
            raise RequestError(f"sampling parameter suppressed: ids must be < n_vocab ({n_vocab}) and leave "
                               f"at least one token, got {len(params.suppressed)} ids up to {params.suppressed[-1]}")
        self.params = params
        self.n_vocab = n_vocab
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    # -- public ---------------------------------------------------------------------------------------

    def sample(self, logits: torch.Tensor, history: Sequence[int] | torch.Tensor = ()) -> SampleResult:
        """Draw one token. logits: float [n_vocab] for this sequence (any device);
        history: prompt + generated ids so far (the penalties read the last ``repeat_last_n``)."""
        x = self._penalised(logits, history)
        log_z = torch.logsumexp(x, dim=0)
        if self.params.greedy:
            token = int(torch.argmax(x))
        else:
            ids, probs = self._distribution(x, log_z)
            token = self._draw(ids, probs)
        return self._result(x, log_z, token)

    def distribution(
        self, logits: torch.Tensor, history: Sequence[int] | torch.Tensor = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final distribution ``sample`` draws from, for rejection sampling in speculative decoding.

        Returns (ids [m] long, probs [m] float32 summing to 1) after penalties, truncation and
        temperature; greedy gives the argmax with probability 1. Consumes no randomness.
        """
        x = self._penalised(logits, history)
        if self.params.greedy:
            token = torch.argmax(x).reshape(1)
            return token, torch.ones(1, dtype=torch.float32, device=x.device)
        ids, probs = self._distribution(x, torch.logsumexp(x, dim=0))
        if ids is None:
            ids = torch.arange(self.n_vocab, device=x.device)
        return ids, probs.float()

    # -- stages ---------------------------------------------------------------------------------------

    def _penalised(self, logits: torch.Tensor, history: Sequence[int] | torch.Tensor) -> torch.Tensor:
        if logits.shape != (self.n_vocab,):
            raise ValueError(f"logits must have shape [{self.n_vocab}], got {list(logits.shape)}")
        if logits.dtype != torch.float32:
            logits = logits.float()
        return apply_penalties(logits, history, self.params)

    def _distribution(
        self, x: torch.Tensor, log_z: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Truncate (top_k, top_p, min_p), apply temperature; return (ids or None = whole vocab, probs)."""
        p = self.params
        n = self.n_vocab
        if 0 < p.top_k < n:
            vals, ids = torch.topk(x, p.top_k)
            # top_p renormalises over the top_k survivors, as llama.cpp's softmax over cur_p does.
            log_zc = torch.logsumexp(vals, dim=0)
        elif p.top_p < 1.0 or p.min_p > 0.0:
            vals, ids = self._sorted_prefix(x, log_z)
            log_zc = log_z
        else:
            vals, ids, log_zc = x, None, log_z
        keep = vals.numel()
        if ids is not None:
            if p.top_p < 1.0:
                # float64 cumsum: the cut must not drift with the prefix length.
                cum = torch.cumsum(torch.exp((vals - log_zc).double()), dim=0)
                reached = int(torch.count_nonzero(cum < p.top_p))
                keep = min(keep, reached + 1)  # include the token that crosses top_p
            if p.min_p > 0.0:
                # prob >= min_p * max_prob  <=>  logit >= max_logit + log(min_p); vals is sorted.
                keep = min(keep, int(torch.count_nonzero(vals >= vals[0] + math.log(p.min_p))))
            vals, ids = vals[:keep], ids[:keep]
        # Shift by the max before dividing: a tiny temperature would otherwise overflow to inf/inf.
        v = vals.double()
        probs = torch.softmax((v - v.max()) / p.temperature, dim=0)
        return ids, probs

    def _sorted_prefix(self, x: torch.Tensor, log_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Descending (vals, ids), long enough to contain the top_p and min_p cuts (top_k disabled)."""
        p = self.params
        n = self.n_vocab
        k = min(n, _FIRST_PREFIX)
        while True:
            vals, ids = torch.topk(x, k)
            if k == n:
                return vals, ids
            if p.min_p > 0.0 and bool(vals[-1] < vals[0] + math.log(p.min_p)):
                return vals, ids
            if p.top_p < 1.0 and float(torch.exp((vals - log_z).double()).sum()) >= p.top_p:
                return vals, ids
            k = min(n, k * 8)

    def _draw(self, ids: torch.Tensor | None, probs: torch.Tensor) -> int:
        # Exactly one uniform per non-greedy draw, whatever the candidate count, so the RNG stream
        # (and so a seeded sequence) depends only on the number of tokens drawn.
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        cum = torch.cumsum(probs, dim=0)
        idx = min(int(torch.count_nonzero(cum <= u * float(cum[-1]))), probs.numel() - 1)
        return idx if ids is None else int(ids[idx])

    def _result(self, x: torch.Tensor, log_z: torch.Tensor, token: int) -> SampleResult:
        logprob = float(x[token] - log_z)
        top: list[tuple[int, float]] = []
        if self.params.n_probs > 0:
            k = min(self.params.n_probs, self.n_vocab)
            vals, ids = torch.topk(x, k)
            top = list(zip(ids.tolist(), (vals - log_z).tolist()))
        return SampleResult(token=token, logprob=logprob, top=top)
