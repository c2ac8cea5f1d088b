"""`SpeculativeConfig`: which drafter, how many tokens per block, and when a slot stops drafting.

Names and defaults follow llama.cpp (common/common.h `common_params_speculative`): `n_max` 3, `n_min` 0,
`p_min` 0.0, types `none`, `ngram-simple` (prompt lookup, `--lookup`), `draft-simple` (a second model of
the same vocabulary, `-md`) and `draft-mtp` (the Gemma 4 MTP assistant, `--assistant`).

Two qatserve additions, both per slot (engine/speculative/controller.py):
- `auto` (`--draft-max auto`): the block size follows the slot's measured acceptance, 1..`auto_max`.
- `auto_off`: a slot whose measured acceptance makes drafting slower than plain decoding stops drafting
  (it probes with a block of 1 now and then, so it can switch back on when the text turns repetitive).
The cost model behind both is two numbers relative to one plain decode step: `row_cost`, what one more
verification row costs, and `draft_cost`, what proposing one token costs. None picks them from the models
(speculator.py): a row 0.2 (0.5 for MoE targets), a lookup draft nothing, a model draft its matrices'
bytes relative to the target's (decode reads every weight once per token).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qatserve.errors import RequestError

NONE, NGRAM, DRAFT, MTP = "none", "ngram-simple", "draft-simple", "draft-mtp"
TYPES = (NONE, NGRAM, DRAFT, MTP)
# llama.cpp's other types, named in the error so a user knows they exist there but not here.
_UNSUPPORTED = ("draft-eagle3", "draft-dflash", "draft-dspark", "ngram-map-k", "ngram-map-k4v", "ngram-mod",
                "ngram-cache")
AUTO_MAX = 8  # the largest block `--draft-max auto` picks (vLLM's recipes top out at 4-8 for Gemma 4)
MAX_BLOCK = 64  # a sanity cap on --draft-max (llama.cpp's ngram-mod drafts up to 64)


@dataclass(frozen=True)
class SpeculativeConfig:
    type: str = NONE
    n_max: int = 3  # draft tokens per block (0 = never draft); ignored with `auto`
    n_min: int = 0  # a shorter draft is discarded
    p_min: float = 0.0  # model drafters stop when the top-10-renormalised probability of the pick is below
    auto: bool = False
    auto_max: int = AUTO_MAX
    auto_off: bool = True
    draft_model: str | None = None  # draft-simple: path of the draft GGUF
    assistant: str | None = None  # draft-mtp: path of the assistant GGUF
    ngram_max: int = 4  # lookup: longest n-gram tried (llama.cpp's LLAMA_NGRAM_MAX)
    ngram_min: int = 1  # lookup: shortest n-gram tried (LLAMA_NGRAM_MIN)
    row_cost: float | None = None
    draft_cost: float | None = None

    def __post_init__(self):
        if self.type not in TYPES:
            hint = " (supported by llama.cpp, not by qatserve)" if self.type in _UNSUPPORTED else ""
            raise RequestError(f"unknown speculative type {self.type!r}{hint}; expected one of {', '.join(TYPES)}")
        if not 0 <= self.n_max <= MAX_BLOCK:
            raise RequestError(f"--draft-max must be in 0..{MAX_BLOCK} or 'auto', got {self.n_max}")
        if not 0 <= self.n_min <= self.block_max:
            raise RequestError(f"--draft-min ({self.n_min}) must be between 0 and the largest block ({self.block_max})")
        if not 0.0 <= self.p_min <= 1.0:
            raise RequestError(f"--draft-p-min must be in [0, 1], got {self.p_min}")
        if not 1 <= self.auto_max <= MAX_BLOCK:
            raise RequestError(f"auto block size limit must be in 1..{MAX_BLOCK}, got {self.auto_max}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise RequestError(f"n-gram sizes must satisfy 1 <= min ({self.ngram_min}) <= max ({self.ngram_max})")
        for name in ("row_cost", "draft_cost"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 100.0:
                raise RequestError(f"{name} must be in [0, 100), got {v}")
        if self.type == DRAFT and not self.draft_model:
            raise RequestError("speculative type draft-simple needs a draft model (-md PATH.gguf)")
        if self.type == MTP and not self.assistant:
            raise RequestError("speculative type draft-mtp needs an assistant (--assistant PATH.gguf)")
        if self.draft_model and self.type != DRAFT or self.assistant and self.type != MTP:
            raise RequestError(f"speculative type {self.type} does not take "
                               f"{'a draft model (-md)' if self.draft_model else 'an assistant (--assistant)'}")

    def with_overrides(self, o: "SpeculativeOverrides | None") -> "SpeculativeConfig":
        """This config with one request's own block settings (a fixed n_max replaces `auto`; an n_min the
        request does not set is cut to its block, as llama.cpp clamps it). RequestError on bad values."""
        if o is None:
            return self
        changes: dict = {}
        if o.n_max is not None:
            changes.update(n_max=o.n_max, auto=False, n_min=min(self.n_min, o.n_max))
        if o.n_min is not None:
            changes["n_min"] = o.n_min
        if o.p_min is not None:
            changes["p_min"] = o.p_min
        return replace(self, **changes) if changes else self

    @property
    def enabled(self) -> bool:
        return self.type != NONE and (self.n_max > 0 or self.auto)

    @property
    def block_max(self) -> int:
        """The largest block a slot may draft."""
        return self.auto_max if self.auto else self.n_max


@dataclass(frozen=True)
class SpeculativeOverrides:
    """One request's speculative settings, llama.cpp's request fields `speculative.n_max`, `speculative.n_min`
    and `speculative.p_min`; None keeps the server's. They change how fast a request runs, never what it
    generates (verification is lossless), so a server without a drafter accepts and ignores them."""

    n_max: int | None = None
    n_min: int | None = None
    p_min: float | None = None
