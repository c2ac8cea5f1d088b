"""Audit statistics against scalar ports of llama.cpp's perplexity.cpp and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qatserve.audit import RefFile, RefWriter, encode_logprobs, kld_rows, make_setup, row_width
from qatserve.audit.kld import (AuditReport, KLDAccumulator, covariance, mean_and_uncertainty, median_f32,
                                percentile_f32)
from qatserve.errors import RequestError

f32 = np.float32


def _c_encode(logits: np.ndarray) -> np.ndarray:
    """perplexity.cpp log_softmax(n_vocab, logits, log_prob, tok), one row, scalar by scalar."""
    n = len(logits)
    mx = mn = logits[0]
    for v in logits[1:]:
        mx, mn = max(mx, v), min(mn, v)
    mn = max(mn, f32(mx - f32(16)))
    s = 0.0
    for v in logits:
        s += float(np.exp(f32(v - mx)))
    lse = f32(math.log(s))
    min_lp = f32(f32(mn - mx) - lse)
    scale = f32(f32(mx - mn) / f32(65535))
    out = np.zeros(row_width(n), np.uint16)
    out[:4] = np.array([scale, min_lp], f32).view(np.uint16)
    if scale:
        inv = f32(f32(1) / scale)
        for i, v in enumerate(logits):
            # nearest_int: add 1.5 * 2^23 in float32, keep the mantissa bits
            val = f32(f32(inv * f32(v - mn)) + f32(12582912))
            out[4 + i] = ((int(val.view(np.int32)) & 0x7FFFFF) - 0x400000) & 0xFFFF if v > mn else 0
    return out


def _c_kld(logits: np.ndarray, base: np.ndarray, tok: int) -> tuple[float, float, float, float, int, int]:
    """perplexity.cpp log_softmax(n_vocab, logits, base_log_prob, tok, kld), one row, scalar by scalar:
    returns (nll, nll_base, kld, p_diff, imax, imax_base)."""
    n = len(logits)
    mx, imax = logits[0], 0
    for i in range(1, n):
        if logits[i] > mx:
            mx, imax = logits[i], i
    s = sum(float(np.exp(f32(v - mx))) for v in logits)
    lse = f32(math.log(s))
    scale, min_lp = base[:4].view(f32)
    q = base[4:]
    nll = f32(f32(mx + lse) - logits[tok])
    nll_base = -f32(f32(scale * f32(q[tok])) + min_lp)
    mx = f32(mx + lse)
    kld, imax_base, best = 0.0, -1, f32(0)
    for i in range(n):
        lpb = f32(f32(scale * f32(q[i])) + min_lp)
        if i == 0 or lpb > best:
            best, imax_base = lpb, i
        if lpb > f32(-16):
            kld += float(f32(np.exp(lpb) * f32(f32(lpb - logits[i]) + mx)))
    p_diff = f32(np.exp(-nll) - np.exp(-nll_base))
    return float(nll), float(nll_base), kld, float(p_diff), imax, imax_base


def _logits(rng, n: int, v: int, spread: float = 6.0) -> np.ndarray:
    x = (rng.standard_normal((n, v)) * spread).astype(f32)
    x[0, :] = 1.5  # a constant row: scale 0, all codes 0
    x[1, 3] = x[1, 7] = x[1].max() + 1  # a tie for the maximum: the first index wins
    x[2, :5] -= 40  # below max - 16: clamped to code 0 and left out of the KLD sum
    return x


def test_encode_logprobs_equals_the_scalar_port():
    rng = np.random.default_rng(0)
    x = _logits(rng, 12, 37)  # odd vocabulary: one padding entry per row
    got = encode_logprobs(x)
    assert got.shape == (12, row_width(37)) == (12, 42)
    for r in range(len(x)):
        np.testing.assert_array_equal(got[r], _c_encode(x[r]))
    assert not got[0, 4:].any()  # the constant row: scale 0, all codes 0; the head keeps min log-prob -log V
    assert got[0, :4].view(f32)[0] == 0


def test_kld_rows_equals_the_scalar_port():
    rng = np.random.default_rng(1)
    ref = _logits(rng, 11, 40)
    test = ref + (rng.standard_normal(ref.shape) * 0.3).astype(f32)
    test[1, 3] = test[1, 7] = test[1].max() + 1
    tok = rng.integers(0, 40, 11)
    base = encode_logprobs(ref)
    r = kld_rows(test, base, tok)
    for i in range(11):
        nll, nll_base, kld, p_diff, imax, imax_base = _c_kld(test[i], base[i], int(tok[i]))
        assert r.nll[i] == pytest.approx(nll, rel=2e-7, abs=1e-7)
        assert r.nll_base[i] == nll_base
        assert r.kld[i] == pytest.approx(kld, rel=1e-6, abs=1e-9)
        assert r.p_diff[i] == pytest.approx(p_diff, rel=1e-5, abs=1e-8)
        assert (r.top[i], r.top_base[i]) == (imax, imax_base)
    assert r.top[1] == 3 and r.top_base[1] == 3
    assert r.nll.dtype == np.float32 and r.kld.dtype == np.float64


def test_kld_of_known_distributions():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    base = encode_logprobs(np.log(p).astype(f32)[None])
    r = kld_rows(np.log(q).astype(f32)[None], base, np.array([0]))
    want = float((p * np.log(p / q)).sum())  # 0.125 * ln 2 * 2 ... = 0.1732867951
    assert r.kld[0] == pytest.approx(want, abs=2e-4)  # 16-bit codes of the base log-probs
    assert r.nll[0] == pytest.approx(math.log(4), rel=1e-6)  # -log q(tok)
    assert r.nll_base[0] == pytest.approx(math.log(2), abs=2e-4)
    assert r.p_diff[0] == pytest.approx(0.25 - 0.5, abs=1e-4)
    assert r.top_base[0] == 0 and r.top[0] == 0  # uniform: the first index
    same = kld_rows(np.log(p).astype(f32)[None] + f32(3), base, np.array([2]))  # logits shift: same p
    assert abs(same.kld[0]) < 1e-4


def test_ppl_from_known_log_probs():
    # Uniform logits over V: every nll is log V, so PPL(Q) = PPL(base) = V and the ratio is 1.
    v, n = 50, 30
    x = np.zeros((n, v), f32)
    tok = np.arange(n) % v
    acc = KLDAccumulator()
    acc.add(kld_rows(x, encode_logprobs(x), tok), tok)
    rep = acc.report()
    assert rep.ppl[0] == pytest.approx(v, rel=1e-6) and rep.ppl_base[0] == pytest.approx(v, rel=1e-6)
    # No variance up to rounding (C squares nll in float32 too): uncertainties are (near) zero.
    assert rep.ppl[1] < 1e-2 and rep.ratio[0] == pytest.approx(1.0) and rep.ratio[1] < 1e-4
    assert rep.same_top[0] == 1.0 and rep.kld[0] == pytest.approx(0, abs=1e-7)
    assert rep.top1 == rep.top1_base == 1 / n  # top-1 is token 0, the next token once in 30 positions


def test_mean_uncertainty_and_covariance_conventions():
    assert mean_and_uncertainty(10.0, 30.0, 10) == (1.0, 0.0)  # count <= 10: no uncertainty
    vals = np.arange(1, 13, dtype=np.float64)
    m, d = mean_and_uncertainty(vals.sum(), (vals**2).sum(), len(vals))
    assert m == 6.5 and d == pytest.approx(math.sqrt(vals.var() / 11))  # population var / (n-1)
    assert mean_and_uncertainty(12.0, 12.0, 12) == (1.0, 0.0)  # zero variance
    assert mean_and_uncertainty(0.0, 0.0, 0) == (0.0, 0.0)
    assert covariance(1.0, 2.0, 3.0, 9) == 0.0
    a, b = vals, vals[::-1]
    assert covariance(a.sum(), b.sum(), (a * b).sum(), 12) == pytest.approx(np.cov(a, b, bias=True)[0, 1] / 11)


def test_median_and_percentiles_as_llama_cpp():
    v = np.array([1, 2, 3, 4], f32)
    assert median_f32(v) == 2.5
    assert median_f32(np.array([1, 5, 9], f32)) == 5
    assert percentile_f32(v, 0.0) == 1 and percentile_f32(v, 1.0) == 4
    # p = 0.9f * 3 = 2.7 (float32): 0.3 * v[2] + 0.7 * v[3]
    assert percentile_f32(v, 0.9) == pytest.approx(3.7, rel=1e-6)
    many = np.arange(5100, dtype=f32) / 5100
    p = f32(0.999) * f32(5099)
    ip = int(p)
    w = p - f32(ip)
    want = (f32(1) - w) * many[ip] + w * many[ip + 1]
    assert percentile_f32(many, 0.999) == float(want)
    # not numpy's default rule by accident on this grid: the median of an even count is the midpoint
    assert median_f32(many) == float(f32(0.5) * (many[2550] + many[2549]))


def test_report_same_top_flips_and_format():
    # 4 positions, V = 3. Base favours token 0 everywhere; Q favours 0, 1, 0, 2; next tokens 0, 1, 2, 2.
    base_logits = np.array([[3, 0, 0]] * 4, f32)
    q = np.array([[3, 0, 0], [0, 3, 0], [3, 0, 0], [0, 0, 3]], f32)
    nxt = np.array([0, 1, 2, 2])
    acc = KLDAccumulator()
    acc.add(kld_rows(q, encode_logprobs(base_logits), nxt), nxt)
    rep = AuditReport.from_sums(acc)
    assert rep.same_top[0] == 0.5
    assert rep.same_top[1] == pytest.approx(math.sqrt(0.25 / 3))
    assert (rep.right_to_wrong, rep.wrong_to_right) == (0, 2)  # base right once (pos 0); Q right at 0, 1, 3
    assert rep.top1 == 0.75 and rep.top1_base == 0.25
    text = rep.format()
    for line in ("Mean PPL(Q)                   : ", "Mean    KLD: ", "99.9%   KLD: ", " 5.0%   KLD: ",
                 "Median  KLD: ", "Maximum Δp: ", "RMS Δp    : ", "Same top p: 50.000 ±", "right->wrong 0"):
        assert line in text, line
    assert "fewer than 100" in text


def test_ref_file_round_trip_and_errors(tmp_path):
    n_ctx, v = 8, 5
    toks = np.arange(3 * n_ctx) % v
    rows = [encode_logprobs(np.random.default_rng(i).standard_normal((3, v)).astype(f32)) for i in range(3)]
    w = RefWriter(tmp_path / "ref.kld", n_ctx, v, toks)
    assert not (tmp_path / "ref.kld").exists()  # only visible once complete
    for r in rows:
        w.add(r)
    w.close()
    data = (tmp_path / "ref.kld").read_bytes()
    assert data[:8] == b"_logits_" and np.frombuffer(data[8:20], "<i4").tolist() == [8, 5, 3]
    assert len(data) == 20 + 4 * 24 + 3 * 3 * row_width(5) * 2
    rf = RefFile(tmp_path / "ref.kld")
    assert (rf.n_ctx, rf.n_vocab, rf.n_chunk, rf.rows) == (8, 5, 3, 3)
    np.testing.assert_array_equal(rf.tokens, toks)
    for i in range(3):
        np.testing.assert_array_equal(rf.chunk(i), rows[i])
    (tmp_path / "short.kld").write_bytes(data[:-1])
    with pytest.raises(RequestError, match="truncated"):
        RefFile(tmp_path / "short.kld")
    (tmp_path / "ids.kld").write_bytes(data[:20] + np.full(24, 5, "<i4").tobytes() + data[20 + 96:])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        RefFile(tmp_path / "ids.kld")
    (tmp_path / "bad.kld").write_bytes(b"x" * 40)
    with pytest.raises(RequestError, match="not a log-prob file"):
        RefFile(tmp_path / "bad.kld")
    with pytest.raises(RequestError, match="cannot read"):
        RefFile(tmp_path / "missing.kld")


def test_chunking_and_bos_as_perplexity_cpp():
    toks = list(range(100, 153))  # 53 tokens
    s = make_setup(toks, 10, -1, bos=7)
    assert (s.n_chunk, s.first) == (5, 5) and len(s.tokens) == 50
    inp, nxt = s.chunk(2)
    assert inp == [7] + list(range(121, 130))  # first token of the chunk replaced by BOS
    assert nxt.tolist() == list(range(126, 130))  # rows first..n_ctx-2 predict tokens first+1..n_ctx-1
    assert make_setup(toks, 10, 3, None).n_chunk == 3
    assert make_setup(toks, 10, 9, None).n_chunk == 5
    assert make_setup(toks, 10, 3, None).chunk(0)[0][0] == 100  # no BOS: the text's own token
    with pytest.raises(RequestError, match="at least 60"):
        make_setup(toks, 30, -1, None)
    with pytest.raises(RequestError, match="--chunks"):
        make_setup(toks, 10, 0, None)
    one = make_setup(toks[:10], 10, -1, None, min_tokens=10)  # a saved reference of a single chunk
    assert one.n_chunk == 1
