"""Prompt lookup (`--lookup`, llama.cpp's `ngram-simple`): draft the tokens that followed the most recent
earlier occurrence of the history's last n tokens. No weights, works with every model; it pays off where
the output repeats its input (code edits, quoting, extraction, summaries with names).

Differences from llama.cpp's ngram-simple (common/ngram-map.cpp), which looks up one n-gram of size 12:
n-grams from `ngram_max` down to `ngram_min` are tried, longest first (llama-lookup's LLAMA_NGRAM_MAX 4 /
MIN 1), so a copy is picked up after a few tokens instead of twelve; the engine's block size bounds the
draft. The index is incremental: history only grows between steps (drafts enter it only once accepted),
so each step indexes the new positions only and a lookup is one dict probe per n-gram size.
"""

from __future__ import annotations

from qatserve.engine.speculative.drafter import Draft, Drafter


class NgramIndex:
    """For each size n: n-gram -> start of the tokens that followed its most recent occurrence."""

    def __init__(self, n_min: int, n_max: int):
        self.sizes = range(n_max, n_min - 1, -1)
        self.last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.next_end = 0  # n-grams ending before this position are indexed

    def update(self, tokens: list[int]) -> None:
        # Only n-grams with at least one following token: the history's own suffix (ending at the last
        # position) must not find itself.
        for e in range(self.next_end, len(tokens) - 1):
            for n in self.sizes:
                if e + 1 >= n:
                    self.last[n][tuple(tokens[e + 1 - n : e + 1])] = e + 1
        self.next_end = max(self.next_end, len(tokens) - 1)

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens continuing `tokens`, from the longest n-gram that occurred before."""
        self.update(tokens)
        for n in self.sizes:
            if len(tokens) >= n:
                start = self.last[n].get(tuple(tokens[-n:]))
                if start is not None:
                    return tokens[start : start + k]
        return []


class NgramLookup(Drafter):
    name = "ngram-simple"

    def __init__(self, n_min: int = 1, n_max: int = 4):
        self.n_min, self.n_max = n_min, n_max

    def propose(self, requests: list, ks: list[int]) -> list[Draft]:
        out = []
        for r, k in zip(requests, ks):
            st = r.spec
            if st.ngrams is None:
                st.ngrams = NgramIndex(self.n_min, self.n_max)
            out.append(Draft(st.ngrams.lookup(r.history, k) if k > 0 else []))
        return out
