"""The coordinator's combination of site sums: recalibration rounds (honest and hostile sites),
internal-vs-external unpaired DeLong and partial AUCs from the same blocks as in the federation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.special import expit

from hcc_fl.client.statistics import (
    external_report_prob,
    pooled_validation_probs,
    recalibrated_report,
    recalibration_sums,
)
from hcc_fl.shared.evaluation import internal_vs_external, recalibrate_pooled, recalibration_of
from hcc_fl.shared.metrics import calibration, delong_unpaired_test, partial_auc
from hcc_fl.shared.metrics.pooled import ScoreGrid


def _cohort(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """4-decimal probabilities (distinct values fall in distinct bins of the 10,000-bin grid),
    squeezed towards 0.5 as the phantom's deep models are."""
    rng = np.random.default_rng(seed)
    z = rng.normal(shift, 1.5, n)
    y = (rng.random(n) < expit(z)).astype(float)
    return y, np.round(expit(0.15 * z + 0.2), 4)


def _sites(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {f"site_{k}": _cohort(n, seed + i) for i, (k, n) in
            enumerate({"A": 60, "B": 45, "C": 80}.items())}


def test_pooled_validation_recalibrates_like_the_central_fit() -> None:
    parts = _sites()
    _, block = pooled_validation_probs(parts, ScoreGrid())
    fit = recalibration_of(block)
    y = np.concatenate([v[0] for v in parts.values()])
    p = np.concatenate([v[1] for v in parts.values()])
    central = calibration(y, p)
    assert fit is not None and fit.method == "newton"
    assert block["pooled"]["recalibration"]["applied"] is True
    assert fit.intercept == pytest.approx(central.intercept, abs=1e-9)
    assert fit.slope == pytest.approx(central.slope, abs=1e-9)
    assert fit.iterations <= 4  # started from the binned fit on the pooled histograms
    _, off = pooled_validation_probs(parts, ScoreGrid(), recalibrate=False)
    assert off["pooled"]["recalibration"]["method"] == "binned"  # only the starting point


def _asker(parts: dict[str, tuple[np.ndarray, np.ndarray]],
           forge: Any = None) -> Any:
    def ask(coef: tuple[float, float]) -> dict[str, Any]:
        out = {s: np.asarray(recalibration_sums(y, p, coef)) for s, (y, p) in parts.items()}
        return forge(out) if forge else out
    return ask


@pytest.mark.parametrize("forge, reason", [
    (lambda o: {**o, "site_B": o["site_B"] * np.array([2, 1, 1, 1, 1, 1, 1])}, "site_B"),
    (lambda o: {k: v for k, v in o.items() if k != "site_C"}, "no recalibration sums from site_C"),
    (lambda o: {**o, "site_A": o["site_A"][:5]}, "site_A"),
    (lambda o: {**o, "site_A": np.full(7, np.nan)}, "site_A"),
    (lambda o: {**o, "site_X": o["site_A"]}, "site_X"),
    (lambda o: {**o, "site_B": o["site_B"] * np.array([1, 1e6, 1e6, 1, 1, 1, 1])}, None),
])
def test_a_hostile_site_cannot_set_the_recalibration(forge: Any, reason: str | None) -> None:
    parts = _sites(1)
    _, block = pooled_validation_probs(parts, ScoreGrid(), recalibrate=False)
    counts = {s: len(y) for s, (y, _) in parts.items()}
    fit = recalibrate_pooled(block, _asker(parts, forge), counts)
    entry = block["pooled"]["recalibration"]
    if reason is None:
        # a forged score vector with a valid count passes the screen but the fit then stops
        # at a point the honest sums do not support: it is still refused or it is not usable
        _, honest = pooled_validation_probs(parts, ScoreGrid())
        good = recalibration_of(honest)
        assert good is not None
        assert fit is None or abs(fit.slope - good.slope) > 1e-3
        return
    assert fit is None and entry["applied"] is False
    assert reason in entry["reason"]


def test_recalibrated_external_report_keeps_ranks_and_threshold_groups() -> None:
    parts = _sites(2)
    threshold, block = pooled_validation_probs(parts, ScoreGrid())
    fit = recalibration_of(block)
    assert fit is not None
    y, p = _cohort(70, seed=99, shift=0.3)
    raw = external_report_prob(y, p, threshold)
    rec = recalibrated_report(y, p, threshold, fit)
    assert rec["auc"] == pytest.approx(raw["auc"], abs=1e-15)
    q = fit.apply(p)
    assert np.array_equal(q >= rec["threshold"], p >= threshold)
    assert raw["calibration"]["slope"] > 3  # squeezed before ...
    assert 0.5 < rec["calibration"]["slope"] < 2.0  # ... and near 1 after
    assert rec["calibration"]["brier"] < raw["calibration"]["brier"]
    assert rec["recalibration"]["slope"] == fit.slope


def test_internal_vs_external_is_the_central_unpaired_delong_test() -> None:
    parts = _sites(3)
    _, block = pooled_validation_probs(parts, ScoreGrid())
    y_ext, p_ext = _cohort(50, seed=7, shift=0.5)
    ext = external_report_prob(y_ext, p_ext, 0.5)
    t = internal_vs_external(block, ext)
    y = np.concatenate([v[0] for v in parts.values()])
    p = np.concatenate([v[1] for v in parts.values()])
    ref = delong_unpaired_test(y, p, y_ext, p_ext)
    assert t is not None
    assert t["statistic"] == pytest.approx(ref.statistic, rel=1e-12, abs=1e-12)
    assert t["df"] == pytest.approx(ref.df, rel=1e-12)
    assert t["p_value"] == pytest.approx(ref.p_value, rel=1e-12, abs=1e-15)
    assert t["auc_internal"] == pytest.approx(ref.auc1, abs=1e-12)
    for name, limits, focus in (("specificity_0.8_1", (1.0, 0.8), "specificity"),
                                ("sensitivity_0.8_1", (1.0, 0.8), "sensitivity")):
        assert block["pooled"]["partial_auc"][name] == pytest.approx(
            partial_auc(y, p, limits, focus, correct=True), abs=1e-12)
        assert ext["partial_auc"][name] == pytest.approx(
            partial_auc(y_ext, p_ext, limits, focus, correct=True), abs=1e-12)
    assert internal_vs_external(block, {"auc": 0.7}) is None
    assert internal_vs_external(None, ext) is None


def test_separated_predictions_spend_no_recalibration_message() -> None:
    """A handful of validation patients that the score separates (typical of a local baseline):
    the binned fit diverges, so no Newton message is sent and nothing is applied."""
    parts = {"site_A": (np.array([0, 0, 1, 1.0]), np.array([0.41, 0.42, 0.6, 0.61])),
             "site_B": (np.array([0, 1.0]), np.array([0.43, 0.59]))}
    _, block = pooled_validation_probs(parts, ScoreGrid(), recalibrate=False)
    asked: list[tuple[float, float]] = []

    def ask(coef: tuple[float, float]) -> dict[str, Any]:
        asked.append(coef)
        return {}

    assert recalibrate_pooled(block, ask, {"site_A": 4, "site_B": 2}) is None
    assert asked == []
    entry = block["pooled"]["recalibration"]
    assert entry["applied"] is False and "separate" in entry["reason"]
