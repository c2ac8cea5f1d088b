"""Bench lanes: one server configuration each, typed as a short string, and the flags that start it.

Syntax: settings joined by commas; a setting is `key=value` or a bare word.
    f16                      both K/V types (any -ctk type name: f32 f16 bf16 q8_0 q4_0)
    ctk=q8_0,ctv=q8_0        K and V separately (`kv=q8_0` sets both)
    lookup                   prompt-lookup drafting (--lookup)
    lookup,draft-max=4       ... with a block of 4 (`auto` adapts the block per slot, qatserve only)
    assistant=PATH           Gemma 4 MTP assistant (--assistant);  md=PATH  a draft model (-md)
    draft-min=N, draft-p-min=P, ngram=N    the other speculative knobs (--draft-min, --draft-p-min,
                                           --spec-ngram-size-n)
    np=N                     server slots (default 2: the aggregate column runs N requests at once)
    rot=off                  quantised K/V without the Hadamard rotation (llama.cpp: LLAMA_ATTN_ROT_DISABLE=1)
The lane's text, as typed, is its name in the table. Every mistake is a `LaneError` naming the lane.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, replace

from qatserve.errors import RequestError

# Light copy of the K/V types qatserve serves (quant/kernels/kv_quant.KV_TYPES imports torch; a test
# checks the two agree).
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
DRAFTERS = ("lookup", "assistant", "md")
KEYS = ("ctk", "ctv", "kv", "lookup", "assistant", "md", "draft-max", "draft-min", "draft-p-min", "ngram", "np", "rot")
ALIASES = {"cache-type-k": "ctk", "cache-type-v": "ctv", "model-draft": "md", "draft": "draft-max",
           "slots": "np", "parallel": "np", "spec-ngram-size-n": "ngram"}
DEFAULT_SLOTS = 2
MAX_SLOTS = 64


class LaneError(RequestError):
    """A lane (or --sweep) the user typed cannot be run; the message names it and says why."""


class PeerUnsupported(Exception):
    """The peer server has no equivalent of this lane; the message is what its table cell says."""


@dataclass(frozen=True)
class Lane:
    name: str
    ctk: str = "f16"
    ctv: str = "f16"
    drafter: str | None = None  # "lookup" | "assistant" | "md"
    drafter_path: str | None = None
    draft_max: int | str | None = None  # N or "auto"; None = the server's default (3)
    draft_min: int | None = None
    draft_p_min: float | None = None
    ngram: int | None = None
    slots: int = DEFAULT_SLOTS
    rotate: bool = True
    settings: dict = field(default_factory=dict, compare=False)  # as typed, for the JSON report

    def with_draft_max(self, k: int | str) -> "Lane":
        """The same lane with block size k (the --sweep rows)."""
        kept = [item for item in self.name.split(",") if _key(item) != "draft-max"]
        return replace(self, name=",".join([*kept, f"draft-max={k}"]), draft_max=k)

    # -- flags -------------------------------------------------------------------------------------

    def qatserve_args(self) -> list[str]:
        """`qatserve serve` flags of this lane (besides -m, -t, -c, --port)."""
        args = ["-ctk", self.ctk, "-ctv", self.ctv, "-np", str(self.slots)]
        if not self.rotate:
            args.append("--no-kv-rotation")
        args += {"lookup": ["--lookup"], "assistant": ["--assistant", str(self.drafter_path)],
                 "md": ["-md", str(self.drafter_path)], None: []}[self.drafter]
        for flag, value in (("--draft-max", self.draft_max), ("--draft-min", self.draft_min),
                            ("--draft-p-min", self.draft_p_min), ("--spec-ngram-size-n", self.ngram)):
            if value is not None:
                args += [flag, str(value)]
        return args

    def llama_server_args(self) -> tuple[list[str], dict[str, str]]:
        """llama-server flags and environment of the same configuration; PeerUnsupported when it has none.

        Lookup maps to `--spec-type ngram-simple`: llama.cpp matches one n-gram size exactly (qatserve tries
        the longest first, down to 1) and drafts the m tokens that followed it, so n = min(ngram, block)
        (a larger n than the block could never draft there) and m = the block."""
        args = ["-ctk", self.ctk, "-ctv", self.ctv, "-np", str(self.slots)]
        env = {} if self.rotate else {"LLAMA_ATTN_ROT_DISABLE": "1"}
        if self.draft_max == "auto":
            raise PeerUnsupported("no adaptive block size (draft-max=auto) in llama.cpp")
        block = self.draft_max if self.draft_max is not None else 3
        if self.drafter == "lookup":
            n = min(self.ngram or 4, block)
            args += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(n),
                     "--spec-ngram-simple-size-m", str(block)]
            if self.draft_p_min is not None:
                raise PeerUnsupported("draft-p-min does not apply to llama.cpp's n-gram drafter")
        elif self.drafter in ("assistant", "md"):
            kind = "draft-mtp" if self.drafter == "assistant" else "draft-simple"
            args += ["--spec-type", kind, "-md", str(self.drafter_path), "--spec-draft-n-max", str(block)]
            if self.draft_p_min is not None:
                args += ["--spec-draft-p-min", str(self.draft_p_min)]
        if self.drafter is not None and self.draft_min is not None:
            args += ["--spec-draft-n-min", str(self.draft_min)]
        return args, env


# -- parsing -----------------------------------------------------------------------------------------

def _key(item: str) -> str:
    """The canonical key of one `key=value` setting."""
    key = item.strip().partition("=")[0].strip().lower().lstrip("-")
    return ALIASES.get(key, key)


def _int(lane: str, key: str, value: str, low: int, high: int | None = None) -> int:
    try:
        n = int(value)
    except ValueError:
        raise LaneError(f"lane {lane!r}: {key} expects an integer, got {value!r}") from None
    if n < low or high is not None and n > high:
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise LaneError(f"lane {lane!r}: {key} must be {span}, got {n}")
    return n


def _kv_type(lane: str, key: str, value: str) -> str:
    v = value.lower()
    if v not in KV_TYPES:
        raise LaneError(f"lane {lane!r}: {key}={value} is not a K/V cache type; expected one of {', '.join(KV_TYPES)}")
    return v


def _unknown(lane: str, word: str) -> LaneError:
    close = difflib.get_close_matches(word, [*KEYS, *KV_TYPES, *ALIASES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return LaneError(f"lane {lane!r}: unknown setting {word!r}{hint}; settings: a K/V type "
                     f"({', '.join(KV_TYPES)}), {', '.join(k + ('' if k == 'lookup' else '=') for k in KEYS)}")


def parse_lane(text: str) -> Lane:
    """A Lane from its text; LaneError (one line, naming the lane) on any mistake."""
    name = text.strip()
    if not name:
        raise LaneError("empty lane: give settings such as f16, ctk=q8_0,ctv=q8_0 or lookup")
    seen: dict[str, str] = {}
    for raw in name.split(","):
        item = raw.strip()
        if not item:
            raise LaneError(f"lane {name!r}: empty setting (two commas, or a trailing comma)")
        key, (_, eq, value) = _key(item), item.partition("=")
        value = value.strip()
        if not eq and key in KV_TYPES:
            key, value = "kv", key
        elif not eq and key != "lookup":
            if key in KEYS:
                raise LaneError(f"lane {name!r}: {key} needs a value ({key}=...)")
            raise _unknown(name, key)
        elif eq and key == "lookup":
            raise LaneError(f"lane {name!r}: lookup takes no value (write just 'lookup')")
        elif key not in KEYS:
            raise _unknown(name, key)
        if eq and not value:
            raise LaneError(f"lane {name!r}: {key}= has no value")
        if key in seen or key in ("ctk", "ctv") and "kv" in seen or key == "kv" and ({"ctk", "ctv"} & seen.keys()):
            raise LaneError(f"lane {name!r}: {key} is set twice")
        seen[key] = value
    return _lane_from(name, seen)


def _lane_from(name: str, s: dict[str, str]) -> Lane:
    drafters = [d for d in DRAFTERS if d in s]
    if len(drafters) > 1:
        raise LaneError(f"lane {name!r}: one drafter per lane, got {' and '.join(drafters)}")
    drafter = drafters[0] if drafters else None
    tuning = [k for k in ("draft-max", "draft-min", "draft-p-min", "ngram") if k in s]
    if tuning and drafter is None:
        raise LaneError(f"lane {name!r}: {tuning[0]} needs a drafter (lookup, assistant=PATH or md=PATH)")
    if "ngram" in s and drafter != "lookup":
        raise LaneError(f"lane {name!r}: ngram applies to lookup only")
    path = s.get(drafter) if drafter in ("assistant", "md") else None
    if path is not None:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise LaneError(f"lane {name!r}: {drafter}={path}: no such file")
    kv = _kv_type(name, "kv", s["kv"]) if "kv" in s else None
    dm = s.get("draft-max")
    if dm is not None:
        dm = "auto" if dm.lower() == "auto" else _int(name, "draft-max", dm, 1, 64)
    p_min = None
    if "draft-p-min" in s:
        try:
            p_min = float(s["draft-p-min"])
        except ValueError:
            raise LaneError(f"lane {name!r}: draft-p-min expects a number, got {s['draft-p-min']!r}") from None
        if not 0.0 <= p_min <= 1.0:
            raise LaneError(f"lane {name!r}: draft-p-min must be in [0, 1], got {p_min}")
    rot = s.get("rot", "on").lower()
    if rot not in ("on", "off"):
        raise LaneError(f"lane {name!r}: rot must be on or off, got {s['rot']!r}")
    draft_min = _int(name, "draft-min", s["draft-min"], 0, 64) if "draft-min" in s else None
    if draft_min is not None and isinstance(dm, int) and draft_min > dm:
        raise LaneError(f"lane {name!r}: draft-min ({draft_min}) is larger than draft-max ({dm})")
    return Lane(name=name, ctk=kv or _kv_type(name, "ctk", s.get("ctk", "f16")),
                ctv=kv or _kv_type(name, "ctv", s.get("ctv", "f16")),
                drafter=drafter, drafter_path=path, draft_max=dm, draft_min=draft_min, draft_p_min=p_min,
                ngram=_int(name, "ngram", s["ngram"], 1, 16) if "ngram" in s else None,
                slots=_int(name, "np", s["np"], 1, MAX_SLOTS) if "np" in s else DEFAULT_SLOTS,
                rotate=rot == "on", settings=dict(s))


def parse_lanes(texts: list[str]) -> list[Lane]:
    lanes = [parse_lane(t) for t in texts]
    names = [lane.name for lane in lanes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise LaneError(f"lane {dup!r} is given twice")
    return lanes


def parse_sweep(text: str) -> list[int]:
    """`draft-max=1..8` or `draft-max=1,2,4` -> block sizes (ascending, distinct)."""
    key, eq, spec = (s.strip() for s in text.partition("="))
    if key.lower().lstrip("-") not in ("draft-max", "draft"):
        raise LaneError(f"--sweep {text!r}: only draft-max can be swept (e.g. --sweep draft-max=1..8)")
    if not eq or not spec:
        raise LaneError(f"--sweep {text!r}: give the block sizes, e.g. draft-max=1..8 or draft-max=1,2,4")
    values: list[int] = []
    for part in spec.split(","):
        lo, dots, hi = part.partition("..")
        try:
            a = int(lo)
            b = int(hi) if dots else a
        except ValueError:
            raise LaneError(f"--sweep {text!r}: {part!r} is not N or N..M") from None
        if not 1 <= a <= b <= 64:
            raise LaneError(f"--sweep {text!r}: block sizes must satisfy 1 <= N <= M <= 64, got {part!r}")
        values += range(a, b + 1)
    return sorted(set(values))
