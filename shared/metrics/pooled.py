"""Pooled statistics across sites from summed sufficient statistics (no per-patient scores move).

Each site computes sums locally (``site_*`` functions); the coordinator adds them up and finishes
the statistic (``pooled_*`` functions). The sums are plain arrays, so they can also travel through
secure aggregation, after which the coordinator sees only the cross-site totals.

Scores are placed on an agreed grid (:class:`ScoreGrid`, default 10,000 equal bins on [0, 1]),
survival times on a :class:`TimeGrid`. Bins are half-open, [edge_i, edge_(i+1)) (the last one
closed), and edge_i is the float nearest to the exact lo + i (hi - lo) / n_bins, so a value equal
to an edge (0.4567 on the 10,000-bin grid, day 12 on a one-bin-per-day grid, 12.3 on a
tenth-of-a-day grid) always lands in the bin starting at that edge, never in the one below.

**When pooled equals central.** Every pooled statistic here equals the central one on the
patient rows (up to floating-point rounding of the sums, ~1e-15 relative; the CI half-width
of a paired difference is sqrt of a variance near 0 for similar models, so it can differ by
~1e-9 there) when no two distinct
values share a bin: AUC, DeLong variance and the paired DeLong test (distinct scores in distinct
bins), Kaplan-Meier and the log-rank test (distinct times in distinct bins; a bin's time is its
left edge, so reported times are the data's times when they lie on edges). That holds in
particular when every value lies on an edge: scores recorded to 4 decimals on the default grid,
whole-day (or tenth-of-a-day) times on a one-bin-per-day (tenth-of-a-day) grid, except that
the closed last bin holds both hi and the edge below it (1.0 and 0.9999 on the default grid;
a TimeGrid's t_max should exceed the last time). Net benefit is
exact at every threshold that is an edge; the Youden threshold (an edge) induces the same
sensitivity and specificity as the central one; the Brier score is exact on any grid.
**Binning error bound** otherwise: pooled AUC, DeLong variance and the paired DeLong test equal
the central DeLong statistics computed on the binned scores exactly; they differ from the
unbinned central values only through case-control pairs (and, for the variance, placement values)
falling in the same bin, which are counted as ties. The AUC error is therefore at most half the
fraction of case-control pairs sharing a bin (<= 0.5 * the largest bin's share of patients). A
paired DeLong test between two similar models amplifies this error (the variance of the
difference is small): on the phantom, 1,000 bins moved its p-value by 0.02, 10,000 bins by less
than 1e-12.

Disclosure: a single site's fine histogram tells the coordinator approximately how that site's
scores are distributed (not which patient has which score). A site can choose a coarser grid
(fewer bins) at the cost of a larger binning error, and once secure aggregation is on, the
coordinator sees only sums over sites.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

from hcc_fl.shared.metrics.classification import (
    AUCResult,
    DeLongSummary,
    DeLongTest,
    UnpairedDeLongTest,
    delong_unpaired_from_summaries,
    partial_auc_from_roc,
)

F64 = npt.NDArray[np.float64]


@functools.lru_cache(maxsize=32)
def _exact_edges(lo: float, hi: float, n_bins: int) -> F64:
    """The ``n_bins + 1`` edges ``lo + i (hi - lo) / n_bins``, each the float nearest to the exact
    rational ``(lo (n_bins - i) + hi i) / n_bins`` of the floats ``lo`` and ``hi``.

    For decimal-friendly grids an edge is therefore the Python literal of its decimal value
    (``ScoreGrid(10_000).edges[4567] == 0.4567``, ``TimeGrid(730, 7300).edges[123] == 12.3``),
    which ``np.linspace`` does not guarantee. Cached and read-only.
    """
    if n_bins < 1:
        raise ValueError(f"a grid needs at least one bin, got n_bins={n_bins}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"a grid needs finite lo < hi, got [{lo}, {hi}]")
    if lo.is_integer() and hi.is_integer() and max(abs(lo), abs(hi)) * n_bins < 2.0**53:
        # integer numerators below 2**53 are exact in float64: one correctly rounded division
        i = np.arange(n_bins + 1, dtype=np.int64)
        num = int(lo) * (n_bins - i) + int(hi) * i
        edges = num.astype(np.float64) / float(n_bins)
    else:
        # exact rationals: lo = a / q, hi = b / q (q a power of two); int / int rounds correctly
        (a, qa), (b, qb) = lo.as_integer_ratio(), hi.as_integer_ratio()
        q = max(qa, qb)
        a, b = a * (q // qa), b * (q // qb)
        den = q * n_bins
        edges = np.array([(a * (n_bins - k) + b * k) / den for k in range(n_bins + 1)],
                         dtype=np.float64)
    if not np.all(np.diff(edges) > 0):
        raise ValueError(f"{n_bins} bins on [{lo}, {hi}] are finer than float64 resolves")
    edges.flags.writeable = False
    return edges


def _bin_of(edges: F64, x: F64) -> npt.NDArray[np.int64]:
    """Index of the bin whose left edge is the largest edge <= x, clipped to the grid's bins
    (values on an edge go to the bin that starts there; the last bin includes its right edge)."""
    idx = np.searchsorted(edges, x, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2).astype(np.int64)


@dataclass(frozen=True)
class ScoreGrid:
    """The agreed grid: ``n_bins`` equal bins on [lo, hi]; bin i holds edge_i <= s < edge_(i+1)
    (the last bin includes ``hi``), where edge_i is the float nearest to lo + i (hi - lo) / n_bins
    (see :attr:`edges`). A score equal to an edge always lands in the bin starting there."""

    n_bins: int = 10_000
    lo: float = 0.0
    hi: float = 1.0

    @property
    def edges(self) -> F64:
        """The ``n_bins + 1`` bin edges, exactly rounded (read-only array)."""
        return _exact_edges(float(self.lo), float(self.hi), int(self.n_bins))

    def index(self, score: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Bin index of each score (scores outside [lo, hi] are refused)."""
        s = np.asarray(score, dtype=np.float64).ravel()
        if np.any(~np.isfinite(s)) or np.any((s < self.lo) | (s > self.hi)):
            raise ValueError(f"scores must be finite and lie in [{self.lo}, {self.hi}]")
        return _bin_of(self.edges, s)

    def edge_index(self, value: float) -> int:
        """k with ``edges[k] == value`` exactly; ValueError if ``value`` is not an edge."""
        edges = self.edges
        k = int(np.searchsorted(edges, value, side="left"))
        if k > self.n_bins or edges[k] != value:
            raise ValueError(f"{value!r} is not an edge of the grid")
        return k


# ----------------------------------------------------------------------------- pass 1: histograms
def site_histograms(y: npt.ArrayLike, score: npt.ArrayLike, grid: ScoreGrid) -> tuple[F64, F64]:
    """Class-wise counts per bin (cases, controls) of one site."""
    yy = np.asarray(y, dtype=np.float64).ravel()
    idx = grid.index(score)
    if yy.shape != idx.shape:
        raise ValueError("y and score differ in length")
    pos = np.bincount(idx[yy == 1], minlength=grid.n_bins).astype(np.float64)
    neg = np.bincount(idx[yy == 0], minlength=grid.n_bins).astype(np.float64)
    return pos, neg


def _placements(pos: F64, neg: F64) -> tuple[F64, F64]:
    """Per-bin placement values: V10 for a case in bin b, V01 for a control in bin b."""
    m, n = pos.sum(), neg.sum()
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    pos_above = pos.sum() - np.cumsum(pos)
    v10 = (neg_below + 0.5 * neg) / n
    v01 = (pos_above + 0.5 * pos) / m
    return v10, v01


def pooled_auc(pos: F64, neg: F64) -> float:
    """AUC from summed class-wise histograms (ties within a bin count one half)."""
    if pos.sum() == 0 or neg.sum() == 0:
        raise ValueError("the AUC needs at least one case and one control")
    v10, _ = _placements(pos, neg)
    return float((pos * v10).sum() / pos.sum())


def youden_from_histograms(pos: F64, neg: F64, grid: ScoreGrid | None = None) -> float:
    """Youden threshold over the grid's edges from summed histograms (positive if s >= thr).

    Among equally good edges the lowest is returned (as :func:`youden_threshold`): J is compared
    as ``(J - 1) * n_pos * n_neg = TP * n_neg - FP * n_pos``, exact for counts, so that ties are
    ties and not decided by rounding.
    """
    grid = grid or ScoreGrid(len(pos))
    if pos.sum() == 0 or neg.sum() == 0:
        raise ValueError("the Youden threshold needs both classes")
    tp, fp = confusion_at_edges(pos, neg)
    j = tp * neg.sum() - fp * pos.sum()
    best = int(np.argmax(j))
    if best == len(pos):
        return float(grid.hi + 1e-9)
    return float(grid.edges[best])


def confusion_at_edges(pos: F64, neg: F64) -> tuple[F64, F64]:
    """(TP, FP) when the threshold is each grid edge (n_bins + 1 values)."""
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    fp = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])
    return tp, fp


def pooled_net_benefit(pos: F64, neg: F64, grid: ScoreGrid, thresholds: npt.ArrayLike) -> F64:
    """Model net benefit at ``thresholds`` from summed histograms; each threshold must equal a
    grid edge exactly (``grid.edges[k]``; decimal thresholds such as 0.05 or 0.3 are edges of the
    default grid), so that "positive if score >= threshold" is decided exactly by the bins."""
    tp, fp = confusion_at_edges(pos, neg)
    n = pos.sum() + neg.sum()
    out = []
    for pt in np.asarray(thresholds, dtype=np.float64):
        try:
            k = grid.edge_index(float(pt))
        except ValueError:
            raise ValueError(f"threshold {pt!r} is not an edge of the grid") from None
        out.append(tp[k] / n - fp[k] / n * pt / (1 - pt))
    return np.asarray(out, dtype=np.float64)


# ----------------------------------------------------------------------------- pass 2: moments
@dataclass(frozen=True)
class PlacementSums:
    """A site's sums of placement values against the broadcast pooled histograms.

    ``case`` and ``control`` each hold [count, sum_a, sum_a^2, sum_b, sum_b^2, sum_a*b]; the
    ``b`` entries are 0 when only one model is evaluated.
    """

    case: F64
    control: F64

    def __add__(self, other: PlacementSums) -> PlacementSums:
        return PlacementSums(self.case + other.case, self.control + other.control)


def site_placement_sums(
    y: npt.ArrayLike,
    score_a: npt.ArrayLike,
    pooled_a: tuple[F64, F64],
    grid: ScoreGrid,
    score_b: npt.ArrayLike | None = None,
    pooled_b: tuple[F64, F64] | None = None,
) -> PlacementSums:
    """Pass 2 at a site: placement-value moments of its own patients (model a, optionally b)."""
    yy = np.asarray(y, dtype=np.float64).ravel()
    va10, va01 = _placements(*pooled_a)
    ia = grid.index(score_a)
    a = np.where(yy == 1, va10[ia], va01[ia])
    if score_b is not None and pooled_b is not None:
        vb10, vb01 = _placements(*pooled_b)
        ib = grid.index(score_b)
        b = np.where(yy == 1, vb10[ib], vb01[ib])
    else:
        b = np.zeros_like(a)

    def sums(mask: npt.NDArray[np.bool_]) -> F64:
        return np.array([mask.sum(), a[mask].sum(), (a[mask] ** 2).sum(), b[mask].sum(),
                         (b[mask] ** 2).sum(), (a[mask] * b[mask]).sum()], dtype=np.float64)

    return PlacementSums(sums(yy == 1), sums(yy == 0))


def _moments(s: F64) -> tuple[float, float, float, float, float]:
    """(mean_a, var_a, mean_b, var_b, cov_ab) with ddof=1 from a sums vector."""
    n, sa, saa, sb, sbb, sab = s
    if n < 2:
        return (sa / max(n, 1), 0.0, sb / max(n, 1), 0.0, 0.0)
    return (sa / n, (saa - sa * sa / n) / (n - 1), sb / n, (sbb - sb * sb / n) / (n - 1),
            (sab - sa * sb / n) / (n - 1))


def pooled_auc_ci(sums: PlacementSums, level: float = 0.95) -> AUCResult:
    """Pooled AUC of model a with its DeLong CI, from the summed placement sums."""
    m, n = int(sums.case[0]), int(sums.control[0])
    if m == 0 or n == 0:
        raise ValueError("the AUC needs at least one case and one control")
    auc, var10, _, _, _ = _moments(sums.case)
    _, var01, _, _, _ = _moments(sums.control)
    var = var10 / m + var01 / n
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    half = z * math.sqrt(max(var, 0.0))
    return AUCResult(float(auc), float(max(0.0, auc - half)), float(min(1.0, auc + half)),
                     float(var), level, "delong-pooled", m, n)


def pooled_delong_test(sums: PlacementSums, level: float = 0.95) -> DeLongTest:
    """Paired DeLong test of model a vs model b from the summed placement sums."""
    m, n = sums.case[0], sums.control[0]
    auc_a, va10, auc_b, vb10, c10 = _moments(sums.case)
    _, va01, _, vb01, c01 = _moments(sums.control)
    cov = c10 / m + c01 / n
    var = va10 / m + va01 / n + vb10 / m + vb01 / n - 2 * cov
    diff = auc_a - auc_b
    if var <= 0:
        zval, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        zval = diff / math.sqrt(var)
        p = float(2 * stats.norm.sf(abs(zval)))
    zc = float(stats.norm.ppf(0.5 + level / 2.0))
    half = zc * math.sqrt(max(var, 0.0))
    return DeLongTest(float(auc_a), float(auc_b), float(zval), p,
                      (float(diff - half), float(diff + half)), float(cov))


# ----------------------------------------------------------------- unpaired DeLong, partial AUC
def pooled_delong_summary(sums: PlacementSums) -> DeLongSummary:
    """One cohort's :class:`DeLongSummary` (model a) from its summed placement sums."""
    m, n = int(sums.case[0]), int(sums.control[0])
    if m < 2 or n < 2:
        raise ValueError("the DeLong variance needs at least two cases and two controls")
    auc, var10, _, _, _ = _moments(sums.case)
    _, var01, _, _, _ = _moments(sums.control)
    return DeLongSummary(float(auc), float(var10), float(var01), m, n)


def pooled_unpaired_delong_test(
    sums1: PlacementSums, sums2: PlacementSums, level: float = 0.95,
    alternative: str = "two.sided",
) -> UnpairedDeLongTest:
    """Unpaired DeLong test of two cohorts' AUCs (model a of each), each cohort's placement sums
    computed against its own pooled histograms (pass 1 and pass 2 run per cohort). Either side
    may also be a single site's sums; see :func:`delong_unpaired_from_summaries`."""
    return delong_unpaired_from_summaries(pooled_delong_summary(sums1),
                                          pooled_delong_summary(sums2), level, alternative)


def roc_from_histograms(pos: F64, neg: F64) -> tuple[F64, F64]:
    """The empirical ROC curve (FPR, TPR) over the grid's edges from summed histograms, in
    threshold order from (0, 0); edges between two empty bins are left out (they repeat a point).
    Equal to the curve of the unbinned scores when distinct scores fall in distinct bins."""
    if pos.sum() == 0 or neg.sum() == 0:
        raise ValueError("the ROC curve needs at least one case and one control")
    tp, fp = confusion_at_edges(pos, neg)
    keep = np.nonzero((pos + neg) > 0)[0][::-1]
    fpr = np.concatenate([[0.0], fp[keep] / neg.sum()])
    tpr = np.concatenate([[0.0], tp[keep] / pos.sum()])
    return fpr, tpr


def pooled_partial_auc(
    pos: F64, neg: F64, limits: tuple[float, float] = (1.0, 0.8),
    focus: str = "specificity", correct: bool = False,
) -> float:
    """Partial AUC from summed class-wise histograms (see :func:`partial_auc_from_roc`)."""
    fpr, tpr = roc_from_histograms(pos, neg)
    return partial_auc_from_roc(fpr, tpr, limits, focus, correct)


# ----------------------------------------------------------------------------- calibration
def site_calibration_sums(y: npt.ArrayLike, prob: npt.ArrayLike, n_bins: int = 10) -> F64:
    """Per equal-width probability bin: [n, sum p, sum y]; plus a last row [n, sum (p-y)^2,
    sum y] for the Brier score. Shape (n_bins + 1, 3)."""
    yy = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    idx = ScoreGrid(n_bins).index(p)
    out = np.zeros((n_bins + 1, 3))
    np.add.at(out[:, 0], idx, 1.0)
    np.add.at(out[:, 1], idx, p)
    np.add.at(out[:, 2], idx, yy)
    out[n_bins] = [len(p), ((p - yy) ** 2).sum(), yy.sum()]
    return out


@dataclass(frozen=True)
class PooledCalibration:
    """Pooled calibration curve (mean predicted, observed rate, n per non-empty bin) and Brier."""

    bins: tuple[tuple[float, float, int], ...]
    brier: float
    scaled_brier: float


def pooled_calibration(sums: F64) -> PooledCalibration:
    """Finish the pooled calibration curve and Brier score from summed site sums."""
    bins = tuple((float(s[1] / s[0]), float(s[2] / s[0]), int(s[0])) for s in sums[:-1] if s[0])
    n, sq, ys = sums[-1]
    brier = sq / n
    ybar = ys / n
    base = ybar * (1 - ybar)
    return PooledCalibration(bins, float(brier), float(1 - brier / base) if base else math.nan)


# ----------------------------------------------------------------------------- survival
@dataclass(frozen=True)
class TimeGrid:
    """Agreed time grid: ``n_bins`` equal bins on [0, t_max] with exactly rounded edges (as
    :class:`ScoreGrid`); bin i holds edge_i <= t < edge_(i+1), times beyond t_max fall in the last
    bin, and every time is represented by its bin's left edge. Exact when no two distinct times
    share a bin: choose the resolution at the data's recording precision, e.g. one bin per day
    (``TimeGrid(365, 365)``) for whole days or ``TimeGrid(730, 7300)`` for tenths of a day; a
    time equal to an edge is then its bin's left edge."""

    t_max: float
    n_bins: int

    @property
    def edges(self) -> F64:
        """The ``n_bins + 1`` bin edges, exactly rounded (read-only array)."""
        return _exact_edges(0.0, float(self.t_max), int(self.n_bins))

    def index(self, time: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Bin index of each time (times beyond t_max fall in the last bin)."""
        t = np.asarray(time, dtype=np.float64).ravel()
        if np.any(t < 0) or not np.all(np.isfinite(t)):
            raise ValueError("times must be finite and >= 0")
        return _bin_of(self.edges, t)

    @property
    def times(self) -> F64:
        """Left edge of every bin."""
        return self.edges[:-1]


def site_survival_counts(
    time: npt.ArrayLike, event: npt.ArrayLike, group: npt.ArrayLike, groups: list[object],
    grid: TimeGrid,
) -> F64:
    """Per group and time bin: events and censorings, shape (len(groups), 2, n_bins)."""
    e = np.asarray(event, dtype=np.float64).ravel()
    g = np.asarray(group).ravel()
    idx = grid.index(time)
    out = np.zeros((len(groups), 2, grid.n_bins))
    for k, name in enumerate(groups):
        m = g == name
        out[k, 0] = np.bincount(idx[m & (e == 1)], minlength=grid.n_bins)
        out[k, 1] = np.bincount(idx[m & (e == 0)], minlength=grid.n_bins)
    return out


@dataclass(frozen=True)
class PooledSurvival:
    """Pooled Kaplan-Meier per group (at event times) and the log-rank test."""

    times: tuple[float, ...]
    survival: tuple[tuple[float, ...], ...]
    statistic: float
    df: int
    p_value: float


def pooled_survival(counts: F64, grid: TimeGrid) -> PooledSurvival:
    """Kaplan-Meier per group and the k-group log-rank test from summed site counts.

    Within a bin, events are taken to happen before censorings (the usual convention for ties).
    """
    d = counts[:, 0, :]
    c = counts[:, 1, :]
    total = (d + c).sum(axis=1)
    leaving = np.cumsum(d + c, axis=1)
    at_risk = total[:, None] - np.concatenate([np.zeros((len(d), 1)), leaving[:, :-1]], axis=1)
    event_bins = np.nonzero(d.sum(axis=0) > 0)[0]
    surv = []
    for k in range(len(d)):
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where(at_risk[k] > 0, 1.0 - d[k] / np.where(at_risk[k] > 0, at_risk[k], 1),
                              1.0)
        surv.append(tuple(float(x) for x in np.cumprod(factor)[event_bins]))
    dk, nk = d[:, event_bins], at_risk[:, event_bins]
    dt, nt = dk.sum(axis=0), nk.sum(axis=0)
    expected = (dt * nk / nt).sum(axis=1)
    observed = dk.sum(axis=1)
    g = len(d)
    v = np.zeros((g, g))
    for j in range(len(event_bins)):
        if nt[j] <= 1:
            continue
        w = dt[j] * (nt[j] - dt[j]) / (nt[j] - 1)
        p = nk[:, j] / nt[j]
        v += w * (np.diag(p) - np.outer(p, p))
    diff = (observed - expected)[:-1]
    # A generalised inverse, as lifelines' multivariate_logrank_test (the central reference) uses:
    # the variance is singular when a group has nobody at risk at any event time.
    stat = float(diff @ np.linalg.pinv(v[:-1, :-1]) @ diff)
    return PooledSurvival(tuple(float(x) for x in grid.times[event_bins]), tuple(surv), stat,
                          g - 1, float(stats.chi2.sf(stat, g - 1)))
