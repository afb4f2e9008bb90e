"""Unpaired DeLong test and partial AUC: pROC's own expectations on aSAH, pooled = central, and
inputs that must be refused.

pROC references are from xrobin/pROC @ ee2877e8 (the commit test_metrics_reference.py cites);
the curves are those of tests/testthat/helper-rocs.R: roc(aSAH$outcome, aSAH$<marker>), whose
automatic direction is "<" (controls < cases) for wfns, s100b and ndka, this module's convention.
"""

from __future__ import annotations

import math
import warnings
from functools import reduce

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hcc_fl.shared.metrics import (
    DeLongSummary,
    auc_ci,
    delong_test,
    delong_unpaired_from_summaries,
    delong_unpaired_test,
    partial_auc,
    partial_auc_from_roc,
    roc_points,
)
from hcc_fl.shared.metrics.pooled import (
    PlacementSums,
    ScoreGrid,
    pooled_auc,
    pooled_partial_auc,
    pooled_unpaired_delong_test,
    roc_from_histograms,
    site_histograms,
    site_placement_sums,
)
from tests.conftest import REFERENCE

SP, SE = "specificity", "sensitivity"


@pytest.fixture(scope="module")
def asah() -> pd.DataFrame:
    path = REFERENCE / "aSAH.csv"
    assert path.exists(), f"{path} missing: clone beside shared/ or set HCC_FL_REFERENCE_DATA"
    d = pd.read_csv(path)
    d["y"] = (d["outcome"] == "Poor").astype(int)
    return d


# ---------------------------------------------------------------- pROC: partial AUC
# tests/testthat/test-auc.R: auc(r.<marker>, partial.auc = limits, partial.auc.focus = focus,
# partial.auc.correct = correct), expectations printed to 15 significant digits.
PAUC_REFERENCE = [
    # marker, limits, focus, correct, expected, test-auc.R line
    ("wfns", (1, .9), SP, False, 0.0334417344173442, 16),
    ("wfns", (.9, 1), SP, False, 0.0334417344173442, 19),
    ("wfns", (.9, .8), SP, False, 0.0598373983739837, 23),
    ("wfns", (.5, 0), SP, False, 0.488134475939354, 25),
    ("ndka", (1, .9), SP, False, 0.0107046070460705, 29),
    ("ndka", (.9, .8), SP, False, 0.0277777777777778, 36),
    ("ndka", (.5, 0), SP, False, 0.416836043360434, 38),
    ("wfns", (1, 0), SP, False, 0.823678861788618, 42),
    ("ndka", (1, 0), SP, False, 0.611957994579946, 45),
    ("wfns", (1, .9), SE, False, 0.0400999322493225, 51),
    ("wfns", (.9, .8), SE, False, 0.0609953703703703, 58),
    ("wfns", (.5, 0), SE, False, 0.483358739837398, 60),
    ("ndka", (1, .9), SE, False, 0.0037940379403794, 64),
    ("ndka", (.9, 1), SE, False, 0.0037940379403794, 67),
    ("ndka", (.9, .8), SE, False, 0.0242547425474255, 71),
    ("ndka", (.5, 0), SE, False, 0.428523035230352, 73),
    ("wfns", (1, 0), SE, False, 0.823678861788618, 77),
    ("wfns", (1, .9), SP, True, 0.649693339038653, 86),
    ("wfns", (.9, 1), SP, True, 0.649693339038653, 89),
    ("wfns", (.9, .8), SP, True, 0.763749402199904, 93),
    ("wfns", (.5, 0), SP, True, 0.952537903757416, 95),
    ("ndka", (1, .9), SP, True, 0.530024247610897, 99),
    ("ndka", (.9, .8), SP, True, 0.575163398692811, 106),
    ("ndka", (.5, 0), SP, True, 0.667344173441734, 108),
    ("wfns", (1, 0), SP, True, 0.823678861788618, 112),
    ("wfns", (1, .9), SE, True, 0.68473648552275, 121),
    ("wfns", (.9, .8), SE, True, 0.770561002178649, 128),
    ("wfns", (.5, 0), SE, True, 0.933434959349593, 130),
    ("ndka", (.9, .8), SE, True, 0.554439662043679, 145),
    ("ndka", (.5, 0), SE, True, 0.714092140921409, 147),
    ("ndka", (1, 0), SE, True, 0.611957994579946, 154),
]


@pytest.mark.parametrize(("marker", "limits", "focus", "correct", "expected", "line"),
                         PAUC_REFERENCE)
def test_partial_auc_matches_proc_test_auc(asah: pd.DataFrame, marker: str,
                                           limits: tuple[float, float], focus: str,
                                           correct: bool, expected: float, line: int) -> None:
    got = partial_auc(asah["y"], asah[marker], limits, focus, correct)
    assert got == pytest.approx(expected, abs=1e-12), f"test-auc.R L{line}"


def test_partial_auc_below_diagonal_has_no_correction(asah: pd.DataFrame) -> None:
    # test-auc.R L134-141: ndka, c(1, .9) (either order), focus "se", correct: NA with a warning.
    for limits in [(1.0, 0.9), (0.9, 1.0)]:
        with pytest.warns(RuntimeWarning, match="below the diagonal"):
            assert math.isnan(partial_auc(asah["y"], asah["ndka"], limits, SE, correct=True))
    # ...while the uncorrected value exists (L64) and is below the diagonal's 0.0095.
    raw = partial_auc(asah["y"], asah["ndka"], (1.0, 0.9), SE)
    assert raw < (0.0 + 0.1) / 2 * 0.1


def test_partial_auc_matches_proc_printed_s100b(asah: pd.DataFrame) -> None:
    # tests/testthat/print_output/r.s100b.partial1 L6 (specificity 0.99-0.9): 0.02983;
    # r.wfns.partial1 L6: 0.03305; r.ndka.partial1 L6: 0.01046; r.s100b.partial2 L6
    # (sensitivity 0.99-0.9): 0.01376 (also test-print.R L10-12). Four significant digits.
    y = asah["y"]
    assert partial_auc(y, asah["s100b"], (0.9, 0.99)) == pytest.approx(0.02983, abs=5e-6)
    assert partial_auc(y, asah["wfns"], (0.9, 0.99)) == pytest.approx(0.03305, abs=5e-6)
    assert partial_auc(y, asah["ndka"], (0.9, 0.99)) == pytest.approx(0.01046, abs=5e-6)
    assert partial_auc(y, asah["s100b"], (0.9, 0.99), SE) == pytest.approx(0.01376, abs=5e-6)


# ---------------------------------------------------------------- pROC: unpaired DeLong
# tests/testthat/test-roc.test.R L70-90: roc.test(r.a, r.b, paired = FALSE); D and two-sided p.
UNPAIRED_REFERENCE = [
    ("wfns", "s100b", 1.43490640926908, 0.152825378808796, "L72, L78-79"),
    ("wfns", "ndka", 3.10125096778969, 0.00220950791756457, "L73, L83-84"),
    ("ndka", "s100b", -1.55995743389685, 0.120192832430845, "L74, L88-89"),
]


@pytest.mark.parametrize(("a", "b", "d", "p", "where"), UNPAIRED_REFERENCE)
def test_unpaired_delong_matches_proc_roc_test(asah: pd.DataFrame, a: str, b: str, d: float,
                                               p: float, where: str) -> None:
    y = asah["y"]
    t = delong_unpaired_test(y, asah[a], y, asah[b])
    assert t.statistic == pytest.approx(d, abs=1e-12), where
    assert t.p_value == pytest.approx(p, abs=1e-12), where
    # L94-105: the curves swapped give -D and the same p.
    r = delong_unpaired_test(y, asah[b], y, asah[a])
    assert r.statistic == pytest.approx(-d, abs=1e-12)
    assert r.p_value == pytest.approx(p, abs=1e-12)
    assert r.df == pytest.approx(t.df, abs=1e-9)


def test_unpaired_delong_one_sided_matches_proc(asah: pd.DataFrame) -> None:
    # test-roc.test.R L127-135: alternative "greater" 0.076412689404398, "less" 0.923587310595602
    # for roc.test(r.wfns, r.s100b, paired = FALSE); the statistic is unchanged (L131-132).
    y = asah["y"]
    gt = delong_unpaired_test(y, asah["wfns"], y, asah["s100b"], alternative="greater")
    lt = delong_unpaired_test(y, asah["wfns"], y, asah["s100b"], alternative="less")
    assert gt.p_value == pytest.approx(0.076412689404398, abs=1e-12)
    assert lt.p_value == pytest.approx(0.923587310595602, abs=1e-12)
    assert gt.statistic == lt.statistic == pytest.approx(1.43490640926908, abs=1e-12)


def test_unpaired_df_is_welch_satterthwaite_of_proc(asah: pd.DataFrame) -> None:
    # R/delong.R delong.unpaired.test: df = (S_R + S_S)^2 / (S_R^2/(N_R-1) + S_S^2/(N_S-1)),
    # computed here from the two curves' DeLong variances (auc_ci, checked against pROC's var()
    # in test_metrics_reference.py) on different subsets, so the two N differ.
    y, f = asah["y"].to_numpy(), (asah["gender"] == "Female").to_numpy()
    v1 = auc_ci(y[f], asah["s100b"][f]).variance
    v2 = auc_ci(y[~f], asah["wfns"][~f]).variance
    n1, n2 = int(f.sum()), int((~f).sum())
    t = delong_unpaired_test(y[f], asah["s100b"][f], y[~f], asah["wfns"][~f])
    assert t.df == pytest.approx((v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1)),
                                 rel=1e-12)
    assert t.statistic == pytest.approx((t.auc1 - t.auc2) / math.sqrt(v1 + v2), rel=1e-12)


def test_unpaired_ci_agrees_with_its_p_value(asah: pd.DataFrame) -> None:
    # pROC reports no CI for the unpaired test; ours uses the same t distribution, so at
    # level = 1 - p the interval's lower end is exactly 0 (here AUC1 > AUC2).
    y = asah["y"]
    t = delong_unpaired_test(y, asah["wfns"], y, asah["s100b"])
    at_p = delong_unpaired_test(y, asah["wfns"], y, asah["s100b"], level=1 - t.p_value)
    assert at_p.ci_diff[0] == pytest.approx(0.0, abs=1e-12)
    assert t.ci_diff[0] < 0 < t.ci_diff[1]  # p = 0.15 > 0.05
    assert sum(t.ci_diff) / 2 == pytest.approx(t.auc1 - t.auc2, abs=1e-15)


def test_unpaired_and_paired_delong_differ_on_the_same_curves(asah: pd.DataFrame) -> None:
    # The paired test uses the covariance of the two curves (positive here), so it is sharper:
    # pROC test-roc.test.R L28-31 (paired p 0.0272) vs L78-79 (unpaired p 0.1528).
    y = asah["y"]
    paired = delong_test(y, asah["wfns"], asah["s100b"])
    unpaired = delong_unpaired_test(y, asah["wfns"], y, asah["s100b"])
    assert paired.auc_a == pytest.approx(unpaired.auc1, abs=1e-15)
    assert paired.p_value < 0.05 < unpaired.p_value
    assert abs(paired.z - unpaired.statistic) > 0.5


# ---------------------------------------------------------------- properties
def test_partial_areas_add_up_to_the_auc(asah: pd.DataFrame) -> None:
    y = asah["y"]
    for marker in ("wfns", "s100b", "ndka"):
        auc = auc_ci(y, asah[marker]).auc
        for focus in (SP, SE):
            parts = [partial_auc(y, asah[marker], lim, focus)
                     for lim in [(1, .93), (.93, .5), (.5, .137), (.137, 0)]]
            assert sum(parts) == pytest.approx(auc, abs=1e-14), (marker, focus)


def test_partial_auc_correction_bounds() -> None:
    # perfect curve -> 1, diagonal -> 0.5 (McClish), for both foci and any band.
    for focus in (SP, SE):
        for lim in [(1, .9), (.7, .2)]:
            assert partial_auc([0, 0, 1, 1], [.1, .2, .8, .9], lim, focus, True) == 1.0
            assert partial_auc_from_roc([0, 1], [0, 1], lim, focus, True) == pytest.approx(0.5)


# ---------------------------------------------------------------- refusals
def test_bad_inputs_raise(asah: pd.DataFrame) -> None:
    y, s = asah["y"], asah["s100b"]
    with pytest.raises(ValueError, match="case and one control"):
        partial_auc(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        partial_auc(y, s, (1.1, 0.8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        partial_auc(y, s, (0.5, -0.1))
    with pytest.raises(ValueError, match="different"):
        partial_auc(y, s, (0.8, 0.8))
    with pytest.raises(ValueError, match="unknown focus"):
        partial_auc(y, s, (1.0, 0.8), focus="ppv")
    with pytest.raises(ValueError, match="non-decreasing"):
        partial_auc_from_roc([0, 0.5, 0.4, 1], [0, 0.5, 0.6, 1])
    with pytest.raises(ValueError, match="two cases and two controls"):
        delong_unpaired_test([0, 0, 1], [.1, .2, .3], y, s)
    with pytest.raises(ValueError, match="two cases and two controls"):
        delong_unpaired_test(y, s, np.zeros(6), np.arange(6.0))
    with pytest.raises(ValueError, match="unknown alternative"):
        delong_unpaired_test(y, s, y, s, alternative="two-sided")
    with pytest.raises(ValueError, match="level"):
        delong_unpaired_test(y, s, y, s, level=95)
    grid = ScoreGrid(100, 0.0, 2.5)
    pos, neg = site_histograms(y, s, grid)
    with pytest.raises(ValueError, match="case and one control"):
        pooled_partial_auc(np.zeros_like(pos), neg)
    one = site_placement_sums(y[:3], s[:3], (pos, neg), grid)
    full = site_placement_sums(y, s, (pos, neg), grid)
    with pytest.raises(ValueError, match="two cases and two controls"):
        pooled_unpaired_delong_test(one, full)


def test_perfect_separation_in_both_cohorts() -> None:
    # Both DeLong variances 0: no t distribution; a difference is infinitely significant.
    perfect = DeLongSummary(1.0, 0.0, 0.0, 5, 5)
    same = delong_unpaired_from_summaries(perfect, perfect)
    assert (same.statistic, same.p_value) == (0.0, 1.0)
    worse = delong_unpaired_from_summaries(perfect, DeLongSummary(0.5, 0.0, 0.0, 5, 5))
    assert worse.statistic == math.inf and worse.p_value == 0.0
    assert math.isnan(worse.df)
    # all scores tied in both cohorts: both AUCs 1/2, but the central 38 x 5 one is computed as
    # 0.5 + 4.4e-16 (midranks); that is rounding, not an infinitely significant difference.
    tied = delong_unpaired_test(np.r_[np.ones(38), np.zeros(5)], np.full(43, 0.5),
                                [1, 1, 0, 0], [0.5] * 4)
    assert (tied.statistic, tied.p_value) == (0.0, 1.0)
    # perfectly separated in both cohorts, central and pooled
    y1, s1 = np.array([0, 0, 0, 1, 1, 1]), np.array([.11, .12, .13, .71, .72, .73])
    y2, s2 = np.array([0, 0, 0, 0, 1, 1, 1]), np.array([.2, .25, .3, .31, .8, .81, .9])
    central = delong_unpaired_test(y1, s1, y2, s2)
    grid = ScoreGrid(100)
    pooled = pooled_unpaired_delong_test(_cohort_sums(y1, s1, grid, [np.arange(6)])[2],
                                         _cohort_sums(y2, s2, grid, [np.arange(7)])[2])
    for t in (central, pooled):
        assert (t.auc1, t.auc2, t.statistic, t.p_value, t.ci_diff) == (1.0, 1.0, 0.0, 1.0,
                                                                        (0.0, 0.0))


# ---------------------------------------------------------------- pooled = central
def _cohort_sums(y: np.ndarray, s: np.ndarray, grid: ScoreGrid, parts: list[np.ndarray],
                 ) -> tuple[np.ndarray, np.ndarray, PlacementSums]:
    """Pass 1 (histograms summed over the cohort's sites) and pass 2 (placement sums)."""
    hists = [site_histograms(y[p], s[p], grid) for p in parts]
    pooled = (sum(h[0] for h in hists), sum(h[1] for h in hists))
    sums = reduce(lambda u, v: u + v,
                  [site_placement_sums(y[p], s[p], pooled, grid) for p in parts])
    return pooled[0], pooled[1], sums


def _split(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


# Grids on which aSAH's distinct values (2 decimals) never share a bin.
GRIDS = {"s100b": ScoreGrid(10_000, 0.0, 2.5), "wfns": ScoreGrid(10_000, 0.0, 5.0),
         "ndka": ScoreGrid(100_000, 0.0, 500.0)}


@settings(deadline=None, max_examples=15)
@given(k=st.integers(2, 5), seed=st.integers(0, 2**32 - 1),
       marker=st.sampled_from(sorted(GRIDS)),
       limits=st.sampled_from([(1.0, 0.9), (0.9, 0.8), (0.99, 0.9), (0.5, 0.0), (0.73, 0.31)]),
       focus=st.sampled_from([SP, SE]), correct=st.booleans())
def test_pooled_partial_auc_equals_central_on_asah(asah: pd.DataFrame, k: int, seed: int,
                                                   marker: str, limits: tuple[float, float],
                                                   focus: str, correct: bool) -> None:
    y, s = asah["y"].to_numpy(float), asah[marker].to_numpy(float)
    pos, neg, _ = _cohort_sums(y, s, GRIDS[marker], _split(len(y), k, seed))
    with warnings.catch_warnings():  # ndka's sensitivity-focused band (1, .9) has no correction
        warnings.simplefilter("ignore", RuntimeWarning)
        central = partial_auc(y, s, limits, focus, correct)
        pooled = pooled_partial_auc(pos, neg, limits, focus, correct)
    if math.isnan(central):
        assert math.isnan(pooled)
    else:
        assert pooled == pytest.approx(central, abs=1e-12)


@settings(deadline=None, max_examples=15)
@given(k1=st.integers(2, 5), k2=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
       marker=st.sampled_from(sorted(GRIDS)))
def test_pooled_unpaired_delong_equals_central_on_asah(asah: pd.DataFrame, k1: int, k2: int,
                                                       seed: int, marker: str) -> None:
    # Internal cohort: the women, over k1 sites; "external" cohort: the men, over k2 sites.
    y, s = asah["y"].to_numpy(float), asah[marker].to_numpy(float)
    f = (asah["gender"] == "Female").to_numpy()
    grid = GRIDS[marker]
    _, _, sums1 = _cohort_sums(y[f], s[f], grid, _split(int(f.sum()), k1, seed))
    _, _, sums2 = _cohort_sums(y[~f], s[~f], grid, _split(int((~f).sum()), k2, seed + 1))
    central = delong_unpaired_test(y[f], s[f], y[~f], s[~f])
    pooled = pooled_unpaired_delong_test(sums1, sums2)
    for name in ("auc1", "auc2", "statistic", "df", "p_value"):
        assert getattr(pooled, name) == pytest.approx(getattr(central, name), abs=1e-12), name
    assert pooled.ci_diff == pytest.approx(central.ci_diff, abs=1e-12)


def _cohort(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n_pos, n_neg = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    top = draw(st.sampled_from([15, 9_999]))  # few distinct scores (many ties) or many
    bins = draw(st.lists(st.integers(0, top), min_size=n_pos + n_neg, max_size=n_pos + n_neg))
    # bin centres of ScoreGrid(10_000): 4-decimal-like scores, distinct scores in distinct bins
    scores = (np.asarray(bins, dtype=float) + 0.5) / 10_000
    y = np.concatenate([np.ones(n_pos), np.zeros(n_neg)])
    return y, scores


@st.composite
def _cohorts(draw: st.DrawFn) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    return _cohort(draw), _cohort(draw)


@settings(deadline=None, max_examples=30)
@given(cohorts=_cohorts(), k=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_pooled_unpaired_delong_equals_central_random(
    cohorts: tuple[tuple[np.ndarray, np.ndarray], ...], k: int, seed: int,
) -> None:
    (y1, s1), (y2, s2) = cohorts
    grid = ScoreGrid(10_000)
    pos1, neg1, sums1 = _cohort_sums(y1, s1, grid, _split(len(y1), k, seed))
    _, _, sums2 = _cohort_sums(y2, s2, grid, _split(len(y2), k, seed + 1))
    central = delong_unpaired_test(y1, s1, y2, s2)
    pooled = pooled_unpaired_delong_test(sums1, sums2)
    assert pooled.auc1 == pytest.approx(central.auc1, abs=1e-12)
    assert pooled.auc2 == pytest.approx(central.auc2, abs=1e-12)
    assert pooled.statistic == pytest.approx(central.statistic, abs=1e-12 * max(
        1.0, abs(central.statistic)))
    assert pooled.p_value == pytest.approx(central.p_value, abs=1e-12)
    # the binned ROC curve is the empirical one (its points, empty bins left out)
    fpr_c, tpr_c = roc_points(y1, s1)
    fpr_p, tpr_p = roc_from_histograms(pos1, neg1)
    np.testing.assert_allclose(fpr_p, fpr_c, atol=1e-15)
    np.testing.assert_allclose(tpr_p, tpr_c, atol=1e-15)
    assert partial_auc_from_roc(fpr_p, tpr_p, (1, 0)) == pytest.approx(pooled_auc(pos1, neg1),
                                                                       abs=1e-12)
