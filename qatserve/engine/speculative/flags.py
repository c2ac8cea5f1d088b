"""The speculative-decoding flags, shared by `qatserve run` and `qatserve serve`.

llama.cpp's current names and the older ones users still type, with llama.cpp's meanings:
  --spec-type T                 none | ngram-simple | draft-simple | draft-mtp
  --spec-draft-n-max, --draft-max, --draft, --draft-n N|auto   tokens per draft block (default 3);
                                'auto' adapts the block per slot from its acceptance (qatserve)
  --spec-draft-n-min, --draft-min, --draft-n-min N             drop drafts shorter than N (default 0)
  --spec-draft-p-min, --draft-p-min P                          model drafts stop below probability P (default 0)
  --spec-draft-model, -md, --model-draft PATH                  a draft model of the same vocabulary
plus qatserve's shorthands: --lookup (= --spec-type ngram-simple), --assistant PATH (the Gemma 4 MTP
assistant, = --spec-type draft-mtp), --spec-ngram-size-n N (longest n-gram --lookup tries, default 4).
"""

from __future__ import annotations

import argparse

from qatserve.engine.speculative import config as C
from qatserve.errors import RequestError


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    """Add the speculative-decoding argument group to a subcommand's parser."""
    g = parser.add_argument_group("speculative decoding (lossless; llama.cpp names)")
    g.add_argument("--spec-type", metavar="TYPE", default=None,
                   help=f"drafter: {', '.join(C.TYPES)} (default: from --lookup / --assistant / -md, else none)")
    g.add_argument("--lookup", action="store_true",
                   help="draft by prompt lookup (n-grams of the prompt and output; no extra weights)")
    g.add_argument("--assistant", metavar="PATH.gguf", default=None, help="Gemma 4 MTP assistant to draft with")
    g.add_argument("-md", "--model-draft", "--spec-draft-model", dest="draft_model", metavar="PATH.gguf",
                   default=None, help="draft model with the target's vocabulary")
    g.add_argument("--spec-draft-n-max", "--draft-max", "--draft", "--draft-n", dest="draft_max", metavar="N|auto",
                   default=None, help="draft tokens per block (default 3); 'auto' adapts per slot (1..8)")
    g.add_argument("--spec-draft-n-min", "--draft-min", "--draft-n-min", dest="draft_min", metavar="N",
                   default=None, help="discard drafts shorter than N (default 0)")
    g.add_argument("--spec-draft-p-min", "--draft-p-min", dest="draft_p_min", metavar="P", default=None,
                   help="model drafters stop at a token whose top-10 probability is below P (default 0)")
    g.add_argument("--spec-ngram-size-n", dest="ngram_size", metavar="N", default=None,
                   help="longest n-gram --lookup matches (default 4; shorter ones down to 1 are tried next)")


def _int(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RequestError(f"{flag} expects an integer, got {value!r}") from None


def _float(flag: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise RequestError(f"{flag} expects a number, got {value!r}") from None


def speculative_config_from_args(args: argparse.Namespace) -> C.SpeculativeConfig | None:
    """The SpeculativeConfig the flags ask for (None: no drafter). RequestError (one line) on bad flags."""
    implied = {t for t, given in ((C.NGRAM, args.lookup), (C.MTP, args.assistant), (C.DRAFT, args.draft_model))
               if given}
    kind = args.spec_type
    if kind is not None:
        kind = kind.strip()
        if "," in kind:
            raise RequestError(f"--spec-type {kind}: qatserve runs one drafter at a time")
        implied.add(kind)
    if len(implied) > 1 and C.NONE not in implied:
        raise RequestError(f"choose one drafter: {', '.join(sorted(implied))} were all requested "
                           "(--spec-type, --lookup, --assistant, -md)")
    kind = kind if kind is not None else (implied.pop() if implied else C.NONE)
    tuning = [f for f, v in (("--draft-max", args.draft_max), ("--draft-min", args.draft_min),
                             ("--draft-p-min", args.draft_p_min), ("--spec-ngram-size-n", args.ngram_size))
              if v is not None]
    if kind == C.NONE:
        if tuning and args.spec_type is None:
            raise RequestError(f"{tuning[0]} needs a drafter: --lookup, --assistant PATH or -md PATH")
        return None
    if kind == C.MTP and args.draft_model or kind == C.DRAFT and args.assistant:
        raise RequestError(f"--spec-type {kind} does not take {'-md' if args.draft_model else '--assistant'}")
    opts: dict = {}
    if args.draft_max is not None:
        if str(args.draft_max).strip().lower() == "auto":
            opts["auto"] = True
        else:
            opts["n_max"] = _int("--draft-max", args.draft_max)
    if args.draft_min is not None:
        opts["n_min"] = _int("--draft-min", args.draft_min)
    if args.draft_p_min is not None:
        opts["p_min"] = _float("--draft-p-min", args.draft_p_min)
    if args.ngram_size is not None:
        n = _int("--spec-ngram-size-n", args.ngram_size)
        opts["ngram_max"] = n
        if n < 1:
            raise RequestError(f"--spec-ngram-size-n must be at least 1, got {n}")
    return C.SpeculativeConfig(kind, draft_model=args.draft_model if kind == C.DRAFT else None,
                               assistant=args.assistant if kind == C.MTP else None, **opts)
