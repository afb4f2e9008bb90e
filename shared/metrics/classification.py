"""Binary-outcome statistics: AUC with CI, paired and unpaired DeLong tests, partial AUC, Youden
threshold, confusion-matrix metrics with CIs, calibration, Hosmer-Lemeshow and decision-curve net
benefit.

Results are frozen dataclasses. Conventions (pROC's and dcurves'): the positive class is 1; a
patient is called positive when ``score >= threshold``; tied scores count one half in the AUC.
"""

from __future__ import annotations

import math
import warnings
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


# ----------------------------------------------------------------------------- unpaired DeLong
@dataclass(frozen=True)
class DeLongSummary:
    """What one ROC curve contributes to an unpaired DeLong test.

    ``var10`` and ``var01`` are the sample variances (ddof = 1) of the cases' and the controls'
    placement values (V10, V01); ``variance`` = var10 / n_pos + var01 / n_neg is DeLong's
    variance of the AUC. A site can send this instead of its patients' scores.
    """

    auc: float
    var10: float
    var01: float
    n_pos: int
    n_neg: int

    @property
    def variance(self) -> float:
        """DeLong's variance of the AUC."""
        return self.var10 / self.n_pos + self.var01 / self.n_neg


def delong_summary(y_true: ArrayLike, score: ArrayLike) -> DeLongSummary:
    """AUC and placement-value variances of one curve (at least two cases and two controls)."""
    y, s = _as_binary(y_true, score)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError("the DeLong variance needs at least two cases and two controls")
    aucs, v10, v01 = _delong_components(y, s[None, :])
    return DeLongSummary(float(aucs[0]), float(np.var(v10[0], ddof=1)),
                         float(np.var(v01[0], ddof=1)), n_pos, n_neg)


@dataclass(frozen=True)
class UnpairedDeLongTest:
    """DeLong's test of two AUCs on different patients (pROC ``paired = FALSE``).

    ``statistic`` is pROC's D, referred to Student's t with ``df`` degrees of freedom; ``ci_diff``
    is the two-sided ``level`` interval of auc1 - auc2 from the same t distribution (pROC itself
    reports no interval for this test).
    """

    auc1: float
    auc2: float
    statistic: float
    df: float
    p_value: float
    ci_diff: tuple[float, float]
    level: float
    alternative: str
    method: str = "DeLong's test for two ROC curves (unpaired)"


_ALTERNATIVES = ("two.sided", "greater", "less")


def delong_unpaired_from_summaries(
    curve1: DeLongSummary, curve2: DeLongSummary, level: float = 0.95,
    alternative: str = "two.sided",
) -> UnpairedDeLongTest:
    """Unpaired DeLong test of AUC1 = AUC2 from the two curves' summaries.

    As pROC's ``delong.unpaired.test`` (R/delong.R): with S_k = var10_k / m_k + var01_k / n_k
    (m cases, n controls, N_k = m_k + n_k patients),
    D = (AUC1 - AUC2) / sqrt(S_1 + S_2) and
    df = (S_1 + S_2)^2 / (S_1^2 / (N_1 - 1) + S_2^2 / (N_2 - 1)),
    p from Student's t with df (``alternative`` "greater": AUC1 > AUC2, as in ``roc.test``).
    """
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"unknown alternative '{alternative}' (use {', '.join(_ALTERNATIVES)})")
    if not 0.0 < level < 1.0:
        raise ValueError("level must lie in (0, 1)")
    for c in (curve1, curve2):
        if c.n_pos < 2 or c.n_neg < 2:
            raise ValueError("the DeLong test needs at least two cases and two controls per curve")
    s1, s2 = curve1.variance, curve2.variance
    var = s1 + s2
    diff = curve1.auc - curve2.auc
    if var > 0:
        df = var**2 / (s1**2 / (curve1.n_pos + curve1.n_neg - 1)
                       + s2**2 / (curve2.n_pos + curve2.n_neg - 1))
        stat = diff / math.sqrt(var)
        upper = float(stats.t.sf(stat, df))
        lower = float(stats.t.cdf(stat, df))
        half = float(stats.t.ppf(0.5 + level / 2.0, df)) * math.sqrt(var)
    else:
        # Both variances 0: every placement value of a curve equal, so each AUC is 0, 1/2 or 1
        # and a difference below 1e-9 is rounding. pROC gives NaN here; we give D = 0, p = 1 for
        # equal AUCs and D = +-inf, p = 0 otherwise (as delong_test).
        df = math.nan
        if abs(diff) < 1e-9:
            diff = 0.0
        stat = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        upper = 1.0 if diff <= 0 else 0.0
        lower = 1.0 if diff >= 0 else 0.0
        half = 0.0
    p = {"two.sided": min(1.0, 2.0 * min(upper, lower)), "greater": upper, "less": lower}
    return UnpairedDeLongTest(float(curve1.auc), float(curve2.auc), float(stat), float(df),
                              float(p[alternative]), (float(diff - half), float(diff + half)),
                              level, alternative)


def delong_unpaired_test(
    y1: ArrayLike, score1: ArrayLike, y2: ArrayLike, score2: ArrayLike, level: float = 0.95,
    alternative: str = "two.sided",
) -> UnpairedDeLongTest:
    """Unpaired DeLong test of two ROC curves on different patients (e.g. internal validation
    vs the external cohort), as pROC ``roc.test(roc1, roc2, method = "delong", paired = FALSE)``
    with ``direction = "<"`` (higher score = case, this module's convention throughout)."""
    return delong_unpaired_from_summaries(delong_summary(y1, score1),
                                          delong_summary(y2, score2), level, alternative)


# ----------------------------------------------------------------------------- partial AUC
_FOCI = ("specificity", "sensitivity")


def _area_between(x: F64, y: F64, lo: float, hi: float) -> float:
    """Area under the polyline through (x, y) (x non-decreasing) between x = lo and x = hi.

    Each segment is clipped to [lo, hi], its ends interpolated linearly; vertical segments add
    nothing.
    """
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    a, b = np.clip(x0, lo, hi), np.clip(x1, lo, hi)
    keep = b > a
    x0, x1, y0, y1, a, b = (v[keep] for v in (x0, x1, y0, y1, a, b))
    slope = (y1 - y0) / (x1 - x0)
    ya, yb = y0 + (a - x0) * slope, y0 + (b - x0) * slope
    return float(np.sum((b - a) * (ya + yb) / 2.0))


def partial_auc_from_roc(
    fpr: ArrayLike, tpr: ArrayLike, limits: tuple[float, float] = (1.0, 0.8),
    focus: str = "specificity", correct: bool = False,
) -> float:
    """Partial area under an empirical ROC curve given as (FPR, TPR) points in threshold order
    (from (0, 0) to (1, 1), both non-decreasing), as pROC's ``auc(..., partial.auc = limits)``.

    ``focus = "specificity"`` integrates sensitivity over specificity in ``limits``;
    ``"sensitivity"`` integrates specificity over sensitivity. The curve is linear between
    points (trapezoids), and at the limits it is interpolated. ``correct`` applies McClish's
    (1989) standardisation as pROC: (1 + (pAUC - min) / (max - min)) / 2 with max = |a - b| and
    min = the area under the diagonal in the band, ((1 - a) + (1 - b)) / 2 * |a - b|; a curve
    below that (pAUC < min) has no corrected value: NaN with a RuntimeWarning (pROC: NA with a
    warning). ``limits`` may be given in either order; over (1, 0) the result is the AUC.
    """
    f = np.asarray(fpr, dtype=np.float64).ravel()
    t = np.asarray(tpr, dtype=np.float64).ravel()
    if f.shape != t.shape or f.size < 2:
        raise ValueError("fpr and tpr must have the same length (at least 2)")
    rates = np.concatenate([f, t])
    if (not np.all(np.isfinite(rates)) or np.any((rates < 0) | (rates > 1))
            or np.any(np.diff(f) < 0) or np.any(np.diff(t) < 0)):
        raise ValueError("fpr and tpr must be non-decreasing rates in [0, 1]")
    if focus not in _FOCI:
        raise ValueError(f"unknown focus '{focus}' (use 'specificity' or 'sensitivity')")
    lims = [float(v) for v in limits]
    if len(lims) != 2 or not all(0.0 <= v <= 1.0 for v in lims) or lims[0] == lims[1]:
        raise ValueError(f"limits must be two different values in [0, 1], got {limits}")
    hi, lo = max(lims), min(lims)
    if focus == "specificity":
        area = _area_between(1.0 - f[::-1], t[::-1], lo, hi)
    else:
        area = _area_between(t, 1.0 - f, lo, hi)
    if not correct:
        return area
    smallest = ((1.0 - hi) + (1.0 - lo)) / 2.0 * (hi - lo)
    largest = hi - lo
    if area < smallest:
        warnings.warn("the partial AUC correction is not defined for ROC curves below the "
                      "diagonal", RuntimeWarning, stacklevel=2)
        return math.nan
    return (1.0 + (area - smallest) / (largest - smallest)) / 2.0


def roc_points(y_true: ArrayLike, score: ArrayLike) -> tuple[F64, F64]:
    """The empirical ROC curve: (FPR, TPR) at +inf and at every distinct score, descending
    (a patient is positive when ``score >= threshold``)."""
    y, s = _as_binary(y_true, score)
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("the ROC curve needs at least one case and one control")
    thr = np.unique(s)[::-1]
    tp = len(pos) - np.searchsorted(pos, thr, side="left")
    fp = len(neg) - np.searchsorted(neg, thr, side="left")
    return (np.concatenate([[0.0], fp / len(neg)]), np.concatenate([[0.0], tp / len(pos)]))


def partial_auc(
    y_true: ArrayLike, score: ArrayLike, limits: tuple[float, float] = (1.0, 0.8),
    focus: str = "specificity", correct: bool = False,
) -> float:
    """Partial AUC of the empirical ROC curve (pROC ``auc(roc, partial.auc = limits,
    partial.auc.focus = focus, partial.auc.correct = correct)``); see
    :func:`partial_auc_from_roc`."""
    fpr, tpr = roc_points(y_true, score)
    return partial_auc_from_roc(fpr, tpr, limits, focus, correct)


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
