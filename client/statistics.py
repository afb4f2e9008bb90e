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
from hcc_fl.client.disclosure import (
    ReleasePolicy,
    check_split,
    confusion_releasable,
    count_releasable,
    km_steps,
    merge_calibration_bins,
    merge_calibration_sums,
    net_benefit_thresholds,
    released_scores,
    roc_from_cells,
    score_cells,
)
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
EXACT = ReleasePolicy(mode="exact")  # the pure functions' default; sites pass their own policy
NB_THRESHOLDS = tuple(round(x, 2) for x in np.arange(0.05, 0.96, 0.05))


def _finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None


def validation_sums(model: nn.Module, data: SiteData, grid: ScoreGrid, device: str = "cpu"
                    ) -> dict[str, Any]:
    """Pass 1 at a training site: class-wise histograms and calibration sums of the val split,
    plus the site's own AUC with DeLong CI (a per-site summary)."""
    return validation_sums_prob(data.label.numpy().astype(np.float64),
                                predict(model, data, device), grid)


def validation_sums_prob(y: F64, prob: F64, grid: ScoreGrid, policy: ReleasePolicy = EXACT
                         ) -> dict[str, Any]:
    """:func:`validation_sums` of given probabilities (any component of a task), released as
    ``policy`` allows: in cells mode the histograms hold each cell's patients at its middle
    (``cells`` gives the cells), and calibration bins are merged to the minimum cell count."""
    check_split(y, policy, "pooled validation")
    released, cells = released_scores(y, prob, policy)
    pos, neg = site_histograms(y, released, grid)
    cal = site_calibration_sums(y, prob)
    if not policy.exact:
        cal = merge_calibration_sums(cal, policy.min_cell)
    out: dict[str, Any] = {
        "pos": pos, "neg": neg, "calibration": cal,
        "n": len(y), "n_pos": int(y.sum()), "loss": bce_loss(prob, y),
        "cells": cells, **_auc_fields(y, prob),
    }
    return out


def validation_placements(
    model: nn.Module, data: SiteData, pooled: tuple[F64, F64], grid: ScoreGrid,
    device: str = "cpu",
) -> F64:
    """Pass 2 at a training site: placement-value sums against the pooled histograms,
    flattened as [case sums (6), control sums (6)]."""
    return validation_placements_prob(data.label.numpy().astype(np.float64),
                                      predict(model, data, device), pooled, grid)


def validation_placements_prob(y: F64, prob: F64, pooled: tuple[F64, F64], grid: ScoreGrid,
                               policy: ReleasePolicy = EXACT) -> F64:
    """:func:`validation_placements` of given probabilities; in cells mode of the released
    scores (each patient at its cell's middle), so that the reply is a function of what pass 1
    released and the broadcast, whatever the coordinator broadcasts."""
    check_split(y, policy, "pooled validation")
    released, _ = released_scores(y, prob, policy)
    s = site_placement_sums(y, released, pooled, grid)
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
    policy: ReleasePolicy = EXACT,
) -> dict[str, Any]:
    """The external site's full statistics for one model, computed where the patients are.

    AUC with DeLong CI; at the training Youden ``threshold`` sensitivity, specificity, accuracy,
    PPV and NPV with percentile-bootstrap CIs (as the Ki-67 seed reports); calibration (slope,
    calibration-in-the-large, Brier, binned curve, Hosmer-Lemeshow); net benefit; ROC curve
    coordinates; and, for each survival endpoint given, Kaplan-Meier curves of the high- and
    low-score groups at the threshold with the log-rank test.
    """
    return external_report_prob(data.label.numpy().astype(np.float64),
                                predict(model, data, device), threshold, survival, n_boot,
                                policy)


def external_report_prob(
    y: F64, prob: F64, threshold: float, survival: dict[str, tuple[F64, F64]] | None = None,
    n_boot: int = 1000, policy: ReleasePolicy = EXACT,
) -> dict[str, Any]:
    """:func:`external_report` of given probabilities (any component of a task), released as
    ``policy`` allows (:func:`apply_policy`)."""
    check_split(y, policy, "external evaluation")
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
    if not policy.exact:
        apply_policy(out, y, prob, survival, policy)
    return out


def apply_policy(out: dict[str, Any], y: F64, prob: F64,
                 survival: dict[str, tuple[F64, F64]] | None, policy: ReleasePolicy) -> None:
    """The cells-mode release of an external report (in place): the ROC curve at the score
    cells' boundaries; the confusion table at the threshold (and the sensitivity, specificity,
    accuracy, PPV, NPV it gives) withheld when a cell holds 1 to k - 1 patients; calibration
    bins merged and net benefit kept only at thresholds that cut the patients into cells of
    >= k (:func:`_policy_calibration`); Kaplan-Meier curves as steps of >= k patients, and a
    survival block withheld when a score group holds 1 to k - 1 patients. ``withheld`` lists
    what was left out and why."""
    k = policy.min_cell
    withheld: list[str] = out.setdefault("withheld", [])
    if not confusion_releasable((out["tp"], out["fp"], out["tn"], out["fn"]), k):
        for key in ("sensitivity", "specificity", "accuracy", "ppv", "npv"):
            out[key] = None
            out[f"{key}_ci"] = None
        out.update(tp=None, fp=None, tn=None, fn=None)
        withheld.append(f"confusion table at the threshold (min_cell: a cell of 1 to {k - 1} "
                        "patients)")
    if "roc" in out:
        out["roc"] = roc_from_cells(score_cells(y, prob, policy))
    _policy_calibration(out, y, prob, policy)
    for name, (t, e) in (survival or {}).items():
        block = out["survival"][name]
        if not (_ok(block["n_high"], k) and _ok(block["n_low"], k)):
            out["survival"][name] = {"withheld": f"min_cell: a score group of 1 to {k - 1} "
                                                 "patients"}
            withheld.append(f"survival '{name}' (min_cell)")
            continue
        high = prob >= out["threshold"]
        if "high" in block:
            block["high"] = km_steps(t[high], e[high], k)
            block["low"] = km_steps(t[~high], e[~high], k)


def _ok(count: Any, k: int) -> bool:
    return count is None or count_releasable(count, k)


def _policy_calibration(out: dict[str, Any], y: F64, prob: F64, policy: ReleasePolicy
                        ) -> None:
    """Calibration bins merged to >= k events and non-events; net benefit withheld at the
    thresholds that would cut a cell of 1 to k - 1 patients."""
    k = policy.min_cell
    if "calibration" in out:
        out["calibration"]["bins"] = merge_calibration_bins(out["calibration"]["bins"], k)
    if "net_benefit" in out:
        nb = out["net_benefit"]
        keep = net_benefit_thresholds(y, prob, tuple(nb["thresholds"]), k)
        nb["model"] = [v if ok else None for v, ok in zip(nb["model"], keep, strict=False)]
        if not all(keep):
            out.setdefault("withheld", []).append(
                f"net benefit at {sum(not x for x in keep)} of {len(keep)} thresholds "
                "(min_cell)")


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


def recalibrated_report(y: F64, prob: F64, threshold: float, fit: Recalibration,
                        policy: ReleasePolicy = EXACT) -> dict[str, Any]:
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
        if not policy.exact:
            _policy_calibration(out, y, q, policy)
    return out


def recalibration_sums(y: F64, prob: F64, coef: tuple[float, float],
                       policy: ReleasePolicy = EXACT) -> list[float]:
    """A training site's recalibration sums at ``coef`` (count, score, information,
    log-likelihood: 7 numbers, no patient-level value); in cells mode of the released scores,
    so that a coordinator that asks at many points learns nothing beyond the cells."""
    check_split(y, policy, "recalibration")
    released, _ = released_scores(y, prob, policy)
    return [float(v) for v in site_recalibration_sums(y, released, coef)]


def site_auc(model: nn.Module, data: SiteData, device: str = "cpu") -> dict[str, Any]:
    """A model's AUC (DeLong CI), n and cases on one site's split: the per-site numbers of
    pass 1 (:func:`validation_sums_prob`), for the cross-site matrix of the baselines."""
    y = data.label.numpy().astype(np.float64)
    return {"n": len(y), "n_pos": int(y.sum()), **_auc_fields(y, predict(model, data, device))}


def _auc_fields(y: F64, prob: F64) -> dict[str, Any]:
    """``auc`` and its DeLong ``auc_ci`` on one site's patients (None with one class)."""
    if not 0 < y.sum() < len(y):
        return {"auc": None, "auc_ci": None}
    r = auc_ci(y, prob)
    return {"auc": r.auc, "auc_ci": [r.lower, r.upper]}


def compare_models(models: dict[str, nn.Module], data: SiteData, device: str = "cpu",
                   policy: ReleasePolicy = EXACT) -> list[dict[str, Any]]:
    """Paired DeLong tests between the final models of several arms on the external cohort
    (the site's part of ``external_compare``; the simulation calls it in-process)."""
    y = data.label.numpy().astype(np.float64)
    check_split(y, policy, "comparison of the arms")
    return external_comparisons({arm: predict(m, data, device) for arm, m in models.items()}, y)


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
    recalibrate: bool = True, policy: ReleasePolicy = EXACT,
) -> tuple[float, dict[str, Any]]:
    """The federated two-pass validation (and recalibration) run in one process (for the
    baselines): the same site sums, combined by the same coordinator code as under Flower."""
    return pooled_validation_probs(
        {s: (d.label.numpy().astype(np.float64), predict(model, d, device))
         for s, d in parts.items()}, grid, recalibrate, policy)


def pooled_validation_probs(parts: dict[str, tuple[F64, F64]], grid: ScoreGrid,
                            recalibrate: bool = True, policy: ReleasePolicy = EXACT
                            ) -> tuple[float, dict[str, Any]]:
    """:func:`pooled_validation` of given (labels, probabilities) per site, with the federated
    recalibration (``pooled.recalibration`` of the block) unless ``recalibrate`` is False."""
    from hcc_fl.shared.evaluation import combine_pass1, finish_pass2, recalibrate_pooled

    pass1 = {s: validation_sums_prob(y, p, grid, policy) for s, (y, p) in parts.items()}
    threshold, hist, block = combine_pass1(pass1, grid)
    vectors = [validation_placements_prob(y, p, hist, grid, policy) for y, p in parts.values()]
    block = finish_pass2(block, vectors)
    if recalibrate:
        recalibrate_pooled(
            block, lambda coef: {s: np.asarray(recalibration_sums(y, p, coef, policy))
                                 for s, (y, p) in parts.items()},
            {s: int(v["n"]) for s, v in pass1.items()})
    return threshold, block
