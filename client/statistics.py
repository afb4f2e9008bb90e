"""Site-side statistics of a model on a site's own patients.

Everything returned here is aggregate: sums on agreed grids, summary statistics, curve
coordinates. No function returns a per-patient score, time or identifier.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn

from hcc_fl.client.data import SiteData
from hcc_fl.client.train import bce_loss, predict
from hcc_fl.shared.evaluation import PARTIAL_AUC
from hcc_fl.shared.metrics import (
    auc_ci,
    binary_metrics,
    calibration,
    delong_summary,
    delong_test,
    hosmer_lemeshow,
    logrank,
    net_benefit,
    partial_auc,
)
from hcc_fl.shared.metrics.pooled import (
    ScoreGrid,
    site_calibration_sums,
    site_histograms,
    site_placement_sums,
)
from hcc_fl.shared.metrics.recalibration import Recalibration, site_recalibration_sums

F64 = npt.NDArray[np.float64]
NB_THRESHOLDS = tuple(round(x, 2) for x in np.arange(0.05, 0.96, 0.05))


def _finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None


def validation_sums(model: nn.Module, data: SiteData, grid: ScoreGrid, device: str = "cpu"
                    ) -> dict[str, Any]:
    """Pass 1 at a training site: class-wise histograms and calibration sums of the val split,
    plus the site's own AUC with DeLong CI (a per-site summary)."""
    return validation_sums_prob(data.label.numpy().astype(np.float64),
                                predict(model, data, device), grid)


def validation_sums_prob(y: F64, prob: F64, grid: ScoreGrid) -> dict[str, Any]:
    """:func:`validation_sums` of given probabilities (any component of a task)."""
    pos, neg = site_histograms(y, prob, grid)
    out: dict[str, Any] = {
        "pos": pos, "neg": neg, "calibration": site_calibration_sums(y, prob),
        "n": len(y), "n_pos": int(y.sum()), "loss": bce_loss(prob, y),
        "auc": None, "auc_ci": None,
    }
    if 0 < y.sum() < len(y):
        r = auc_ci(y, prob)
        out.update(auc=r.auc, auc_ci=[r.lower, r.upper])
    return out


def validation_placements(
    model: nn.Module, data: SiteData, pooled: tuple[F64, F64], grid: ScoreGrid,
    device: str = "cpu",
) -> F64:
    """Pass 2 at a training site: placement-value sums against the pooled histograms,
    flattened as [case sums (6), control sums (6)]."""
    return validation_placements_prob(data.label.numpy().astype(np.float64),
                                      predict(model, data, device), pooled, grid)


def validation_placements_prob(y: F64, prob: F64, pooled: tuple[F64, F64], grid: ScoreGrid
                               ) -> F64:
    """:func:`validation_placements` of given probabilities."""
    s = site_placement_sums(y, prob, pooled, grid)
    return np.concatenate([s.case, s.control])


def _roc_points(y: F64, p: F64) -> dict[str, list[float]]:
    """The empirical ROC curve: (FPR, TPR) at every distinct score, no scores themselves."""
    thr = np.unique(p)[::-1]
    tpr = [float(np.mean(p[y == 1] >= t)) for t in thr]
    fpr = [float(np.mean(p[y == 0] >= t)) for t in thr]
    return {"fpr": [0.0, *fpr], "tpr": [0.0, *tpr]}


def _km_steps(time: F64, event: F64) -> dict[str, list[float]]:
    """Kaplan-Meier step coordinates (event times and survival), aggregate by construction."""
    from hcc_fl.shared.metrics import kaplan_meier

    km = kaplan_meier(time, event)
    return {"t": list(km.times), "s": list(km.survival), "lo": list(km.lower),
            "hi": list(km.upper), "n_at_risk": list(km.at_risk)}


def external_report(
    model: nn.Module,
    data: SiteData,
    threshold: float,
    survival: dict[str, tuple[F64, F64]] | None = None,
    device: str = "cpu",
    n_boot: int = 1000,
) -> dict[str, Any]:
    """The external site's full statistics for one model, computed where the patients are.

    AUC with DeLong CI; at the training Youden ``threshold`` sensitivity, specificity, accuracy,
    PPV and NPV with percentile-bootstrap CIs (as the Ki-67 seed reports); calibration (slope,
    calibration-in-the-large, Brier, binned curve, Hosmer-Lemeshow); net benefit; ROC curve
    coordinates; and, for each survival endpoint given, Kaplan-Meier curves of the high- and
    low-score groups at the threshold with the log-rank test.
    """
    return external_report_prob(data.label.numpy().astype(np.float64),
                                predict(model, data, device), threshold, survival, n_boot)


def external_report_prob(
    y: F64, prob: F64, threshold: float, survival: dict[str, tuple[F64, F64]] | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """:func:`external_report` of given probabilities (any component of a task)."""
    out: dict[str, Any] = {"n": int(len(y)), "n_pos": int(y.sum()), "threshold": threshold,
                           "loss": bce_loss(prob, y)}
    both = 0 < y.sum() < len(y)
    if both:
        r = auc_ci(y, prob)
        out.update(auc=r.auc, auc_ci=[r.lower, r.upper], auc_variance=r.variance)
    else:
        out.update(auc=None, auc_ci=None, auc_variance=None)
    bm = binary_metrics(y, prob, threshold, ci="bootstrap", n_boot=n_boot, seed=0)
    for k in ("sensitivity", "specificity", "accuracy", "ppv", "npv"):
        out[k] = _finite(getattr(bm, k))
        lo, hi = bm.ci.get(k, (math.nan, math.nan))
        out[f"{k}_ci"] = [_finite(lo), _finite(hi)] if _finite(lo) is not None else None
    out.update(tp=bm.tp, fp=bm.fp, tn=bm.tn, fn=bm.fn)
    if both:
        out.update(_calibration_blocks(y, prob))
        out["roc"] = _roc_points(y, prob)
        out["partial_auc"] = partial_aucs(y, prob)
    if 2 <= y.sum() <= len(y) - 2:
        out["delong_summary"] = asdict(delong_summary(y, prob))
    high = prob >= threshold
    out["survival"] = {}
    for name, (t, e) in (survival or {}).items():
        block: dict[str, Any] = {"n_high": int(high.sum()), "n_low": int((~high).sum())}
        if high.any() and (~high).any():
            lr = logrank(t, e, high.astype(int))
            block.update(statistic=lr.statistic, p_value=lr.p_value,
                         high=_km_steps(t[high], e[high]), low=_km_steps(t[~high], e[~high]))
        out["survival"][name] = block
    return out


def partial_aucs(y: F64, prob: F64) -> dict[str, float | None]:
    """The McClish-standardised partial AUCs of :data:`PARTIAL_AUC` (None where undefined)."""
    import warnings

    out: dict[str, float | None] = {}
    for name, (limits, focus) in PARTIAL_AUC.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[name] = _finite(partial_auc(y, prob, limits, focus, correct=True))
    return out


def _calibration_blocks(y: F64, prob: F64) -> dict[str, Any]:
    """Calibration (slope, calibration-in-the-large, Brier, bins, Hosmer-Lemeshow) and the
    decision curve of probabilities ``prob`` (both classes present)."""
    cal = calibration(y, prob)
    cal_block: dict[str, Any] = {
        "slope": cal.slope, "intercept_in_the_large": cal.intercept_in_the_large,
        "brier": cal.brier, "scaled_brier": cal.scaled_brier,
        "bins": [list(b) for b in cal.bins],
    }
    try:
        hl = hosmer_lemeshow(y, prob, groups=min(10, max(3, len(y) // 5)))
        cal_block["hosmer_lemeshow"] = {"statistic": hl.statistic, "df": hl.df,
                                        "p_value": hl.p_value}
    except ValueError:
        cal_block["hosmer_lemeshow"] = None
    nb = net_benefit(y, prob, NB_THRESHOLDS)
    return {"calibration": cal_block,
            "net_benefit": {"thresholds": list(nb.thresholds), "model": list(nb.model),
                            "treat_all": list(nb.treat_all)}}


def recalibrated_report(y: F64, prob: F64, threshold: float, fit: Recalibration
                        ) -> dict[str, Any]:
    """What recalibration changes, on the external patients: the recalibrated probabilities'
    calibration, Brier score, log loss and decision curve, and the training threshold mapped
    onto the new scale. The ranks are unchanged (``fit.slope > 0``), so the AUC (repeated here as
    the check) and the patients above the threshold are the same as without recalibration."""
    q = fit.apply(prob)
    out: dict[str, Any] = {"recalibration": fit.as_dict(),
                           "threshold": float(fit.apply(np.array([threshold]))[0]),
                           "loss": bce_loss(q, y), "auc": None}
    if 0 < y.sum() < len(y):
        out["auc"] = auc_ci(y, q).auc
        out.update(_calibration_blocks(y, q))
    return out


def recalibration_sums(y: F64, prob: F64, coef: tuple[float, float]) -> list[float]:
    """A training site's recalibration sums at ``coef`` (count, score, information,
    log-likelihood: 7 numbers, no patient-level value)."""
    return [float(v) for v in site_recalibration_sums(y, prob, coef)]


def external_comparisons(
    probs: dict[str, F64], y: F64
) -> list[dict[str, Any]]:
    """Paired DeLong tests between every pair of models on the same external patients."""
    names = list(probs)
    out: list[dict[str, Any]] = []
    if not 1 < y.sum() < len(y) - 1:
        return out
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            t = delong_test(y, probs[a], probs[b])
            out.append({"a": a, "b": b, "auc_a": t.auc_a, "auc_b": t.auc_b, "z": _finite(t.z),
                        "p_value": t.p_value, "ci_diff": list(t.ci_diff)})
    return out


def pooled_validation(
    model: nn.Module, parts: dict[str, SiteData], grid: ScoreGrid, device: str = "cpu",
    recalibrate: bool = True,
) -> tuple[float, dict[str, Any]]:
    """The federated two-pass validation (and recalibration) run in one process (for the
    baselines): the same site sums, combined by the same coordinator code as under Flower."""
    return pooled_validation_probs(
        {s: (d.label.numpy().astype(np.float64), predict(model, d, device))
         for s, d in parts.items()}, grid, recalibrate)


def pooled_validation_probs(parts: dict[str, tuple[F64, F64]], grid: ScoreGrid,
                            recalibrate: bool = True) -> tuple[float, dict[str, Any]]:
    """:func:`pooled_validation` of given (labels, probabilities) per site, with the federated
    recalibration (``pooled.recalibration`` of the block) unless ``recalibrate`` is False."""
    from hcc_fl.shared.evaluation import combine_pass1, finish_pass2, recalibrate_pooled

    pass1 = {s: validation_sums_prob(y, p, grid) for s, (y, p) in parts.items()}
    threshold, hist, block = combine_pass1(pass1, grid)
    vectors = [validation_placements_prob(y, p, hist, grid) for y, p in parts.values()]
    block = finish_pass2(block, vectors)
    if recalibrate:
        recalibrate_pooled(
            block, lambda coef: {s: np.asarray(recalibration_sums(y, p, coef))
                                 for s, (y, p) in parts.items()},
            {s: int(v["n"]) for s, v in pass1.items()})
    return threshold, block
