"""Task components: the coordinator's tabular fit loop, re-splits, specs and stacking."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hcc_fl.client.components import tabular_step
from hcc_fl.shared.components import (
    TabularSpec,
    TabularState,
    TaskComponents,
    fit_components,
    fit_tabular,
    key,
    resplit_parts,
    stack_matrix,
    standardiser_from,
)
from hcc_fl.shared.tabular import FeatureSums, combine_sums, feature_sums, federated_fit, objective


def _sites(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three non-IID sites of a sparse logistic model (5 of 12 features matter)."""
    rng = np.random.default_rng(seed)
    beta = np.array([1.5, -1.0, 0.8, 0, 0, 0, 0.6, 0, 0, 0, 0, -0.7])
    out = []
    for n, shift in ((60, 0.0), (45, 0.7), (80, -0.4)):
        X = rng.normal(shift, 1.0 + 0.2 * abs(shift), size=(n, beta.size)) * 3 + 10
        z = (X - 10) / 3 @ beta - 0.3
        out.append((X, (rng.uniform(size=n) < 1 / (1 + np.exp(-z))).astype(float)))
    return out


def _asker(sites: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    names = tuple(f"f{j}" for j in range(sites[0][0].shape[1]))

    def ask(op: str, options: dict[str, Any], states: dict[str, TabularState]
            ) -> list[dict[str, Any]]:
        return [tabular_step(dict.fromkeys(states, (X, y, names)), states, op, options)
                for X, y in sites]

    return ask


def test_federated_lasso_equals_the_reference_proximal_gradient() -> None:
    """One full-batch epoch per round with the L1 step at the server is ISTA on the pooled
    objective: our coordinator loop must reproduce shared.tabular.federated_fit (tested
    against scikit-learn) on the same standardised data, coefficient for coefficient."""
    sites = _sites()
    spec = TabularSpec("lasso", "tic", "l1", alpha=0.03)
    states = {key("lasso"): TabularState(spec)}
    fit_tabular(states, _asker(sites), rounds=60, epochs=1)
    st = states[key("lasso")]
    assert st.standardiser is not None and st.model is not None
    pooled = np.vstack([X for X, _ in sites])
    assert st.standardiser.mean == pytest.approx(pooled.mean(axis=0), rel=1e-12)
    assert st.standardiser.sd == pytest.approx(pooled.std(axis=0, ddof=1), rel=1e-10)
    Z = [(st.standardiser.transform(X), y) for X, y in sites]
    ref, _ = federated_fit(Z, rounds=60, local_epochs=1, penalty="l1", alpha=0.03, lr=st.lr,
                           l1_step="server")
    assert st.model.to_vector() == pytest.approx(ref.to_vector(), abs=1e-10)
    assert 0 < np.count_nonzero(st.model.weights) < 12  # exact zeros: features were dropped
    # and the objective went down round after round (history is the server's record)
    assert [h["round"] for h in st.history] == list(range(1, 61))
    assert objective(st.model, Z, "l1", 0.03) < objective(
        type(st.model).zeros(12), Z, "l1", 0.03)


def test_fedprox_and_elastic_net_fit_converge_near_the_pooled_optimum() -> None:
    sites = _sites(1)
    spec = TabularSpec("enet", "tic", "elasticnet", alpha=0.02, l1_ratio=0.5)
    states = {key("enet"): TabularState(spec)}
    fit_tabular(states, _asker(sites), rounds=80, epochs=3, proximal_mu=0.01)
    st = states[key("enet")]
    Z = [(st.standardiser.transform(X), y) for X, y in sites]  # type: ignore[union-attr]
    long_ref, _ = federated_fit(Z, rounds=3000, local_epochs=1, penalty="elasticnet",
                                alpha=0.02, l1_ratio=0.5, l1_step="server")
    gap = objective(st.model, Z, "elasticnet", 0.02, 0.5) - objective(  # type: ignore[arg-type]
        long_ref, Z, "elasticnet", 0.02, 0.5)
    assert -1e-9 <= gap < 5e-3


def test_a_feature_no_site_measured_becomes_a_constant() -> None:
    X = np.array([[1.0, np.nan], [2.0, np.nan], [4.0, np.nan]])
    std = standardiser_from([feature_sums(X[:2], ["a", "b"]), feature_sums(X[2:], ["a", "b"])])
    assert std.constant_names == ["b"]
    assert std.transform(X)[:, 1].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):  # what the plain combination would do
        combine_sums([feature_sums(X, ["a", "b"])])
    assert isinstance(FeatureSums.from_dict(feature_sums(X, ["a", "b"]).to_dict()), FeatureSums)


def test_resplits_keep_the_validation_size_and_are_seeded() -> None:
    split = ("train",) * 30 + ("val",) * 8 + ("test",) * 2
    tr0, va0 = resplit_parts(split, 0, seed=0, site_salt="A")
    assert tr0.sum() == 30 and va0.sum() == 8
    draws = []
    for r in (1, 2, 3):
        tr, va = resplit_parts(split, r, seed=0, site_salt="A")
        assert va.sum() == 8 and tr.sum() == 30 and not (tr & va).any()
        assert not (tr | va)[-2:].any()  # test rows never move
        again = resplit_parts(split, r, seed=0, site_salt="A")
        assert np.array_equal(va, again[1])
        draws.append(tuple(np.flatnonzero(va)))
    assert len(set(draws)) == 3
    assert tuple(np.flatnonzero(resplit_parts(split, 1, 0, "B")[1])) != draws[0]


def test_component_specs_are_checked() -> None:
    good = {"name": "t", "deep": "dl", "tabular": [{"name": "r", "block": "tic"}],
            "stack": {"name": "both", "inputs": ["dl", "r"]}}
    comps = TaskComponents.from_task_config(good)
    assert comps.names == ["dl", "r", "both"]
    assert TaskComponents.from_task_config({"name": "ki67_ceus"}).names == ["ki67_ceus"]
    for bad in ({**good, "tabular": [{"name": "dl", "block": "tic"}]},
                {**good, "stack": {"name": "both", "inputs": ["dl"]}},
                {**good, "stack": {"name": "both", "inputs": ["dl", "nope"]}},
                {**good, "tabular": [{"name": "r", "block": "tic", "penalty": "l3"}]}):
        with pytest.raises(ValueError):
            TaskComponents.from_task_config(bad)


def test_stacked_model_is_fitted_on_the_base_models_logits() -> None:
    p = {"a": np.array([0.5, 0.9, 0.1]), "b": np.array([0.2, 0.2, 0.8])}
    X = stack_matrix(p, ["b", "a"])
    assert X[:, 0] == pytest.approx(np.log(p["b"] / (1 - p["b"])))
    assert X[:, 1] == pytest.approx([0.0, np.log(9), -np.log(9)])
    # fit_components fits the base model first, then the stack with the base model fixed
    sites = _sites(2)
    seen: list[tuple[list[str], list[str], bool]] = []
    comps = TaskComponents.from_task_config(
        {"name": "t", "deep": "dl", "tabular": [{"name": "r", "block": "tic"}],
         "stack": {"name": "s", "inputs": ["dl", "r"]}, "tabular_rounds": 2, "resplits": 1})

    def ask_for(fixed: dict[str, TabularState], with_deep: bool) -> Any:
        inner = _asker(sites)

        def ask(op: str, options: dict[str, Any], states: dict[str, TabularState]
                ) -> list[dict[str, Any]]:
            seen.append((sorted(fixed), sorted(states), with_deep))
            return inner(op, options, states)  # type: ignore[no-any-return]

        return ask

    states = fit_components(comps, ask_for)
    assert sorted(states) == ["r@0", "r@1", "s@0"]
    assert seen[0] == ([], ["r@0", "r@1"], False)
    assert seen[-1] == (["r@0"], ["s@0"], True)


def test_cox_fit_loop_equals_the_federated_cox_reference() -> None:
    """fit_cox drives the sites through cox-center, Newton rounds and the Breslow sums; its
    coefficients equal shared.cox.federated_cox (tested against lifelines) on the same data,
    and its baseline equals the pooled Breslow sums at the horizon."""
    from hcc_fl.shared.components import fit_cox
    from hcc_fl.shared.cox import BreslowSums, baseline_hazard_sums, cox_site_sums, federated_cox

    rng = np.random.default_rng(5)
    sites = []
    for n, lam in ((80, 0.01), (60, 0.02), (100, 0.005)):
        X = np.column_stack([rng.normal(0, 1, n), rng.normal(22, 5, n)])
        t = rng.exponential(1 / (lam * np.exp(0.8 * X[:, 0] + 0.05 * (X[:, 1] - 22))))
        c = np.minimum(rng.exponential(200, n), 90)
        sites.append((X, np.round(np.minimum(t, c), 1), (t <= c).astype(float)))
    spec = TabularSpec("cox_model", "cox", "l2", 0.0, inputs=("score", "meld"))
    states = {key("cox_model"): TabularState(spec)}
    calls: list[str] = []

    def ask(op: str, options: dict[str, Any], sts: dict[str, TabularState]
            ) -> list[dict[str, Any]]:
        calls.append(op)
        (k, st), = sts.items()
        out = []
        for X, t, e in sites:
            if op == "cox-center":
                out.append({k: {"sum": X.sum(axis=0).tolist(), "n": len(t)}})
                continue
            Xc = X - np.asarray(st.cox["center"])
            if op == "cox":
                g, h, ll = cox_site_sums(np.asarray(options["beta"]), Xc, t, e)
                out.append({k: {"gradient": g.tolist(), "hessian": h.tolist(), "loglik": ll}})
            else:
                out.append({k: baseline_hazard_sums(np.asarray(options["beta"]), Xc, t, e,
                                                    np.asarray(options["grid"])).to_dict()})
        return out

    fit_cox(states, ask, horizon=30.0)
    cox = states[key("cox_model")].cox
    ref = federated_cox(sites)
    assert cox["coef"] == pytest.approx(ref.coef.tolist(), abs=1e-8)
    assert cox["se"] == pytest.approx(ref.se.tolist(), rel=1e-6)
    center = np.vstack([X for X, _, _ in sites]).mean(axis=0)
    assert cox["center"] == pytest.approx(center.tolist())
    grid = np.round(np.arange(1, 301) * 0.1, 10)
    pooled = [baseline_hazard_sums(ref.coef, X - center, t, e, grid) for X, t, e in sites]
    total: BreslowSums = pooled[0] + pooled[1] + pooled[2]
    assert cox["h0"] == pytest.approx(total.at(30.0), rel=1e-9)
    assert calls[0] == "cox-center" and calls[-1] == "breslow" and calls.count("cox") >= 3
    assert cox["converged"] and cox["coef"][0] == pytest.approx(0.8, abs=0.25)
