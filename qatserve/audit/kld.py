"""The figures of llama-perplexity --kl-divergence, computed as perplexity.cpp computes them.

Reference log-probs are the 16-bit rows perplexity.cpp stores (`encode_logprobs`); `kld_rows` is its
per-position log_softmax(..., kld) in the same float32/double mix; `KLDAccumulator` holds its
kl_divergence_result sums plus the per-token values; `AuditReport` is its summary (same formulas,
same float32 median/percentile interpolation) plus flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qatserve.errors import RequestError

_F32 = np.float32
_ROW_BLOCK = 8  # rows per vectorised step: [8, V] float32 temporaries stay small for a 262k vocabulary


def row_width(n_vocab: int) -> int:
    """uint16 entries per stored row: 2 floats (scale, min log-prob) + n_vocab codes, padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


# ----------------------------------------------------------------------------- per-row math
def encode_logprobs(logits: np.ndarray) -> np.ndarray:
    """float32 logits [n, V] -> uint16 rows [n, row_width(V)] (perplexity.cpp's log_softmax that writes
    the base file): codes round((logit - lo) / scale) to nearest-even, lo = max(min, max - 16)."""
    logits = np.ascontiguousarray(logits, dtype=_F32)
    n, n_vocab = logits.shape
    out = np.zeros((n, row_width(n_vocab)), np.uint16)
    for r0 in range(0, n, _ROW_BLOCK):
        x = logits[r0 : r0 + _ROW_BLOCK]
        hi = x.max(axis=1)
        lo = np.maximum(x.min(axis=1), hi - _F32(16))
        sum_exp = np.exp(x - hi[:, None]).sum(axis=1, dtype=np.float64)
        log_sum_exp = np.log(sum_exp).astype(_F32)
        min_log_prob = (lo - hi) - log_sum_exp
        scale = (hi - lo) / _F32(65535)
        head = np.stack([scale, min_log_prob], axis=1)  # float32 [b, 2] = uint16 [b, 4]
        out[r0 : r0 + len(x), :4] = head.view(np.uint16)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = _F32(1) / scale
            codes = np.rint(inv[:, None] * (x - lo[:, None]))  # the magic-number nearest_int: ties to even
        codes = np.where((x > lo[:, None]) & (scale[:, None] != 0), codes, 0)
        # C stores the int into uint16 (mod 2^16); codes never exceed 65535 + rounding slack in practice.
        out[r0 : r0 + len(x), 4 : 4 + n_vocab] = (codes.astype(np.int64) & 0xFFFF).astype(np.uint16)
    return out


@dataclass
class RowStats:
    """Per scored position, in llama.cpp's precisions."""

    nll: np.ndarray  # float32 [n]
    nll_base: np.ndarray  # float32 [n]
    kld: np.ndarray  # float64 [n]
    p_diff: np.ndarray  # float32 [n]
    top: np.ndarray  # int64 [n]: the model's top-1 (first index of the max, as C's strict >)
    top_base: np.ndarray  # int64 [n]


def kld_rows(logits: np.ndarray, base: np.ndarray, next_tokens: np.ndarray) -> RowStats:
    """perplexity.cpp's log_softmax(n_vocab, logits, base_log_prob, tok, kld), vectorised.

    logits float32 [n, V] (model under test), base uint16 [n, row_width(V)], next_tokens int [n]."""
    logits = np.ascontiguousarray(logits, dtype=_F32)
    n, n_vocab = logits.shape
    parts = []
    for r0 in range(0, n, _ROW_BLOCK):
        x, b = logits[r0 : r0 + _ROW_BLOCK], base[r0 : r0 + _ROW_BLOCK]
        tok = np.asarray(next_tokens[r0 : r0 + _ROW_BLOCK], dtype=np.int64)
        ar = np.arange(len(x))
        top = x.argmax(axis=1)
        hi = x[ar, top]
        log_sum_exp = np.log(np.exp(x - hi[:, None]).sum(axis=1, dtype=np.float64)).astype(_F32)
        nll = (hi + log_sum_exp) - x[ar, tok]
        head = np.ascontiguousarray(b[:, :4]).view(_F32)
        scale, min_log_prob = head[:, 0], head[:, 1]
        log_p_base = scale[:, None] * b[:, 4 : 4 + n_vocab].astype(_F32) + min_log_prob[:, None]
        nll_base = -log_p_base[ar, tok]
        top_base = log_p_base.argmax(axis=1)
        terms = np.exp(log_p_base) * ((log_p_base - x) + (hi + log_sum_exp)[:, None])  # float32, as C
        kld = np.where(log_p_base > _F32(-16), terms, _F32(0)).sum(axis=1, dtype=np.float64)
        p_diff = np.exp(-nll) - np.exp(-nll_base)
        parts.append((nll, nll_base, kld, p_diff, top, top_base))
    cols = list(zip(*parts)) if parts else [[np.zeros(0)]] * 6
    return RowStats(*(np.concatenate(c) for c in cols))


# ----------------------------------------------------------------------------- statistics
def mean_and_uncertainty(s: float, s2: float, count: int) -> tuple[float, float]:
    """perplexity.cpp's lambda: mean and the standard error of the mean (0 for count <= 10)."""
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    df = math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0
    return f, df


def covariance(sa: float, sb: float, sab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def median_f32(values: np.ndarray) -> float:
    """Median of sorted float32 values: the mean of the middle two in float32 for an even count."""
    n = len(values)
    if n % 2 == 0:
        return float(_F32(0.5) * (values[n // 2] + values[n // 2 - 1]))
    return float(values[n // 2])


def percentile_f32(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile of sorted float32 values: linear interpolation in float32 at
    p = fraction * (n - 1) (fraction a float32 literal such as 0.999f)."""
    fr = _F32(fraction)
    if fr <= 0:
        return float(values[0])
    if fr >= 1:
        return float(values[-1])
    p = fr * _F32(len(values) - 1)
    ip = int(p)
    p = p - _F32(ip)
    return float((_F32(1) - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)])


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else math.nan  # C's sqrt of a negative is NaN, printed as such


def _div(a: float, b: float) -> float:
    return a / b if b != 0 else (math.copysign(math.inf, a) if a else math.nan)


@dataclass
class KLDAccumulator:
    """kl_divergence_result plus the per-token values llama.cpp sorts for its percentiles, and flips."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    n_same_top: int = 0
    count: int = 0
    right_to_wrong: int = 0
    wrong_to_right: int = 0
    n_right: int = 0
    n_right_base: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)
    p_diff_values: list[np.ndarray] = field(default_factory=list)

    def add(self, r: RowStats, next_tokens: np.ndarray) -> None:
        # Squares are float32 products added to double in C (nll*nll with float nll); Δp² is widened first.
        f64 = np.float64
        self.sum_nll += float(r.nll.sum(dtype=f64))
        self.sum_nll2 += float((r.nll * r.nll).sum(dtype=f64))
        self.sum_nll_base += float(r.nll_base.sum(dtype=f64))
        self.sum_nll_base2 += float((r.nll_base * r.nll_base).sum(dtype=f64))
        self.sum_nll_nll_base += float((r.nll * r.nll_base).sum(dtype=f64))
        self.sum_kld += float(r.kld.sum())
        self.sum_kld2 += float((r.kld * r.kld).sum())
        p2 = (r.p_diff * r.p_diff).astype(f64)
        self.sum_p_diff += float(r.p_diff.sum(dtype=f64))
        self.sum_p_diff2 += float(p2.sum())
        self.sum_p_diff4 += float((p2 * p2).sum())
        self.n_same_top += int((r.top == r.top_base).sum())
        self.count += len(r.nll)
        right, right_base = r.top == next_tokens, r.top_base == next_tokens
        self.n_right += int(right.sum())
        self.n_right_base += int(right_base.sum())
        self.right_to_wrong += int((right_base & ~right).sum())
        self.wrong_to_right += int((right & ~right_base).sum())
        self.kld_values.append(r.kld.astype(_F32))
        self.p_diff_values.append(r.p_diff.astype(_F32))

    def chunk_line(self, chunk: int) -> str:
        """The per-chunk progress line llama-perplexity prints (running figures)."""
        lq, lb = mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count), \
            mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, self.count)
        cov = covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, self.count)
        kl = mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count)
        mse = mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, self.count)
        rms = math.sqrt(mse[0])
        top = self.n_same_top / self.count
        return (f"{chunk:4d}    {math.exp(lq[0]):9.4f} ± {math.exp(lq[0]) * lq[1]:9.4f}"
                f"    {lq[0] - lb[0]:10.5f} ± {_sqrt(lq[1] ** 2 + lb[1] ** 2 - 2 * cov):10.5f}"
                f"    {kl[0]:10.5f} ± {kl[1]:10.5f}    {100 * rms:6.3f} ± {100 * _div(0.5, rms) * mse[1]:6.3f} %"
                f"    {100 * top:6.3f} ± {100 * _sqrt(top * (1 - top) / (self.count - 1)) if self.count > 1 else 0:6.3f} %")

    def report(self) -> AuditReport:
        return AuditReport.from_sums(self)


def _label(key: str) -> str:
    """llama.cpp's 7-character row labels: 'Maximum', 'Median ', '99.9%  ', ' 5.0%  '."""
    return {"max": "Maximum", "median": "Median ", "min": "Minimum"}.get(key) or (key + "%").rjust(5) + "  "


CHUNK_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                "              Δp RMS            Same top p")


@dataclass
class AuditReport:
    """The summary figures (values, uncertainties) llama-perplexity prints, plus flips."""

    count: int
    ppl: tuple[float, float]
    ppl_base: tuple[float, float]
    cor: float
    ln_ratio: tuple[float, float]
    ratio: tuple[float, float]
    diff: tuple[float, float]
    kld: tuple[float, float]
    kld_pct: dict[str, float]  # "max", "99.9", ..., "median", ..., "min"
    p_diff: tuple[float, float]
    p_diff_pct: dict[str, float]
    rms_p_diff: tuple[float, float]
    same_top: tuple[float, float]
    top1: float
    top1_base: float
    right_to_wrong: int
    wrong_to_right: int
    kld_values: np.ndarray  # float32, sorted

    @classmethod
    def from_sums(cls, a: KLDAccumulator) -> AuditReport:
        if a.count < 2:
            raise RequestError(f"only {a.count} scored token(s): nothing to compare")
        n = a.count
        kv = np.sort(np.concatenate(a.kld_values))
        pv = np.sort(np.concatenate(a.p_diff_values))
        lq = mean_and_uncertainty(a.sum_nll, a.sum_nll2, n)
        lb = mean_and_uncertainty(a.sum_nll_base, a.sum_nll_base2, n)
        cov = covariance(a.sum_nll, a.sum_nll_base, a.sum_nll_nll_base, n)
        ppl, ppl_b = math.exp(lq[0]), math.exp(lb[0])
        ln_r = (lq[0] - lb[0], _sqrt(lq[1] ** 2 + lb[1] ** 2 - 2 * cov))
        ratio = math.exp(ln_r[0])
        mse = mean_and_uncertainty(a.sum_p_diff2, a.sum_p_diff4, n)
        rms = math.sqrt(mse[0])
        top = a.n_same_top / n
        kld_fr = (("99.9", 0.999), ("99.0", 0.990), ("95.0", 0.950), ("90.0", 0.900))
        kld_lo = (("10.0", 0.100), ("5.0", 0.050), ("1.0", 0.010), ("0.1", 0.001))
        p_fr = kld_fr + (("75.0", 0.750),)
        p_lo = (("25.0", 0.250),) + kld_lo

        def pcts(v: np.ndarray, upper, lower) -> dict[str, float]:
            d = {"max": float(v[-1])}
            d.update({k: percentile_f32(v, f) for k, f in upper})
            d["median"] = median_f32(v)
            d.update({k: percentile_f32(v, f) for k, f in lower})
            d["min"] = float(v[0])
            return d

        return cls(
            count=n, ppl=(ppl, ppl * lq[1]), ppl_base=(ppl_b, ppl_b * lb[1]), cor=_div(cov, lq[1] * lb[1]),
            ln_ratio=ln_r, ratio=(ratio, ratio * ln_r[1]),
            diff=(ppl - ppl_b, _sqrt((ppl * lq[1]) ** 2 + (ppl_b * lb[1]) ** 2 - 2 * ppl * ppl_b * cov)),
            kld=mean_and_uncertainty(a.sum_kld, a.sum_kld2, n), kld_pct=pcts(kv, kld_fr, kld_lo),
            p_diff=mean_and_uncertainty(a.sum_p_diff, a.sum_p_diff2, n), p_diff_pct=pcts(pv, p_fr, p_lo),
            rms_p_diff=(rms, _div(0.5, rms) * mse[1]), same_top=(top, _sqrt(top * (1 - top) / (n - 1))),
            top1=a.n_right / n, top1_base=a.n_right_base / n,
            right_to_wrong=a.right_to_wrong, wrong_to_right=a.wrong_to_right, kld_values=kv,
        )

    def format(self) -> str:
        """llama-perplexity's three summary blocks, line for line, then the flips block."""
        L = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {self.ppl[0]:10.6f} ± {self.ppl[1]:10.6f}",
             f"Mean PPL(base)                : {self.ppl_base[0]:10.6f} ± {self.ppl_base[1]:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * self.cor:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {self.ln_ratio[0]:10.6f} ± {self.ln_ratio[1]:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {self.ratio[0]:10.6f} ± {self.ratio[1]:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {self.diff[0]:10.6f} ± {self.diff[1]:10.6f}", "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {self.kld[0]:10.6f} ± {self.kld[1]:10.6f}"]
        for k, v in self.kld_pct.items():
            L.append(f"{_label(k)} KLD: {v:10.6f}")
        L += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * self.p_diff[0]:6.3f} ± {100 * self.p_diff[1]:5.3f} %"]
        for k, v in self.p_diff_pct.items():
            L.append(f"{_label(k)} Δp: {100 * v:6.3f}%")
        L += [f"RMS Δp    : {100 * self.rms_p_diff[0]:6.3f} ± {100 * self.rms_p_diff[1]:5.3f} %",
              f"Same top p: {100 * self.same_top[0]:6.3f} ± {100 * self.same_top[1]:5.3f} %", "",
              "====== Flips (top-1 vs the actual next token) ======",
              f"Top-1 right (Q / base)   : {100 * self.top1:6.3f}% / {100 * self.top1_base:6.3f}%",
              f"Flips                    : {self.right_to_wrong + self.wrong_to_right} of {self.count} "
              f"({100 * (self.right_to_wrong + self.wrong_to_right) / self.count:.3f}%): "
              f"right->wrong {self.right_to_wrong}, wrong->right {self.wrong_to_right}"]
        if self.count < 100:
            L.append("note: fewer than 100 scored tokens; llama-perplexity prints no summary for so few")
        return "\n".join(L) + "\n"
