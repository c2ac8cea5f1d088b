"""Per-slot block size: how many tokens a slot drafts this step, from its own measured acceptance.

Model. Draft tokens are accepted one after another, each (given the previous ones were) with probability
a, so a block of k drafts emits E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) tokens per target
forward. Relative to a plain decode step, that step costs 1 + c k, where c = row_cost + draft_cost (one
more verification row, one more proposed token). Speed-up S(k) = E(k) / (1 + c k).

- fixed block (`--draft-max N`): k = N while S(N) >= 1;
- `--draft-max auto`: k = argmax S(k) over 1..auto_max (ties to the smaller k), while S(k) >= 1;
- below 1 the slot stops drafting (`auto_off`) and probes with k = 1 every PROBE_EVERY steps, so its
  estimate can recover when the text turns repetitive.

a is estimated from the slot's own verification results with exponential forgetting (recent text
matters more): a step that accepted j of n drafts adds j successes and, when j < n, one failure (the
maximum-likelihood estimate for this model). A Beta(1, 1) prior (a = 0.5) makes a new slot draft at once.
The estimate depends only on that slot's draft outcomes, never on timings or other slots, so two slots
that see the same tokens draft the same blocks.
"""

from __future__ import annotations

DECAY = 0.9  # per verification step: about the last ten steps carry the estimate
PROBE_EVERY = 8  # an off slot drafts one token every this many steps


def expected_tokens(a: float, k: int) -> float:
    """Tokens one verification step of k drafts emits when each draft is accepted with probability a."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


class BlockController:
    def __init__(self, n_max: int, auto: bool, auto_max: int, auto_off: bool, cost: float):
        self.n_max, self.auto, self.auto_max, self.auto_off = n_max, auto, auto_max, auto_off
        self.cost = cost
        self.successes = 0.0
        self.failures = 0.0
        self.idle = 0  # steps since the last draft while switched off

    @property
    def acceptance(self) -> float:
        return (self.successes + 1.0) / (self.successes + self.failures + 2.0)

    def speedup(self, k: int) -> float:
        return expected_tokens(self.acceptance, k) / (1.0 + self.cost * k)

    def best_block(self) -> int:
        """The block this slot's estimate asks for (0 = drafting is slower than plain decoding)."""
        if self.auto:
            k = max(range(1, self.auto_max + 1), key=lambda j: (self.speedup(j), -j))
        else:
            k = self.n_max
        if k == 0 or not self.auto_off or self.speedup(k) >= 1.0:
            return k
        return 0

    def block(self) -> int:
        """Block size for this step (0: do not draft); counts idle steps while switched off."""
        k = self.best_block()
        if k > 0 or (not self.auto and self.n_max == 0):
            self.idle = 0
            return k
        self.idle += 1
        if self.idle >= PROBE_EVERY:
            self.idle = 0
            return 1
        return 0

    def update(self, drafted: int, accepted: int) -> None:
        """Record one verification: `accepted` of `drafted` draft tokens were accepted."""
        if drafted <= 0:
            return
        self.successes = DECAY * self.successes + accepted
        self.failures = DECAY * self.failures + (1.0 if accepted < drafted else 0.0)
