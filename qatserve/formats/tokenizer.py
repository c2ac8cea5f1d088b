"""Tokenizer built from GGUF metadata, reproducing llama.cpp's tokenisation and detokenisation.

Vocab kinds (`tokenizer.ggml.model`):
- 'llama'  SentencePiece-style BPE: score-ordered merges over characters, spaces escaped to U+2581,
           byte fallback. Encoded by the `sentencepiece` library from a ModelProto serialised here
           straight from the metadata; llama.cpp's SPM tokenizer is a port of that same algorithm
           (same leftmost tie-break). Why not `tokenizers`: it needs an explicit merge list, and
           deriving all ~515k merges of a 262k vocab costs seconds on the load path.
- 'gpt2'   byte-level BPE with merges and a pre-tokenizer regex chosen by `tokenizer.ggml.pre`
           (`tokenizers` library).
- 'gemma4' BPE with merges over raw characters (spaces escaped, byte fallback), text pre-split
           into newline runs and the rest (`tokenizers` library). Checked against llama.cpp on a tiny vocabulary
           (tests/models/test_llamacpp_interop.py), not yet on a real Gemma 4 file.

Special tokens are split out of the text before the model runs, exactly as llama.cpp's
`tokenizer_st_partition` does: control/unknown tokens only with parse_special, user-defined always.
"""

from __future__ import annotations

import codecs
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qatserve.errors import TokenizerError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts llama.cpp treats as end-of-generation (and forces to CONTROL) whatever their stored type.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>",
    "<end_of_utterance>", "<turn|>",
})

_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
              r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges), as in llama.cpp's llm_tokenizer_bpe.
_BPE_PRE: dict[str, tuple[tuple[str, ...], bool]] = {}
for _names, _rule in (
    (("default",), ((_LLAMA3_RE,), False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), ((_LLAMA3_RE,), True)),
    (("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jina-es", "jina-de"), ((_GPT2_RE,), False)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     ((r"\p{N}", _GPT2_RE), False)),
    (("qwen2", "deepseek-r1-qwen", "megrez"), ((_QWEN2_RE,), False)),
):
    for _n in _names:
        _BPE_PRE[_n] = _rule


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            out[chr(256 + n)] = b
            n += 1
    return out


_BYTE_DECODER = _byte_decoder()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _pieces_proto(encs: list[bytes], scores: np.ndarray, ptype: np.ndarray) -> bytes:
    """ModelProto.pieces (field 1), one record per piece: 0x0a len {0x0a len piece, 0x15 score, 0x18 type},
    written by whole-array numpy (a Python loop over 262k pieces costs a large share of the start-up)."""
    n = len(encs)
    lens = np.fromiter(map(len, encs), np.int64, n)
    if n and int(lens.max()) >= (1 << 14) - 11:  # varints of more than 2 bytes: rare enough to loop
        return b"".join(b"\x0a" + _varint(len(p) + len(_varint(len(p))) + 8) + b"\x0a" + _varint(len(p)) + p
                        + b"\x15" + struct.pack("<f", s) + b"\x18" + bytes([t])
                        for p, s, t in zip(encs, scores.tolist(), ptype.tolist()))
    len_size = np.where(lens < 128, 1, 2)
    inner = lens + len_size + 8                           # 0x0a, varint, piece, 0x15, f32, 0x18, type
    inner_size = np.where(inner < 128, 1, 2)
    start = np.zeros(n + 1, np.int64)
    np.cumsum(1 + inner_size + inner, out=start[1:])
    out = np.empty(int(start[-1]), np.uint8)

    def put(at: np.ndarray, byte) -> None:
        out[at] = byte

    def put_varint(at: np.ndarray, value: np.ndarray, size: np.ndarray) -> None:
        out[at] = np.where(size == 1, value, (value & 0x7F) | 0x80)
        two = size == 2
        out[at[two] + 1] = value[two] >> 7

    at = start[:-1]
    put(at, 0x0A)
    put_varint(at + 1, inner, inner_size)
    at = at + 1 + inner_size
    put(at, 0x0A)
    put_varint(at + 1, lens, len_size)
    at = at + 1 + len_size                                # first byte of the piece
    text = np.frombuffer(b"".join(encs), np.uint8)
    first = np.cumsum(lens) - lens                        # where each piece starts in `text`
    out[np.repeat(at - first, lens) + np.arange(text.size)] = text
    at = at + lens
    put(at, 0x15)
    out[(at + 1)[:, None] + np.arange(4)] = np.asarray(scores, "<f4").view(np.uint8).reshape(n, 4)
    put(at + 5, 0x18)
    put(at + 6, ptype)
    return out.tobytes()


class StreamDecoder:
    """Incremental detokeniser: push(token_id) returns the text completed so far, holding back an
    incomplete UTF-8 sequence (byte-fallback tokens split characters); flush() returns the rest."""

    def __init__(self, tok: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tok
        self._skip = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self._tok._piece_bytes(token_id, self._skip))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class Tokenizer:
    """llama.cpp-compatible tokenizer; build with `Tokenizer.from_gguf_metadata(meta)`."""

    def __init__(self, kind: str, tokens: list[str], types: list[int], meta: Mapping[str, Any]) -> None:
        self._kind = kind
        self._tokens = tokens
        self._types = types
        self.n_vocab = len(tokens)
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        self.bos_id = self._opt_id(meta, "tokenizer.ggml.bos_token_id")
        self.eos_id = self._opt_id(meta, "tokenizer.ggml.eos_token_id")
        self.unk_id = self._opt_id(meta, "tokenizer.ggml.unknown_token_id")
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind != "gpt2"))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", kind == "llama"))
        if kind == "gemma4":  # llama.cpp forces BOS on for this pre-tokenizer
            self.add_bos = True
        self._text_to_id_map: dict[str, int] | None = None  # built on first use (_text_to_id)
        stops = {i for i in (self.eos_id, self._opt_id(meta, "tokenizer.ggml.eot_token_id"),
                             self._opt_id(meta, "tokenizer.ggml.eom_token_id")) if i is not None}
        # Without the text -> id map: a SentencePiece vocabulary never needs it, and building it for 262k
        # tokens is a tenth of a second of the server's start. Last duplicate wins, as in token_to_id.
        for t in _EOG_TEXTS.intersection(tokens):
            i = len(tokens) - 1 - tokens[::-1].index(t)
            stops.add(i)
            self._types[i] = CONTROL
        self.stop_ids = frozenset(stops)
        # Tokens split out of raw text before the model runs, longest first (llama.cpp's order).
        sel = np.nonzero(np.isin(np.asarray(types), (CONTROL, UNKNOWN, USER_DEFINED)))[0].tolist()
        specials = [(tokens[i], i) for i in sel if tokens[i]]
        specials.sort(key=lambda p: (-len(p[0].encode("utf-8")), p[1]))
        self._specials = specials
        self._special_first = {t[0] for t, _ in specials}
        self._piece_cache: dict[tuple[int, bool], bytes] = {}

    @property
    def _text_to_id(self) -> dict[str, int]:
        """Token text -> id; the last duplicate wins, as llama.cpp's token_to_id."""
        if self._text_to_id_map is None:
            self._text_to_id_map = dict(zip(self._tokens, range(len(self._tokens))))
        return self._text_to_id_map

    @staticmethod
    def _opt_id(meta: Mapping[str, Any], key: str) -> int | None:
        v = meta.get(key)
        n = len(meta["tokenizer.ggml.tokens"])
        if v is None:
            return None
        v = int(v)
        if v == -1 or v == 0xFFFFFFFF:
            return None
        if not 0 <= v < n:
            raise TokenizerError(f"{key} = {v} is outside the vocabulary (n_vocab {n})")
        return v

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF metadata mapping (strings -> list[str], numeric arrays -> numpy)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("llama", "gpt2", "gemma4"):
            raise TokenizerError(f"unsupported tokenizer.ggml.model {kind!r} (supported: llama, gpt2, gemma4)")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, (list, tuple)) or not tokens or set(map(type, tokens)) != {str}:
            raise TokenizerError("tokenizer.ggml.tokens must be a non-empty array of strings")
        tokens = list(tokens)
        n = len(tokens)
        types = cls._array(meta, "tokenizer.ggml.token_type", n, np.int64)
        types_l = types.tolist() if types is not None else [NORMAL] * n
        scores = cls._array(meta, "tokenizer.ggml.scores", n, np.float32)
        tok = cls(kind, tokens, types_l, meta)
        if kind == "llama":
            tok._build_spm(scores)
        else:
            tok._build_bpe(meta)
        return tok

    @staticmethod
    def _array(meta: Mapping[str, Any], key: str, n: int, dtype: type) -> np.ndarray | None:
        v = meta.get(key)
        if v is None:
            return None
        try:
            a = np.asarray(v, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise TokenizerError(f"{key} is not a numeric array: {e}") from None
        if a.ndim != 1 or len(a) != n:
            raise TokenizerError(f"{key} has {a.size} entries, tokenizer.ggml.tokens has {n}")
        return a

    def _build_spm(self, scores: np.ndarray | None) -> None:
        import sentencepiece as spm

        n = self.n_vocab
        sc = (scores if scores is not None else np.zeros(n, np.float32)).astype("<f4")
        # Every piece is NORMAL for the merge search, as llama.cpp merges into any token type;
        # only byte pieces keep BYTE (for fallback) and one piece must be UNKNOWN (sentencepiece asks).
        types = np.asarray(self._types)
        ptype = np.full(n, NORMAL, np.uint8)
        byte_ids = [i for i in np.nonzero(types == BYTE)[0].tolist() if _BYTE_PIECE.fullmatch(self._tokens[i])]
        ptype[byte_ids] = BYTE
        n_bytes = len({self._tokens[i].upper() for i in byte_ids})
        unk = self.unk_id
        if unk is None and (types == UNKNOWN).any():
            unk = int(np.argmax(types == UNKNOWN))
        # Serialise ModelProto.pieces by hand (protobuf wire format): building 262k message objects
        # through the protobuf API costs seconds, this costs a fraction of one.
        if unk is not None:
            ptype[unk] = UNKNOWN
        # trainer_spec: model_type BPE (field 3), byte_fallback (field 35) when all 256 byte pieces exist.
        trainer = b"\x18\x02" + (b"\x98\x02\x01" if n_bytes == 256 else b"")
        # normalizer_spec: identity, no dummy prefix, keep whitespace, escape spaces to U+2581.
        norm = b"\x0a\x08identity\x18\x00\x20\x00\x28\x01"

        def load(encs: list[bytes]):
            parts = [_pieces_proto(encs, sc, ptype)]
            if unk is None:  # sentencepiece requires an unknown piece; this one is never produced by text
                pb = "\ue000qatserve-unk".encode()
                body = b"\x0a" + _varint(len(pb)) + pb + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x02"
                parts.append(b"\x0a" + _varint(len(body)) + body)
            blob = b"".join(parts) + b"\x12" + _varint(len(trainer)) + trainer + b"\x1a" + _varint(len(norm)) + norm
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(blob)
            return sp

        def unique(encs: list[bytes]) -> list[bytes]:
            seen = self._text_to_id
            for i, t in enumerate(self._tokens):
                if not t or seen[t] != i:  # empty or shadowed duplicate: keep the id, make it unreachable
                    encs[i] = f"\ue000qatserve-unreachable-{i}".encode()
            return encs

        encs = [t.encode("utf-8") for t in self._tokens]
        try:
            try:
                # sentencepiece rejects a duplicate piece itself, so the text -> id map that finds them
                # is only built when a file has some (or an empty piece, checked here).
                self._sp = load(unique(encs) if "" in self._tokens else encs)
            except Exception:  # sentencepiece raises RuntimeError/OSError with its own reason
                if len(self._text_to_id) == n:
                    raise
                self._sp = load(unique(encs))
        except Exception as e:
            raise TokenizerError(f"SentencePiece vocabulary rejected: {e}") from None

    def _build_bpe(self, meta: Mapping[str, Any]) -> None:
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers

        merges_raw = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges_raw, (list, tuple)) or not all(isinstance(m, str) for m in merges_raw):
            raise TokenizerError(f"tokenizer.ggml.model {self._kind!r} needs tokenizer.ggml.merges (array of strings)")
        merges = []
        for m in merges_raw:
            k = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
            if k < 0:
                raise TokenizerError(f"malformed merge {m!r}")
            merges.append((m[:k], m[k + 1:]))
        if self._kind == "gemma4":
            regexes, ignore = (r"[^\n]+|[\n]+",), False
        else:
            pre = meta.get("tokenizer.ggml.pre", "default")
            if pre not in _BPE_PRE:
                raise TokenizerError(f"unsupported tokenizer.ggml.pre {pre!r} for gpt2 vocab")
            regexes, ignore = _BPE_PRE[pre]
        try:
            model = models.BPE(vocab=self._text_to_id, merges=merges, ignore_merges=ignore,
                               byte_fallback=self._kind == "gemma4")
        except Exception as e:
            raise TokenizerError(f"BPE vocabulary rejected: {e}") from None
        hf = HFTokenizer(model)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        if self._kind == "gpt2":
            splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence(splits)
        self._hf = hf

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text` as llama.cpp's llama_tokenize(add_special, parse_special) gives them.
        add_bos None follows the GGUF's add_bos_token; EOS is appended only when the GGUF asks for it
        and add_bos is not False."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
        special = self.add_bos if add_bos is None else add_bos
        out: list[int] = []
        if special and self.bos_id is not None:
            out.append(self.bos_id)
        prev_special = True
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            else:
                out.extend(self._encode_raw(frag, prev_special))
                prev_special = False
        if self.add_eos and add_bos is not False and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split out special-token texts: each special in turn, longest first, over all remaining
        raw fragments (llama.cpp's tokenizer_st_partition)."""
        frags: list[str | int] = [text]
        if not text:
            return []
        first = self._special_first.intersection(text)
        if not first:
            return frags
        for t, i in self._specials:
            if t[0] not in first or (not parse_special and self._types[i] != USER_DEFINED):
                continue
            if t not in text:
                continue
            nxt: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or t not in f:
                    nxt.append(f)
                    continue
                pieces = f.split(t)
                for k, p in enumerate(pieces):
                    if k:
                        nxt.append(i)
                    if p:
                        nxt.append(p)
            frags = nxt
        return frags

    def _encode_raw(self, text: str, prev_special: bool) -> list[int]:
        if self._kind == "llama":
            if self.add_space_prefix and prev_special:
                text = " " + text
            ids = self._sp.EncodeAsIds(text)
            if self.unk_id is None and ids and max(ids) >= self.n_vocab:
                ids = [i for i in ids if i < self.n_vocab]
            return ids
        if self._kind == "gemma4":
            text = text.replace(" ", "\u2581")
            out: list[int] = []
            for chunk in re.findall(r"[^\n]+|\n+", text):
                if chunk[0] == "\n" and chunk in self._text_to_id:
                    out.append(self._text_to_id[chunk])
                else:
                    out.extend(self._hf.encode(chunk, add_special_tokens=False).ids)
            return out
        return self._hf.encode(text, add_special_tokens=False).ids

    # ---------------------------------------------------------------- decoding
    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (n_vocab {self.n_vocab})")
        return token_id

    def _piece_bytes(self, token_id: int, skip_special: bool) -> bytes:
        """Bytes llama.cpp's token_to_piece gives (special=not skip_special)."""
        key = (token_id, skip_special)
        b = self._piece_cache.get(key)
        if b is not None:
            return b
        ty, t = self._types[self._check_id(token_id)], self._tokens[token_id]
        if ty in (CONTROL, UNKNOWN):
            b = b"" if skip_special else t.encode("utf-8")
        elif ty == USER_DEFINED:
            b = t.encode("utf-8")
        elif ty == NORMAL:
            if self._kind == "gpt2":
                b = b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode("utf-8") for c in t)
            else:
                b = t.replace("\u2581", " ").encode("utf-8")
        elif ty == BYTE and self._kind != "gpt2" and (m := _BYTE_PIECE.fullmatch(t)):
            b = bytes([int(m.group(1), 16)])
        else:  # unused / unsupported types print nothing, as in llama.cpp
            b = b""
        self._piece_cache[key] = b
        return b

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`: llama.cpp's pieces concatenated, invalid UTF-8 replaced. skip_special drops
        control/unknown tokens (llama-server's output); otherwise they print as their text."""
        data = b"".join(self._piece_bytes(int(i), skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token prints (special tokens as their text); may be a partial UTF-8
        sequence for byte-fallback tokens, which is why log-prob reports carry bytes."""
        return self._piece_bytes(token_id, False)

    def token_piece(self, token_id: int) -> str:
        """The raw vocabulary string of a token (e.g. '▁Paris', 'Ġthe', '<0x0A>')."""
        return self._tokens[self._check_id(token_id)]

    def is_special(self, token_id: int) -> bool:
        """True for control and unknown tokens (those skip_special drops)."""
        return self._types[self._check_id(token_id)] in (CONTROL, UNKNOWN)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer({self._kind!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, eos={self.eos_id})"
