"""Logistic recalibration: the federated fit from summed site sums equals the central fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression

from hcc_fl.shared.metrics import auc_ci, calibration
from hcc_fl.shared.metrics.pooled import ScoreGrid, site_histograms
from hcc_fl.shared.metrics.recalibration import (
    Recalibration,
    binned_recalibration,
    check_sums,
    fit_recalibration,
    recalibrate,
    site_recalibration_sums,
)
from tests.conftest import REFERENCE


def _federated(y: np.ndarray, p: np.ndarray, parts: list[np.ndarray],
               start: tuple[float, float] = (0.0, 1.0)) -> Recalibration:
    def ask(coef: tuple[float, float]) -> np.ndarray:
        return np.sum([site_recalibration_sums(y[i], p[i], coef) for i in parts], axis=0)

    return fit_recalibration(ask, start)


def _squeezed(n: int, seed: int, squeeze: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A well-ranked but miscalibrated model: true logit z, predicted logit squeeze * z + 0.3
    (predictions crowded near 0.5, calibration slope about 1 / squeeze)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < expit(z)).astype(float)
    return y, expit(squeeze * z + 0.3)


def test_mtcars_glm_fit_is_its_own_recalibration() -> None:
    """R's ``glm(am ~ hp + wt, family = binomial, data = mtcars)`` prints the coefficients
    (Intercept) 18.86630, hp 0.03626, wt -8.08348 (r-tutor.com, "Estimated Logistic Regression
    Equation"; the ResourceSelection ``hoslem.test`` example uses the same model). A maximum-
    likelihood fit is calibrated on its own data, so recalibrating R's fitted probabilities gives
    intercept 0 and slope 1, up to the rounding of the printed coefficients."""
    d = pd.read_csv(REFERENCE / "hl_mtcars_am_wt_hp.csv")
    p = expit(18.86630 + 0.03626 * d["hp"].to_numpy() - 8.08348 * d["wt"].to_numpy())
    y = d["am"].to_numpy(dtype=float)
    fit = _federated(y, p, np.array_split(np.arange(len(y)), 3))
    assert fit.converged and fit.score_norm <= 1e-9 * len(y)
    assert fit.intercept == pytest.approx(0.0, abs=2e-3)
    assert fit.slope == pytest.approx(1.0, abs=2e-3)
    # a model that is off by a known affine map on the logit is recalibrated back exactly
    bent = expit((logit(p) - 0.7) / 2.5)
    fit2 = _federated(y, bent, np.array_split(np.arange(len(y)), 4))
    assert fit2.intercept == pytest.approx(fit.intercept + 0.7 * fit.slope, abs=1e-8)
    assert fit2.slope == pytest.approx(2.5 * fit.slope, abs=1e-8)


def test_pooled_fit_equals_central_and_scikit_learn() -> None:
    y, p = _squeezed(400, seed=1)
    central = calibration(y, p)
    parts = np.array_split(np.random.default_rng(2).permutation(len(y)), 5)
    fit = _federated(y, p, parts)
    assert fit.converged and fit.method == "newton"
    assert fit.intercept == pytest.approx(central.intercept, abs=1e-9)
    assert fit.slope == pytest.approx(central.slope, abs=1e-9)
    sk = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(
        logit(p)[:, None], y)
    assert fit.slope == pytest.approx(float(sk.coef_[0, 0]), abs=1e-5)
    assert fit.intercept == pytest.approx(float(sk.intercept_[0]), abs=1e-5)
    assert central.slope > 5  # the test data really are miscalibrated


def test_apparent_recalibration_is_perfectly_calibrated_and_keeps_ranks() -> None:
    y, p = _squeezed(300, seed=3)
    fit = _federated(y, p, [np.arange(300)])
    q = fit.apply(p)
    cal = calibration(y, q)
    assert cal.slope == pytest.approx(1.0, abs=1e-7)
    assert cal.intercept_in_the_large == pytest.approx(0.0, abs=1e-7)
    assert auc_ci(y, q).auc == auc_ci(y, p).auc
    assert np.array_equal(np.argsort(q, kind="stable"), np.argsort(p, kind="stable"))
    assert calibration(y, q).brier < calibration(y, p).brier


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_sites=st.integers(1, 6),
       squeeze=st.floats(0.05, 3.0))
def test_pooled_equals_central_for_any_site_split(seed: int, n_sites: int,
                                                  squeeze: float) -> None:
    y, p = _squeezed(150, seed, squeeze)
    rng = np.random.default_rng(seed + 1)
    cuts = np.sort(rng.choice(np.arange(1, 150), n_sites - 1, replace=False))
    parts = np.split(rng.permutation(150), cuts)
    fit = _federated(y, p, parts)
    one = _federated(y, p, [np.arange(150)])
    central = calibration(y, p)
    assert fit.converged
    assert fit.intercept == pytest.approx(one.intercept, abs=1e-9)
    assert fit.slope == pytest.approx(one.slope, abs=1e-9)
    assert fit.slope == pytest.approx(central.slope, abs=1e-7)


def test_binned_start_is_close_and_newton_from_it_is_short() -> None:
    y, p = _squeezed(500, seed=5)
    grid = ScoreGrid(10_000)
    pos, neg = site_histograms(y, p, grid)
    start = binned_recalibration(pos, neg, grid.edges)
    exact = _federated(y, p, [np.arange(500)])
    assert start.method == "binned" and start.converged
    assert abs(start.slope - exact.slope) < 1e-2 * exact.slope
    evaluations = []

    def ask(coef: tuple[float, float]) -> np.ndarray:
        evaluations.append(coef)
        return site_recalibration_sums(y, p, coef)

    fit = fit_recalibration(ask, (start.intercept, start.slope))
    assert fit.slope == pytest.approx(exact.slope, abs=1e-9)
    assert len(evaluations) <= 4 < exact.iterations


def test_separation_is_reported_not_applied() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    y = np.array([0, 0, 0, 1, 1, 1], dtype=float)
    fit = _federated(y, p, [np.arange(6)])
    assert not fit.converged and not fit.usable()


def test_inverted_model_is_not_usable() -> None:
    y, p = _squeezed(200, seed=7)
    fit = _federated(y, p, [np.arange(200)])
    flipped = _federated(y, 1 - p, [np.arange(200)])
    assert fit.usable() and flipped.converged and flipped.slope < 0 and not flipped.usable()


@pytest.mark.parametrize("vec, message", [
    ([1.0] * 6, "7 values"),
    ([10, 0, 0, 1, 0, 1, np.nan], "non-finite"),
    ([10.5, 0, 0, 1, 0, 1, -3], "integer"),
    ([10, 0, 0, -1, 0, 1, -3], "semi-definite"),
    ([10, 0, 0, 1, 5, 1, -3], "semi-definite"),
    ([10, 0, 0, 3, 0, 1, -3], "n/4"),
    ([10, 0, 0, 1, 0, 1, 2], "positive"),
])
def test_forged_sums_are_refused(vec: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_sums(vec)


def test_count_must_match_the_declared_validation_count() -> None:
    y, p = _squeezed(40, seed=9)
    s = site_recalibration_sums(y, p, (0.0, 1.0))
    assert check_sums(s, 40) is not None
    with pytest.raises(ValueError, match="differs from the 41"):
        check_sums(s, 41)


def test_round_trip_and_bad_input() -> None:
    y, p = _squeezed(100, seed=11)
    fit = _federated(y, p, [np.arange(100)])
    assert Recalibration.from_dict(fit.as_dict()) == fit
    with pytest.raises(ValueError, match="malformed"):
        Recalibration.from_dict({"intercept": 1.0})
    with pytest.raises(ValueError, match="finite"):
        recalibrate(p, float("nan"), 1.0)
    with pytest.raises(ValueError, match="differs|values but"):
        site_recalibration_sums(y[:5], p, (0.0, 1.0))
    with pytest.raises(ValueError, match="only 0 and 1"):
        site_recalibration_sums(np.full(100, 2.0), p, (0.0, 1.0))
