"""Federated tabular models: standardisation, penalised logistic regression, FedAvg/FedProx,
exact federated Newton, feature selection and out-of-fold stacking scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from hcc_fl.shared.tabular import (
    FeatureSums,
    LogisticModel,
    Standardiser,
    combine_sums,
    feature_sums,
    fedavg,
    federated_fit,
    federated_newton,
    fit_standardiser,
    lipschitz_bound,
    local_train,
    log_loss,
    newton_logistic_sums,
    objective,
    out_of_fold_scores,
    predict_proba,
    selected_features,
    stack_features,
)

P = 30
SUPPORT = (0, 3, 7, 12, 20)
TRUE_W = np.zeros(P)
TRUE_W[list(SUPPORT)] = [2.0, -1.5, 1.8, -2.2, 1.2]
NAMES = [f"f{i:02d}" for i in range(P)]


def _raw_sites(seed: int = 0, sizes: tuple[int, ...] = (60, 150, 290)):
    """Non-IID sites: per-site shifts of the feature means and of the baseline risk."""
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(sizes):
        shift = rng.normal(0.0, 0.7, P) * (k - 1)
        X = rng.normal(size=(n, P)) * rng.uniform(0.5, 3.0, P) + shift + 5.0
        z = ((X - shift - 5.0) / 1.0) @ TRUE_W + (-0.5 + 0.5 * k)
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
        out.append((X, y))
    return out


@pytest.fixture(scope="module")
def sites() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three non-IID sites standardised with the federated standardiser."""
    raw = _raw_sites()
    st = combine_sums([feature_sums(X, NAMES) for X, _ in raw])
    return [(st.transform(X), y) for X, y in raw]


def _pooled(sites):
    return np.vstack([X for X, _ in sites]), np.concatenate([y for _, y in sites])


# ----------------------------------------------------------------------------- standardisation
def _missing_sites(seed: int = 1):
    rng = np.random.default_rng(seed)
    sites = []
    for n in (7, 41, 123):
        X = rng.normal(size=(n, 6)) * [1.0, 3.0, 0.01, 10.0, 1.0, 2.0] + [0, 5, -2, 100, 0, 7]
        X[rng.random(X.shape) < 0.15] = np.nan
        X[:, 4] = 3.25  # constant everywhere
        sites.append(X)
    sites[0][:, 5] = np.nan  # one feature missing entirely at the smallest site
    return sites


def test_federated_standardisation_equals_pooled() -> None:
    names = [f"x{i}" for i in range(6)]
    sites = _missing_sites()
    pooled = np.vstack(sites)
    ref_mean = np.nanmean(pooled, axis=0)
    ref_sd = np.nanstd(pooled, axis=0, ddof=1)
    live = [0, 1, 2, 3, 5]
    st = fit_standardiser(sites, names)  # two passes, the second shifted by the pooled mean
    assert np.all(np.abs(st.mean - ref_mean) <= 1e-12 * np.maximum(ref_sd, 1e-300))
    np.testing.assert_allclose(st.sd[live], ref_sd[live], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(st.count, np.isfinite(pooled).sum(axis=0))
    assert st.constant_names == ["x4"] and st.sd[4] == 1.0 and st.mean[4] == 3.25
    Z = st.transform(pooled)
    assert np.all(np.isfinite(Z))
    assert np.all(Z[~np.isfinite(pooled)] == 0.0)  # imputed with the pooled mean
    assert np.all(Z[:, 4] == 0.0)
    obs = np.where(np.isfinite(pooled), Z, np.nan)
    np.testing.assert_allclose(np.nanmean(obs[:, live], axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.nanstd(obs[:, live], axis=0, ddof=1), 1.0, rtol=1e-12)

    # one pass of plain sums: exact up to the cancellation error eps * (mean / sd)^2
    one = combine_sums([feature_sums(X, names) for X in sites])
    np.testing.assert_allclose(one.mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(one.sd[live], ref_sd[live], rtol=1e-9)
    assert one.constant_names == ["x4"]


def test_two_pass_shift_keeps_precision_for_offset_features() -> None:
    rng = np.random.default_rng(5)
    sites = [rng.normal(1e6, 1e-2, size=(n, 1)) for n in (20, 50, 80)]
    pooled = np.vstack(sites)
    ref = np.std(pooled, ddof=1)
    first = combine_sums([feature_sums(X, ["big"]) for X in sites])
    assert first.constant[0]  # SD below what plain sums can resolve: flagged, not made up
    second = fit_standardiser(sites, ["big"])
    assert not second.constant[0]
    assert abs(second.sd[0] - ref) <= 1e-12 * ref
    assert abs(second.mean[0] - pooled.mean()) <= 4 * np.spacing(1e6)  # a few ulp
    with pytest.raises(ValueError, match="shift"):
        feature_sums(sites[0], ["big"]) + feature_sums(sites[1], ["big"], shift=first.mean)


def test_feature_sums_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="names"):
        feature_sums(np.zeros((3, 2)), ["a"])
    with pytest.raises(ValueError, match="no value"):
        combine_sums([feature_sums(np.array([[np.nan, 1.0]]), ["a", "b"])])


def test_serialisation_round_trips_are_exact() -> None:
    names = [f"x{i}" for i in range(6)]
    sums = [feature_sums(X, names) for X in _missing_sites()]
    st = combine_sums(sums)
    back = Standardiser.from_dict(json.loads(json.dumps(st.to_dict(), allow_nan=False)))
    assert back.names == st.names
    for a, b in [(st.mean, back.mean), (st.sd, back.sd), (st.count, back.count)]:
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(st.constant, back.constant) and back.constant.dtype == np.bool_
    s_back = FeatureSums.from_dict(json.loads(json.dumps(sums[1].to_dict())))
    assert np.array_equal(s_back.total_sq, sums[1].total_sq) and s_back.n_rows == sums[1].n_rows

    rng = np.random.default_rng(0)
    m = LogisticModel(rng.normal(size=7) / 3.0, intercept=-0.1234567890123456789)
    m2 = LogisticModel.from_dict(json.loads(json.dumps(m.to_dict())))
    assert np.array_equal(m2.weights, m.weights) and m2.intercept == m.intercept
    v = m.to_vector()
    assert v.shape == (8,) and v[-1] == m.intercept
    m3 = LogisticModel.from_vector(v)
    assert np.array_equal(m3.to_vector(), v)


# ----------------------------------------------------------------------------- exact Newton (L2)
def test_federated_newton_equals_sklearn_and_pooled_newton(sites) -> None:
    alpha = 0.02
    X, y = _pooled(sites)
    n = X.shape[0]
    fed = federated_newton(sites, alpha=alpha)
    pooled = federated_newton([(X, y)], alpha=alpha)
    np.testing.assert_allclose(fed.to_vector(), pooled.to_vector(), atol=1e-10)

    # J = mean logloss + alpha/2 ||w||^2  <=>  C * sum logloss + 1/2 ||w||^2 with C = 1/(alpha n)
    sk = LogisticRegression(C=1.0 / (alpha * n), l1_ratio=0.0, solver="newton-cholesky", tol=1e-12)
    sk.fit(X, y)
    np.testing.assert_allclose(fed.weights, sk.coef_.ravel(), atol=1e-6)
    assert abs(fed.intercept - sk.intercept_[0]) < 1e-6
    np.testing.assert_allclose(predict_proba(fed, X), sk.predict_proba(X)[:, 1], atol=1e-7)

    # the mapping matters: C = 1/alpha (no n) is a different, much weaker penalty
    wrong = LogisticRegression(C=1.0 / alpha, l1_ratio=0.0, solver="newton-cholesky").fit(X, y)
    assert np.max(np.abs(wrong.coef_.ravel() - fed.weights)) > 1e-2

    # stationarity from the summed site statistics
    g = sum(newton_logistic_sums(fed, Xs, ys)[0] for Xs, ys in sites) / n
    g[:-1] += alpha * fed.weights
    assert np.max(np.abs(g)) < 1e-10


def test_newton_sums_add_up_over_sites(sites) -> None:
    m = LogisticModel(np.linspace(-1, 1, P), 0.3)
    parts = [newton_logistic_sums(m, X, y) for X, y in sites]
    g, H, loss, n = newton_logistic_sums(m, *_pooled(sites))
    np.testing.assert_allclose(sum(p[0] for p in parts), g, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sum(p[1] for p in parts), H, rtol=1e-12, atol=1e-12)
    assert abs(sum(p[2] for p in parts) - loss) < 1e-9 and sum(p[3] for p in parts) == n
    assert abs(loss / n - log_loss(m, *_pooled(sites))) < 1e-12


# ----------------------------------------------------------------------------- local training
def test_local_train_single_site_converges_to_l2_optimum(sites) -> None:
    alpha = 0.02
    X, y = _pooled(sites)
    opt = federated_newton([(X, y)], alpha=alpha)
    m, n, loss = local_train(LogisticModel.zeros(P), X, y, "l2", alpha, epochs=3000)
    assert n == X.shape[0]
    assert np.max(np.abs(m.to_vector() - opt.to_vector())) < 1e-4
    assert abs(loss - log_loss(opt, X, y)) < 1e-6
    few, _, _ = local_train(LogisticModel.zeros(P), X, y, "l2", alpha, epochs=5)
    assert np.max(np.abs(few.to_vector() - opt.to_vector())) > 1e-2  # many epochs were needed


def test_minibatch_training_is_seeded(sites) -> None:
    X, y = sites[1]
    a = local_train(LogisticModel.zeros(P), X, y, "l2", 0.02, epochs=3, seed=7, batch_size=16)
    b = local_train(LogisticModel.zeros(P), X, y, "l2", 0.02, epochs=3, seed=7, batch_size=16)
    c = local_train(LogisticModel.zeros(P), X, y, "l2", 0.02, epochs=3, seed=8, batch_size=16)
    assert np.array_equal(a[0].to_vector(), b[0].to_vector())
    assert not np.array_equal(a[0].to_vector(), c[0].to_vector())


def test_fedavg_is_sample_weighted() -> None:
    a = LogisticModel(np.array([1.0, 0.0]), 2.0)
    b = LogisticModel(np.array([0.0, 4.0]), -2.0)
    m = fedavg([(a, 30), (b, 10)])
    np.testing.assert_allclose(m.to_vector(), [0.75, 1.0, 1.0])
    with pytest.raises(ValueError):
        fedavg([(a, 0), (b, 0)])


# ----------------------------------------------------------------------------- FedAvg / FedProx
def test_fedavg_one_epoch_is_pooled_gradient_descent(sites) -> None:
    alpha = 0.02
    X, y = _pooled(sites)
    lr = 1.0 / max(lipschitz_bound(Xs, "l2", alpha) for Xs, _ in sites)
    fed, _ = federated_fit(sites, rounds=40, local_epochs=1, alpha=alpha, lr=lr)
    gd, _, _ = local_train(LogisticModel.zeros(P), X, y, "l2", alpha, epochs=40, lr=lr)
    np.testing.assert_allclose(fed.to_vector(), gd.to_vector(), atol=1e-12)


def test_fedavg_and_fedprox_reach_the_pooled_l2_optimum(sites) -> None:
    alpha = 0.02
    opt = federated_newton(sites, alpha=alpha)
    j_opt = objective(opt, sites, "l2", alpha)
    X, y = _pooled(sites)
    ll_opt = log_loss(opt, X, y)
    kw = {"rounds": 200, "local_epochs": 5, "alpha": alpha, "lr_decay": 0.03}
    avg, h_avg = federated_fit(sites, **kw)
    prox, h_prox = federated_fit(sites, strategy="fedprox", proximal_mu=0.5, **kw)
    for model, hist in [(avg, h_avg), (prox, h_prox)]:
        assert 0.0 <= hist[-1].objective - j_opt < 1e-4
        assert abs(log_loss(model, X, y) - ll_opt) < 1e-3
        assert hist[0].objective - j_opt > 1e-2  # one round was not enough
        assert abs(hist[-1].objective - objective(model, sites, "l2", alpha)) < 1e-15

    # same start (round 1): the proximal term shortens every site's local move
    for a, p in zip(h_avg[0].update_norms, h_prox[0].update_norms, strict=True):
        assert p < a
    assert np.mean([r.update_norms for r in h_prox[:20]]) < np.mean(
        [r.update_norms for r in h_avg[:20]]
    )


def test_constant_step_fedavg_stalls_at_client_drift(sites) -> None:
    alpha = 0.02
    j_opt = objective(federated_newton(sites, alpha=alpha), sites, "l2", alpha)
    _, h5 = federated_fit(sites, rounds=150, local_epochs=5, alpha=alpha)
    _, h1 = federated_fit(sites, rounds=250, local_epochs=1, alpha=alpha)
    drift = h5[-1].objective - j_opt
    assert abs(h5[-1].objective - h5[-50].objective) < 1e-9  # settled ...
    assert drift > 1e-4  # ... away from the optimum (non-IID sites, 5 local epochs)
    assert h1[-1].objective - j_opt < 1e-6  # one epoch per round = pooled gradient descent


def test_strategy_arguments_are_checked(sites) -> None:
    with pytest.raises(ValueError, match="proximal_mu"):
        federated_fit(sites, rounds=1, strategy="fedprox")
    with pytest.raises(ValueError, match="fedprox"):
        federated_fit(sites, rounds=1, proximal_mu=0.1)


# ----------------------------------------------------------------------------- L1 / selection
def test_l1_exact_zeros_and_true_support(sites) -> None:
    alpha = 0.05
    X, y = _pooled(sites)
    truth = {NAMES[i] for i in SUPPORT}

    local, _, _ = local_train(LogisticModel.zeros(P), X, y, "l1", alpha, epochs=3000)
    assert np.sum(local.weights == 0.0) == P - len(SUPPORT)
    assert {nm for nm, _ in selected_features(local, NAMES)} == truth

    fed, _ = federated_fit(
        sites,
        rounds=100,
        local_epochs=5,
        penalty="l1",
        alpha=alpha,
        strategy="fedprox",
        proximal_mu=0.1,
    )
    sel = selected_features(fed, NAMES)
    assert {nm for nm, _ in sel} == truth
    assert np.sum(fed.weights == 0.0) == P - len(SUPPORT)
    assert [abs(c) for _, c in sel] == sorted((abs(c) for _, c in sel), reverse=True)
    for nm, c in sel:
        assert np.sign(c) == np.sign(TRUE_W[NAMES.index(nm)])

    # sklearn's L1 (saga, unpenalised intercept) with C = 1/(alpha n) gives the same model
    sk = LogisticRegression(
        C=1.0 / (alpha * len(y)), l1_ratio=1.0, solver="saga", tol=1e-10, max_iter=100_000
    ).fit(X, y)
    np.testing.assert_allclose(local.weights, sk.coef_.ravel(), atol=1e-5)


def test_server_side_l1_is_pooled_ista_and_sparser_than_local_l1(sites) -> None:
    alpha = 0.05
    X, y = _pooled(sites)
    lr = 1.0 / max(lipschitz_bound(Xs, "l1", alpha) for Xs, _ in sites)
    fed, _ = federated_fit(sites, rounds=60, local_epochs=1, penalty="l1", alpha=alpha, lr=lr)
    ista, _, _ = local_train(LogisticModel.zeros(P), X, y, "l1", alpha, epochs=60, lr=lr)
    np.testing.assert_allclose(fed.to_vector(), ista.to_vector(), atol=1e-12)
    assert np.array_equal(fed.weights == 0.0, ista.weights == 0.0)

    loc, _ = federated_fit(
        sites, rounds=60, local_epochs=5, penalty="l1", alpha=alpha, l1_step="local"
    )
    srv, _ = federated_fit(sites, rounds=60, local_epochs=5, penalty="l1", alpha=alpha)
    assert np.count_nonzero(loc.weights) > np.count_nonzero(srv.weights)


def test_elasticnet_matches_sklearn(sites) -> None:
    alpha, ratio = 0.03, 0.4
    X, y = _pooled(sites)
    m, _, _ = local_train(LogisticModel.zeros(P), X, y, "elasticnet", alpha, ratio, epochs=4000)
    sk = LogisticRegression(
        C=1.0 / (alpha * len(y)), l1_ratio=ratio, solver="saga", tol=1e-10, max_iter=100_000
    ).fit(X, y)
    np.testing.assert_allclose(m.weights, sk.coef_.ravel(), atol=1e-5)
    assert np.any(m.weights == 0.0)


def test_selected_features_order_and_tolerance() -> None:
    m = LogisticModel(np.array([0.0, -3.0, 0.5, 2.0, -0.05]), 1.0)
    names = ["a", "b", "c", "d", "e"]
    assert selected_features(m, names) == [("b", -3.0), ("d", 2.0), ("c", 0.5), ("e", -0.05)]
    assert [nm for nm, _ in selected_features(m, names, tol=0.1)] == ["b", "d", "c"]
    with pytest.raises(ValueError):
        selected_features(m, names[:3])


# ----------------------------------------------------------------------------- stacking
def test_out_of_fold_scores_by_construction() -> None:
    rng = np.random.default_rng(3)
    n = 53
    ids = np.arange(n, dtype=np.float64)
    X = np.column_stack([ids, rng.normal(size=n)])
    y = (rng.random(n) < 0.35).astype(np.float64)
    scored = np.zeros(n, dtype=int)

    def fit_fn(X_train, y_train):
        seen = set(X_train[:, 0].astype(int).tolist())

        def predict(X_test):
            rows = X_test[:, 0].astype(int)
            np.add.at(scored, rows, 1)
            # 1 if the model was trained on this row (must never happen), else a row-unique score
            return np.array([1.0 if r in seen else 0.001 * r + 0.0001 for r in rows])

        return predict

    s, folds = out_of_fold_scores(fit_fn, X, y, k=5, seed=11)
    assert np.all(scored == 1)  # every sample scored exactly once
    np.testing.assert_allclose(s, 0.001 * ids + 0.0001)  # and never by a model trained on it
    assert set(folds.tolist()) == set(range(5))
    for f in range(5):  # stratified: each fold keeps the outcome rate (within one patient)
        pos = y[folds == f].sum()
        assert abs(pos - y.sum() / 5) <= 1 and abs((folds == f).sum() - n / 5) <= 1

    s2, folds2 = out_of_fold_scores(fit_fn, X, y, k=5, seed=11)
    assert np.array_equal(folds, folds2) and np.array_equal(s, s2)
    _, folds3 = out_of_fold_scores(fit_fn, X, y, k=5, seed=12)
    assert not np.array_equal(folds, folds3)
    with pytest.raises(ValueError):
        out_of_fold_scores(fit_fn, X, y, k=1)


def test_out_of_fold_logistic_scores_feed_a_stacked_model(sites) -> None:
    X, y = sites[2]

    def fit_fn(Xt, yt):
        m, _, _ = local_train(LogisticModel.zeros(Xt.shape[1]), Xt, yt, "l2", 0.05, epochs=200)
        return lambda Xv: predict_proba(m, Xv)

    a, _ = out_of_fold_scores(fit_fn, X[:, :10], y, k=5, seed=0)
    b, _ = out_of_fold_scores(fit_fn, X[:, 10:], y, k=5, seed=0)
    Z, names = stack_features({"tic": a, "bmode": b})
    assert names == ["bmode", "tic"] and Z.shape == (len(y), 2)
    assert np.array_equal(Z[:, 0], b) and np.all((a > 0) & (a < 1))
    Zl, _ = stack_features({"tic": a, "bmode": b}, logit=True)
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-Zl[:, 1])), a, rtol=1e-10)
    stacked = federated_newton([(Zl, y)], alpha=0.01)
    # the first 10 features hold three of the five true signals, the rest two
    assert stacked.weights[1] > 0 and stacked.weights[0] > 0
    with pytest.raises(ValueError, match="length"):
        stack_features({"a": a, "b": b[:-1]})
