"""Pooled statistics from summed site sums equal the centrally computed ones within 1e-3."""

from __future__ import annotations

from functools import reduce
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_rossi

from hcc_fl.shared.metrics import (
    auc_ci,
    calibration,
    delong_test,
    kaplan_meier,
    logrank,
    net_benefit,
    youden_threshold,
)
from hcc_fl.shared.metrics.pooled import (
    ScoreGrid,
    TimeGrid,
    pooled_auc,
    pooled_auc_ci,
    pooled_calibration,
    pooled_delong_test,
    pooled_net_benefit,
    pooled_survival,
    site_calibration_sums,
    site_histograms,
    site_placement_sums,
    site_survival_counts,
    youden_from_histograms,
)
from tests.conftest import REFERENCE


def _sites(n: int, k: int, seed: int) -> list[np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    return np.array_split(idx, k)


def _pool(y: np.ndarray, a: np.ndarray, b: np.ndarray, grid: ScoreGrid, parts):  # type: ignore[no-untyped-def]
    hists_a = [site_histograms(y[p], a[p], grid) for p in parts]
    hists_b = [site_histograms(y[p], b[p], grid) for p in parts]
    pa = (sum(h[0] for h in hists_a), sum(h[1] for h in hists_a))
    pb = (sum(h[0] for h in hists_b), sum(h[1] for h in hists_b))
    sums = reduce(lambda u, v: u + v, [
        site_placement_sums(y[p], a[p], pa, grid, b[p], pb) for p in parts
    ])
    return pa, pb, sums


@pytest.fixture(scope="module")
def asah() -> pd.DataFrame:
    d = pd.read_csv(REFERENCE / "aSAH.csv")
    d["y"] = (d["outcome"] == "Poor").astype(int)
    return d


def test_pooled_auc_delong_on_asah_three_sites(asah: pd.DataFrame) -> None:
    y = asah["y"].to_numpy(float)
    a = asah["s100b"].to_numpy(float)
    b = asah["wfns"].to_numpy(float) / 5.0
    grid = ScoreGrid(10_000, 0.0, 2.5)
    parts = _sites(len(y), 3, 0)
    pa, _, sums = _pool(y, a, b, grid, parts)
    central = auc_ci(y, a)
    pooled = pooled_auc_ci(sums)
    assert pooled.auc == pytest.approx(central.auc, abs=1e-3)
    assert pooled.lower == pytest.approx(central.lower, abs=1e-3)
    assert pooled.upper == pytest.approx(central.upper, abs=1e-3)
    assert pooled_auc(*pa) == pytest.approx(central.auc, abs=1e-3)
    t_central = delong_test(y, a, b)
    t_pooled = pooled_delong_test(sums)
    assert t_pooled.z == pytest.approx(t_central.z, abs=1e-3)
    assert t_pooled.p_value == pytest.approx(t_central.p_value, abs=1e-3)
    assert t_pooled.ci_diff == pytest.approx(t_central.ci_diff, abs=1e-3)


def test_pooled_statistics_on_phantom_sites(demo_phantom: Path) -> None:
    """Three phantom sites' oracle probabilities: every pooled statistic equals the central one."""
    truth = pd.read_csv(demo_phantom / "truth.csv")
    frames = []
    for site in ("site_A", "site_B", "site_C"):
        m = pd.read_csv(demo_phantom / site / "manifest.csv")
        frames.append(m.merge(truth, on=["patient_id", "site"]))
    df = pd.concat(frames, ignore_index=True)
    y = df["ki67_high"].to_numpy(float)
    p = 1 / (1 + np.exp(-df["lp_ki67"].to_numpy(float)))
    q = 1 / (1 + np.exp(-df["u_img"].to_numpy(float)))
    parts = [np.nonzero(df["site"].to_numpy() == s)[0] for s in ("site_A", "site_B", "site_C")]
    grid = ScoreGrid(10_000)
    pa, _, sums = _pool(y, p, q, grid, parts)
    assert pooled_auc_ci(sums).auc == pytest.approx(auc_ci(y, p).auc, abs=1e-3)
    assert pooled_auc_ci(sums).upper == pytest.approx(auc_ci(y, p).upper, abs=1e-3)
    assert pooled_delong_test(sums).p_value == pytest.approx(delong_test(y, p, q).p_value,
                                                             abs=1e-3)
    # Youden: the pooled threshold reaches the central maximum of sens + spec (within a bin).
    thr = youden_from_histograms(*pa, grid)
    exact = youden_threshold(y, p)

    def j(t: float) -> float:
        return float(np.mean(p[y == 1] >= t) + np.mean(p[y == 0] < t))

    assert j(thr) == pytest.approx(j(exact), abs=1e-3) or abs(thr - exact) <= 1e-3
    # net benefit at grid edges is exact
    pts = [0.1, 0.2, 0.3, 0.5]
    assert pooled_net_benefit(*pa, grid, pts) == pytest.approx(
        np.array(net_benefit(y, p, pts).model), abs=1e-12)
    # calibration: summed sums give the central Brier exactly
    cal = pooled_calibration(sum(site_calibration_sums(y[i], p[i]) for i in parts))
    central = calibration(y, p)
    assert cal.brier == pytest.approx(central.brier, abs=1e-12)
    assert cal.scaled_brier == pytest.approx(central.scaled_brier, abs=1e-12)
    assert sum(b[2] for b in cal.bins) == len(y)


def test_pooled_kaplan_meier_and_logrank_rossi() -> None:
    rossi = load_rossi()
    parts = _sites(len(rossi), 4, 2)
    grid = TimeGrid(t_max=53.0, n_bins=53)  # weeks are integers: one bin per week, exact
    counts = sum(
        site_survival_counts(rossi["week"].iloc[p], rossi["arrest"].iloc[p],
                             rossi["fin"].iloc[p], [0, 1], grid)
        for p in parts
    )
    pooled = pooled_survival(counts, grid)
    central = logrank(rossi["week"], rossi["arrest"], rossi["fin"])
    assert pooled.statistic == pytest.approx(central.statistic, abs=1e-3)
    assert pooled.p_value == pytest.approx(central.p_value, abs=1e-3)
    for k, group in enumerate((0, 1)):
        sub = rossi[rossi["fin"] == group]
        km = kaplan_meier(sub["week"], sub["arrest"])
        for t, s in zip(pooled.times, pooled.survival[k], strict=True):
            assert s == pytest.approx(km.at(t), abs=1e-3)


def test_grid_refuses_out_of_range() -> None:
    with pytest.raises(ValueError, match="lie in"):
        ScoreGrid(10).index([1.5])
