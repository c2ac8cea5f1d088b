"""The vocabulary of an HF checkpoint -> `tokenizer.ggml.*`, as llama.cpp's converter writes it.

- Gemma 3 (and Llama with a SentencePiece model): `tokenizer.model` -> model 'llama', pre 'default';
  pieces, scores and types from SentencePiece, padded to the config's vocab_size with `[PADi]`
  (unused), then `added_tokens.json` and tokenizer_config's `added_tokens_decoder` (control when
  special or `<...>`-shaped, else user-defined; score -1000).
- Gemma 4: `tokenizer.json` (BPE with byte fallback) -> model 'gemma4' with merges; every score -1000,
  types: `<0xXX>` byte, the named special tokens control, a few chat-syntax tokens user-defined (always
  rendered), tokens added past the base vocabulary user-defined unless special.
Special ids, add_bos/add_eos, merges and the chat template come from `gguf.SpecialVocab` (the gguf
package's reader of tokenizer_config.json / tokenizer.json), as in llama.cpp. Gemma files get
add_space_prefix false; Gemma 4 always add_bos true (llama.cpp forces it at load anyway).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

from qatserve.errors import ModelError

TT = gguf.TokenType
# Gemma 4 chat-syntax tokens llama.cpp's converter marks user-defined so that they are always rendered.
_GEMMA4_VISIBLE = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                             "<tool_response|>", '<|"|>'})
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter makes control even when not marked special (Gemma's <mask>,
    <unusedN>; <|...|> forms)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _spm_vocab(hf_dir: Path, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(TT.UNUSED)] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = int(TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i) else
                       TT.UNUSED if sp.is_unused(i) else TT.BYTE if sp.is_byte(i) else TT.NORMAL)
    for text, i in _json(hf_dir / "added_tokens.json").items():
        if i < n_vocab:
            tokens[i], scores[i], types[i] = text, -1000.0, int(TT.USER_DEFINED)
    added = _json(hf_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
    for key, data in added.items():
        i, text = int(key), data["content"]
        if i >= n_vocab:
            continue
        if data.get("special") or _looks_special(text):
            types[i] = int(TT.CONTROL)
        else:
            text, types[i] = text.replace("\u2581", " "), int(TT.USER_DEFINED)
        tokens[i], scores[i] = text, -1000.0
    return tokens, scores, types


def _special_ids(hf_dir: Path, tok_json: dict[str, Any], vocab: dict[str, int]) -> set[int]:
    """Ids of the named special tokens (bos, eos, unk, pad, ..., extra/additional ones): what
    transformers' `all_special_ids` holds, which llama.cpp's converter marks control."""
    cfg = {**_json(hf_dir / "special_tokens_map.json"), **_json(hf_dir / "tokenizer_config.json")}
    ids = {a["content"]: a["id"] for a in tok_json.get("added_tokens", [])}
    names: list[Any] = [cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                            "cls_token", "mask_token")]
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    names += list(extra.values() if isinstance(extra, dict) else extra)  # transformers 5 may name them
    out = set()
    for n in names:
        text = n.get("content") if isinstance(n, dict) else n
        if isinstance(text, str):
            i = ids.get(text, vocab.get(text))
            if i is not None:
                out.add(int(i))
    return out


def _gemma4_vocab(hf_dir: Path, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tok_json = _json(hf_dir / "tokenizer.json")
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ModelError(f"{hf_dir}/tokenizer.json: Gemma 4 needs a BPE tokenizer with byte fallback")
    vocab: dict[str, int] = model["vocab"]
    base = len(vocab)
    special = _special_ids(hf_dir, tok_json, vocab)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(base):
        t = by_id[i]
        tokens.append(t)
        types.append(TT.BYTE if _BYTE.fullmatch(t) else TT.USER_DEFINED if t in _GEMMA4_VISIBLE else
                     TT.CONTROL if i in special else TT.NORMAL)
    for a in sorted(tok_json.get("added_tokens", []), key=lambda a: a["id"]):
        if a["id"] >= base:
            tokens.append(a["content"])
            types.append(TT.USER_DEFINED if a["content"] in _GEMMA4_VISIBLE or a["id"] not in special
                         else TT.CONTROL)
    if len(tokens) > n_vocab:
        raise ModelError(f"{hf_dir}: tokenizer has {len(tokens)} tokens, the model's vocab_size is {n_vocab}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [TT.UNUSED] * (n_vocab - len(types))
    return tokens, [-1000.0] * n_vocab, [int(t) for t in types]


def write_vocab(w: gguf.GGUFWriter, hf_dir: Path, arch: str, n_vocab: int) -> bool:
    """Write `tokenizer.ggml.*` when the checkpoint has a tokenizer qatserve knows how to export;
    returns False (nothing written) otherwise: the file still loads for logits."""
    if arch == "gemma4" and (hf_dir / "tokenizer.json").is_file():
        tokens, scores, types = _gemma4_vocab(hf_dir, n_vocab)
        w.add_tokenizer_model("gemma4")
        merges = True
    elif arch in ("gemma3", "llama") and (hf_dir / "tokenizer.model").is_file():
        tokens, scores, types = _spm_vocab(hf_dir, n_vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        merges = False
    else:
        return False
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=merges, n_vocab=len(tokens))
    if arch == "gemma4":
        special.add_special_token["bos"] = True
    special.add_to_gguf(w, quiet=True)
    if arch in ("gemma3", "gemma4"):
        w.add_add_space_prefix(False)
    return True
