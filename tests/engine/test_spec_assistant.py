"""Speculative decoding with the Gemma 4 MTP assistant on tiny random target + assistant pairs (an
E2B-style target with PLE and KV sharing and a centroid-head assistant; a 12B-style unified target with a
dense-head assistant): greedy output is identical to plain decoding for 8 prompts and every block size
1..8, and the drafts the engine proposes are exactly the assistant's drafts from the target's committed
cache and hidden state (so the hand-over of the hidden row after each verification is the right one)."""

from __future__ import annotations

import pytest
import torch

from qatserve.engine.batch import SequenceView
from qatserve.engine.engine import Engine, EngineConfig
from qatserve.engine.kv_cache import KVCacheOptions
from qatserve.engine.loader import load_model_file
from qatserve.engine.sampler import SamplingParams
from qatserve.engine.speculative import SpeculativeConfig

pytest.importorskip("transformers")

from tests.engine.spec_util import one_thread  # noqa: E402
from tests.gemma4_pairs import VOCAB, WINDOW, _build_pair, patched_kv_sharing  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
LENGTHS = [3, 9, 17, 20, 33, 40, 5, 26]  # several longer than the sliding window (16)


@pytest.fixture(scope="module", params=[("e2b", True), ("unified", False)], ids=["e2b-centroid", "unified-dense"])
def pair(request, tmp_path_factory):
    kind, ordered = request.param
    with patched_kv_sharing():
        _, tpath, _, apath = _build_pair(kind, tmp_path_factory.mktemp(kind), ordered)
    loaded = load_model_file(tpath)
    with one_thread():
        yield loaded, apath
    loaded.gguf.close()


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def _run(model, prompts, spec=None, kv="f16"):
    eng = Engine(model, None, EngineConfig(n_ctx=256 * len(prompts), n_slots=len(prompts), max_batch_tokens=64,
                                          kv=KVCacheOptions(kv, kv), spec=spec))
    reqs = [eng.add_request(p, GREEDY) for p in prompts]
    eng.run_until_done()
    if eng.spec is not None:
        eng.spec.close()
    return [r.result for r in reqs], eng


def test_greedy_identical_for_every_block_size(pair):
    loaded, apath = pair
    prompts = _prompts()
    assert max(LENGTHS) > WINDOW
    plain, _ = _run(loaded.model, prompts)
    for k in range(1, 9):
        # auto_off off: random weights make the assistant's drafts rarely right, and this test wants every
        # step to draft (and roll back) anyway.
        spec = SpeculativeConfig("draft-mtp", assistant=str(apath), n_max=k, auto_off=False)
        got, eng = _run(loaded.model, prompts, spec)
        assert [r.tokens for r in got] == [r.tokens for r in plain], f"--draft-max {k}"
        assert eng.stats.draft_tokens >= len(prompts) * k  # it really drafted, every slot
        assert all(r.timings.draft_n > 0 for r in got)


def test_engine_drafts_are_the_assistants_drafts(pair):
    """Every draft the engine proposed equals the assistant's own k-step draft from a fresh cache of the
    history (f32 K/V on both sides) and the target's hidden state at the newest token's previous position:
    the engine hands over the right hidden row and cache after accepted and rejected drafts alike."""
    loaded, apath = pair
    model = loaded.model
    spec = SpeculativeConfig("draft-mtp", assistant=str(apath), n_max=3, auto_off=False)
    eng = Engine(model, None, EngineConfig(n_ctx=512, n_slots=2, max_batch_tokens=64,
                                          kv=KVCacheOptions("f32", "f32"), spec=spec))
    asst = eng.spec.drafter.asst
    assert asst._embed.__self__ is model  # the target's own embedding, borrowed, not copied
    log = []
    inner = eng.spec.drafter.propose

    def logged(requests, ks):
        out = inner(requests, ks)
        log.extend((r.history, k, d.tokens) for r, k, d in zip(requests, ks, out))
        return out

    eng.spec.drafter.propose = logged
    for p in _prompts()[3:5]:
        eng.add_request(p, GREEDY)
    eng.run_until_done()
    eng.spec.close()
    assert len(log) > 10
    for hist, k, drafted in log[::3]:
        view = SequenceView.for_model(model, 256)
        with torch.inference_mode():
            hidden = model.hidden_states(torch.tensor(hist[:-1]), torch.arange(len(hist) - 1), view)
        want, _ = asst.draft(hist[-1], hidden[-1], len(hist) - 1, view, k)
        assert drafted == want
