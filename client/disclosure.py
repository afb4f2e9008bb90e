"""The site's release policy: what a statistic may say about the site's patients before it leaves.

Every reply of a site passes through this module (the site's Flower app applies it; the
in-process baselines apply the same functions). The policy is the site's own: ``disclosure`` in
``SITE.yaml`` in a deployment (the coordinator cannot change it), the ``disclosure`` group of the
experiment configuration in simulation, where every site runs the same code.

Two modes:

``cells`` (the default)
    A minimum cell count ``k`` (``min_cell``, default 5) for every count that describes the
    site's patients: a score histogram is released on cells of the probability scale (unions of
    ``cell_width``-wide candidate cells, default 0.01) that the site merges, from low to high
    scores, until every cell holds 0 or at least ``k`` cases *and* 0 or at least ``k`` controls;
    all patients of a cell are represented by the cell's middle (so the coordinator learns how
    many cases and controls fall in each cell, never a score inside it). Calibration bins, ROC
    steps and net-benefit thresholds follow the same rule; a confusion table at a threshold with
    a cell of 1 to ``k - 1`` patients is withheld; Kaplan-Meier curves are released as steps of
    at least ``k`` patients leaving the risk set each, at times halfway between two patients;
    nothing at all is released for a split of fewer than ``min_split`` patients (default 10) or
    with fewer than ``k`` cases or controls. Every later statistic of the same patients (the
    placement sums of pass 2, the recalibration sums) is computed from the released cells, so a
    coordinator learns nothing more by asking again with other parameters.

``exact``
    The previous behaviour, a documented choice for consortia whose agreements allow it: fine
    histograms (the agreed grid, 10,000 bins by default), exact curves and counts. The
    reconstruction test (``tests/client/test_disclosure.py``) shows what it gives away: every
    patient's score to the grid's resolution and label, and every external patient's time and
    event.

Numbers that are aggregates of at least ``k`` patients by construction (AUCs, DeLong variances,
losses, Brier sums, calibration slopes, log-rank statistics, model updates) are released in both
modes. A refused release raises :class:`DisclosureRefused` naming the rule.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from hcc_fl.shared.disclosure import (
    KEY_CELL_WIDTH,
    KEY_MIN_CELL,
    KEY_MIN_SPLIT,
    KEY_MODE,
    MODES,
    Cells,
    DisclosureRefused,
    ReleasePolicy,
)
from hcc_fl.shared.metrics.pooled import ScoreGrid

__all__ = ["KEY_CELL_WIDTH", "KEY_MIN_CELL", "KEY_MIN_SPLIT", "KEY_MODE", "MODES", "Cells",
           "DisclosureRefused", "ReleasePolicy"]

F64 = npt.NDArray[np.float64]

def count_releasable(count: float, k: int) -> bool:
    """The policy's rule for one released count of patients: 0 or at least ``k``."""
    return count == 0 or count >= k


_ok = count_releasable


def check_split(y: npt.ArrayLike, policy: ReleasePolicy, what: str) -> None:
    """Refuse any release about a split that is too small (``min_split``) or has fewer than
    ``min_cell`` cases or controls (then every class-wise count would be a small cell)."""
    if policy.exact:
        return
    yy = np.asarray(y, dtype=np.float64).ravel()
    n, n_pos = len(yy), int(yy.sum())
    if n < policy.min_split:
        raise DisclosureRefused("min_split", f"{what}: the split has fewer than "
                                f"{policy.min_split} patients")
    if n_pos < policy.min_cell or n - n_pos < policy.min_cell:
        raise DisclosureRefused("min_cell", f"{what}: the split has fewer than "
                                f"{policy.min_cell} cases or controls")


# ----------------------------------------------------------------------------- score cells
def score_cells(y: npt.ArrayLike, score: npt.ArrayLike, policy: ReleasePolicy) -> Cells:
    """Merge candidate cells from low to high scores until each holds 0 or >= k cases and 0 or
    >= k controls (a short remainder at the top joins the cell below it)."""
    yy = np.asarray(y, dtype=np.float64).ravel()
    m = policy.n_candidates
    cand = ScoreGrid(m).index(score)
    p = np.bincount(cand[yy == 1], minlength=m)
    q = np.bincount(cand[yy == 0], minlength=m)
    k = policy.min_cell
    starts: list[int] = []
    pos: list[int] = []
    neg: list[int] = []
    start, a, b = 0, 0, 0
    for i in range(m):
        a += int(p[i])
        b += int(q[i])
        if a + b > 0 and _ok(a, k) and _ok(b, k):
            starts.append(start)
            pos.append(a)
            neg.append(b)
            start, a, b = i + 1, 0, 0
    if a + b > 0:  # the remainder at the top joins the cells below until the rule holds
        while starts and not (_ok(a, k) and _ok(b, k)):
            start = starts.pop()
            a += pos.pop()
            b += neg.pop()
        starts.append(start)
        pos.append(a)
        neg.append(b)
    if not starts:
        starts, pos, neg = [0], [0], [0]
    if not all(_ok(x, k) and _ok(z, k) for x, z in zip(pos, neg, strict=False)):
        raise DisclosureRefused("min_cell", f"fewer than {k} cases or controls in all")
    return Cells(tuple(starts), m, tuple(pos), tuple(neg))


def released_scores(y: npt.ArrayLike, score: npt.ArrayLike, policy: ReleasePolicy
                    ) -> tuple[F64, Cells | None]:
    """The scores as the policy releases them: each patient at the middle of its cell (cells
    mode), or the scores themselves (exact mode); and the cells."""
    s = np.asarray(score, dtype=np.float64).ravel()
    if policy.exact:
        return s, None
    cells = score_cells(y, s, policy)
    return np.asarray(cells.middles()[cells.cell_of(s)], dtype=np.float64), cells


# ----------------------------------------------------------------------------- calibration
def merge_calibration_sums(sums: F64, k: int) -> F64:
    """Pass-1 calibration sums ``[n, sum p, sum y]`` per bin (+ the Brier row) with adjacent
    bins merged until each holds 0 or >= k events and 0 or >= k non-events; a merged bin's sums
    sit in its first bin, the others are zero."""
    out = np.array(sums, dtype=np.float64, copy=True)
    rows = out[:-1]
    merged = np.zeros_like(rows)
    start, acc = 0, np.zeros(3)
    for i in range(len(rows)):
        acc = acc + rows[i]
        if acc[0] > 0 and _ok(acc[2], k) and _ok(acc[0] - acc[2], k):
            merged[start] = acc
            start, acc = i + 1, np.zeros(3)
    if acc[0] > 0:
        last = max((j for j in range(len(merged)) if merged[j, 0] > 0), default=None)
        while last is not None and not (_ok(acc[2], k) and _ok(acc[0] - acc[2], k)):
            acc = acc + merged[last]
            merged[last] = 0
            start = last
            last = max((j for j in range(last) if merged[j, 0] > 0), default=None)
        merged[start] = acc
    out[:-1] = merged
    return out


def merge_calibration_bins(bins: list[list[float]] | list[tuple[float, float, int]], k: int
                           ) -> list[list[float]]:
    """Calibration-curve bins ``(mean predicted, observed rate, n)`` merged likewise."""
    sums = np.array([[n, p * n, o * n] for p, o, n in bins] + [[0.0, 0.0, 0.0]])
    sums[:, 2] = np.round(sums[:, 2])
    merged = merge_calibration_sums(sums, k)[:-1]
    return [[float(s[1] / s[0]), float(s[2] / s[0]), int(s[0])] for s in merged if s[0] > 0]


# ----------------------------------------------------------------------------- external report
def roc_from_cells(cells: Cells) -> dict[str, list[float]]:
    """ROC points at the cells' boundaries (each step moves >= k cases or controls, or none)."""
    pos = np.asarray(cells.pos, dtype=np.float64)[::-1]
    neg = np.asarray(cells.neg, dtype=np.float64)[::-1]
    tpr = np.concatenate([[0.0], np.cumsum(pos) / pos.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def confusion_releasable(counts: tuple[int, int, int, int], k: int) -> bool:
    """Whether a confusion table (tp, fp, tn, fn) has no cell of 1 to k - 1 patients."""
    return all(_ok(c, k) for c in counts)


def net_benefit_thresholds(y: npt.ArrayLike, prob: npt.ArrayLike, thresholds: tuple[float, ...],
                           k: int) -> list[bool]:
    """Which net-benefit thresholds may be released: the kept thresholds cut the patients into
    score intervals that each hold 0 or >= k cases and 0 or >= k controls (net benefit at a
    threshold gives the true and false positives above it)."""
    yy = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()

    def counts(lo: float, hi: float) -> tuple[int, int]:
        m = (p >= lo) & (p < hi)
        return int(yy[m].sum()), int((1 - yy[m]).sum())

    kept: list[float] = []
    last = -math.inf
    for t in thresholds:
        a, b = counts(last, t)
        if _ok(a, k) and _ok(b, k):
            kept.append(t)
            last = t
    while kept:
        a, b = counts(kept[-1], math.inf)
        if _ok(a, k) and _ok(b, k):
            break
        kept.pop()
    return [t in kept for t in thresholds]


def km_steps(time: npt.ArrayLike, event: npt.ArrayLike, k: int) -> dict[str, list[float]] | None:
    """A Kaplan-Meier curve as steps of at least ``k`` patients leaving the risk set each.

    The patients are taken in time order (tied times stay together) in blocks of >= k exits; a
    block's step is drawn from the time halfway between the last exit of the block before and its
    own first exit (0 for the first block), at the survival after the block, so the drawn curve
    never lies above the Kaplan-Meier estimate. ``n_at_risk`` is the risk set at the step's time.
    None when there are fewer than ``k`` patients."""
    from hcc_fl.shared.metrics import kaplan_meier

    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event, dtype=np.float64).ravel()
    if len(t) < k:
        return None
    order = np.argsort(t, kind="stable")
    ts = t[order]
    uniq, counts = np.unique(ts, return_counts=True)
    blocks: list[tuple[int, int]] = []  # (index of first unique time, index after last)
    start, acc = 0, 0
    for i, c in enumerate(counts):
        acc += int(c)
        if acc >= k:
            blocks.append((start, i + 1))
            start, acc = i + 1, 0
    if acc:
        first = blocks.pop()[0] if blocks else 0
        blocks.append((first, len(uniq)))
    km = kaplan_meier(t, e)
    kt = np.asarray(km.times)

    def at(x: float, values: tuple[float, ...]) -> float:
        j = int(np.searchsorted(kt, x, side="right")) - 1
        return float(values[j]) if j >= 0 else 1.0

    out: dict[str, list[float]] = {"t": [], "s": [], "lo": [], "hi": [], "n_at_risk": []}
    for j, (a, b) in enumerate(blocks):
        start_t = 0.0 if j == 0 else float((uniq[a - 1] + uniq[a]) / 2)
        end = float(uniq[b - 1])
        out["t"].append(start_t)
        out["s"].append(at(end, km.survival))
        out["lo"].append(at(end, km.lower))
        out["hi"].append(at(end, km.upper))
        out["n_at_risk"].append(float(int((t >= uniq[a]).sum())))
    return out
