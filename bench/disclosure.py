"""What the default release policy (cells, k = 5) costs in precision: the pooled AUC, its
bounds, its DeLong CI width, the Youden threshold and the net benefit (largest change over the
19 decision-curve thresholds) against the central values, for sites of growing size.

    .venv/bin/python bench/disclosure.py      # ~10 s; bench/results/disclosure.json

Scores are 4-decimal probabilities of a model of AUC ~0.8 (binormal on the logit scale), half
cases, 20 random cohorts per row; the same cohorts go through the exact and the cells policy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from hcc_fl.client.disclosure import ReleasePolicy
from hcc_fl.client.statistics import NB_THRESHOLDS, pooled_validation_probs, validation_sums_prob
from hcc_fl.shared.metrics.pooled import ScoreGrid, pooled_net_benefit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

SIZES = ((20, 15, 25), (40, 30, 50), (100, 150, 200), (300, 300, 300))


def site(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.zeros(n)
    y[: n // 2] = 1
    rng.shuffle(y)
    return y, np.round(1 / (1 + np.exp(-(rng.normal(0, 1.3, n) + 1.6 * y - 0.8))), 4)


def main() -> None:
    grid, cells = ScoreGrid(), ReleasePolicy()
    rows = []
    for sizes in SIZES:
        d, width, dci, dthr, dnb = [], [], [], [], []
        for seed in range(20):
            rng = np.random.default_rng(seed)
            parts = {f"s{i}": site(rng, n) for i, n in enumerate(sizes)}
            y = np.concatenate([p[0] for p in parts.values()])
            s = np.concatenate([p[1] for p in parts.values()])
            _, b = pooled_validation_probs(parts, grid, recalibrate=False, policy=cells)
            _, e = pooled_validation_probs(parts, grid, recalibrate=False)
            d.append(abs(b["pooled"]["auc"] - roc_auc_score(y, s)))
            lo, hi = b["pooled"]["auc_bounds"]
            width.append(hi - lo)
            dci.append(abs(np.diff(b["pooled"]["auc_ci"])[0] - np.diff(e["pooled"]["auc_ci"])[0]))
            dthr.append(abs(b["pooled"]["threshold"] - e["pooled"]["threshold"]))
            nb = []
            for policy in (cells, ReleasePolicy(mode="exact")):
                sums = [validation_sums_prob(yy, ss, grid, policy) for yy, ss in parts.values()]
                nb.append(pooled_net_benefit(sum(x["pos"] for x in sums),
                                             sum(x["neg"] for x in sums), grid, NB_THRESHOLDS))
            dnb.append(float(np.max(np.abs(nb[0] - nb[1]))))
        rows.append({"sites (patients)": "/".join(map(str, sizes)),
                     "mean_abs_auc_error": round(float(np.mean(d)), 4),
                     "max_abs_auc_error": round(float(np.max(d)), 4),
                     "mean_bound_width": round(float(np.mean(width)), 3),
                     "mean_abs_ci_width_change": round(float(np.mean(dci)), 4),
                     "mean_abs_threshold_change": round(float(np.mean(dthr)), 3),
                     "mean_max_net_benefit_change": round(float(np.mean(dnb)), 4)})
        print(f"{'/'.join(map(str, sizes)):>12} patients: |AUC - central| mean {np.mean(d):.4f} "
              f"max {np.max(d):.4f}; bounds width {np.mean(width):.3f}; "
              f"CI width change {np.mean(dci):.4f}; threshold {np.mean(dthr):.3f}; "
              f"net benefit {np.mean(dnb):.4f}")
    write_result("disclosure", rows, policy="cells, min_cell 5, cell_width 0.01",
                 cohorts_per_row=20)


if __name__ == "__main__":
    main()
