"""Statistics against outputs nobody here wrote: R packages' tests and documentation, scipy,
scikit-learn. Each test cites where its reference numbers come from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_lung, load_lymphoma, load_rossi
from scipy import stats
from sklearn.metrics import brier_score_loss, f1_score

from hcc_fl.shared.cox import cox_site_sums
from hcc_fl.shared.metrics import (
    auc_ci,
    binary_metrics,
    c_index,
    calibration,
    cox_fit,
    delong_test,
    dice,
    hosmer_lemeshow,
    kaplan_meier,
    logrank,
    net_benefit,
    net_benefit_survival,
    wilson_interval,
)
from hcc_fl.shared.metrics.classification import _logistic_fit
from tests.conftest import REFERENCE


def _csv(name: str) -> pd.DataFrame:
    path = REFERENCE / name
    assert path.exists(), f"{path} missing: clone beside shared/ or set HCC_FL_REFERENCE_DATA"
    return pd.read_csv(path)


@pytest.fixture(scope="module")
def asah() -> pd.DataFrame:
    d = _csv("aSAH.csv")
    d["y"] = (d["outcome"] == "Poor").astype(int)
    return d


# ---------------------------------------------------------------- pROC (xrobin/pROC @ ee2877e8)
def test_delong_variance_and_covariance_match_proc_tests(asah: pd.DataFrame) -> None:
    # tests/testthat/test-var.R L6-8 and test-cov.R L5 (curves from helper-rocs.R).
    assert auc_ci(asah["y"], asah["wfns"]).variance == pytest.approx(0.00146991470882363,
                                                                     abs=1e-15)
    assert auc_ci(asah["y"], asah["s100b"]).variance == pytest.approx(0.00266868245717244,
                                                                      abs=1e-15)
    assert auc_ci(asah["y"], asah["ndka"]).variance == pytest.approx(0.0031908105493913,
                                                                     abs=1e-15)
    t = delong_test(asah["y"], asah["s100b"], asah["wfns"])
    assert t.covariance == pytest.approx(0.00119615567376754, abs=1e-15)
    t2 = delong_test(asah["y"], asah["wfns"], asah["ndka"])
    assert t2.covariance == pytest.approx(-0.000532967856762438, abs=1e-15)


def test_delong_test_matches_proc_roc_test(asah: pd.DataFrame) -> None:
    # tests/testthat/test-roc.test.R L10 and L28-31: roc.test(r.wfns, r.s100b).
    t = delong_test(asah["y"], asah["wfns"], asah["s100b"])
    assert t.z == pytest.approx(2.20898359144091, abs=1e-12)
    assert t.p_value == pytest.approx(0.0271757822291882, abs=1e-12)
    assert t.ci_diff[0] == pytest.approx(0.0104061769564846, abs=1e-12)
    assert t.ci_diff[1] == pytest.approx(0.174214419249478, abs=1e-12)
    # tests/testthat/test-auc.R L7 and helper-roc-expected.R L778.
    assert t.auc_a == pytest.approx(0.823678861788618, abs=1e-14)
    assert t.auc_b == pytest.approx(0.73136856368563685, abs=1e-14)


# ---------------------------------------------------------------- ResourceSelection hoslem.test
def test_hosmer_lemeshow_mtcars() -> None:
    # ResourceSelection R/hoslem.test.R (df = G - 2 since 2023, issue #18). Reference output for
    # glm(am ~ wt + hp, mtcars, binomial), g = 6: "X-squared = 2.3502, df = 4, p-value = 0.6717"
    # (secondary source: Teniola17/modeldiag docs/reference/check_hosmer_lemeshow.md @ 69aaaac4).
    d = _csv("hl_mtcars_am_wt_hp.csv")
    x = np.column_stack([np.ones(len(d)), d["wt"], d["hp"]])
    p = 1 / (1 + np.exp(-x @ _logistic_fit(x, d["am"].to_numpy(float))))
    hl = hosmer_lemeshow(d["am"], p, groups=6)
    assert hl.statistic == pytest.approx(2.3502, abs=5e-5)
    assert hl.df == 4
    assert hl.p_value == pytest.approx(0.6717, abs=5e-5)


# ---------------------------------------------------------------- dcurves (ddsjoberg @ 2362730f)
def test_net_benefit_matches_dcurves_tests() -> None:
    # tests/testthat/test-dca.R L3-13: dca(cancer ~ cancerpredmarker, df_binary) at 0.25:
    # all -0.1466667, none 0, model 0.0640000 (tolerance 1e-5 in dcurves' test).
    d = _csv("dca_df_binary.csv")
    nb = net_benefit(d["cancer"], d["cancerpredmarker"], [0.25])
    assert nb.model[0] == pytest.approx(0.0640000, abs=1e-7)
    assert nb.treat_all[0] == pytest.approx(-0.1466667, abs=1e-7)
    assert nb.treat_none[0] == 0.0
    # L30-36: dca(cancer ~ famhistory, thresholds = 0): all 0.140, none 0, model 0.032. Needs
    # dcurves' epsilon nudge of 0/1 risks (R/dca.r L106-116).
    fam = net_benefit(d["cancer"], d["famhistory"], [0.0])
    assert fam.model[0] == pytest.approx(0.032, abs=1e-12)
    assert fam.treat_all[0] == pytest.approx(0.140, abs=1e-12)


def test_survival_net_benefit_matches_dcurves_tests() -> None:
    # tests/testthat/test-dca.R L39-49: dca(Surv(ttcancer, cancer) ~ cancerpredmarker,
    # df_surv, time = 1) at 0.25: all -0.13695058, none 0, model 0.05695371.
    d = _csv("dca_df_surv.csv")
    nb = net_benefit_survival(d["ttcancer"], d["cancer"], d["cancerpredmarker"], 1.0, [0.25])
    assert nb.model[0] == pytest.approx(0.05695371, abs=1e-8)
    assert nb.treat_all[0] == pytest.approx(-0.13695058, abs=1e-8)


# ---------------------------------------------------------------- R survival via lifelines tests
def test_cox_rossi_matches_r_coxph() -> None:
    # R coxph(Surv(week, arrest) ~ fin+age+race+wexp+mar+paro+prio, Rossi), Efron ties, as
    # quoted in lifelines/tests/test_estimation.py L3971 (coef) and L4492 (se) @ ad023a01.
    rossi = load_rossi()
    cov = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
    res = cox_fit(rossi, "week", "arrest", cov)
    coef = [-0.3794222, -0.0574377, 0.3138998, -0.1497957, -0.4337039, -0.0848711, 0.0914971]
    se = [0.19138, 0.02200, 0.30799, 0.21222, 0.38187, 0.19576, 0.02865]
    for name, c, s in zip(cov, coef, se, strict=True):
        assert res.coef[name] == pytest.approx(c, abs=5e-8), name  # R's 7 printed decimals
        assert res.se[name] == pytest.approx(s, abs=5e-6), name
    assert res.score_norm <= 1e-9
    # R summary(): "Concordance= 0.64 (se = 0.027 )" (two digits printed).
    assert round(res.concordance, 2) == 0.64
    risk = rossi[cov].to_numpy() @ np.array(coef)
    assert c_index(rossi["week"], rossi["arrest"], risk) == pytest.approx(res.concordance,
                                                                         abs=1e-9)


def test_cox_lung_matches_r_to_its_printed_digits() -> None:
    """R survival ``coxph(Surv(time, status) ~ age + sex, data = lung)`` (Efron ties): coef age
    0.01704533, sex -0.51321852 as printed by R (8 decimals) in mthulin/boot.pval, README.md
    (@ db43caf7), section "Cox PH model": ``censboot_summary(model, coef = "raw")``, column
    Estimate (the coxph fit's own coefficients). lifelines' default convergence alone ends
    1.6e-6 off in sex; the Newton polish must reach R's last printed digit and a score of
    max |d l / d beta| <= 1e-9, with SEs and p-values of the returned coefficients.
    lifelines ships the same lung data (228 patients, status recoded 1 = death)."""
    lung = load_lung()
    res = cox_fit(lung, "time", "status", ["age", "sex"])
    ref = {"age": 0.01704533, "sex": -0.51321852}
    for name, c in ref.items():
        assert round(res.coef[name], 8) == c, name
        assert abs(res.coef[name] - c) <= 5e-9, name
    # the score, recomputed here from the returned coefficients, is zero to 1e-9
    beta = np.array([res.coef["age"], res.coef["sex"]])
    g, h, ll = cox_site_sums(beta, lung[["age", "sex"]].to_numpy(float),
                             lung["time"].to_numpy(float), lung["status"].to_numpy(float))
    assert np.max(np.abs(g)) <= 1e-9
    assert res.score_norm == pytest.approx(float(np.max(np.abs(g))), abs=1e-12)
    assert res.log_likelihood == pytest.approx(ll, abs=1e-9)
    se = np.sqrt(np.diag(np.linalg.inv(-h)))
    assert [res.se["age"], res.se["sex"]] == pytest.approx(se, rel=1e-10)
    p = 2 * stats.norm.sf(np.abs(beta / se))
    assert [res.p_value["age"], res.p_value["sex"]] == pytest.approx(p, rel=1e-9)


def test_stratified_cox_rossi_matches_r() -> None:
    # lifelines/tests/test_estimation.py L3988: coxph(... + strata(race)) in R.
    rossi = load_rossi()
    cov = ["fin", "age", "wexp", "mar", "paro", "prio"]
    res = cox_fit(rossi, "week", "arrest", cov, strata=["race"])
    ref = [-0.3788, -0.0576, -0.1427, -0.4388, -0.0858, 0.0922]
    for name, c in zip(cov, ref, strict=True):
        assert res.coef[name] == pytest.approx(c, abs=5e-5), name
    assert res.score_norm <= 1e-9


FREIREICH_6MP = [(6, 1), (6, 1), (6, 1), (6, 0), (7, 1), (9, 0), (10, 1), (10, 0), (11, 0),
                 (13, 1), (16, 1), (17, 0), (19, 0), (20, 0), (22, 1), (23, 1), (25, 0), (32, 0),
                 (32, 0), (34, 0), (35, 0)]
FREIREICH_PLACEBO = [1, 1, 2, 2, 3, 4, 4, 5, 5, 8, 8, 8, 8, 11, 11, 12, 12, 15, 17, 22, 23]


def test_logrank_freireich() -> None:
    # R survdiff on the Freireich 6-MP trial: O/E 9/19.3 (6-MP) and 21/10.7 (placebo),
    # "Chisq= 16.8 on 1 degrees of freedom, p= 4.17e-05" (textbook output, e.g. course notes
    # reproducing R; Freireich et al. 1963).
    t = [x for x, _ in FREIREICH_6MP] + FREIREICH_PLACEBO
    e = [x for _, x in FREIREICH_6MP] + [1] * 21
    g = ["6mp"] * 21 + ["placebo"] * 21
    res = logrank(t, e, g)
    assert res.statistic == pytest.approx(16.8, abs=0.05)
    assert res.df == 1
    assert res.p_value == pytest.approx(4.17e-05, abs=5e-7)
    km = kaplan_meier([x for x, _ in FREIREICH_6MP], [x for _, x in FREIREICH_6MP])
    # Textbook KM for 6-MP (Kaplan & Meier style tables): S(6)=0.857, S(7)=0.807, S(10)=0.753
    assert km.at(6) == pytest.approx(18 / 21, abs=1e-12)
    assert km.at(7) == pytest.approx(18 / 21 * 16 / 17, abs=1e-12)
    assert km.at(10) == pytest.approx(18 / 21 * 16 / 17 * 14 / 15, abs=1e-12)


def test_logrank_small_r_cases_and_lymphoma() -> None:
    # lifelines/tests/test_statistics.py L70-80 and L103-114 (values from R survdiff).
    res = logrank([10, 20, 30, 10, 20, 50], [1] * 6, [1, 1, 1, 0, 0, 0])
    assert res.statistic == pytest.approx(0.254237, abs=1e-6)
    assert res.p_value == pytest.approx(0.614107, abs=1e-6)
    res = logrank([10, 20, 30, 10, 20, 50], [1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0])
    assert res.statistic == pytest.approx(0.384615, abs=1e-6)
    # L83-88: StatsDirect's lymphoma example, 6.70971, p 0.0096.
    ly = load_lymphoma()
    res = logrank(ly["Time"], ly["Censor"], ly["Stage_group"])
    assert res.statistic == pytest.approx(6.70971, abs=1e-5)
    assert res.p_value == pytest.approx(0.0096, abs=5e-5)


# ---------------------------------------------------------------- scipy / scikit-learn / identities
def test_wilson_matches_scipy() -> None:
    for k, n in [(8, 10), (0, 12), (59, 87), (116, 168)]:
        ref = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_binary_metric_cis(asah: pd.DataFrame) -> None:
    m = binary_metrics(asah["y"], asah["s100b"], 0.205, ci="bootstrap", n_boot=500, seed=1)
    n = len(asah)
    for key in ("sensitivity", "specificity", "accuracy"):
        lo, hi = m.ci[key]
        assert lo <= getattr(m, key) <= hi
    lo, hi = m.ci["accuracy"]  # a patient bootstrap puts accuracy bounds on the k/n grid
    assert lo * n == pytest.approx(round(lo * n), abs=1e-9)
    w = binary_metrics(asah["y"], asah["s100b"], 0.205, ci="wilson")
    assert w.ci["sensitivity"] == pytest.approx(wilson_interval(26, 41))


def test_calibration_identities_and_brier() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 2))
    y = (rng.uniform(size=400) < 1 / (1 + np.exp(-(0.3 + x @ [1.0, -0.7])))).astype(float)
    design = np.column_stack([np.ones(400), x])
    p = 1 / (1 + np.exp(-design @ _logistic_fit(design, y)))
    cal = calibration(y, p)
    # an apparent-fit logistic model: slope 1, calibration-in-the-large 0 (exact identities)
    assert cal.slope == pytest.approx(1.0, abs=1e-8)
    assert cal.intercept_in_the_large == pytest.approx(0.0, abs=1e-8)
    assert cal.brier == pytest.approx(brier_score_loss(y, p), abs=1e-15)
    lp = np.log(p / (1 - p))
    halved = calibration(y, 1 / (1 + np.exp(-lp / 2)))
    assert halved.slope == pytest.approx(2.0, abs=1e-8)
    assert sum(b[2] for b in cal.bins) == 400


def test_dice_matches_f1_and_states_empty_rule() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(32, 32)) > 0.5, rng.uniform(size=(32, 32)) > 0.4
    assert dice(a, b) == pytest.approx(f1_score(b.ravel(), a.ravel()), abs=1e-12)
    empty = np.zeros((4, 4), bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, empty, empty=float("nan")) != dice(empty, empty, empty=float("nan"))
    assert dice(empty, ~empty) == 0.0
