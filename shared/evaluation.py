"""Combine training sites' validation sums into pooled statistics (coordinator side).

Pass 1 sums (class-wise histograms, calibration sums) give the pooled Youden threshold, the
pooled calibration curve and Brier score; pass 2 placement sums give the pooled AUC with its
DeLong CI; the recalibration rounds give the logistic recalibration of the model
(:mod:`hcc_fl.shared.metrics.recalibration`), started from the fit on the pooled histograms.
Used identically by the ServerApp and by the in-process baselines.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import numpy.typing as npt

from hcc_fl.shared.disclosure import auc_bounds, cell_intervals, fine_cells
from hcc_fl.shared.metrics.classification import DeLongSummary, delong_unpaired_from_summaries
from hcc_fl.shared.metrics.pooled import (
    PlacementSums,
    ScoreGrid,
    pooled_auc_ci,
    pooled_calibration,
    pooled_delong_summary,
    pooled_partial_auc,
    youden_from_histograms,
)
from hcc_fl.shared.metrics.recalibration import (
    Recalibration,
    binned_recalibration,
    check_sums,
    fit_recalibration,
)

log = logging.getLogger(__name__)
# Partial AUCs (McClish-standardised) of the pooled validation and at the external site: the
# high-specificity and the high-sensitivity end of the ROC curve.
PARTIAL_AUC = {"specificity_0.8_1": ((1.0, 0.8), "specificity"),
               "sensitivity_0.8_1": ((1.0, 0.8), "sensitivity")}

F64 = npt.NDArray[np.float64]


def threshold_splits(name: str) -> tuple[str, ...]:
    """Manifest splits behind ``evaluation.threshold_split`` (``all`` = train and val)."""
    return ("train", "val") if name == "all" else (name,)


def combine_pass1(
    per_site: dict[str, dict[str, Any]], grid: ScoreGrid
) -> tuple[float, tuple[F64, F64], dict[str, Any]]:
    """Pooled threshold and calibration from the sites' pass-1 sums.

    Returns the Youden threshold, the pooled (cases, controls) histograms to broadcast for pass 2,
    and the validation block (per-site summaries and the pooled part so far).
    """
    pos = sum(np.asarray(v["pos"], dtype=np.float64) for v in per_site.values())
    neg = sum(np.asarray(v["neg"], dtype=np.float64) for v in per_site.values())
    assert isinstance(pos, np.ndarray) and isinstance(neg, np.ndarray)
    threshold = youden_from_histograms(pos, neg, grid)
    cal_sums = sum(np.asarray(v["calibration"], dtype=np.float64).reshape(-1, 3)
                   for v in per_site.values())
    cal = pooled_calibration(np.asarray(cal_sums))
    intervals = [iv for v in per_site.values() for iv in
                 (cell_intervals(v["cells"]) if v.get("cells") is not None
                  else fine_cells(np.asarray(v["pos"]), np.asarray(v["neg"])))]
    known = not any(v.get("release") for v in per_site.values())
    bounds = auc_bounds(intervals) if known else (math.nan, math.nan)
    block: dict[str, Any] = {
        "disclosure": {site: (v.get("release") or ("exact" if v.get("cells") is None else
                                                    f"cells ({len(v['cells'].starts)} cells)"))
                       for site, v in sorted(per_site.items())},
        "per_site": {
            site: {k: v.get(k) for k in ("auc", "auc_ci", "n", "n_pos", "loss")}
            for site, v in sorted(per_site.items())
        },
        "pooled": {
            "threshold": threshold, "n": int(pos.sum() + neg.sum()), "n_pos": int(pos.sum()),
            "brier": cal.brier, "scaled_brier": cal.scaled_brier,
            "calibration_bins": [list(b) for b in cal.bins], "grid_bins": grid.n_bins,
            # the AUC's range over every arrangement of the patients inside what the sites
            # released (a point when every site released fine histograms of distinct scores)
            "auc_bounds": [None if math.isnan(x) else x for x in bounds],
        },
    }
    for name, (limits, focus) in PARTIAL_AUC.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                value = pooled_partial_auc(pos, neg, limits, focus, correct=True)
            block["pooled"].setdefault("partial_auc", {})[name] = (
                value if np.isfinite(value) else None)
        except ValueError:
            block["pooled"].setdefault("partial_auc", {})[name] = None
    try:
        binned = binned_recalibration(pos, neg, grid.edges)
        block["pooled"]["recalibration"] = {**binned.as_dict(), "applied": binned.usable()}
    except ValueError as exc:
        block["pooled"]["recalibration"] = {"applied": False, "reason": str(exc)}
    return threshold, (pos, neg), block


def finish_pass2(block: dict[str, Any], placement_vectors: list[F64]) -> dict[str, Any]:
    """Add the pooled AUC and DeLong CI from the sites' summed pass-2 placement sums."""
    total = np.sum(np.stack(placement_vectors), axis=0)
    sums = PlacementSums(total[:6], total[6:])
    try:
        res = pooled_auc_ci(sums)
        block["pooled"].update(auc=res.auc, auc_ci=[res.lower, res.upper])
    except ValueError:
        block["pooled"].update(auc=None, auc_ci=None)
    try:
        block["pooled"]["delong_summary"] = asdict(pooled_delong_summary(sums))
    except ValueError:
        block["pooled"]["delong_summary"] = None
    return block


def internal_vs_external(validation: dict[str, Any] | None, external: dict[str, Any] | None
                         ) -> dict[str, Any] | None:
    """Unpaired DeLong test of the pooled internal-validation AUC (training sites' summed
    placement sums) against the external site's AUC (its own summary): does discrimination
    transport? None when either side lacks a summary (too few cases or controls)."""
    a = ((validation or {}).get("pooled") or {}).get("delong_summary")
    b = (external or {}).get("delong_summary")
    if not a or not b:
        return None
    try:
        t = delong_unpaired_from_summaries(DeLongSummary(**a), DeLongSummary(**b))
    except (TypeError, ValueError):
        return None
    return {"auc_internal": t.auc1, "auc_external": t.auc2, "statistic": t.statistic,
            "df": t.df, "p_value": t.p_value, "ci_diff": list(t.ci_diff), "method": t.method}


def recalibration_of(block: dict[str, Any]) -> Recalibration | None:
    """The usable recalibration recorded in a validation block (``pooled.recalibration``), or
    None (not fitted, not converged, or not rank-preserving)."""
    entry = (block.get("pooled") or {}).get("recalibration") or {}
    if not entry.get("applied"):
        return None
    fit = Recalibration.from_dict(entry)
    return fit if fit.usable() else None


def recalibrate_pooled(
    block: dict[str, Any],
    ask: Callable[[tuple[float, float]], dict[str, Any]],
    counts: dict[str, int],
    max_evaluations: int = 10,
) -> Recalibration | None:
    """The exact federated recalibration: Newton steps on the sites' summed recalibration sums,
    started from the binned fit in ``block`` (see :func:`combine_pass1`).

    ``ask(coef)`` returns each site's sums vector at ``coef`` (site name -> vector); every site of
    ``counts`` (site -> patients declared in pass 1) must answer every step with a count equal to
    its declared one, else the fit stops and the binned fit stays in ``block`` with the reason.
    Returns the recalibration to apply, or None.
    """
    entry = block["pooled"].get("recalibration") or {}
    if not entry.get("converged"):
        # The fit on the pooled histograms diverged: the outcome is separated by the score (or
        # a class is missing), so the exact fit diverges too; no message is spent on it.
        block["pooled"]["recalibration"] = {
            **entry, "applied": False,
            "reason": entry.get("reason") or "not fitted: the pooled predictions separate the "
                                             "outcome (the maximum-likelihood fit does not exist)"}
        return None
    start = (float(entry["intercept"]), float(entry["slope"]))

    def summed(coef: tuple[float, float]) -> F64:
        replies = ask(coef)
        missing = sorted(set(counts) - set(replies))
        if missing:
            raise ValueError(f"no recalibration sums from {', '.join(missing)}")
        vectors = []
        for site, vec in sorted(replies.items()):
            if site not in counts:
                raise ValueError(f"recalibration sums from {site}, which is not in the fit")
            try:
                vectors.append(check_sums(vec, counts[site]))
            except ValueError as exc:
                raise ValueError(f"{site}: {exc}") from None
        return np.sum(np.stack(vectors), axis=0)

    try:
        fit = fit_recalibration(summed, start, max_evaluations=max_evaluations)
    except ValueError as exc:
        log.warning("federated recalibration stopped: %s", exc)
        block["pooled"]["recalibration"] = {**entry, "applied": False,
                                            "reason": f"federated fit stopped: {exc}"}
        return None
    out: dict[str, Any] = {**fit.as_dict(), "applied": fit.usable()}
    if not fit.converged:
        out["reason"] = "did not converge (the outcome may be separated by the score)"
    elif fit.slope <= 0:
        out["reason"] = "slope <= 0: recalibration would invert the ranking"
    block["pooled"]["recalibration"] = out
    return fit if fit.usable() else None


def cross_site_matrix(models: list[str], training: list[str], external_site: str,
                      validation: dict[str, Any], cross: dict[str, dict[str, Any]],
                      external: dict[str, Any]) -> dict[str, Any]:
    """The cross-site evaluation matrix: every model (row) on every training site's threshold
    split and on the external site (columns), AUC and n per cell.

    A federated arm's cells come from its pooled validation (each site's own AUC in pass 1,
    ``validation[model]["per_site"]``), a baseline's from ``cross[model]`` (its model on every
    site's split, in-process); the external column is ``external[model]["auc"]``. A cell no
    source covers (a site that refused or dropped out) is None.
    """
    sites = [*training, external_site]
    auc: list[list[float | None]] = []
    n: list[list[int | None]] = []
    for m in models:
        per_site = {**((validation.get(m) or {}).get("per_site") or {}), **cross.get(m, {})}
        row_auc, row_n = [], []
        for s in training:
            v = per_site.get(s) or {}
            row_auc.append(v.get("auc"))
            row_n.append(v.get("n"))
        e = external.get(m) or {}
        row_auc.append(e.get("auc"))
        row_n.append(e.get("n"))
        auc.append(row_auc)
        n.append(row_n)
    return {"models": list(models), "sites": sites, "external_site": external_site,
            "auc": auc, "n": n}
