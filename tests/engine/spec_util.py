"""Helpers of the speculative-decoding tests: a scripted drafter and a one-thread context for tiny models."""

from __future__ import annotations

import contextlib

import torch

from qatserve.engine.speculative.drafter import Draft, Drafter
from qatserve.quant import linear


@contextlib.contextmanager
def one_thread():
    """Tiny models run several times faster on one thread (the pool hand-offs cost more than the math);
    the previous setting comes back afterwards."""
    before_torch, before = torch.get_num_threads(), linear._threads
    linear.set_cpu_threads(1)
    try:
        yield
    finally:
        linear.set_cpu_threads(before)
        torch.set_num_threads(before_torch)


@contextlib.contextmanager
def torch_one_thread():
    """The many small per-row attention ops of verification rows are slower with two torch threads than
    with one (hand-offs; badly so on a shared CPU); the matmuls keep their onnxruntime threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Oracle(Drafter):
    """Drafts from known greedy continuations (by prompt): in a request's i-th drafting step the first
    `good(i, k)` tokens are right and the one after is made wrong, so the number accepted per step is
    known in advance; the tokens after the wrong one stay (rows that must be rolled back)."""

    name = "oracle"

    def __init__(self, refs: dict[tuple[int, ...], list[int]], good, n_vocab: int):
        self.refs, self.good, self.n_vocab = refs, good, n_vocab
        self.steps: dict[str, int] = {}
        self.expected_accepted: dict[str, int] = {}

    def propose(self, requests: list, ks: list[int]) -> list[Draft]:
        out = []
        for r, k in zip(requests, ks):
            i = self.steps.get(r.id, 0)
            self.steps[r.id] = i + 1
            ref = self.refs[tuple(r.prompt)]
            toks = list(ref[len(r.generated) : len(r.generated) + k])
            n = min(self.good(i, k), len(toks))
            if n < len(toks):
                toks[n] = (toks[n] + 1) % self.n_vocab
            self.expected_accepted[r.id] = self.expected_accepted.get(r.id, 0) + n
            out.append(Draft(toks))
        return out
