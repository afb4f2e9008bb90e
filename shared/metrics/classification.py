"""Binary-outcome statistics: AUC with CI, DeLong test, Youden threshold, confusion-matrix
metrics with CIs, calibration, Hosmer-Lemeshow and decision-curve net benefit.

Results are frozen dataclasses. Conventions (pROC's and dcurves'): the positive class is 1; a
patient is called positive when ``score >= threshold``; tied scores count one half in the AUC.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

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
    """Confusion-matrix metrics at a fixed threshold (NaN where the denominator is 0).

    ``ci`` maps ``sensitivity``, ``specificity``, ``accuracy``, ``ppv`` and ``npv`` to
    (lower, upper) when a CI method was asked for, else it is empty.
    """

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
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    ci_method: str = ""


def _ratio(a: int, b: int) -> float:
    return float(a / b) if b else float("nan")


def _counts(y: F64, s: F64, threshold: float) -> tuple[int, int, int, int]:
    pred = s >= threshold
    return (int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0))),
            int(np.sum(~pred & (y == 0))), int(np.sum(~pred & (y == 1))))


def _rates(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    return {
        "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn), "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (NaN, NaN when n = 0)."""
    if n == 0:
        return (math.nan, math.nan)
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def binary_metrics(
    y_true: ArrayLike,
    score: ArrayLike,
    threshold: float,
    ci: str | None = None,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> BinaryMetrics:
    """Sensitivity, specificity, accuracy, PPV and NPV when ``score >= threshold`` is positive.

    Parameters
    ----------
    ci : {None, "wilson", "bootstrap"}
        Confidence intervals: Wilson score intervals of each proportion, or the percentile
        bootstrap of patients (resampled with replacement, threshold held fixed), which is what
        the Ki-67 seed paper's intervals are (they sit on the k/n grid).
    """
    y, s = _as_binary(y_true, score)
    tp, fp, tn, fn = _counts(y, s, threshold)
    rates = _rates(tp, fp, tn, fn)
    intervals: dict[str, tuple[float, float]] = {}
    if ci == "wilson":
        pairs = {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
                 "accuracy": (tp + tn, len(y)), "ppv": (tp, tp + fp), "npv": (tn, tn + fn)}
        intervals = {k: wilson_interval(a, b, level) for k, (a, b) in pairs.items()}
    elif ci == "bootstrap":
        rng = np.random.default_rng(seed)
        draws = {k: np.empty(n_boot) for k in rates}
        for b in range(n_boot):
            idx = rng.integers(0, len(y), len(y))
            r = _rates(*_counts(y[idx], s[idx], threshold))
            for k in rates:
                draws[k][b] = r[k]
        lo, hi = (1 - level) / 2, (1 + level) / 2
        intervals = {
            k: (float(np.nanquantile(v, lo)), float(np.nanquantile(v, hi)))
            for k, v in draws.items()
        }
    elif ci is not None:
        raise ValueError(f"unknown ci '{ci}' (use None, 'wilson' or 'bootstrap')")
    return BinaryMetrics(float(threshold), rates["sensitivity"], rates["specificity"],
                         rates["accuracy"], rates["ppv"], rates["npv"], tp, fp, tn, fn,
                         intervals, ci or "")


# ----------------------------------------------------------------------------- calibration
def _logit(p: F64) -> F64:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.asarray(np.log(p / (1 - p)), dtype=np.float64)


def _logistic_fit(x: F64, y: F64, offset: F64 | None = None, iters: int = 100) -> F64:
    """Maximum-likelihood logistic regression by Newton-Raphson; x includes the intercept."""
    beta = np.zeros(x.shape[1])
    off = np.zeros(len(y)) if offset is None else offset
    for _ in range(iters):
        eta = x @ beta + off
        mu = 1.0 / (1.0 + np.exp(-eta))
        w = mu * (1 - mu)
        grad = x.T @ (y - mu)
        hess = x.T @ (x * w[:, None])
        step = np.linalg.solve(hess + 1e-12 * np.eye(len(beta)), grad)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-12:
            break
    return beta


@dataclass(frozen=True)
class Calibration:
    """Calibration of predicted probabilities.

    ``slope``: coefficient of logit(p) in a logistic regression of y on logit(p) (ideal 1);
    ``intercept_in_the_large``: intercept of an intercept-only logistic regression with
    offset logit(p) (ideal 0); ``brier`` = mean (p - y)^2; ``scaled_brier`` = 1 - brier /
    (ybar (1 - ybar)); ``bins``: (mean predicted, observed rate, n) per quantile bin.
    """

    slope: float
    intercept: float
    intercept_in_the_large: float
    brier: float
    scaled_brier: float
    bins: tuple[tuple[float, float, int], ...]


def calibration(y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10) -> Calibration:
    """Calibration slope, calibration-in-the-large, Brier and a binned calibration curve."""
    y, p = _as_binary(y_true, prob)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    lp = _logit(p)
    ones = np.ones_like(lp)
    intercept, slope = _logistic_fit(np.column_stack([ones, lp]), y)
    citl = float(_logistic_fit(ones[:, None], y, offset=lp)[0])
    brier = float(np.mean((p - y) ** 2))
    base = float(y.mean() * (1 - y.mean()))
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    bins = []
    for b in range(max(len(edges) - 1, 1)):
        m = idx == b
        if m.any():
            bins.append((float(p[m].mean()), float(y[m].mean()), int(m.sum())))
    return Calibration(float(slope), float(intercept), citl, brier,
                       1.0 - brier / base if base > 0 else math.nan, tuple(bins))


@dataclass(frozen=True)
class HosmerLemeshow:
    """Hosmer-Lemeshow goodness-of-fit test."""

    statistic: float
    df: int
    p_value: float
    groups: int


def hosmer_lemeshow(y_true: ArrayLike, prob: ArrayLike, groups: int = 10) -> HosmerLemeshow:
    """Hosmer-Lemeshow test with ResourceSelection's ``hoslem.test`` algorithm.

    Breaks are the unique type-7 quantiles of ``prob`` at ``seq(0, 1, 1/groups)``; intervals are
    right-closed with the lowest included (R's ``cut(..., include.lowest = TRUE)``); the statistic
    sums (observed - expected)^2 / expected over both outcome columns; df = G - 2 where G is the
    number of non-empty groups (ResourceSelection since 2023; before, df was ``groups - 2``).
    """
    y, p = _as_binary(y_true, prob)
    breaks = np.unique(np.quantile(p, np.linspace(0.0, 1.0, groups + 1)))
    # right-closed intervals (a, b], first one [a, b]
    idx = np.searchsorted(breaks, p, side="left") - 1
    idx[p <= breaks[0]] = 0
    stat = 0.0
    filled = 0
    for b in range(len(breaks) - 1):
        m = idx == b
        if not m.any():
            continue
        filled += 1
        obs1, exp1 = y[m].sum(), p[m].sum()
        obs0, exp0 = m.sum() - obs1, m.sum() - exp1
        stat += (obs1 - exp1) ** 2 / exp1 + (obs0 - exp0) ** 2 / exp0
    if filled < 3:
        raise ValueError(f"Hosmer-Lemeshow needs at least 3 non-empty groups, got {filled}")
    df = filled - 2
    return HosmerLemeshow(float(stat), df, float(stats.chi2.sf(stat, df)), filled)


# ----------------------------------------------------------------------------- decision curves
@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit of the model, of treating all and of treating none, per threshold."""

    thresholds: tuple[float, ...]
    model: tuple[float, ...]
    treat_all: tuple[float, ...]
    treat_none: tuple[float, ...]


def net_benefit(y_true: ArrayLike, prob: ArrayLike, thresholds: ArrayLike) -> DecisionCurve:
    """Decision-curve net benefit with dcurves' conventions.

    NB(pt) = TP/n - FP/n * pt / (1 - pt), a patient being test-positive when ``prob >= pt``;
    treat-all uses every patient as positive; treat-none is 0. As dcurves does, risks of exactly
    0 or 1 are nudged by machine epsilon (to -eps and 1 + eps), so that a risk of 0 is never
    positive, even at threshold 0.
    """
    y, p = _as_binary(y_true, prob)
    eps = float(np.finfo(np.float64).eps)
    p = np.where(p == 0.0, -eps, np.where(p == 1.0, 1.0 + eps, p))
    pts = np.asarray(thresholds, dtype=np.float64)
    if np.any((pts < 0) | (pts >= 1)):
        raise ValueError("thresholds must lie in [0, 1)")
    n = len(y)
    prev = y.mean()
    model, all_ = [], []
    for pt in pts:
        odds = pt / (1 - pt)
        pos = p >= pt
        tp = np.sum(pos & (y == 1)) / n
        fp = np.sum(pos & (y == 0)) / n
        model.append(float(tp - fp * odds))
        all_.append(float(prev - (1 - prev) * odds))
    return DecisionCurve(tuple(map(float, pts)), tuple(model), tuple(all_),
                         tuple(0.0 for _ in pts))
