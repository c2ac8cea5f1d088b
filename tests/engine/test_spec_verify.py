"""Speculative decoding's logic without a model: rejection sampling keeps the target distribution exactly
(chi-square over 20,000 drafted continuations per case, two temperatures, sampled and one-hot drafts),
greedy verification, the n-gram index, the block controller, the config and the flags."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from qatserve.engine.sampler import Sampler, SamplingParams
from qatserve.engine.speculative import config as C
from qatserve.engine.speculative.controller import PROBE_EVERY, BlockController, expected_tokens
from qatserve.engine.speculative.drafter import Draft, DraftState, pick
from qatserve.engine.speculative.flags import add_speculative_args, speculative_config_from_args
from qatserve.engine.speculative.ngram import NgramIndex
from qatserve.engine.speculative.verify import verify
from qatserve.errors import RequestError

V = 5  # vocabulary of the toy chain
N_SAMPLES = 20_000


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy target and drafter: next-token logits depend on the last token only ([V, V] each)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * 1.5, torch.randn(V, V, generator=g) * 1.5


def _exact(target: torch.Tensor, params: SamplingParams, start: list[int]) -> torch.Tensor:
    """P(first two tokens after `start`) under plain sampling: [V, V]."""
    s = Sampler(params, V)

    def dist(hist):
        ids, probs = s.distribution(target[hist[-1]], hist)
        return torch.zeros(V, dtype=torch.float64).index_put_((ids,), probs.double())

    p1 = dist(start)
    return torch.stack([p1[a] * dist(start + [a]) for a in range(V)])


def _speculative_pairs(target, drafter, params, start, k, sampled_drafts, seed) -> torch.Tensor:
    """Counts [V, V] of the first two tokens emitted by draft-then-verify rounds of k drafts."""
    sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}), V)
    state = DraftState(None, Sampler(SamplingParams(**{**params.__dict__, "seed": seed + 1}), V))
    counts = torch.zeros(V, V, dtype=torch.long)
    for _ in range(N_SAMPLES):
        hist, out = list(start), []
        while len(out) < 2:
            toks, qs, h = [], [], list(hist)
            for _ in range(k):
                if sampled_drafts:
                    tok, q = pick(drafter[h[-1]], h, state, 0.0)
                    qs.append(q)
                else:  # a deterministic drafter (lookup-like): the draft table's argmax, q one-hot
                    tok = int(drafter[h[-1]].argmax())
                toks.append(tok)
                h.append(tok)
            rows = torch.stack([target[t] for t in [hist[-1]] + toks])
            res = verify(sampler, rows, hist, Draft(toks, qs if sampled_drafts else None))
            assert 1 <= len(res) <= k + 1
            for r in res:
                out.append(r.token)
                hist.append(r.token)
        counts[out[0], out[1]] += 1
    return counts


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test; cells expecting fewer than 5 are pooled into one."""
    n = int(counts.sum())
    exp, obs = (probs.flatten() * n), counts.flatten().double()
    small = exp < 5
    e = torch.cat([exp[~small], exp[small].sum().reshape(1)]) if small.any() else exp
    o = torch.cat([obs[~small], obs[small].sum().reshape(1)]) if small.any() else obs
    keep = e > 0
    chi2 = float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(chi2 / 2, dtype=torch.float64)))


CASES = {
    # Sampled drafts (draft model / MTP assistant sampling with the request's settings): q is the
    # drafter's distribution, blocks of 2.
    "sampled-t0.7": (SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0), True, 2),
    # One-hot drafts (lookup, greedy model drafts), blocks of 3, with top-k and top-p truncation.
    "onehot-t1.5-topk-topp": (SamplingParams(temperature=1.5, top_k=4, top_p=0.9, min_p=0.0), False, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rejection_sampling_keeps_the_target_distribution(case):
    params, sampled, k = CASES[case]
    target, drafter = _tables(seed=11)
    start = [0, 3]
    probs = _exact(target, params, start)
    counts = _speculative_pairs(target, drafter, params, start, k, sampled, seed=5)
    assert int(counts.sum()) == N_SAMPLES
    assert _chi2_pvalue(counts, probs) > 0.01
    # Power: had the drafts simply been kept, the pairs would follow the drafter's chain, which is far
    # from the target's (the test could tell them apart).
    if sampled:
        assert 0.5 * float((_exact(drafter, params, start) - probs).abs().sum()) > 0.2
    else:  # the one-hot drafts are the draft table's argmax chain, which the target rarely picks twice
        d0 = int(drafter[start[-1]].argmax())
        assert float(probs[d0, int(drafter[d0].argmax())]) < 0.5


def test_greedy_verification_is_plain_argmax():
    """Greedy: emit each row's argmax while it equals the draft; the first mismatch is the correction."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    s = Sampler(SamplingParams(temperature=0.0, n_probs=2), 3)
    res = verify(s, logits, [2], Draft([1, 0, 1]))  # rows argmax 1, 0, 2: third draft rejected
    assert [r.token for r in res] == [1, 0, 2]
    plain = [s.sample(logits[i], h) for i, h in enumerate([[2], [2, 1], [2, 1, 0]])]
    assert [(r.token, r.logprob, r.top) for r in res] == [(p.token, p.logprob, p.top) for p in plain]
    res = verify(s, logits, [2], Draft([1, 0, 2]))  # all accepted: the bonus comes from the last row
    assert [r.token for r in res] == [1, 0, 2, 0]
    assert [r.token for r in verify(s, logits[:1], [2], Draft([]))] == [1]
    with pytest.raises(ValueError):
        verify(s, logits, [2], Draft([1]))


def test_rows_see_the_accepted_drafts_in_their_history():
    """Penalties read the history: row i is judged after history + d1..di, as plain decoding would."""
    logits = torch.tensor([[0.0, 2.0, 1.9], [0.0, 2.0, 1.9]])
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5), 3)
    # Row 1 follows the accepted draft 1, so token 1 is penalised there (2.0 / 1.5 < 1.9): argmax 2.
    assert [r.token for r in verify(s, logits, [0], Draft([1]))] == [1, 2]
    three = torch.cat([logits, logits[:1]])
    assert [r.token for r in verify(s, three, [0], Draft([1, 1]))] == [1, 2]  # second draft rejected
    # Sampling at a low temperature (rejection sampling): the same, with overwhelming probability.
    cold = Sampler(SamplingParams(temperature=0.01, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.5, seed=0), 3)
    assert [r.token for r in verify(cold, three, [0], Draft([1, 1]))] == [1, 2]


def test_one_hot_rejection_by_hand():
    """One-hot q: accept d with probability p(d); on rejection draw from p without d."""
    # p = (0.5, 0.5, 0): draft token 2 has p = 0, so it is always rejected and the result is 0 or 1.
    logits = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 0.0, 0.0]])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3), 3)
    seen = {verify(s, logits, [0], Draft([2]))[0].token for _ in range(200)}
    assert seen == {0, 1}
    # p(d) = 1: always accepted, then a bonus from row 1.
    logits = torch.tensor([[-math.inf, 0.0, -math.inf], [0.0, 0.0, 0.0]])
    assert all(len(verify(s, logits, [0], Draft([1]))) == 2 for _ in range(50))


def test_ngram_index_finds_the_most_recent_longest_match():
    idx = NgramIndex(1, 3)
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # suffix (5, 2, 3) never occurred; (2, 3) last occurred at 5..6 followed by 7, 8, 5
    assert idx.lookup(toks, 3) == [7, 8, 5]
    toks += [7]
    assert idx.lookup(toks, 2) == [8, 5]  # (2, 3, 7) at 5..7
    assert idx.lookup([4, 4], 5) == []  # a fresh index: nothing before
    assert NgramIndex(1, 2).lookup([6, 6, 6], 4) == [6]  # the continuation may run into the suffix
    assert NgramIndex(2, 2).lookup([1, 5, 2, 5], 3) == []  # 1-grams not tried below the minimum


def test_controller_blocks_and_auto_off():
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 3) == 4
    fixed = BlockController(n_max=4, auto=False, auto_max=8, auto_off=True, cost=0.1)
    assert fixed.block() == 4  # prior a = 0.5: S(4) = 1.94 / 1.4 > 1
    for _ in range(30):
        fixed.update(4, 0)
    assert fixed.acceptance < 0.1
    blocks = [fixed.block() for _ in range(2 * PROBE_EVERY)]
    assert blocks.count(0) == 2 * PROBE_EVERY - 2 and blocks.count(1) == 2  # off, probing with 1
    for _ in range(30):
        fixed.update(1, 1)
    assert fixed.block() == 4  # probes succeeded: back on
    auto = BlockController(n_max=3, auto=True, auto_max=8, auto_off=True, cost=0.1)
    for _ in range(40):
        auto.update(8, 8)
    assert auto.block() == 8
    for _ in range(40):
        auto.update(3, 1)  # a = 0.5: S(1) = 1.5/1.1 = 1.36, S(2) = 1.75/1.2 = 1.46, S(3) = 1.875/1.3 = 1.44
    assert auto.block() == 2
    keep = BlockController(n_max=2, auto=False, auto_max=8, auto_off=False, cost=5.0)
    assert keep.block() == 2  # auto_off disabled: drafts whatever it costs


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_speculative_args(p)
    return speculative_config_from_args(p.parse_args(list(argv)))


def test_flags_both_name_sets():
    assert _parse() is None
    a = _parse("--lookup", "--draft-max", "5", "--draft-min", "2", "--draft-p-min", "0.5")
    b = _parse("--spec-type", "ngram-simple", "--spec-draft-n-max", "5", "--spec-draft-n-min", "2",
               "--spec-draft-p-min", "0.5")
    assert a == b == C.SpeculativeConfig("ngram-simple", n_max=5, n_min=2, p_min=0.5)
    assert _parse("--lookup", "--draft-max", "1").n_max == 1  # a block of one is allowed
    auto = _parse("--lookup", "--draft-max", "auto")
    assert auto.auto and auto.block_max == C.AUTO_MAX
    assert _parse("-md", "d.gguf") == C.SpeculativeConfig("draft-simple", draft_model="d.gguf")
    assert _parse("--assistant", "a.gguf").type == "draft-mtp"
    assert _parse("--lookup", "--spec-ngram-size-n", "2").ngram_max == 2
    assert _parse("--spec-type", "none", "--lookup") is None


@pytest.mark.parametrize("argv,msg", [
    (("--draft-max", "3"), "needs a drafter"),
    (("--lookup", "--draft-max", "x"), "expects an integer"),
    (("--lookup", "--draft-max", "-1"), "--draft-max must be"),
    (("--lookup", "--draft-max", "2", "--draft-min", "3"), "--draft-min"),
    (("--lookup", "--draft-p-min", "1.5"), "--draft-p-min"),
    (("--lookup", "-md", "d.gguf"), "choose one drafter"),
    (("--spec-type", "draft-mtp"), "needs an assistant"),
    (("--spec-type", "ngram-mod"), "not by qatserve"),
    (("--spec-type", "ngram-simple,draft-mtp"), "one drafter at a time"),
])
def test_flag_errors_are_one_line(argv, msg):
    with pytest.raises(RequestError, match=msg) as e:
        _parse(*argv)
    assert "\n" not in str(e.value)


def test_pick_stops_below_p_min():
    state = DraftState(None, Sampler(SamplingParams(temperature=0.0), 12))
    flat = torch.zeros(12)
    flat[3] = 0.5  # top-10 renormalised: e^0.5 / (e^0.5 + 9) = 0.155
    assert pick(flat, [], state, 0.0) == (3, None)
    assert pick(flat, [], state, 0.15) == (3, None)
    assert pick(flat, [], state, 0.2) is None
    peaked = torch.zeros(12)
    peaked[7] = 10.0
    assert pick(peaked, [], state, 0.9) == (7, None)


class _Fixed:
    """A drafter that proposes fixed token lists (per request id), to test the Speculator's rules."""

    needs_hidden = False

    def __init__(self, drafts):
        self.drafts, self.asked = drafts, {}

    def propose(self, requests, ks):
        self.asked.update({r.id: k for r, k in zip(requests, ks)})
        return [Draft(list(self.drafts[r.id])) for r in requests]


def test_speculator_budget_caps_and_n_min():
    from qatserve.engine.request import Request
    from qatserve.engine.speculative.speculator import Speculator

    def req(rid, max_tokens=16, generated=0, prompt_len=3):
        r = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(temperature=0.0, max_tokens=max_tokens), 50)
        r.generated = [7] * generated
        return r

    drafter = _Fixed({"a": [1, 2, 3, 4], "b": [5], "c": [6, 6, 6, 6], "d": [1, 2], "e": [1, 2, 3, 4]})
    spec = Speculator(C.SpeculativeConfig("ngram-simple", n_max=4, n_min=2, auto_off=False), drafter, 0.1, 0.0)
    reqs = [req("a"), req("b"), req("c", max_tokens=3, generated=1), req("d", max_tokens=2, generated=1),
            req("e", prompt_len=60, generated=2)]
    out = spec.propose(reqs, budget=100, n_ctx_slot=64)
    # a: the full block; b: 1 token < n_min, dropped; c: may emit 2 more, so 1 draft (< n_min, dropped);
    # d: one token left, never asked; e: 64 - 62 = 2 positions of context left -> 2 drafts.
    assert drafter.asked == {"a": 4, "b": 4, "c": 1, "e": 2}
    assert {rid: d.tokens for rid, d in out.items()} == {"a": [1, 2, 3, 4], "e": [1, 2]}
    # An equal share of the row budget each: 5 slots, 12 rows -> (12 - 5) // 5 = 1 draft per slot.
    drafter.asked = {}
    spec.propose([req("a"), req("b"), req("c"), req("d"), req("e")], budget=12, n_ctx_slot=512)
    assert set(drafter.asked.values()) == {1}
