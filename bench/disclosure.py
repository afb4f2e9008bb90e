"""What the default release policy (cells, k = 5) costs in precision: the pooled AUC, its
bounds and its DeLong CI width against the central values, for sites of growing size.

    .venv/bin/python bench/disclosure.py      # ~10 s; JSON in bench/results/disclosure.json

Scores are 4-decimal probabilities of a model of AUC ~0.8 (binormal on the logit scale), half
cases, 20 random cohorts per row; the same cohorts go through the exact and the cells policy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from hcc_fl.client.disclosure import ReleasePolicy
from hcc_fl.client.statistics import pooled_validation_probs
from hcc_fl.shared.metrics.pooled import ScoreGrid

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
        d, width, dci = [], [], []
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
        rows.append({"sites": list(sizes), "mean_abs_auc_error": float(np.mean(d)),
                     "max_abs_auc_error": float(np.max(d)),
                     "mean_bound_width": float(np.mean(width)),
                     "mean_abs_ci_width_change": float(np.mean(dci))})
        print(f"{'/'.join(map(str, sizes)):>12} patients: |AUC - central| mean {np.mean(d):.4f} "
              f"max {np.max(d):.4f}; bounds width {np.mean(width):.3f}; "
              f"CI width change {np.mean(dci):.4f}")
    out = Path(__file__).parent / "results" / "disclosure.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"bench": "disclosure", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
