"""Speculative decoding through the engine. Greedy output is token-for-token what plain decoding gives:
on the real default model with prompt lookup (8 prompts, every block size 1..8), with a draft model, and
with scripted drafts whose rejections roll back every K/V layout (f16, q8_0 and q4_0 blocks with the
Hadamard rotation, sliding-window rings) while prompts are read in chunks beside the verifications. The
acceptance accounting matches a hand-computed case; two slots running the same prompt report the same
acceptance; stop tokens and stop strings inside an accepted draft end the request where plain decoding
does; sampled requests draft and stay reproducible under a seed."""

from __future__ import annotations

import copy

import pytest

from qatserve.engine.engine import Engine, EngineConfig
from qatserve.engine.kv_cache import KVCacheOptions
from qatserve.engine.loader import load_model_file
from qatserve.engine.sampler import SamplingParams
from qatserve.engine.speculative import SpeculativeConfig
from qatserve.errors import ModelError
from tests.engine.conftest import VOCAB, WINDOW, random_prompts
from tests.engine.spec_util import Oracle, one_thread, torch_one_thread

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
LOOKUP = "ngram-simple"

# Repetitive prompts, where prompt lookup's drafts get accepted: code edits, data rows, lists, markup.
PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n# The same with type hints:\n"
    "def add(a: int, b: int) -> int:\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    '{"name": "Alice", "age": 30, "city": "Paris"}\n{"name": "Bob", "age": 25, "city": "London"}\n{"name":',
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Monday, Tuesday,",
    "<ul>\n  <li>apple</li>\n  <li>banana</li>\n  <li>cherry</li>\n</ul>\n<ol>\n  <li>apple</li>\n",
    "SELECT id, name FROM users WHERE age > 30;\nSELECT id, name FROM users WHERE age > 40;\nSELECT id,",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n    print(j)\nfor k in range(10):\n",
    "Original: The meeting is on Friday at noon in room 4.\nCopy: The meeting is on Friday",
]


def _engine(model, tok=None, *, n_slots=1, spec=None, kv="f16", batch=512):
    return Engine(model, tok, EngineConfig(n_ctx=512 * n_slots, n_slots=n_slots, max_batch_tokens=batch,
                                          kv=KVCacheOptions(kv, kv), spec=spec))


def _generate(eng, prompts, params=GREEDY):
    reqs = [eng.add_request(p, params) for p in prompts]
    eng.run_until_done()
    return [r.result for r in reqs]


def _blocks_all_free(eng):
    return all(p.n_available() == p.n_blocks for p in eng.cache.pools)


# -- the real default model with prompt lookup ---------------------------------------------------------
@pytest.fixture(scope="module")
def real(gemma_path):
    loaded = load_model_file(gemma_path)
    ids = [loaded.tokenizer.encode(p) for p in PROMPTS]
    with torch_one_thread():
        plain = _generate(_engine(loaded.model, loaded.tokenizer, n_slots=len(ids)), ids)
        yield loaded, ids, plain
    loaded.gguf.close()


def test_lookup_greedy_identical_for_every_block_size(real):
    loaded, ids, plain = real
    for k in range(1, 9):
        eng = _engine(loaded.model, loaded.tokenizer, n_slots=len(ids), spec=SpeculativeConfig(LOOKUP, n_max=k))
        got = _generate(eng, ids)
        assert [r.tokens for r in got] == [r.tokens for r in plain], f"--draft-max {k}"
        assert [r.text for r in got] == [r.text for r in plain]
        st = eng.stats
        assert st.draft_accepted > 0 and st.draft_tokens >= st.draft_accepted
        assert _blocks_all_free(eng)


def test_two_slots_same_prompt_same_acceptance(real):
    loaded, ids, plain = real
    eng = _engine(loaded.model, loaded.tokenizer, n_slots=2, spec=SpeculativeConfig(LOOKUP, auto=True))
    a, b = _generate(eng, [ids[0], ids[0]])
    assert a.tokens == b.tokens == plain[0].tokens
    ta, tb = a.timings, b.timings
    assert ta.draft_n > 0 and ta.draft_n_accepted > 0
    assert (ta.draft_n, ta.draft_n_accepted, ta.draft_steps) == (tb.draft_n, tb.draft_n_accepted, tb.draft_steps)
    assert eng.stats.draft_tokens == 2 * ta.draft_n and eng.stats.draft_accepted == 2 * ta.draft_n_accepted


def _with_oracle(eng, refs, good):
    eng.spec.drafter = Oracle(refs, good, eng.n_vocab)
    return eng.spec.drafter


def test_stop_token_and_string_inside_a_draft(real):
    """An EOS or a stop string inside a block of accepted drafts ends the request exactly where plain
    decoding ends it: same tokens, text and reason."""
    loaded, ids, plain = real
    ref = plain[0].tokens
    tok = copy.copy(loaded.tokenizer)
    tok.stop_ids = frozenset({ref[5]})
    spec = SpeculativeConfig(LOOKUP, n_max=8, auto_off=False)
    cases = [(tok, GREEDY), (loaded.tokenizer, SamplingParams(temperature=0.0, max_tokens=16,
                                                              stop=[loaded.tokenizer.decode(ref[4:7])]))]
    for tk, params in cases:
        want = _generate(_engine(loaded.model, tk), [ids[0]], params)[0]
        eng = _engine(loaded.model, tk, spec=spec)
        _with_oracle(eng, {tuple(ids[0]): ref}, lambda i, k: k)  # every draft right
        got = _generate(eng, [ids[0]], params)[0]
        assert (got.tokens, got.text, got.finish_reason, got.stop_reason) == \
               (want.tokens, want.text, want.finish_reason, want.stop_reason)
        assert got.finish_reason == "stop" and len(got.tokens) < 8
        assert eng.stats.steps == 2  # the prompt, then one verification that reached the stop
        assert _blocks_all_free(eng)


# -- tiny Gemma 3 (window 16, head dim 64): rollback in every KV layout -------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_gemma3):
    with one_thread():
        yield tiny_gemma3


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_rollback_in_every_kv_layout(tiny, kv):
    """Scripted drafts with 0..k right tokens per step, 3 slots, prompts shorter and longer than the
    window, a 32-row budget (prompt chunks interleave with verifications): identical to plain decoding,
    exactly the scripted number of drafts accepted, every block back in its pool."""
    model = tiny.model
    params = SamplingParams(temperature=0.0, max_tokens=40)
    prompts = random_prompts([5, 40, 70], seed=11)
    assert max(len(p) for p in prompts) > WINDOW and params.max_tokens > 2 * WINDOW
    plain = _generate(_engine(model, n_slots=3, kv=kv, batch=32), prompts, params)
    refs = {tuple(p): r.tokens for p, r in zip(prompts, plain)}
    eng = _engine(model, n_slots=3, kv=kv, batch=32, spec=SpeculativeConfig(LOOKUP, n_max=5, auto_off=False))
    oracle = _with_oracle(eng, refs, lambda i, k: i % (k + 1))
    reqs = [eng.add_request(p, params) for p in prompts]
    eng.run_until_done()
    assert [r.result.tokens for r in reqs] == [r.tokens for r in plain]
    for r in reqs:
        assert r.result.timings.draft_n_accepted == oracle.expected_accepted[r.id]
        assert r.result.timings.draft_n > r.result.timings.draft_n_accepted  # some rolled back
    assert _blocks_all_free(eng)


def test_acceptance_accounting_by_hand(tiny):
    """max_tokens 12, blocks of 3, each drafting step 2 right then 1 wrong. The first token comes from the
    prompt's forward; then blocks of 3 emit 3 tokens each (2 accepted + the correction): 1 -> 4 -> 7 -> 10;
    at 10 the block is cut to 12 - 10 - 1 = 1 draft, which is right: 1 accepted + the bonus -> 12.
    Drafted 3 + 3 + 3 + 1 = 10, accepted 2 + 2 + 2 + 1 = 7 in 4 verifications: acceptance 0.7, mean
    accepted length 1 + 7 / 4 = 2.75 tokens per verification."""
    model = tiny.model
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompt = random_prompts([20], seed=12)[0]
    ref = _generate(_engine(model), [prompt], params)[0].tokens
    eng = _engine(model, spec=SpeculativeConfig(LOOKUP, n_max=3, auto_off=False))
    _with_oracle(eng, {tuple(prompt): ref}, lambda i, k: min(2, k))
    res = _generate(eng, [prompt], params)[0]
    assert res.tokens == ref
    t = res.timings
    assert (t.draft_n, t.draft_n_accepted, t.draft_steps) == (10, 7, 4)
    assert t.draft_acceptance_rate == pytest.approx(0.7)
    assert t.draft_mean_accepted_length == pytest.approx(2.75)
    d = t.as_dict()
    assert (d["draft_n"], d["draft_n_accepted"], d["draft_acceptance_rate"]) == (10, 7, 0.7)
    st = eng.stats
    assert (st.draft_tokens, st.draft_accepted, st.draft_steps, st.steps) == (10, 7, 4, 5)
    assert st.generated_tokens == 12


def test_draft_model_greedy_identical(tiny, tmp_path):
    """Target Q4_0, draft = a Q8_0 conversion of the same checkpoint (its own cache, rolled back on
    rejection): identical output, over half the drafts accepted."""
    from qatserve.convert.hf_to_gguf import convert

    draft = convert(tiny.path.parent / "hf", tmp_path / "draft-q8_0.gguf", "Q8_0")
    model = tiny.model
    params = SamplingParams(temperature=0.0, max_tokens=30)
    prompts = random_prompts([7, 30, 45], seed=13)
    plain = _generate(_engine(model, n_slots=3, batch=32), prompts, params)
    for k in (1, 4):
        eng = _engine(model, n_slots=3, batch=32, spec=SpeculativeConfig("draft-simple", draft_model=str(draft),
                                                                         n_max=k, auto_off=False))
        got = _generate(eng, prompts, params)
        assert [r.tokens for r in got] == [r.tokens for r in plain], f"--draft-max {k}"
        st = eng.stats
        assert st.draft_accepted > 0.5 * st.draft_tokens
        assert all(p.n_available() == p.n_blocks for p in eng.spec.drafter.cache.pools)  # draft cache freed
        eng.spec.close()
    # Sampling with the draft model: reproducible under a seed, and it drafts.
    sampled = SamplingParams(temperature=0.9, max_tokens=20, seed=42)
    runs = []
    for _ in range(2):
        eng = _engine(model, spec=SpeculativeConfig("draft-simple", draft_model=str(draft), n_max=3, auto_off=False))
        runs.append(_generate(eng, prompts[:1], sampled)[0])
        eng.spec.close()
    assert runs[0].tokens == runs[1].tokens and runs[0].timings.draft_n > 0


def test_draft_model_vocabulary_must_match(tiny, tmp_path):
    import transformers

    from qatserve.convert.hf_to_gguf import convert

    cfg = transformers.Gemma3TextConfig(vocab_size=VOCAB + 32, hidden_size=64, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=32, sliding_window=WINDOW, max_position_embeddings=256)
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    other = convert(tmp_path / "hf", tmp_path / "other.gguf", "F32")
    with pytest.raises(ModelError, match="same vocabulary"):
        _engine(tiny.model, spec=SpeculativeConfig("draft-simple", draft_model=str(other)))


def test_lookup_sampling_reproducible_and_counted(tiny):
    """Sampled requests draft too (rejection sampling; its distribution is tested in test_spec_verify.py);
    a seed makes the output reproducible."""
    params = SamplingParams(temperature=0.7, max_tokens=30, seed=7)
    prompt = [5, 6, 7, 8] * 10
    outs = []
    for _ in range(2):
        eng = _engine(tiny.model, spec=SpeculativeConfig(LOOKUP, n_max=4, auto_off=False))
        outs.append(_generate(eng, [prompt], params)[0])
    assert outs[0].tokens == outs[1].tokens
    assert outs[0].timings.draft_n > 0
    assert len(outs[0].tokens) == 30


def test_auto_off_stops_drafting_a_slot_that_never_hits(tiny):
    """Drafts that are always wrong switch the slot's drafting off (a probe of 1 now and then)."""
    model = tiny.model
    params = SamplingParams(temperature=0.0, max_tokens=40)
    prompt = random_prompts([10], seed=14)[0]
    ref = _generate(_engine(model), [prompt], params)[0].tokens
    eng = _engine(model, spec=SpeculativeConfig(LOOKUP, n_max=4))
    _with_oracle(eng, {tuple(prompt): ref}, lambda i, k: 0)
    res = _generate(eng, [prompt], params)[0]
    assert res.tokens == ref
    assert res.timings.draft_n_accepted == 0
    assert res.timings.draft_steps < 12  # a few blocks of 4, then single-token probes
    assert res.timings.draft_n < 4 * 4 + 8
