"""The coordinator's screening rules for what sites send back: one place, no Flower imports.

Every function here either returns a reason (a short sentence naming the problem, which goes
into the run's rejections and the audit log) or raises ``ValueError`` with one; ``None`` means
the value passed. The strategy (:mod:`hcc_fl.server.strategy`) and the pooled validation
(:mod:`hcc_fl.server.flower_app`) call them; nothing here reads a message or sends one.

Training replies (:func:`check_arrays`, :func:`check_num_examples`, :func:`norm_bound`,
:func:`capped_shares`):

- every array has exactly the dtype and shape of the record the coordinator sent (the global
  model per tensor, or its packed wire layout), under exactly the same names, before any
  arithmetic: an integer or float64 array where float32 was sent is rejected;
- ``num-examples`` is a finite whole number >= 1 and at most what the site declared at
  discovery (``n-train``; ``n-train + n-val`` for the self-supervised stage);
- the update norm (L2 distance to the global model) is at most ``max_update_norm_ratio`` x a
  reference scale that no single site can inflate: the largest of the round's *lower* median
  norm (with two sites, the smaller of the two), the median accepted norm of the last
  :data:`HISTORY_ROUNDS` rounds, and :data:`GLOBAL_NORM_FLOOR` x the global model's norm;
- the accepted sites' weights are capped: no site's share of the total exceeds
  ``max_site_weight``; the excess goes to the other sites in proportion to their weights
  (:func:`capped_shares`, nothing is dropped).

Pooled validation (:func:`check_pass1`, :func:`check_pass2`): histograms of the grid's length
with non-negative whole counts whose total equals the rows the site declared for
``evaluation.threshold_split``, calibration sums consistent with them, placement sums whose
counts equal the site's pass-1 counts and whose sums lie within their bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hcc_fl.shared import records as R
from hcc_fl.shared.disclosure import Cells

F64 = npt.NDArray[np.float64]

# The reference scale of the norm screen never falls below this share of the global model's
# norm: an update may move the model by up to ratio x 10 % of its own norm (the whole norm at
# the default ratio 10), whatever the other replies of the round claim.
GLOBAL_NORM_FLOOR = 0.1
HISTORY_ROUNDS = 5  # rounds of accepted update norms the reference scale remembers
CALIBRATION_ROWS = 11  # shared.metrics.pooled.site_calibration_sums: 10 bins + the Brier row
PLACEMENT_LENGTH = 12  # [case sums (6), control sums (6)]
AGGREGATIONS = ("mean", "median", "trimmed_mean")
ROBUST_MIN_SITES = 5  # coordinate-wise median / trimmed mean need this many training sites
_TOL = 1e-9


# ----------------------------------------------------------------------------- training replies
def expected_layout(views: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...],
                                                                      np.dtype[Any]]]:
    """``name -> (shape, dtype)`` of the record the coordinator sent."""
    return {k: (tuple(int(s) for s in v.shape), np.dtype(v.dtype)) for k, v in views.items()}


def check_arrays(views: Mapping[str, np.ndarray],
                 expected: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]) -> str | None:
    """Exactly the expected names, and for each exactly the expected shape and dtype."""
    if set(views) != set(expected):
        missing, extra = sorted(set(expected) - set(views)), sorted(set(views) - set(expected))
        return ("parameters of the wrong names or shapes (missing "
                f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(extra[:3]) or 'none'})")
    for k, (shape, dtype) in expected.items():
        v = views[k]
        if tuple(v.shape) != tuple(shape):
            return f"parameters of the wrong names or shapes ({k}: {tuple(v.shape)}, not {shape})"
        if np.dtype(v.dtype) != dtype:
            return f"parameter {k} has dtype {np.dtype(v.dtype).name}, not {dtype.name}"
    return None


def check_num_examples(n: Any, declared: int | None) -> str | None:
    """``num-examples`` must be a finite whole number >= 1 and at most ``declared``."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 1 \
            or n != math.floor(n):
        return "missing or invalid num-examples"
    if declared is not None and n > declared:
        return f"num-examples {n:g} exceeds the {declared} examples the site declared"
    return None


def capped_shares(weights: Sequence[float], cap: float) -> list[float]:
    """Shares (summing to 1) proportional to ``weights``, except that no share exceeds ``cap``:
    a capped site gets exactly ``cap`` and its excess is spread over the uncapped sites in
    proportion to their weights (water-filling, repeated until no uncapped share exceeds the
    cap). ``cap >= 1`` leaves the proportional shares; when ``cap * len(weights) < 1`` no
    shares can respect it and the sites get equal shares (the closest to it)."""
    w = [float(x) for x in weights]
    if not w or any(not math.isfinite(x) or x < 0 for x in w) or not sum(w) > 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    total = sum(w)
    shares = [x / total for x in w]
    if cap >= 1.0 or max(shares) <= cap:
        return shares
    if cap * len(w) <= 1.0:
        return [1.0 / len(w)] * len(w)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(w)) if i not in capped]
        left = 1.0 - cap * len(capped)
        free_total = sum(w[i] for i in free)
        if free_total <= 0:  # the uncapped sites weigh nothing: share the rest equally
            out = [cap if i in capped else left / len(free) for i in range(len(w))]
            return out
        out = [cap if i in capped else left * w[i] / free_total for i in range(len(w))]
        over = {i for i in free if out[i] > cap * (1 + 1e-12)}
        if not over:
            return out
        capped |= over


def lower_median(values: Sequence[float]) -> float:
    """The lower median: the middle value, or the smaller of the two middle ones. With one
    outlier among two or more values it is never the outlier's when the outlier is the largest."""
    s = sorted(values)
    return float(s[(len(s) - 1) // 2])


@dataclass(frozen=True)
class NormBound:
    """The norm screen's bound of one round and how it came about (for the rejection text)."""

    bound: float
    reference: float
    source: str  # "round" | "history" | "global"

    def describe(self, ratio: float) -> str:
        what = {"round": "the round's lower median",
                "history": f"the median accepted norm of the last {HISTORY_ROUNDS} rounds",
                "global": f"{GLOBAL_NORM_FLOOR:g} x the global model's norm"}[self.source]
        return f"{ratio:g} x {what} {self.reference:.3g}"


def norm_bound(norms: Sequence[float], history: Sequence[float], global_norm: float,
               ratio: float) -> NormBound | None:
    """The largest update norm accepted this round, or None when the screen is off (``ratio``
    <= 0) or nothing gives a positive scale.

    The reference scale is the largest of: the lower median of this round's finite norms
    (:func:`lower_median`: one hostile site can raise it only to the largest honest norm, and
    with two sites it is the smaller norm), the median of the accepted norms of the last
    :data:`HISTORY_ROUNDS` rounds (``history``), and :data:`GLOBAL_NORM_FLOOR` x
    ``global_norm``. A site that sends a tiny update to drag the median down cannot get honest
    sites rejected below the history and global-norm floors."""
    if ratio <= 0:
        return None
    finite = [x for x in norms if math.isfinite(x)]
    candidates = [
        (lower_median(finite) if finite else 0.0, "round"),
        (float(np.median(history[-HISTORY_ROUNDS:])) if history else 0.0, "history"),
        (GLOBAL_NORM_FLOOR * global_norm if math.isfinite(global_norm) else 0.0, "global"),
    ]
    reference, source = max(candidates, key=lambda c: c[0])
    if not reference > 0:
        return None
    return NormBound(ratio * reference, reference, source)


# ----------------------------------------------------------------------------- pooled validation
def declared_rows(sizes: Mapping[str, Any], splits: Sequence[str]) -> int:
    """Rows a site declared for the threshold splits (``n-train``/``n-val`` of ``site_info``)."""
    total = 0
    for s in splits:
        v = sizes.get(f"n-{s}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0 or v != math.floor(v):
            raise ValueError(f"the site declared no valid n-{s}")
        total += int(v)
    return total


def _vector(value: Any, length: int, what: str) -> F64:
    """A finite float vector of exactly ``length`` values, else ValueError."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise ValueError(f"{what} is not a list of numbers")
    try:
        v = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a list of numbers") from None
    if v.size != length:
        raise ValueError(f"{what} has {v.size} values, expected {length}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what} contains non-finite values")
    return v


def _counts(v: F64, what: str) -> None:
    if np.any(v < 0):
        raise ValueError(f"{what} contains negative counts")
    if np.any(v != np.round(v)):
        raise ValueError(f"{what} contains non-integer counts")


def _number(value: Any, what: str, lo: float = -math.inf, hi: float = math.inf,
            nan_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is not a number")
    x = float(value)
    if math.isnan(x) and nan_ok:
        return x
    if not math.isfinite(x) or not lo <= x <= hi:
        raise ValueError(f"{what} = {x:g} is not in [{lo:g}, {hi:g}]")
    return x


def check_pass1(m: Mapping[str, Any], n_bins: int, n_declared: int | None) -> dict[str, Any]:
    """A site's pass-1 reply (``pos``, ``neg``, ``calibration``, ``n``, ``n-pos``, ``loss``,
    ``auc``, ``auc-lower``, ``auc-upper``) checked and parsed into the entry
    :func:`hcc_fl.shared.evaluation.combine_pass1` sums; ValueError names the first problem.

    Rules: both histograms have ``n_bins`` finite, non-negative whole counts; their total equals
    ``n`` and ``n_declared`` (the rows of the threshold split the site declared); ``n-pos``
    equals the cases' total; calibration is ``11 x 3`` finite sums whose bin counts are whole,
    non-negative and add up to ``n``, with ``0 <= sum p <= count`` and ``sum y`` a whole number
    in ``[0, count]`` per bin adding up to ``n-pos``, and a last row ``[n, sum (p - y)^2, n-pos]``
    with the squared-error sum in ``[0, n]``; the loss is finite and >= 0; the AUC and its CI
    lie in [0, 1] (or are all NaN)."""
    pos = _vector(m.get("pos"), n_bins, "the cases' histogram")
    neg = _vector(m.get("neg"), n_bins, "the controls' histogram")
    _counts(pos, "the cases' histogram")
    _counts(neg, "the controls' histogram")
    total, cases = float(pos.sum() + neg.sum()), float(pos.sum())
    n = _number(m.get("n"), "n", 0)
    n_pos = _number(m.get("n-pos"), "n-pos", 0)
    if n != total:
        raise ValueError(f"n = {n:g} differs from the histograms' total {total:g}")
    if n_pos != cases:
        raise ValueError(f"n-pos = {n_pos:g} differs from the cases' histogram total {cases:g}")
    if n_declared is not None and total != n_declared:
        raise ValueError(f"the histograms count {total:g} patients, the site declared "
                         f"{n_declared}")
    cal = _vector(m.get("calibration"), CALIBRATION_ROWS * 3, "the calibration sums")
    cal = cal.reshape(CALIBRATION_ROWS, 3)
    bins, last = cal[:-1], cal[-1]
    _counts(bins[:, 0], "the calibration counts")
    if float(bins[:, 0].sum()) != total:
        raise ValueError("the calibration counts do not add up to the histograms' total")
    if np.any(bins[:, 1] < -_TOL) or np.any(bins[:, 1] > bins[:, 0] * (1 + _TOL) + _TOL):
        raise ValueError("a calibration bin's sum of p is outside [0, its count]")
    _counts(bins[:, 2], "the calibration outcome sums")
    if np.any(bins[:, 2] > bins[:, 0]) or float(bins[:, 2].sum()) != cases:
        raise ValueError("the calibration outcome sums disagree with the cases")
    if last[0] != total or last[2] != cases or not -_TOL <= last[1] <= total * (1 + _TOL) + _TOL:
        raise ValueError("the calibration's Brier row is inconsistent with the histograms")
    loss = _number(m.get("loss"), "loss", 0)
    auc = _number(m.get("auc"), "auc", 0, 1, nan_ok=True)
    lo = _number(m.get("auc-lower"), "auc-lower", 0, 1, nan_ok=True)
    hi = _number(m.get("auc-upper"), "auc-upper", 0, 1, nan_ok=True)
    ok = math.isfinite(auc) and math.isfinite(lo) and math.isfinite(hi)
    cells = None
    if m.get(R.CELL_STARTS) is not None:
        cand = _number(m.get(R.CELL_CANDIDATES), "the cell grid", 1, n_bins)
        raw = m.get(R.CELL_STARTS)
        starts = _vector(raw, len(raw) if isinstance(raw, (list, tuple)) else -1,
                         "the cell starts")
        if np.any(starts != np.round(starts)) or cand != math.floor(cand):
            raise ValueError("the cell starts are not whole numbers")
        cells = Cells.from_histograms([int(s) for s in starts], int(cand), pos, neg)
    return {"cells": cells, "pos": pos, "neg": neg, "calibration": cal.ravel(), "n": int(total),
            "n_pos": int(cases), "loss": loss, "auc": auc if ok else None,
            "auc_ci": [lo, hi] if ok else None}


def check_pass2(value: Any, n_pos: int, n_neg: int) -> F64:
    """A site's pass-2 placement sums (12 values) checked against its pass-1 counts;
    ValueError names the problem.

    Each half (cases, controls) is ``[count, sum a, sum a^2, sum b, sum b^2, sum ab]`` with
    placement values in [0, 1]: the count equals the site's pass-1 cases (controls), and
    ``0 <= sum a^2 <= sum a <= count``, ``(sum a)^2 <= count * sum a^2`` (Cauchy-Schwarz), the
    same for ``b``, and ``0 <= sum ab <= min(sum a, sum b)``."""
    v = _vector(value, PLACEMENT_LENGTH, "the placement sums")
    for half, expected, what in ((v[:6], n_pos, "cases"), (v[6:], n_neg, "controls")):
        count, sa, saa, sb, sbb, sab = (float(x) for x in half)
        if count != expected:
            raise ValueError(f"the placement sums count {count:g} {what}, pass 1 counted "
                             f"{expected}")
        slack = _TOL * max(1.0, count)
        for s, ss, name in ((sa, saa, "a"), (sb, sbb, "b")):
            if not (-slack <= ss <= s + slack and s <= count + slack):
                raise ValueError(f"the {what}' placement sums of {name} are out of bounds")
            if s * s > count * ss * (1 + _TOL) + slack:
                raise ValueError(f"the {what}' placement sums of {name} are inconsistent")
        if not -slack <= sab <= min(sa, sb) + slack:
            raise ValueError(f"the {what}' cross placement sum is out of bounds")
    return v


def check_aggregation(aggregation: str, trim_fraction: float, n_sites: int) -> None:
    """``federation.aggregation`` / ``trim_fraction`` against the number of training sites;
    ValueError names the problem."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"federation.aggregation must be one of {', '.join(AGGREGATIONS)}, "
                         f"got {aggregation!r}")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"federation.trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if aggregation != "mean" and n_sites < ROBUST_MIN_SITES:
        raise ValueError(f"federation.aggregation={aggregation} needs at least "
                         f"{ROBUST_MIN_SITES} training sites, got {n_sites}")
    if aggregation == "trimmed_mean" and int(trim_fraction * n_sites) < 1:
        raise ValueError(f"federation.trim_fraction={trim_fraction} trims no site of "
                         f"{n_sites} (needs trim_fraction x sites >= 1)")
