"""Federated Cox model (site-stratified Efron partial likelihood), Breslow baseline from summed
site statistics and Harrell's C, checked against lifelines and R coxph."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from lifelines.utils import concordance_index

from hcc_fl.shared.cox import (
    BreslowSums,
    baseline_hazard_sums,
    concordance,
    cox_site_sums,
    federated_cox,
    survival_at,
)

COV = ["age", "meld", "dl"]
TRUE_BETA = np.array([0.03, 0.08, 0.9])
ROSSI_COV = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
# lifelines stops on a Newton decrement < 1e-7 without taking that last step (and damps steps
# by 0.95), which leaves coefficient errors up to ~3e-5 on these data; the same estimator run to
# convergence is the tight reference.
TIGHT = {"precision": 1e-12, "r_precision": 1e-15}


def _sites(seed: int = 0, sizes: tuple[int, ...] = (90, 160, 240)) -> list[pd.DataFrame]:
    """Non-IID sites: own covariate shifts and own Weibull baseline hazard; times in whole days
    (many ties, also between events), administrative censoring at 90 days plus drop-out."""
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(sizes):
        age = rng.normal(50 + 5 * k, 10, n)
        meld = rng.normal(22 - 2 * k, 6, n)
        dl = rng.normal(0.3 * k, 1.0, n)
        X = np.column_stack([age, meld, dl])
        scale, shape = (0.004, 0.02, 0.01)[k], (1.0, 0.7, 1.4)[k]  # H0_k(t) = scale * t**shape
        eta = (X - [50, 22, 0]) @ TRUE_BETA
        t_event = (-np.log(rng.random(n)) / (scale * np.exp(eta))) ** (1 / shape)
        t_cens = np.minimum(rng.uniform(5, 200, n), 90.0)
        time = np.ceil(np.minimum(t_event, t_cens))
        event = (t_event <= t_cens).astype(np.float64)
        df = pd.DataFrame(X, columns=COV).assign(time=time, event=event, site=k)
        out.append(df)
    return out


def _xte(df: pd.DataFrame, cov: list[str] = COV) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return df[cov].to_numpy(), df["time"].to_numpy(), df["event"].to_numpy()


# --------------------------------------------------------------------------- federated = pooled
def test_lifelines_default_is_unpenalised() -> None:
    assert inspect.signature(CoxPHFitter).parameters["penalizer"].default == 0.0
    assert CoxPHFitter().penalizer == 0.0


def test_federated_fit_equals_lifelines_stratified_by_site() -> None:
    sites = _sites()
    pooled = pd.concat(sites, ignore_index=True)
    # the data really have ties, also among events, and different event rates per site
    ev_times = pooled.loc[pooled.event == 1, "time"]
    assert ev_times.duplicated().sum() > 50
    rates = [float(s.event.mean()) for s in sites]
    assert max(rates) - min(rates) > 0.2

    fit = federated_cox([_xte(s) for s in sites], names=COV)
    ref = CoxPHFitter().fit(pooled, "time", "event", strata=["site"], fit_options=TIGHT)
    assert fit.converged
    assert fit.names == tuple(COV)
    assert ref.penalizer == 0.0
    np.testing.assert_allclose(fit.coef, ref.params_[COV].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.se, ref.standard_errors_[COV].to_numpy(), rtol=0, atol=1e-6)
    assert fit.loglik == pytest.approx(ref.log_likelihood_, abs=1e-6)
    default = CoxPHFitter().fit(pooled, "time", "event", strata=["site"])
    np.testing.assert_allclose(fit.coef, default.params_[COV].to_numpy(), rtol=0, atol=1e-4)
    # stratification matters here: the unstratified fit is clearly different
    unstrat = CoxPHFitter().fit(pooled.drop(columns="site"), "time", "event")
    assert np.max(np.abs(unstrat.params_[COV].to_numpy() - fit.coef)) > 1e-3


def test_rossi_single_site_matches_lifelines_and_r() -> None:
    rossi = load_rossi()
    fit = federated_cox([(rossi[ROSSI_COV], rossi["week"], rossi["arrest"])], names=ROSSI_COV)
    ref = CoxPHFitter().fit(rossi, "week", "arrest")
    np.testing.assert_allclose(fit.coef, ref.params_[ROSSI_COV].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        fit.se, ref.standard_errors_[ROSSI_COV].to_numpy(), rtol=0, atol=1e-6
    )
    assert fit.loglik == pytest.approx(ref.log_likelihood_, abs=1e-6)
    # R: coxph(Surv(week, arrest) ~ fin + age + race + wexp + mar + paro + prio, data = rossi),
    # Efron ties, as quoted in lifelines/tests/test_estimation.py L3971 (coef, 7 decimals) and
    # L4492 (se, summary() output) @ ad023a01 (Fox & Weisberg, Cox regression appendix).
    r_coef = [-0.3794222, -0.0574377, 0.3138998, -0.1497957, -0.4337039, -0.0848711, 0.0914971]
    r_se = [0.19138, 0.02200, 0.30799, 0.21222, 0.38187, 0.19576, 0.02865]
    np.testing.assert_allclose(fit.coef, r_coef, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fit.coef, r_coef, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.se, r_se, rtol=0, atol=5e-6)
    assert fit.as_dict()["prio"] == pytest.approx(0.0914971, abs=1e-6)


def test_gradient_zero_at_fit_and_objective_monotone() -> None:
    sites = [_xte(s) for s in _sites(seed=4)]
    fit = federated_cox(sites)
    sums = [cox_site_sums(fit.coef, *s) for s in sites]
    total_grad = np.sum([g for g, _, _ in sums], axis=0)
    site_grads = np.array([g for g, _, _ in sums])
    start_grad = np.sum([cox_site_sums(np.zeros(3), *s)[0] for s in sites], axis=0)
    assert np.max(np.abs(total_grad)) < 1e-6
    assert np.max(np.abs(total_grad)) < 1e-9 * np.max(np.abs(start_grad))
    assert np.max(np.abs(total_grad) * fit.se) < 1e-8  # remaining Newton step, in SEs
    assert np.max(np.abs(site_grads)) > 1e-3  # zero only summed: the sites differ
    hist = np.array(fit.objective_history)
    assert hist.size == fit.iterations + 1 >= 3
    assert np.all(np.diff(hist) >= 0)
    assert hist[-1] - hist[0] > 1.0
    assert hist[0] == pytest.approx(sum(cox_site_sums(np.zeros(3), *s)[2] for s in sites))
    assert hist[-1] == pytest.approx(fit.loglik, abs=1e-12)
    assert fit.loglik == pytest.approx(sum(lk for _, _, lk in sums), abs=1e-9)


def test_step_halving_keeps_objective_monotone() -> None:
    # heavy-tailed covariates: the first full Newton step from zero overshoots
    rng = np.random.default_rng(1)
    X = rng.standard_cauchy(size=(30, 2))
    time = rng.exponential(size=30)
    event = (rng.random(30) < 0.7).astype(np.float64)
    fit = federated_cox([(X, time, event)])
    assert fit.step_halvings >= 1
    assert fit.converged
    assert np.all(np.diff(fit.objective_history) >= 0)
    df = pd.DataFrame(X, columns=["a", "b"]).assign(time=time, event=event)
    ref = CoxPHFitter().fit(df, "time", "event", fit_options=TIGHT)
    np.testing.assert_allclose(fit.coef, ref.params_.to_numpy(), rtol=0, atol=1e-6)


def test_ridge_fit_is_stationary_for_the_penalised_objective() -> None:
    sites = [_xte(s) for s in _sites(seed=2)]
    plain = federated_cox(sites)
    ridge = federated_cox(sites, l2=50.0)
    g = np.sum([cox_site_sums(ridge.coef, *s)[0] for s in sites], axis=0)
    np.testing.assert_allclose(g, 50.0 * ridge.coef, rtol=0, atol=1e-8)
    assert np.linalg.norm(ridge.coef) < np.linalg.norm(plain.coef)
    assert ridge.l2 == 50.0


def test_site_sums_are_derivatives_of_the_loglik() -> None:
    X, t, e = _xte(_sites(seed=5)[1])
    beta = np.array([0.02, -0.05, 0.7])
    g, H, _ = cox_site_sums(beta, X, t, e)
    h = 1e-6
    for j in range(3):
        d = np.zeros(3)
        d[j] = h
        lp, lm = cox_site_sums(beta + d, X, t, e)[2], cox_site_sums(beta - d, X, t, e)[2]
        assert g[j] == pytest.approx((lp - lm) / (2 * h), rel=1e-6, abs=1e-6)
        gp, gm = cox_site_sums(beta + d, X, t, e)[0], cox_site_sums(beta - d, X, t, e)[0]
        np.testing.assert_allclose(H[:, j], (gp - gm) / (2 * h), rtol=1e-5, atol=1e-5)
    assert np.all(np.linalg.eigvalsh(H) < 0)
    # shifting a site's covariates by a constant does not change its stratum's sums
    g2, H2, l2 = cox_site_sums(beta, X + [1000.0, -50.0, 3.0], t, e)
    np.testing.assert_allclose(g2, g, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(H2, H, rtol=1e-9, atol=1e-9)


def test_site_without_events_contributes_nothing() -> None:
    sites = [_xte(s) for s in _sites(seed=6)]
    X, t, _ = sites[0]
    g, H, ll = cox_site_sums(np.ones(3), X, t, np.zeros(len(t)))
    assert not g.any() and not H.any() and ll == 0.0
    a = federated_cox(sites)
    b = federated_cox([*sites, (X, t, np.zeros(len(t)))])
    np.testing.assert_allclose(a.coef, b.coef, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- Harrell's C
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concordance_equals_lifelines_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    time = rng.integers(1, 40, n).astype(np.float64)  # many tied times
    event = (rng.random(n) < 0.6).astype(np.float64)
    risk = np.round(rng.normal(size=n) - 0.03 * time, 1)  # many tied risks
    c = concordance(time, event, risk)
    assert c == pytest.approx(concordance_index(time, -risk, event), abs=1e-12)
    assert 0.5 < c < 1.0  # risk is informative and the sign convention is right
    assert concordance(time, event, -risk) == pytest.approx(1.0 - c, abs=1e-12)


def test_concordance_by_hand() -> None:
    # pairs with i an event: (0,1) (0,2) (0,3) and (1,2): t equal, 2 censored; (1,3); 2 is
    # censored; 3 has no later time. Concordant: (0,1) (0,2) (0,3); (1,2) tied risk -> 0.5;
    # (1,3) discordant. C = 3.5 / 5.
    time = [1.0, 2.0, 2.0, 3.0]
    event = [1, 1, 0, 1]
    risk = [4.0, 2.0, 2.0, 3.0]
    assert concordance(time, event, risk) == pytest.approx(0.7)


# --------------------------------------------------------------------------- Breslow baseline
def test_pooled_breslow_equals_lifelines_unstratified() -> None:
    sites = _sites(seed=3)
    pooled = pd.concat(sites, ignore_index=True).drop(columns="site")
    ref = CoxPHFitter().fit(pooled, "time", "event", fit_options=TIGHT)
    # one-stratum federated fit: a single "site" holding everything gives the same beta
    one = federated_cox([_xte(pooled)])
    np.testing.assert_allclose(one.coef, ref.params_[COV].to_numpy(), rtol=0, atol=1e-6)

    beta = ref.params_[COV].to_numpy()
    center = pooled[COV].mean().to_numpy()  # lifelines' baseline is at the covariate mean
    grid = np.unique(pooled.loc[pooled.event == 1, "time"])  # contains every event time
    per_site = [baseline_hazard_sums(beta, *_xte(s), grid, center=center) for s in sites]
    total = sum(per_site[1:], per_site[0])
    assert total.events.sum() == pooled.event.sum()
    H0 = total.cumulative_hazard()
    ref_H0 = ref.baseline_cumulative_hazard_.iloc[:, 0].reindex(grid).to_numpy()
    np.testing.assert_allclose(H0, ref_H0, rtol=0, atol=1e-6)
    assert H0[-1] > 0.1

    # a transported copy gives the same numbers
    back = BreslowSums.from_dict(json.loads(json.dumps(total.to_dict())))
    np.testing.assert_array_equal(back.cumulative_hazard(), H0)

    # 30-day survival of some patients
    X_new = pooled[COV].to_numpy()[:25]
    s30 = survival_at(total.at(30.0), beta, X_new, center=center)
    ref_s30 = ref.predict_survival_function(pooled[COV].iloc[:25], times=[30.0]).to_numpy()[0]
    np.testing.assert_allclose(s30, ref_s30, rtol=0, atol=1e-6)
    assert np.ptp(s30) > 0.05
    # between grid times the estimate is constant; before the first grid time it is 0
    assert total.at(30.5) == total.at(30.0)
    assert total.at(grid[0] - 0.5) == 0.0


def test_breslow_single_site_is_that_stratum_baseline() -> None:
    # a site's own sums give its own stratum's baseline (lifelines' per-stratum column)
    sites = _sites(seed=3)
    pooled = pd.concat(sites, ignore_index=True)
    ref = CoxPHFitter().fit(pooled, "time", "event", strata=["site"], fit_options=TIGHT)
    beta = ref.params_[COV].to_numpy()
    center = pooled[COV].mean().to_numpy()
    X, t, e = _xte(sites[2])
    grid = np.unique(t[e == 1])
    H0 = baseline_hazard_sums(beta, X, t, e, grid, center=center).cumulative_hazard()
    ref_H0 = ref.baseline_cumulative_hazard_[2].reindex(grid).to_numpy()
    np.testing.assert_allclose(H0, ref_H0, rtol=0, atol=1e-6)


def test_coarse_grid_rounds_event_times_up() -> None:
    X, t, e = _xte(_sites(seed=3)[0])
    beta = np.array([0.03, 0.08, 0.9])
    grid = np.arange(10.0, 100.0, 10.0)
    coarse = baseline_hazard_sums(beta, X, t, e, grid)
    t_up = np.where(e == 1, np.ceil(t / 10.0) * 10.0, t)
    exact = baseline_hazard_sums(beta, X, t_up, e, grid)
    np.testing.assert_allclose(coarse.cumulative_hazard(), exact.cumulative_hazard(), rtol=1e-12)
    assert coarse.events.sum() == e[t <= 90].sum()


# --------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_the_problem() -> None:
    X, t, e = _xte(_sites()[0])
    b = np.zeros(3)
    with pytest.raises(ValueError, match="X has 90 rows but time has 89"):
        cox_site_sums(b, X, t[:-1], e[:-1])
    with pytest.raises(ValueError, match="time has 90 values but event has 89"):
        cox_site_sums(b, X, t, e[:-1])
    X_nan = X.copy()
    X_nan[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*column\(s\) 1"):
        cox_site_sums(b, X_nan, t, e)
    t_inf = t.copy()
    t_inf[0] = np.inf
    with pytest.raises(ValueError, match="time contains 1 non-finite"):
        federated_cox([(X, t_inf, e)])
    with pytest.raises(ValueError, match="event must contain only 0"):
        cox_site_sums(b, X, t, np.full(len(t), 2.0))
    with pytest.raises(ValueError, match="beta has 2 values but X has 3"):
        cox_site_sums(b[:2], X, t, e)
    with pytest.raises(ValueError, match="no events at any site"):
        federated_cox([(X, t, np.zeros(len(t))), (X, t, np.zeros(len(t)))])
    with pytest.raises(ValueError, match="site 1 has 2 covariates"):
        federated_cox([(X, t, e), (X[:, :2], t, e)])
    with pytest.raises(ValueError, match="site 1: X has 90 rows but time has 10"):
        federated_cox([(X, t, e), (X, t[:10], e[:10])])
    with pytest.raises(ValueError, match="no events"):
        concordance(t, np.zeros(len(t)), X[:, 0])
    with pytest.raises(ValueError, match="risk has 3 values"):
        concordance(t, e, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="risk contains non-finite"):
        concordance(t, e, X_nan[:, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        baseline_hazard_sums(b, X, t, e, [5.0, 3.0])
    with pytest.raises(ValueError, match="beyond the last grid time"):
        baseline_hazard_sums(b, X, t, e, [5.0, 10.0]).at(11.0)
    with pytest.raises(ValueError, match="singular"):
        federated_cox([(np.column_stack([X[:, 0], X[:, 0]]), t, e)])


def test_module_imports_neither_flower_nor_torch() -> None:
    code = (
        "import sys, hcc_fl.shared.cox; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'torch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
