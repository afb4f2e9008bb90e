"""Statistics against pROC's documented outputs on its own aSAH data, and against sklearn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from hcc_fl.shared.metrics import (
    ScoreGrid,
    auc_ci,
    binary_metrics,
    delong_test,
    site_histograms,
    youden_from_histograms,
    youden_threshold,
)
from tests.conftest import REFERENCE


@pytest.fixture(scope="module")
def asah() -> pd.DataFrame:
    path = REFERENCE / "aSAH.csv"
    assert path.exists(), (
        f"reference data {path} is missing: clone beside shared/ or set HCC_FL_REFERENCE_DATA"
    )
    d = pd.read_csv(path)
    d["y"] = (d["outcome"] == "Poor").astype(int)
    return d


def test_auc_delong_ci_matches_proc(asah: pd.DataFrame) -> None:
    # pROC documented example: roc(aSAH$outcome, aSAH$s100b, ci=TRUE) prints
    # "Area under the curve: 0.7314" and "95% CI: 0.6301-0.8326 (DeLong)" (man/ci.auc.Rd).
    r = auc_ci(asah["y"], asah["s100b"])
    assert r.auc == pytest.approx(0.7314, abs=5e-5)
    assert r.lower == pytest.approx(0.6301, abs=5e-5)
    assert r.upper == pytest.approx(0.8326, abs=5e-5)


def test_delong_paired_test_matches_proc(asah: pd.DataFrame) -> None:
    # pROC man/roc.test.Rd example, roc.test(roc(outcome, wfns), roc(outcome, s100b)):
    # "Z = 2.209, p-value = 0.02718"; AUCs 0.8236789 and 0.7313686.
    t = delong_test(asah["y"], asah["wfns"], asah["s100b"])
    assert t.auc_a == pytest.approx(0.8236789, abs=5e-7)
    assert t.auc_b == pytest.approx(0.7313686, abs=5e-7)
    assert t.z == pytest.approx(2.209, abs=5e-4)
    assert t.p_value == pytest.approx(0.02718, abs=5e-6)
    assert t.ci_diff[0] < t.auc_a - t.auc_b < t.ci_diff[1]


def test_youden_matches_proc_coords_best(asah: pd.DataFrame) -> None:
    # pROC coords(roc(aSAH$outcome, aSAH$s100b), "best"): threshold 0.205,
    # specificity 0.8055556, sensitivity 0.6341463.
    thr = youden_threshold(asah["y"], asah["s100b"])
    assert thr == pytest.approx(0.205, abs=1e-9)
    m = binary_metrics(asah["y"], asah["s100b"], thr)
    assert m.specificity == pytest.approx(0.8055556, abs=5e-8)
    assert m.sensitivity == pytest.approx(0.6341463, abs=5e-8)
    assert (m.tp, m.fp, m.tn, m.fn) == (26, 14, 58, 15)


def test_auc_with_ties_equals_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # many ties
    assert auc_ci(y, s).auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_bootstrap_ci_close_to_delong(asah: pd.DataFrame) -> None:
    d = auc_ci(asah["y"], asah["s100b"])
    b = auc_ci(asah["y"], asah["s100b"], method="bootstrap", n_boot=1000, seed=2)
    assert b.auc == d.auc
    assert abs(b.lower - d.lower) < 0.03 and abs(b.upper - d.upper) < 0.03


def test_histogram_youden_within_one_bin() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 400)
    p = 1 / (1 + np.exp(-(rng.normal(size=400) + 1.5 * y)))
    exact = youden_threshold(y, p)
    pos, neg = site_histograms(y, p, ScoreGrid(1000))
    approx = youden_from_histograms(pos, neg)
    ex = binary_metrics(y, p, exact)
    ap = binary_metrics(y, p, approx)
    # Same Youden index up to the patients inside one bin of width 1e-3.
    assert abs(approx - exact) <= 1e-3 + 1e-12 or np.isclose(
        ex.sensitivity + ex.specificity, ap.sensitivity + ap.specificity, atol=2 / 200)
    # Summing per-site histograms equals the histogram of the pooled data.
    grid = ScoreGrid(1000)
    halves = [site_histograms(y[:150], p[:150], grid), site_histograms(y[150:], p[150:], grid)]
    assert np.array_equal(halves[0][0] + halves[1][0], pos)


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="both"):
        youden_threshold([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="at least one case and one control"):
        auc_ci([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        auc_ci([0, 1], [0.1, float("nan")])
