"""Combine training sites' validation sums into pooled statistics (coordinator side).

Pass 1 sums (class-wise histograms, calibration sums) give the pooled Youden threshold, the
pooled calibration curve and Brier score; pass 2 placement sums give the pooled AUC with its
DeLong CI. Used identically by the ServerApp and by the in-process baselines.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from hcc_fl.shared.metrics.pooled import (
    PlacementSums,
    ScoreGrid,
    pooled_auc_ci,
    pooled_calibration,
    youden_from_histograms,
)

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
    block = {
        "per_site": {
            site: {k: v.get(k) for k in ("auc", "auc_ci", "n", "n_pos", "loss")}
            for site, v in sorted(per_site.items())
        },
        "pooled": {
            "threshold": threshold, "n": int(pos.sum() + neg.sum()), "n_pos": int(pos.sum()),
            "brier": cal.brier, "scaled_brier": cal.scaled_brier,
            "calibration_bins": [list(b) for b in cal.bins], "grid_bins": grid.n_bins,
        },
    }
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
    return block
