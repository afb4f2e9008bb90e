"""Exact federated penalised logistic regression by proximal Newton (shared/newton.py).

Reference: scikit-learn's LogisticRegression on the pooled rows, standardised with the same
pooled standardiser, with C = 1 / (alpha * n) (shared/tabular.py's module docstring):
newton-cholesky for L2, saga (tol 1e-13) for L1 and the elastic net.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression

from hcc_fl.client.components import tabular_step
from hcc_fl.shared.components import (
    TabularSpec,
    TabularState,
    TaskComponents,
    fit_components,
    fit_tabular_newton,
    key,
)
from hcc_fl.shared.newton import centred_sums, check_reply, combine_centred
from tests.shared.test_components import _asker, _sites

L1_RATIO = {"l2": 0.0, "l1": 1.0, "elasticnet": 0.5}


def _sklearn(Z: np.ndarray, y: np.ndarray, penalty: str, alpha: float) -> LogisticRegression:
    solver = "newton-cholesky" if penalty == "l2" else "saga"
    return LogisticRegression(C=1.0 / (alpha * len(y)), l1_ratio=L1_RATIO[penalty],
                              solver=solver, tol=1e-13, max_iter=1_000_000).fit(Z, y)


def _pooled(st_: TabularState, sites: list[tuple[np.ndarray, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray]:
    assert st_.standardiser is not None
    return (np.vstack([st_.standardiser.transform(X) for X, _ in sites]),
            np.concatenate([y for _, y in sites]))


@pytest.mark.parametrize(("penalty", "alpha"), [("l2", 0.02), ("l1", 0.03),
                                                 ("elasticnet", 0.02)])
def test_newton_fit_equals_the_centralized_penalised_fit(penalty: str, alpha: float) -> None:
    """Three non-IID sites; every penalty: coefficients within 1e-6 of scikit-learn's on the
    pooled rows (same standardisation), the same exact zeros, and at most 8 messages."""
    sites = _sites()
    states = {key("m"): TabularState(TabularSpec("m", "tic", penalty, alpha, 0.5))}
    fit_tabular_newton(states, _asker(sites))
    fit = states[key("m")]
    assert fit.model is not None and fit.standardiser is not None
    pooled_raw = np.vstack([X for X, _ in sites])
    assert fit.standardiser.mean == pytest.approx(pooled_raw.mean(axis=0), rel=1e-12)
    assert fit.standardiser.sd == pytest.approx(pooled_raw.std(axis=0, ddof=1), rel=1e-12)
    Z, y = _pooled(fit, sites)
    sk = _sklearn(Z, y, penalty, alpha)
    assert np.max(np.abs(fit.model.weights - sk.coef_.ravel())) < 1e-6
    assert abs(fit.model.intercept - sk.intercept_[0]) < 1e-6
    assert np.array_equal(fit.model.weights == 0, sk.coef_.ravel() == 0)
    if penalty != "l2":
        assert 0 < np.count_nonzero(fit.model.weights) < 12  # features were dropped exactly
    assert fit.fit["solver"] == "newton" and fit.fit["converged"]
    assert fit.fit["messages"] <= 8


def test_all_models_and_resplits_share_each_message() -> None:
    """fit_components: 2 tabular models x 3 re-splits, then the stack: every step carries all
    the models being fitted, and each fit takes <= 8 messages (FedAvg took 3 + rounds)."""
    sites = _sites(3)
    ops: list[tuple[str, tuple[str, ...]]] = []
    comps = TaskComponents.from_task_config(
        {"name": "t", "deep": "dl", "resplits": 2,
         "tabular": [{"name": "a", "block": "tic", "penalty": "l1", "alpha": 0.03},
                     {"name": "b", "block": "tic", "penalty": "elasticnet", "alpha": 0.02}],
         "stack": {"name": "s", "inputs": ["dl", "a"]}})
    assert comps.solver == "newton"

    def ask_for(fixed: dict[str, TabularState], with_deep: bool) -> Any:
        inner = _asker(sites)

        def ask(op: str, options: dict[str, Any], states: dict[str, TabularState]
                ) -> list[dict[str, Any]]:
            ops.append((op, tuple(sorted(states))))
            return inner(op, options, states)  # type: ignore[no-any-return]

        return ask

    states = fit_components(comps, ask_for)
    base = [o for o in ops if "s@0" not in o[1]]
    assert base[0] == ("sums", ("a@0", "a@1", "a@2", "b@0", "b@1", "b@2"))
    assert len(base) <= 8 and all(op == "newton" for op, _ in base[1:])
    assert len(ops) - len(base) <= 8
    for st_ in states.values():
        assert st_.fit["converged"] and st_.fit["messages"] <= 8


def test_a_hostile_sites_newton_replies_are_refused() -> None:
    """Site 3 sends honest sums, then a forged gradient/Hessian each step (a Hessian that is not
    PSD, a wrong shape, an impossible intercept gradient, NaN, a missing key): every such reply
    is refused and the fit equals the fit of the two honest sites' rows."""
    sites = _sites(4)
    everyone = _asker(sites)
    forgeries = iter([
        lambda r: {**r, "hessian": (-np.eye(13)).tolist()},
        lambda r: {**r, "gradient": r["gradient"][:-1]},
        lambda r: {**r, "gradient": [*r["gradient"][:-1], 1e9]},
        lambda r: {**r, "loss": float("nan")},
        lambda r: {**r, "n": 0},
        lambda r: None,
    ] * 10)

    def ask(op: str, options: dict[str, Any], states: dict[str, TabularState]
            ) -> list[dict[str, Any]]:
        if op == "sums":
            return everyone(op, options, states)  # type: ignore[no-any-return]
        replies = everyone(op, options, states)
        forge = next(forgeries)
        return [*replies[:2], {k: forge(v) for k, v in replies[2].items()}]

    states = {key("m"): TabularState(TabularSpec("m", "tic", "l1", 0.03))}
    fit_tabular_newton(states, ask)
    fit = states[key("m")]
    assert fit.fit["rejected_replies"] == fit.fit["messages"] - 1
    Z, y = _pooled(fit, sites[:2])  # the standardiser still pools all three sites' sums
    sk = _sklearn(Z, y, "l1", 0.03)
    assert fit.model is not None
    assert np.max(np.abs(fit.model.to_vector() - np.r_[sk.coef_.ravel(), sk.intercept_])) < 1e-6


def test_a_site_that_drops_out_mid_fit_leaves_the_optimum_of_the_rest() -> None:
    sites = _sites(5)
    calls = {"n": 0}
    everyone, two = _asker(sites), _asker(sites[:2])

    def ask(op: str, options: dict[str, Any], states: dict[str, TabularState]
            ) -> list[dict[str, Any]]:
        calls["n"] += 1
        return (everyone if calls["n"] <= 3 else two)(op, options, states)  # type: ignore

    states = {key("m"): TabularState(TabularSpec("m", "tic", "elasticnet", 0.02))}
    fit_tabular_newton(states, ask)
    fit = states[key("m")]
    Z, y = _pooled(fit, sites[:2])
    sk = _sklearn(Z, y, "elasticnet", 0.02)
    assert fit.model is not None and fit.fit["converged"]
    assert np.max(np.abs(fit.model.to_vector() - np.r_[sk.coef_.ravel(), sk.intercept_])) < 1e-6


def test_check_reply_accepts_honest_site_sums() -> None:
    X, y = _sites()[0]
    st_ = {key("m"): TabularState(TabularSpec("m", "tic", "l2", 0.02))}
    fit_tabular_newton(st_, _asker([(X, y)]))
    reply = tabular_step({key("m"): (X, y, tuple(f"f{j}" for j in range(12)))}, st_, "newton",
                         {})[key("m")]
    g, H, loss, n = check_reply(reply, 12)
    assert n == len(y) and H.shape == (13, 13) and loss > 0


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=5), st.integers(0, 2**31 - 1),
       st.sampled_from([0.0, 1e3, 1e8]), st.floats(0.0, 0.4))
def test_site_centred_sums_pool_to_the_central_mean_and_sd(
        sizes: list[int], seed: int, offset: float, missing: float) -> None:
    """Pooled mean and SD from one message of site-centred sums equal numpy's on the pooled
    values (ignoring missing ones) to 1e-9 relative plus the values' own float64 resolution
    (a few ulp of the offset), even for a mean 1e8 times the SD."""
    rng = np.random.default_rng(seed)
    parts = [rng.normal(offset, 1.0, size=(n, 3)) for n in sizes]
    for P in parts:
        P[rng.uniform(size=P.shape) < missing] = np.nan
    pooled = np.vstack(parts)
    count = np.isfinite(pooled).sum(axis=0)
    std = combine_centred([centred_sums(P, ["a", "b", "c"]) for P in parts])
    for j in range(3):
        vals = pooled[np.isfinite(pooled[:, j]), j]
        assert std.count[j] == count[j]
        if count[j] == 0:
            assert std.mean[j] == 0 and std.constant[j]
            continue
        ulps = 64 * np.finfo(float).eps * (offset + 10.0)  # x - mean is known to this much only
        assert std.mean[j] == pytest.approx(vals.mean(), rel=1e-12, abs=ulps)
        if count[j] >= 2:
            assert std.sd[j] == pytest.approx(vals.std(ddof=1), rel=1e-9, abs=ulps)
            assert not std.constant[j]
    const = combine_centred([centred_sums(np.full((4, 1), 1e6 + 0.1), ["k"]),
                             centred_sums(np.full((3, 1), 1e6 + 0.1), ["k"])])
    assert const.constant[0] and const.sd[0] == 1.0
