"""Clinical statistics: AUC with DeLong CI, Youden threshold, confusion-matrix metrics.

Results are frozen dataclasses. Conventions (pROC's): the positive class is 1; a case is called
positive when ``score >= threshold``; tied scores count one half in the AUC.

Pooling across sites without sharing patient scores uses class-wise score histograms on an agreed
grid (:func:`score_histogram`); :func:`youden_from_histograms` picks the threshold that maximises
sensitivity + specificity over the grid's bin edges from the summed counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

ArrayLike = npt.ArrayLike
F64 = npt.NDArray[np.float64]


def _as_binary(y_true: ArrayLike, score: ArrayLike) -> tuple[F64, F64]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} values but score has {s.size}")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError("y_true must contain only 0 and 1")
    if not np.all(np.isfinite(s)):
        raise ValueError("score contains NaN or infinite values")
    return y, s


def _midrank(x: F64) -> F64:
    """Mid-ranks (1-based) of x, ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks = np.empty(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1.0
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks
    return out


def _delong_components(y: F64, scores: F64) -> tuple[F64, F64, F64]:
    """Fast DeLong (Sun & Xu 2014). scores shape (k, n). Returns aucs (k,), V10 (k,m), V01 (k,n)."""
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    k = scores.shape[0]
    tx = np.empty((k, m))
    ty = np.empty((k, n))
    tz = np.empty((k, m + n))
    for r in range(k):
        tx[r] = _midrank(pos[r])
        ty[r] = _midrank(neg[r])
        tz[r] = _midrank(np.concatenate([pos[r], neg[r]]))
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


@dataclass(frozen=True)
class AUCResult:
    """AUC with its confidence interval; ``variance`` is DeLong's (NaN for bootstrap)."""

    auc: float
    lower: float
    upper: float
    variance: float
    level: float
    method: str
    n_pos: int
    n_neg: int

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain dict (for JSON)."""
        return asdict(self)


def auc_ci(
    y_true: ArrayLike,
    score: ArrayLike,
    method: str = "delong",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> AUCResult:
    """Area under the ROC curve with a confidence interval.

    Parameters
    ----------
    y_true : array-like of {0, 1}
        Outcome, 1 = case.
    score : array-like of float
        Higher = more likely a case.
    method : {"delong", "bootstrap"}
        DeLong's variance (AUC +- z * sqrt(var), clipped to [0, 1], as pROC's ``ci.auc``), or a
        stratified percentile bootstrap (cases and controls resampled separately).
    level : float
        Confidence level.
    n_boot, seed : int
        Bootstrap replicates and seed (bootstrap only).

    Raises
    ------
    ValueError
        If y_true does not contain both classes.
    """
    y, s = _as_binary(y_true, score)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one case and one control")
    aucs, v10, v01 = _delong_components(y, s[None, :])
    auc = float(aucs[0])
    var = float(
        (np.var(v10[0], ddof=1) / n_pos if n_pos > 1 else 0.0)
        + (np.var(v01[0], ddof=1) / n_neg if n_neg > 1 else 0.0)
    )
    z = stats.norm.ppf(0.5 + level / 2.0)
    if method == "delong":
        half = z * math.sqrt(max(var, 0.0))
        return AUCResult(auc, float(max(0.0, auc - half)), float(min(1.0, auc + half)), var, level,
                         "delong",
                         n_pos, n_neg)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        pos, neg = s[y == 1], s[y == 0]
        boots = np.empty(n_boot)
        yb = np.concatenate([np.ones(n_pos), np.zeros(n_neg)])
        for b in range(n_boot):
            sb = np.concatenate([rng.choice(pos, n_pos), rng.choice(neg, n_neg)])
            boots[b] = _delong_components(yb, sb[None, :])[0][0]
        lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
        return AUCResult(auc, float(lo), float(hi), float("nan"), level, "bootstrap", n_pos, n_neg)
    raise ValueError(f"unknown method '{method}' (use 'delong' or 'bootstrap')")


@dataclass(frozen=True)
class DeLongTest:
    """Paired DeLong test of two correlated AUCs on the same patients."""

    auc_a: float
    auc_b: float
    z: float
    p_value: float
    ci_diff: tuple[float, float]
    covariance: float


def delong_test(
    y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike, level: float = 0.95
) -> DeLongTest:
    """Two-sided DeLong test of AUC(a) = AUC(b), with the CI of AUC(a) - AUC(b)."""
    y, sa = _as_binary(y_true, score_a)
    _, sb = _as_binary(y_true, score_b)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError("the DeLong test needs at least two cases and two controls")
    aucs, v10, v01 = _delong_components(y, np.vstack([sa, sb]))
    s10 = np.cov(v10)
    s01 = np.cov(v01)
    cov = s10 / n_pos + s01 / n_neg
    var_diff = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    if var_diff <= 0:
        zval, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        zval = diff / math.sqrt(var_diff)
        p = float(2 * stats.norm.sf(abs(zval)))
    zc = stats.norm.ppf(0.5 + level / 2.0)
    half = zc * math.sqrt(max(var_diff, 0.0))
    return DeLongTest(float(aucs[0]), float(aucs[1]), float(zval), p,
                      (float(diff - half), float(diff + half)),
                      float(cov[0, 1]))


def youden_threshold(y_true: ArrayLike, score: ArrayLike) -> float:
    """Threshold maximising sensitivity + specificity (positive if score >= threshold).

    Candidates are the midpoints between consecutive distinct scores (plus -inf and +inf, as in
    pROC); among equally good candidates the lowest is returned.
    """
    y, s = _as_binary(y_true, score)
    u = np.unique(s)
    cands = np.concatenate([[-np.inf], (u[:-1] + u[1:]) / 2.0, [np.inf]])
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("the Youden threshold needs both classes")
    sens = (pos[None, :] >= cands[:, None]).mean(axis=1)
    spec = (neg[None, :] < cands[:, None]).mean(axis=1)
    return float(cands[int(np.argmax(sens + spec))])


@dataclass(frozen=True)
class BinaryMetrics:
    """Confusion-matrix metrics at a fixed threshold (NaN where the denominator is 0)."""

    threshold: float
    sensitivity: float
    specificity: float
    accuracy: float
    ppv: float
    npv: float
    tp: int
    fp: int
    tn: int
    fn: int


def _ratio(a: int, b: int) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(y_true: ArrayLike, score: ArrayLike, threshold: float) -> BinaryMetrics:
    """Sensitivity, specificity, accuracy, PPV and NPV when ``score >= threshold`` is positive."""
    y, s = _as_binary(y_true, score)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return BinaryMetrics(
        float(threshold), _ratio(tp, tp + fn), _ratio(tn, tn + fp), _ratio(tp + tn, len(y)),
        _ratio(tp, tp + fp), _ratio(tn, tn + fn), tp, fp, tn, fn,
    )


# ----------------------------------------------------------------------------- pooled counts
def score_grid(n_bins: int = 1000) -> F64:
    """The agreed grid of bin edges on the probability scale [0, 1] (``n_bins + 1`` edges)."""
    return np.linspace(0.0, 1.0, n_bins + 1)


def score_histogram(y_true: ArrayLike, prob: ArrayLike, n_bins: int = 1000) -> tuple[F64, F64]:
    """Class-wise counts of probabilities per bin of :func:`score_grid` (cases, controls).

    Bin ``i`` holds ``edges[i] <= p < edges[i+1]`` (the last bin includes 1.0). Sites send these
    counts instead of scores; the coordinator sums them.
    """
    y, p = _as_binary(y_true, prob)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    pos = np.bincount(idx[y == 1], minlength=n_bins).astype(np.float64)
    neg = np.bincount(idx[y == 0], minlength=n_bins).astype(np.float64)
    return pos, neg


def youden_from_histograms(pos: F64, neg: F64) -> float:
    """Youden threshold from (summed) class-wise histograms on :func:`score_grid`.

    The candidates are the grid's bin edges, so the threshold is exact up to one bin width
    (1e-3 for the default grid): a patient is positive when ``prob >= threshold``.
    """
    n_bins = len(pos)
    if pos.sum() == 0 or neg.sum() == 0:
        raise ValueError("the Youden threshold needs both classes")
    edges = score_grid(n_bins)
    # positives at threshold edges[i]: patients in bins i..end
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    fp = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])
    sens = tp / pos.sum()
    spec = 1.0 - fp / neg.sum()
    best = int(np.argmax(sens + spec))
    if best == n_bins:
        return 1.0 + 1e-9
    return float(edges[best])
