"""Pooled statistics equal the central ones to 1e-12 when every value lies on a grid edge.

Scores recorded to 4 decimals on the default 10,000-bin :class:`ScoreGrid` and whole-day times on a
one-bin-per-day :class:`TimeGrid` put distinct values in distinct bins, so the pooled AUC, DeLong
variance and paired test, Brier score, net benefit, Youden classification, Kaplan-Meier and
log-rank must agree with the central (lifelines-based) computation up to rounding of the sums.
Property-based (hypothesis) on random data and random site splits, then deterministic on natural
data (lifelines' lung and Rossi, scikit-learn's breast-cancer symmetry features) across 1,000
random splits each, then unit tests of the exact edges themselves.

The old binning (``floor((x - lo) / (hi - lo) * n)``) fails the unit tests (e.g. 0.0003 went to bin
2 of ``ScoreGrid(10_000)``, day 3 to bin 2 of ``TimeGrid(365, 365)``) and, through the shared bins,
the statistics here.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from lifelines.datasets import load_lung, load_rossi
from scipy import stats
from sklearn.datasets import load_breast_cancer

from hcc_fl.shared.metrics import (
    DeLongTest,
    auc_ci,
    calibration,
    delong_test,
    kaplan_meier,
    logrank,
    net_benefit,
    youden_threshold,
)
from hcc_fl.shared.metrics.pooled import (
    PlacementSums,
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

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
GRID = ScoreGrid(10_000)
TOL = 1e-12
SETTINGS = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
Z95 = float(stats.norm.ppf(0.975))


# ----------------------------------------------------------------------------- helpers
def _test_entries(t: DeLongTest) -> dict[str, float]:
    """The paired test's numbers. Its CI is compared as (centre, variance): the half-width is
    1.96 sqrt(var) and sqrt turns a rounding error of 1e-18 in a variance near 0 (two nearly
    equal models) into 1e-9, so the half-width itself is not a 1e-12 quantity."""
    lo, hi = t.ci_diff
    return {"auc_b": t.auc_b, "z": t.z, "p": t.p_value, "diff": (lo + hi) / 2,
            "var_diff": ((hi - lo) / (2 * Z95)) ** 2, "cov": t.covariance}


def _diffs(pooled: dict[str, float], central: dict[str, float]) -> dict[str, float]:
    """Absolute difference per statistic (relative for |value| > 1, e.g. a z or chi-square)."""
    return {k: abs(pooled[k] - central[k]) / max(1.0, abs(central[k])) for k in central}


def _score_stats(y: F64, a: F64, b: F64, site: I64, k: int, pts: F64
                 ) -> tuple[dict[str, float], tuple[F64, F64]]:
    """Every pooled score statistic from the sums of ``k`` sites (site label per patient)."""
    parts = [np.nonzero(site == j)[0] for j in range(k)]
    ha = [site_histograms(y[p], a[p], GRID) for p in parts]
    hb = [site_histograms(y[p], b[p], GRID) for p in parts]
    pa = (np.sum([h[0] for h in ha], axis=0), np.sum([h[1] for h in ha], axis=0))
    pb = (np.sum([h[0] for h in hb], axis=0), np.sum([h[1] for h in hb], axis=0))
    sums = PlacementSums(np.zeros(6), np.zeros(6))
    for p in parts:
        sums = sums + site_placement_sums(y[p], a[p], pa, GRID, b[p], pb)
    ci = pooled_auc_ci(sums)
    test = pooled_delong_test(sums)
    cal = pooled_calibration(np.sum([site_calibration_sums(y[p], a[p]) for p in parts], axis=0))
    out = {"auc": pooled_auc(*pa), "auc_pass2": ci.auc, "var": ci.variance, "lower": ci.lower,
           "upper": ci.upper, **_test_entries(test), "brier": cal.brier,
           "scaled_brier": cal.scaled_brier}
    for i, v in enumerate(pooled_net_benefit(*pa, GRID, pts)):
        out[f"nb{i}"] = float(v)
    return out, pa


def _central_scores(y: F64, a: F64, b: F64, pts: F64) -> dict[str, float]:
    ci = auc_ci(y, a)
    test = delong_test(y, a, b)
    cal = calibration(y, a)
    out = {"auc": ci.auc, "auc_pass2": ci.auc, "var": ci.variance, "lower": ci.lower,
           "upper": ci.upper, **_test_entries(test), "brier": cal.brier,
           "scaled_brier": cal.scaled_brier}
    for i, v in enumerate(net_benefit(y, a, pts).model):
        out[f"nb{i}"] = v
    return out


def _check_youden(y: F64, a: F64, thr_pooled: float) -> None:
    """The pooled Youden threshold (a grid edge) and the central one (a midpoint) classify the
    patients alike; where several cut-offs reach the maximal J exactly (integer arithmetic), both
    must reach it and pick the lowest such cut-off."""
    thr_central = youden_threshold(y, a)
    pos, neg = a[y == 1], a[y == 0]

    def counts(t: float) -> tuple[int, int]:
        return int(np.sum(pos >= t)), int(np.sum(neg < t))

    # J * n_pos * n_neg as an exact integer for every distinct cut-off (plus "nobody positive")
    cuts = [*np.unique(a), np.inf]
    j_int = [tp * len(neg) + tn * len(pos) for tp, tn in map(counts, cuts)]
    best = max(j_int)
    tp_p, tn_p = counts(thr_pooled)
    tp_c, tn_c = counts(thr_central)
    assert tp_p * len(neg) + tn_p * len(pos) == best
    assert tp_c * len(neg) + tn_c * len(pos) == best
    if j_int.count(best) == 1 or (tp_c, tn_c) == counts(cuts[j_int.index(best)]):
        assert (tp_p, tn_p) == (tp_c, tn_c), (thr_pooled, thr_central)


def _survival(time: F64, event: F64, group: I64, site: I64, k: int, grid: TimeGrid
              ) -> tuple[F64, tuple[tuple[float, ...], ...], float, float]:
    groups = sorted(set(group.tolist()))
    counts = np.zeros((len(groups), 2, grid.n_bins))
    for j in range(k):
        m = site == j
        counts += site_survival_counts(time[m], event[m], group[m], groups, grid)
    res = pooled_survival(counts, grid)
    return np.asarray(res.times), res.survival, res.statistic, res.p_value


def _survival_diffs(time: F64, event: F64, group: I64, site: I64, k: int, grid: TimeGrid
                    ) -> float:
    """Largest difference pooled vs central: KM of every group at every event time, log-rank
    statistic (relative) and p-value. Pooled times must be the data's event times exactly."""
    times, surv, stat, p = _survival(time, event, group, site, k, grid)
    assert np.array_equal(times, np.unique(time[event == 1]))
    worst = 0.0
    for gi, gname in enumerate(sorted(set(group.tolist()))):
        km = kaplan_meier(time[group == gname], event[group == gname])
        central = np.array([km.at(t) for t in times])
        worst = max(worst, float(np.max(np.abs(np.asarray(surv[gi]) - central))))
    lr = logrank(time, event, group)
    worst = max(worst, abs(stat - lr.statistic) / max(1.0, abs(lr.statistic)),
                abs(p - lr.p_value))
    return worst


# ----------------------------------------------------------------------------- property-based
@st.composite
def _scored(draw: st.DrawFn) -> tuple[F64, F64, F64, I64, int]:
    """Labels, two 4-decimal score vectors, and a random split over 2-6 sites.

    0.9999 is left out: the last bin is closed ([0.9999, 1]), so 0.9999 and 1.0 share it (the
    one pair of distinct 4-decimal scores that does); 1.0 itself is drawn.
    """
    n = draw(st.integers(4, 60))
    ints = st.integers(0, 10_000).filter(lambda i: i != 9_999)
    a = np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=np.int64) / 10_000
    b = np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=np.int64) / 10_000
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.float64)
    assume(2 <= y.sum() <= n - 2)
    k = draw(st.integers(2, 6))
    site = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    return y, a, b, site, k


@SETTINGS
@given(_scored())
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # central logistic fit
def test_pooled_scores_equal_central_on_four_decimal_scores(
    data: tuple[F64, F64, F64, I64, int],
) -> None:
    y, a, b, site, k = data
    inner = np.unique(a[(a > 0) & (a < 1)])
    pts = inner[:: max(1, len(inner) // 5)][:5]  # some of the scores as thresholds
    pooled, pa = _score_stats(y, a, b, site, k, pts)
    central = _central_scores(y, a, b, pts)
    diffs = _diffs(pooled, central)
    assert max(diffs.values()) <= TOL, diffs
    _check_youden(y, a, youden_from_histograms(*pa, GRID))


@st.composite
def _survival_data(draw: st.DrawFn) -> tuple[F64, F64, I64, I64, int, int]:
    """Whole-day times 0..1000 with events, 2-3 groups, 2-6 sites, and a one-bin-per-day grid
    reaching past the last time (t_max drawn, so many grids are tried)."""
    n = draw(st.integers(4, 80))
    time = np.array(draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n)), np.float64)
    event = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), np.float64)
    n_groups = draw(st.integers(2, 3))
    group = np.array(draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n)))
    assume(len(set(group.tolist())) == n_groups and event.sum() >= 1)
    k = draw(st.integers(2, 6))
    site = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    t_max = draw(st.integers(int(time.max()) + 1, int(time.max()) + 400))
    return time, event, group, site, k, t_max


@SETTINGS
@given(_survival_data())
def test_pooled_km_and_logrank_equal_central_on_whole_days(
    data: tuple[F64, F64, I64, I64, int, int],
) -> None:
    time, event, group, site, k, t_max = data
    lr = logrank(time, event, group)
    # a log-rank test needs variance: two groups sharing a risk set at an event time
    assume(np.isfinite(lr.statistic) and lr.statistic > 0)
    assert _survival_diffs(time, event, group, site, k, TimeGrid(t_max, t_max)) <= TOL


# ----------------------------------------------------------------------------- natural data
def _random_splits(n: int, count: int, seed: int) -> list[tuple[I64, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        k = int(rng.integers(2, 7))
        out.append((rng.integers(0, k, n), k))
    return out


def test_survival_on_lung_and_rossi_across_1000_splits() -> None:
    """lifelines' lung (days 5..1022, death, by sex; one bin per day up to 1100) and Rossi
    (weeks 1..52, arrest, by financial aid; one bin per week up to 53): pooled KM and log-rank
    equal lifelines' to 1e-12 for each of 1,000 random splits over 2-6 sites."""
    lung, rossi = load_lung(), load_rossi()
    cases = [
        (lung["time"].to_numpy(float), lung["status"].to_numpy(float),
         lung["sex"].to_numpy(np.int64), TimeGrid(1100, 1100)),
        (rossi["week"].to_numpy(float), rossi["arrest"].to_numpy(float),
         rossi["fin"].to_numpy(np.int64), TimeGrid(53, 53)),
    ]
    for time, event, group, grid in cases:
        # central once; pooled per split (counts are integers, so every split sums alike)
        groups = sorted(set(group.tolist()))
        lr = logrank(time, event, group)
        event_times = np.unique(time[event == 1])
        central = np.array([[km.at(t) for t in event_times] for km in
                            (kaplan_meier(time[group == g], event[group == g]) for g in groups)])
        worst = 0.0
        for site, k in _random_splits(len(time), 1000, 7):
            times, surv, stat, p = _survival(time, event, group, site, k, grid)
            assert np.array_equal(times, event_times)
            worst = max(worst, float(np.max(np.abs(np.asarray(surv) - central))))
            worst = max(worst, abs(stat - lr.statistic) / max(1.0, lr.statistic),
                        abs(p - lr.p_value))
        assert worst <= TOL, (grid, worst)


def test_scores_on_breast_cancer_symmetry_across_1000_splits() -> None:
    """scikit-learn's Wisconsin breast cancer data (569 patients): 'worst symmetry' (4 decimals,
    0.1565..0.6638) and 'mean symmetry' as two scores for malignancy; every pooled score
    statistic equals the central one to 1e-12 for each of 1,000 random splits over 2-6 sites."""
    d = load_breast_cancer(as_frame=True).frame
    y = (d["target"] == 0).to_numpy(np.float64)  # 0 = malignant in scikit-learn's coding
    a = d["worst symmetry"].to_numpy(np.float64)
    b = d["mean symmetry"].to_numpy(np.float64)
    assert np.array_equal(np.round(a, 4), a) and np.array_equal(np.round(b, 4), b)
    # thresholds: scores of some patients, and two round numbers
    pts = np.concatenate([np.unique(a)[[50, 150, 250, 350, 450]], [0.2, 0.3]])
    central = _central_scores(y, a, b, pts)
    worst: dict[str, float] = {}
    for site, k in _random_splits(len(y), 1000, 11):
        pooled, pa = _score_stats(y, a, b, site, k, pts)
        for key, v in _diffs(pooled, central).items():
            worst[key] = max(worst.get(key, 0.0), v)
    assert max(worst.values()) <= TOL, worst
    _check_youden(y, a, youden_from_histograms(*pa, GRID))


# ----------------------------------------------------------------------------- exact edges
def test_score_grid_edges_are_the_four_decimal_literals() -> None:
    i = np.arange(10_001)
    decimals = np.array([float(f"{k / 10_000:.4f}") for k in i])  # the literals 0.0000..1.0000
    assert np.array_equal(GRID.edges, decimals)
    assert GRID.edges[4567] == 0.4567
    assert np.array_equal(GRID.index(decimals), np.minimum(i, 9_999))
    assert GRID.index([0.4567])[0] == 4567


def test_time_grids_put_whole_days_and_tenths_in_their_own_bins() -> None:
    days = TimeGrid(365, 365)
    assert np.array_equal(days.edges, np.arange(366.0))
    assert np.array_equal(days.times, np.arange(365.0))
    assert np.array_equal(days.index(np.arange(366.0)), np.minimum(np.arange(366), 364))
    assert days.index([3.0, 400.0]).tolist() == [3, 364]  # beyond t_max: the last bin
    tenths = TimeGrid(730, 7300)
    literals = np.array([float(f"{k / 10:.1f}") for k in range(7301)])
    assert np.array_equal(tenths.edges, literals)
    assert tenths.edges[123] == 12.3
    assert np.array_equal(tenths.index(literals), np.minimum(np.arange(7301), 7299))


@pytest.mark.parametrize("grid", [ScoreGrid(10_000), ScoreGrid(1_000, 0.0, 2.5),
                                  ScoreGrid(7, -1.5, 3.25), ScoreGrid(1_000, 0.1, 0.7)])
def test_edges_are_the_correctly_rounded_rationals(grid: ScoreGrid) -> None:
    lo, hi, n = Fraction(grid.lo), Fraction(grid.hi), grid.n_bins
    exact = [float(lo + (hi - lo) * Fraction(k, n)) for k in range(n + 1)]
    assert grid.edges.tolist() == exact
    assert grid.edges[0] == grid.lo and grid.edges[-1] == grid.hi
    assert np.array_equal(grid.index(grid.edges), np.minimum(np.arange(n + 1), n - 1))


def test_a_value_just_below_an_edge_goes_to_the_bin_below() -> None:
    k = np.arange(1, 10_001)
    below = np.nextafter(GRID.edges[1:], -np.inf)
    assert np.array_equal(GRID.index(below), k - 1)
    above = np.nextafter(GRID.edges[:-1], np.inf)
    assert np.array_equal(GRID.index(above), k - 1)
    days = TimeGrid(365, 365)
    assert np.array_equal(days.index(np.nextafter(days.edges[1:], -np.inf)), np.arange(365))


def test_net_benefit_thresholds_must_be_exact_edges() -> None:
    y = np.array([1.0, 0.0, 1.0, 0.0])
    s = np.array([0.3, 0.3, 0.7, 0.1])
    pos, neg = site_histograms(y, s, GRID)
    assert pooled_net_benefit(pos, neg, GRID, [0.3])[0] == net_benefit(y, s, [0.3]).model[0]
    with pytest.raises(ValueError, match="not an edge"):
        pooled_net_benefit(pos, neg, GRID, [0.1 * 3])  # 0.30000000000000004
    with pytest.raises(ValueError, match="not an edge"):
        pooled_net_benefit(pos, neg, GRID, [0.30005])


def test_grids_refuse_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least one bin"):
        _ = ScoreGrid(0).edges
    with pytest.raises(ValueError, match="lo < hi"):
        _ = ScoreGrid(10, 1.0, 0.0).edges
    with pytest.raises(ValueError, match="finer than float64"):
        _ = ScoreGrid(10, 1.0, float(np.nextafter(1.0, 2.0))).edges
    with pytest.raises(ValueError, match="lie in"):
        GRID.index([1.0 + 1e-12])
    with pytest.raises(ValueError, match="finite and >= 0"):
        TimeGrid(10, 10).index([-1.0])
