"""Federated tabular models: per-patient features -> binary outcome, without Flower.

These are the building blocks that the project's ClientApp/ServerApp call at the edge (R-TIC and
R-BMode logistic models in the TACE-response study, the LASSO-logistic radiomics score and the
stacked model in the early-recurrence study). Everything here is numpy/scipy; nothing imports
Flower or torch.

Pieces
------
* **Standardisation** from summed sufficient statistics: each site sends
  :func:`feature_sums` (per-feature count of non-missing values, sum, sum of squares), the
  coordinator adds them up with :func:`combine_sums` and broadcasts the :class:`Standardiser`.
  The sums are plain arrays, so they can travel through secure aggregation. A second pass with
  the sums shifted by the pass-1 mean makes the SD exact to rounding (:func:`fit_standardiser`).
* **Penalised logistic regression**: :class:`LogisticModel`, the local step :func:`local_train`
  (proximal gradient descent, optionally with the FedProx term), :func:`fedavg` and the in-process
  reference driver :func:`federated_fit`.
* **Exact federated L2 logistic regression** by Newton-Raphson on summed gradients and Hessians
  (:func:`newton_logistic_sums`, :func:`federated_newton`): equal to the pooled fit.
* **Stacking**: :func:`out_of_fold_scores` and :func:`stack_features`.

Objective convention
--------------------
With ``theta = (w, b)`` (weights ``w`` of length p, intercept ``b``) and ``n`` patients, every
function here minimises::

    J(w, b) = (1/n) * sum_i logloss(y_i, x_i.w + b) + alpha * P(w)

    P(w) = 0.5 * ||w||_2^2                                          penalty "l2"
    P(w) = ||w||_1                                                  penalty "l1"
    P(w) = l1_ratio * ||w||_1 + 0.5 * (1 - l1_ratio) * ||w||_2^2    penalty "elasticnet"

with ``logloss(y, z) = log(1 + exp(z)) - y*z`` (natural log) and an unpenalised intercept.
In a federation ``n`` is the pooled number of patients and the sum runs over all sites.

Mapping to scikit-learn: ``LogisticRegression`` minimises ``C * sum_i logloss_i + R(w)`` with
``R = 0.5||w||^2`` (l2), ``||w||_1`` (l1) or ``l1_ratio||w||_1 + 0.5(1 - l1_ratio)||w||^2``
(elasticnet), and (lbfgs/newton-cg/newton-cholesky/saga) an unpenalised intercept. Dividing ``J``
by ``alpha`` gives ``(1/(alpha*n)) sum_i logloss_i + P(w)``, so the two have the same minimiser
when **C = 1 / (alpha * n)** (for all three penalties, with the same ``l1_ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import linalg as sla
from scipy.special import expit

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Penalty = Literal["l2", "l1", "elasticnet"]
Strategy = Literal["fedavg", "fedprox"]
L1Step = Literal["server", "local"]

_PENALTIES = ("l2", "l1", "elasticnet")


# ============================================================================ standardisation
@dataclass(frozen=True)
class FeatureSums:
    """One site's (or several sites' summed) sufficient statistics for standardisation.

    Attributes
    ----------
    names : tuple of str
        Feature names; sites must agree on names and order.
    count : ndarray, shape (p,)
        Number of non-missing (finite) values per feature.
    total : ndarray, shape (p,)
        Sum of ``x - shift`` over the non-missing values.
    total_sq : ndarray, shape (p,)
        Sum of ``(x - shift)**2`` over the non-missing values.
    shift : ndarray, shape (p,)
        The agreed shift subtracted before summing (zeros by default). A shift close to the mean
        (e.g. the pooled mean from a first pass) avoids cancellation in ``total_sq - total**2/n``
        for features whose mean is large compared with their SD.
    n_rows : int
        Number of patients (rows), missing values included.
    """

    names: tuple[str, ...]
    count: F64
    total: F64
    total_sq: F64
    shift: F64
    n_rows: int

    def __add__(self, other: FeatureSums) -> FeatureSums:
        if self.names != other.names:
            raise ValueError("feature sums over different feature names cannot be added")
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("feature sums computed with different shifts cannot be added")
        return FeatureSums(
            self.names,
            self.count + other.count,
            self.total + other.total,
            self.total_sq + other.total_sq,
            self.shift.copy(),
            self.n_rows + other.n_rows,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists of Python floats)."""
        return {
            "names": list(self.names),
            "count": self.count.tolist(),
            "total": self.total.tolist(),
            "total_sq": self.total_sq.tolist(),
            "shift": self.shift.tolist(),
            "n_rows": self.n_rows,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSums:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(str(s) for s in d["names"]),
            np.asarray(d["count"], dtype=np.float64),
            np.asarray(d["total"], dtype=np.float64),
            np.asarray(d["total_sq"], dtype=np.float64),
            np.asarray(d["shift"], dtype=np.float64),
            int(d["n_rows"]),
        )


def _as_matrix(X: npt.ArrayLike, what: str = "X") -> F64:
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (patients x features), got {arr.ndim}-D")
    return arr


def feature_sums(
    X: npt.ArrayLike, names: Sequence[str], shift: npt.ArrayLike | None = None
) -> FeatureSums:
    """Per-feature sufficient statistics of one site, ignoring missing values.

    Parameters
    ----------
    X : array_like, shape (n, p)
        Features; NaN (or any non-finite value) marks a missing value.
    names : sequence of str
        The p feature names.
    shift : array_like, shape (p,), optional
        Agreed per-feature shift subtracted before summing (default 0). All sites must use the
        same shift; see :class:`FeatureSums`.

    Returns
    -------
    FeatureSums
    """
    A = _as_matrix(X)
    names_t = tuple(str(s) for s in names)
    if A.shape[1] != len(names_t):
        raise ValueError(f"X has {A.shape[1]} columns but {len(names_t)} names were given")
    if len(set(names_t)) != len(names_t):
        raise ValueError("feature names must be unique")
    c = np.zeros(A.shape[1]) if shift is None else np.asarray(shift, dtype=np.float64).ravel()
    if c.shape != (A.shape[1],) or not np.all(np.isfinite(c)):
        raise ValueError("shift must hold one finite value per feature")
    ok = np.isfinite(A)
    D = np.where(ok, A - c, 0.0)
    return FeatureSums(
        names=names_t,
        count=ok.sum(axis=0).astype(np.float64),
        total=D.sum(axis=0),
        total_sq=(D * D).sum(axis=0),
        shift=c.copy(),
        n_rows=int(A.shape[0]),
    )


@dataclass(frozen=True)
class Standardiser:
    """Pooled z-scoring broadcast by the coordinator.

    Attributes
    ----------
    names : tuple of str
        Feature names, in column order.
    mean : ndarray, shape (p,)
        Pooled mean of the non-missing values.
    sd : ndarray, shape (p,)
        Pooled sample SD (ddof=1); 1.0 where the feature is flagged ``constant``.
    constant : ndarray of bool, shape (p,)
        True where the pooled SD is zero (up to rounding, see :func:`combine_sums`) or fewer than
        two values were seen; their SD is set to 1, so they are only centred (all values
        equal to the mean become 0 after :meth:`transform`).
    count : ndarray, shape (p,)
        Pooled number of non-missing values per feature.
    """

    names: tuple[str, ...]
    mean: F64
    sd: F64
    constant: npt.NDArray[np.bool_]
    count: F64

    def transform(self, X: npt.ArrayLike) -> F64:
        """Standardise ``X`` with the pooled mean and SD; missing values become 0 (the mean).

        Parameters
        ----------
        X : array_like, shape (n, p)
            Features in the order of :attr:`names`; NaN marks missing.

        Returns
        -------
        ndarray, shape (n, p)
            ``(X - mean) / sd`` with non-finite entries replaced by 0.
        """
        A = _as_matrix(X)
        if A.shape[1] != len(self.names):
            raise ValueError(f"X has {A.shape[1]} columns, the standardiser {len(self.names)}")
        Z = (A - self.mean) / self.sd
        return np.where(np.isfinite(A), Z, 0.0)

    @property
    def constant_names(self) -> list[str]:
        """Names of the features flagged constant."""
        return [n for n, c in zip(self.names, self.constant, strict=True) if c]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` restores it bit for bit."""
        return {
            "names": list(self.names),
            "mean": self.mean.tolist(),
            "sd": self.sd.tolist(),
            "constant": [bool(c) for c in self.constant],
            "count": self.count.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Standardiser:
        """Inverse of :meth:`to_dict`."""
        names = tuple(str(s) for s in d["names"])
        out = cls(
            names,
            np.asarray(d["mean"], dtype=np.float64),
            np.asarray(d["sd"], dtype=np.float64),
            np.asarray(d["constant"], dtype=np.bool_),
            np.asarray(d["count"], dtype=np.float64),
        )
        for arr in (out.mean, out.sd, out.constant, out.count):
            if arr.shape != (len(names),):
                raise ValueError("standardiser arrays do not match the number of names")
        return out


def combine_sums(parts: Sequence[FeatureSums], const_rtol: float = 1e-6) -> Standardiser:
    """Pool the sites' sums into a :class:`Standardiser` (mean, SD with ddof=1).

    Parameters
    ----------
    parts : sequence of FeatureSums
        One entry per site (or already summed entries); names and shift must agree.
    const_rtol : float
        A feature is flagged constant when fewer than two values were seen or when its sum of
        squared deviations is at most ``const_rtol**2`` times the sum of squared shifted values,
        i.e. its SD is below about ``const_rtol`` times the RMS of ``x - shift``. This is the
        precision limit of the sum-of-squares formula: a truly constant feature leaves a residue
        of order ``sqrt(eps) * |value - shift|`` in the SD. A feature whose mean is large
        compared with its SD (e.g. mean 1e6, SD 1e-2) is flagged on a pass with shift 0 and
        resolved by a second pass shifted by the pooled mean (:func:`fit_standardiser`).

    Returns
    -------
    Standardiser

    Raises
    ------
    ValueError
        If no parts are given or a feature has no non-missing value at any site.

    Notes
    -----
    The relative rounding error of the pooled variance is about ``eps * ((mean - shift) / sd)**2``
    (eps = 2.2e-16): below 1e-12 when ``|mean - shift| < 60 sd``. Hence the two-pass protocol.
    """
    if not parts:
        raise ValueError("no feature sums to combine")
    s = parts[0]
    for p in parts[1:]:
        s = s + p
    if np.any(s.count == 0):
        empty = [n for n, c in zip(s.names, s.count, strict=True) if c == 0]
        raise ValueError(f"features with no value at any site: {empty}")
    mean_shifted = s.total / s.count
    mean = s.shift + mean_shifted
    ss = np.maximum(s.total_sq - s.total * mean_shifted, 0.0)
    constant = (s.count < 2) | (ss <= const_rtol**2 * s.total_sq)
    var = np.where(constant, 1.0, ss / np.maximum(s.count - 1, 1.0))
    return Standardiser(s.names, mean, np.sqrt(var), constant, s.count.copy())


def fit_standardiser(
    site_X: Sequence[npt.ArrayLike], names: Sequence[str], two_pass: bool = True
) -> Standardiser:
    """In-process reference for the standardisation protocol (what the Flower apps do).

    Pass 1: every site sends :func:`feature_sums` with shift 0; the server pools them.
    Pass 2 (``two_pass=True``): the pass-1 pooled mean is broadcast as the shift and the sites
    send their sums again; the pooled SD is then accurate to rounding whatever the ratio of
    mean to SD (see :func:`combine_sums`).

    Parameters
    ----------
    site_X : sequence of array_like, shape (n_k, p)
        Each site's raw features (NaN = missing).
    names : sequence of str
        The p feature names.
    two_pass : bool
        Run the shifted second pass (default).

    Returns
    -------
    Standardiser
    """
    if not site_X:
        raise ValueError("no sites")
    st = combine_sums([feature_sums(X, names) for X in site_X])
    if two_pass:
        st = combine_sums([feature_sums(X, names, shift=st.mean) for X in site_X])
    return st


# ============================================================================ logistic model
@dataclass
class LogisticModel:
    """Linear logistic model ``P(y=1 | x) = sigmoid(x.weights + intercept)``.

    Attributes
    ----------
    weights : ndarray, shape (p,)
    intercept : float
    """

    weights: F64
    intercept: float = 0.0

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64).ravel().copy()
        self.intercept = float(self.intercept)

    @classmethod
    def zeros(cls, p: int) -> LogisticModel:
        """The all-zero model (predicts 0.5) with ``p`` features."""
        return cls(np.zeros(p), 0.0)

    @property
    def n_features(self) -> int:
        """Number of features p."""
        return int(self.weights.shape[0])

    def to_vector(self) -> F64:
        """Parameters as one vector ``[w_1, ..., w_p, intercept]`` (length p + 1)."""
        return np.concatenate([self.weights, [self.intercept]])

    @classmethod
    def from_vector(cls, theta: npt.ArrayLike) -> LogisticModel:
        """Inverse of :meth:`to_vector`."""
        v = np.asarray(theta, dtype=np.float64).ravel()
        if v.size < 1:
            raise ValueError("a parameter vector holds at least the intercept")
        return cls(v[:-1].copy(), float(v[-1]))

    def copy(self) -> LogisticModel:
        """An independent copy."""
        return LogisticModel(self.weights.copy(), self.intercept)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` restores it bit for bit."""
        return {"weights": self.weights.tolist(), "intercept": self.intercept}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LogisticModel:
        """Inverse of :meth:`to_dict`."""
        return cls(np.asarray(d["weights"], dtype=np.float64), float(d["intercept"]))


def _check_xy(model: LogisticModel | None, X: npt.ArrayLike, y: npt.ArrayLike) -> tuple[F64, F64]:
    A = _as_matrix(X)
    yy = np.asarray(y, dtype=np.float64).ravel()
    if yy.shape[0] != A.shape[0]:
        raise ValueError(f"X has {A.shape[0]} rows but y has {yy.shape[0]} values")
    if not np.all((yy == 0) | (yy == 1)):
        raise ValueError("y must be binary (0/1)")
    if not np.all(np.isfinite(A)):
        raise ValueError("X must be finite (standardise and impute first)")
    if model is not None and model.n_features != A.shape[1]:
        raise ValueError(f"model has {model.n_features} weights, X has {A.shape[1]} columns")
    return A, yy


def _check_penalty(penalty: str, alpha: float, l1_ratio: float) -> tuple[float, float]:
    """Return (l1 strength, l2 strength) so that alpha*P(w) = a1*||w||_1 + a2/2*||w||^2."""
    if penalty not in _PENALTIES:
        raise ValueError(f"penalty must be one of {_PENALTIES}, got {penalty!r}")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError("alpha must be finite and >= 0")
    if penalty == "l2":
        return 0.0, float(alpha)
    if penalty == "l1":
        return float(alpha), 0.0
    if not 0.0 <= l1_ratio <= 1.0:
        raise ValueError("l1_ratio must lie in [0, 1]")
    return float(alpha * l1_ratio), float(alpha * (1.0 - l1_ratio))


def _logloss_sum(z: F64, y: F64) -> float:
    return float(np.sum(np.logaddexp(0.0, z) - y * z))


def predict_proba(model: LogisticModel, X: npt.ArrayLike) -> F64:
    """Predicted probability of the outcome (y = 1) for each row of ``X``.

    Parameters
    ----------
    model : LogisticModel
    X : array_like, shape (n, p)

    Returns
    -------
    ndarray, shape (n,)
    """
    A = _as_matrix(X)
    if A.shape[1] != model.n_features:
        raise ValueError(f"model has {model.n_features} weights, X has {A.shape[1]} columns")
    return np.asarray(expit(A @ model.weights + model.intercept), dtype=np.float64)


def log_loss(model: LogisticModel, X: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Mean log-loss (natural log) of ``model`` on ``(X, y)``, without any penalty."""
    A, yy = _check_xy(model, X, y)
    if A.shape[0] == 0:
        raise ValueError("no rows")
    return _logloss_sum(A @ model.weights + model.intercept, yy) / A.shape[0]


def penalty_value(
    model: LogisticModel, penalty: Penalty = "l2", alpha: float = 0.0, l1_ratio: float = 0.5
) -> float:
    """The penalty term ``alpha * P(w)`` of the objective (see the module docstring)."""
    a1, a2 = _check_penalty(penalty, alpha, l1_ratio)
    w = model.weights
    return float(a1 * np.abs(w).sum() + 0.5 * a2 * (w @ w))


def objective(
    model: LogisticModel,
    site_data: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
    penalty: Penalty = "l2",
    alpha: float = 0.0,
    l1_ratio: float = 0.5,
) -> float:
    """The pooled objective ``J`` over all sites' data (mean log-loss + ``alpha * P(w)``).

    In a federation each site reports its log-loss sum and n; this in-process version does the
    same sums.
    """
    total, n = 0.0, 0
    for X, y in site_data:
        A, yy = _check_xy(model, X, y)
        total += _logloss_sum(A @ model.weights + model.intercept, yy)
        n += A.shape[0]
    if n == 0:
        raise ValueError("no rows at any site")
    return total / n + penalty_value(model, penalty, alpha, l1_ratio)


def _spectral_sq(A: F64) -> float:
    """Largest eigenvalue of A^T A (squared spectral norm), via the smaller Gram matrix."""
    n, q = A.shape
    G = A @ A.T if n < q else A.T @ A
    return float(sla.eigvalsh(G, subset_by_index=[G.shape[0] - 1, G.shape[0] - 1])[0])


def _soft_threshold(v: F64, t: F64) -> F64:
    return np.sign(v) * np.maximum(np.abs(v) - t, 0.0)


def lipschitz_bound(
    X: npt.ArrayLike,
    penalty: Penalty = "l2",
    alpha: float = 0.0,
    l1_ratio: float = 0.5,
    proximal_mu: float = 0.0,
    batch_size: int | None = None,
) -> float:
    """Lipschitz constant of the gradient of the smooth part of a site's local objective.

    ``0.25 * lambda_max([X 1]^T [X 1]) / n + l2 strength + mu`` for full-batch steps, or the
    per-row bound ``0.25 * max_i ||[x_i 1]||^2 + l2 strength + mu`` for mini-batches (valid for
    any batch). A step ``lr <= 1/L`` guarantees descent. In a federation each site reports this
    one number and the server broadcasts ``lr = 1 / max_k L_k`` (see :func:`federated_fit`).

    Parameters
    ----------
    X : array_like, shape (n, p)
    penalty, alpha, l1_ratio, proximal_mu, batch_size
        As in :func:`local_train`.

    Returns
    -------
    float
    """
    A = _as_matrix(X)
    n = A.shape[0]
    if n == 0:
        raise ValueError("no rows")
    _, a2 = _check_penalty(penalty, alpha, l1_ratio)
    Xt = np.hstack([A, np.ones((n, 1))])
    if batch_size is None or batch_size >= n:
        lip = 0.25 * _spectral_sq(Xt) / n
    else:
        lip = 0.25 * float(np.max(np.einsum("ij,ij->i", Xt, Xt)))
    return lip + a2 + float(proximal_mu)


def local_train(
    model: LogisticModel,
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    penalty: Penalty = "l2",
    alpha: float = 0.0,
    l1_ratio: float = 0.5,
    epochs: int = 1,
    lr: float | None = None,
    proximal_mu: float = 0.0,
    global_model: LogisticModel | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    apply_l1: bool = True,
) -> tuple[LogisticModel, int, float]:
    """One site's local step: proximal gradient descent on the penalised log-loss.

    The local objective is ``(1/n) sum_i logloss_i + alpha * P(w)`` over this site's ``n`` rows
    plus, when ``proximal_mu > 0``, the FedProx term ``mu/2 * ||theta - theta_global||^2`` over
    all parameters (weights and intercept). The smooth part (log-loss, the L2 share of the
    penalty, the proximal term) takes a gradient step; the L1 share is applied by
    soft-thresholding, so coefficients become exactly zero. The intercept is never penalised.

    Parameters
    ----------
    model : LogisticModel
        Starting point (not modified).
    X : array_like, shape (n, p)
        Standardised, imputed features (finite).
    y : array_like, shape (n,)
        Outcome, 0/1.
    penalty : {"l2", "l1", "elasticnet"}
    alpha : float
        Penalty strength (see the module docstring for the convention).
    l1_ratio : float
        Share of L1 in the elastic net (ignored otherwise).
    epochs : int
        Passes over the data; with ``batch_size=None`` one pass is one full-batch step.
    lr : float, optional
        Step size. Default ``1 / lipschitz_bound(...)`` of this site, which guarantees descent.
        In a federation pass the server's common step (sites with different steps make FedAvg
        converge to a biased point; see :func:`federated_fit`).
    proximal_mu : float
        FedProx coefficient mu (0 = plain local training / FedAvg).
    global_model : LogisticModel, optional
        The centre of the proximal term; defaults to ``model`` (the round's global model).
    seed : int
        Seeds the mini-batch order; full-batch training is deterministic and does not use it.
    batch_size : int, optional
        Mini-batch size for proximal SGD; None (default) means full batch.
    apply_l1 : bool
        Apply the L1 share by soft-thresholding after each step (default). False skips it (only
        the smooth part is trained), for a server that soft-thresholds the averaged model instead
        (``federated_fit(..., l1_step="server")``).

    Returns
    -------
    model : LogisticModel
        The trained model.
    n : int
        Number of training rows (the FedAvg weight).
    loss : float
        Mean log-loss of the returned model on ``(X, y)``, unpenalised.
    """
    A, yy = _check_xy(model, X, y)
    n, p = A.shape
    if n == 0:
        raise ValueError("a site with no rows cannot train")
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    if proximal_mu < 0:
        raise ValueError("proximal_mu must be >= 0")
    a1, a2 = _check_penalty(penalty, alpha, l1_ratio)
    centre = (global_model if global_model is not None else model).to_vector()
    if centre.shape != (p + 1,):
        raise ValueError("global_model has a different number of features")
    Xt = np.hstack([A, np.ones((n, 1))])
    reg = np.concatenate([np.full(p, a2), [0.0]]) + proximal_mu
    l1 = np.concatenate([np.full(p, a1), [0.0]])

    full = batch_size is None or batch_size >= n
    if lr is None:
        lr = 1.0 / lipschitz_bound(A, penalty, alpha, l1_ratio, proximal_mu, batch_size)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError("lr must be finite and > 0")

    theta = model.to_vector()
    rng = np.random.default_rng(seed)
    bs = n if batch_size is None or full else int(batch_size)
    if bs < 1:
        raise ValueError("batch_size must be >= 1")
    for _ in range(epochs):
        order = np.arange(n) if full else rng.permutation(n)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            Xb = Xt[idx]
            resid = expit(Xb @ theta) - yy[idx]
            grad = Xb.T @ resid / idx.size + reg * theta
            if proximal_mu > 0:
                grad -= proximal_mu * centre
            theta = theta - lr * grad
            if a1 > 0 and apply_l1:
                theta = _soft_threshold(theta, lr * l1)
    out = LogisticModel.from_vector(theta)
    loss = _logloss_sum(Xt @ theta, yy) / n
    return out, n, loss


def fedavg(models: Sequence[tuple[LogisticModel, int]]) -> LogisticModel:
    """Sample-weighted average of the sites' models (FedAvg aggregation).

    Parameters
    ----------
    models : sequence of (LogisticModel, n)
        Each site's trained model and its number of training rows.

    Returns
    -------
    LogisticModel
        ``sum_k n_k theta_k / sum_k n_k``.
    """
    if not models:
        raise ValueError("no models to average")
    p = models[0][0].n_features
    total = 0.0
    acc = np.zeros(p + 1)
    for m, n in models:
        if m.n_features != p:
            raise ValueError("models with different numbers of features cannot be averaged")
        if n < 0:
            raise ValueError("sample counts must be >= 0")
        acc += float(n) * m.to_vector()
        total += float(n)
    if total <= 0:
        raise ValueError("the total sample count is zero")
    return LogisticModel.from_vector(acc / total)


@dataclass(frozen=True)
class RoundRecord:
    """What one round of :func:`federated_fit` did.

    Attributes
    ----------
    round : int
        1-based round number.
    train_loss : float
        Sample-weighted mean of the sites' reported local log-losses (of their local models).
    objective : float
        Pooled objective ``J`` of the new global model (log-loss + penalty, all sites).
    update_norms : tuple of float
        Per site, ``||theta_site - theta_global||_2`` (how far local training moved).
    step_norm : float
        ``||theta_global_new - theta_global_old||_2``.
    """

    round: int
    train_loss: float
    objective: float
    update_norms: tuple[float, ...]
    step_norm: float


def federated_fit(
    site_data: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
    rounds: int = 50,
    local_epochs: int = 5,
    penalty: Penalty = "l2",
    alpha: float = 0.0,
    l1_ratio: float = 0.5,
    lr: float | None = None,
    strategy: Strategy = "fedavg",
    proximal_mu: float = 0.0,
    seed: int = 0,
    batch_size: int | None = None,
    init: LogisticModel | None = None,
    l1_step: L1Step = "server",
    lr_decay: float = 0.0,
) -> tuple[LogisticModel, list[RoundRecord]]:
    """In-process FedAvg/FedProx reference driver (what the Flower apps do over the network).

    Round 0 (only when ``lr`` is None): every site reports :func:`lipschitz_bound` and the server
    fixes one common step ``lr = 1 / max_k L_k``. A common step matters: with per-site steps the
    FedAvg fixed point is not the pooled optimum even with one local epoch (on the test data of
    this module the objective gap stalled at 1e-2 instead of 1e-4).

    Each round every site runs :func:`local_train` from the current global model, the server
    replaces the global model with :func:`fedavg` of the results and, for an L1 share with
    ``l1_step="server"``, soft-thresholds the average.

    Parameters
    ----------
    site_data : sequence of (X, y)
        Each site's standardised features and 0/1 outcome.
    rounds, local_epochs : int
        Number of rounds and local epochs per round.
    penalty, alpha, l1_ratio, batch_size
        Passed to :func:`local_train`.
    lr : float, optional
        Common local step; default from the sites' Lipschitz bounds (round 0 above).
    lr_decay : float
        Round r (1-based) uses ``lr / (1 + lr_decay * (r - 1))``. With more than one local epoch
        and a constant step, FedAvg (and, less so, FedProx) settles at a point biased by client
        drift on non-IID sites; a decaying step removes that bias (slowly). Default 0: constant.
    strategy : {"fedavg", "fedprox"}
        "fedprox" requires ``proximal_mu > 0``; "fedavg" requires ``proximal_mu == 0``.
    proximal_mu : float
        FedProx coefficient.
    seed : int
        Base seed; site k in round r uses ``seed + 1000 * r + k`` for its mini-batch order.
    init : LogisticModel, optional
        Starting global model (default all zeros).
    l1_step : {"server", "local"}
        Where the L1 share of the penalty is applied. "server" (default): sites train the smooth
        part only and the server soft-thresholds the average with ``lr * a1 * s`` (``a1`` the L1
        strength, ``s`` the sample-weighted mean number of local steps). With one full-batch
        epoch per round this is exactly proximal gradient descent (ISTA) on the pooled
        objective, and the global model has exact zeros. "local": sites soft-threshold at every
        step (FedMiD-style); the average of sparse local models is only zero where every site's
        model is, so the global model is typically much less sparse.

    Returns
    -------
    model : LogisticModel
        The final global model.
    history : list of RoundRecord
    """
    if not site_data:
        raise ValueError("no sites")
    if strategy not in ("fedavg", "fedprox"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy == "fedprox" and not proximal_mu > 0:
        raise ValueError("strategy 'fedprox' needs proximal_mu > 0")
    if strategy == "fedavg" and proximal_mu != 0:
        raise ValueError("strategy 'fedavg' uses proximal_mu = 0; choose 'fedprox'")
    if l1_step not in ("server", "local"):
        raise ValueError(f"l1_step must be 'server' or 'local', got {l1_step!r}")
    if rounds < 0:
        raise ValueError("rounds must be >= 0")
    if not lr_decay >= 0:
        raise ValueError("lr_decay must be >= 0")
    a1, _ = _check_penalty(penalty, alpha, l1_ratio)
    p = _as_matrix(site_data[0][0]).shape[1]
    if lr is None:
        lr = 1.0 / max(
            lipschitz_bound(X, penalty, alpha, l1_ratio, proximal_mu, batch_size)
            for X, _ in site_data
        )
    server_l1 = a1 > 0 and l1_step == "server"
    glob = init.copy() if init is not None else LogisticModel.zeros(p)
    history: list[RoundRecord] = []
    for r in range(rounds):
        lr_r = lr / (1.0 + lr_decay * r)
        results: list[tuple[LogisticModel, int]] = []
        losses: list[float] = []
        norms: list[float] = []
        steps: list[float] = []
        g_vec = glob.to_vector()
        for k, (X, y) in enumerate(site_data):
            m, n, loss = local_train(
                glob,
                X,
                y,
                penalty=penalty,
                alpha=alpha,
                l1_ratio=l1_ratio,
                epochs=local_epochs,
                lr=lr_r,
                proximal_mu=proximal_mu,
                global_model=glob,
                seed=seed + 1000 * r + k,
                batch_size=batch_size,
                apply_l1=not server_l1,
            )
            results.append((m, n))
            losses.append(loss)
            norms.append(float(np.linalg.norm(m.to_vector() - g_vec)))
            per_epoch = 1 if batch_size is None else math.ceil(n / min(batch_size, n))
            steps.append(float(local_epochs * per_epoch))
        new = fedavg(results)
        ns = np.array([n for _, n in results], dtype=np.float64)
        if server_l1:
            s_mean = float(np.dot(ns, steps) / ns.sum())
            new = LogisticModel(
                _soft_threshold(new.weights, np.full(p, lr_r * a1 * s_mean)), new.intercept
            )
        history.append(
            RoundRecord(
                round=r + 1,
                train_loss=float(np.dot(ns, losses) / ns.sum()),
                objective=objective(new, site_data, penalty, alpha, l1_ratio),
                update_norms=tuple(norms),
                step_norm=float(np.linalg.norm(new.to_vector() - g_vec)),
            )
        )
        glob = new
    return glob, history


# ============================================================================ exact Newton (L2)
def newton_logistic_sums(
    model: LogisticModel, X: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[F64, F64, float, int]:
    """One site's contribution to a federated Newton step (sums, not means).

    Parameters
    ----------
    model : LogisticModel
        The current global model.
    X : array_like, shape (n, p)
    y : array_like, shape (n,)

    Returns
    -------
    gradient : ndarray, shape (p + 1,)
        ``sum_i (sigmoid(z_i) - y_i) [x_i, 1]`` (intercept last, as in ``to_vector``).
    hessian : ndarray, shape (p + 1, p + 1)
        ``sum_i s_i (1 - s_i) [x_i, 1][x_i, 1]^T``.
    loss : float
        ``sum_i logloss_i`` (unpenalised, summed).
    n : int
        Number of rows.

    Notes
    -----
    The penalty is added once by the coordinator, after summing over sites and dividing by the
    pooled n, so the sites need not know alpha. The Hessian is (p+1)^2 numbers: fine for
    radiomics-sized p, not for thousands of deep features.
    """
    A, yy = _check_xy(model, X, y)
    n = A.shape[0]
    Xt = np.hstack([A, np.ones((n, 1))])
    z = Xt @ model.to_vector()
    s = expit(z)
    grad = Xt.T @ (s - yy)
    H = (Xt * (s * (1.0 - s))[:, None]).T @ Xt
    return grad, H, _logloss_sum(z, yy), int(n)


def federated_newton(
    site_data: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
    alpha: float = 0.0,
    iterations: int = 50,
    tol: float = 1e-10,
    init: LogisticModel | None = None,
) -> LogisticModel:
    """Exact federated L2 logistic regression by Newton-Raphson on summed sufficient statistics.

    Each iteration the sites send :func:`newton_logistic_sums` at the current model; the
    coordinator forms the pooled gradient ``G = sum g / N + alpha [w, 0]`` and Hessian
    ``H = sum H / N + alpha diag(1, ..., 1, 0)`` and steps ``theta -= H^{-1} G``, halving the step
    until the pooled objective decreases (each trial is one more evaluation round in a real
    federation; on well-posed data the full step is accepted). The result is the minimiser of the
    pooled objective ``J`` (L2 penalty) up to ``tol``, i.e. the pooled fit.

    Parameters
    ----------
    site_data : sequence of (X, y)
    alpha : float
        L2 strength (``J = mean logloss + alpha/2 ||w||^2``).
    iterations : int
        Maximum Newton iterations.
    tol : float
        Stop when the Newton decrement ``G^T H^{-1} G / 2`` falls below ``tol**2`` or the step's
        largest entry below ``tol``.
    init : LogisticModel, optional
        Starting point (default all zeros).

    Returns
    -------
    LogisticModel
    """
    if not site_data:
        raise ValueError("no sites")
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    p = _as_matrix(site_data[0][0]).shape[1]
    theta = (init if init is not None else LogisticModel.zeros(p)).to_vector()
    pen = np.concatenate([np.full(p, float(alpha)), [0.0]])

    def pooled(th: F64) -> tuple[F64, F64, float]:
        g = np.zeros(p + 1)
        H = np.zeros((p + 1, p + 1))
        loss, n = 0.0, 0
        m = LogisticModel.from_vector(th)
        for X, y in site_data:
            gk, Hk, lk, nk = newton_logistic_sums(m, X, y)
            g += gk
            H += Hk
            loss += lk
            n += nk
        if n == 0:
            raise ValueError("no rows at any site")
        return (
            g / n + pen * th,
            H / n + np.diag(pen),
            loss / n + 0.5 * float(np.sum(pen * th * th)),
        )

    G, H, J = pooled(theta)
    for _ in range(iterations):
        try:
            step = sla.solve(H, G, assume_a="pos")
        except (sla.LinAlgError, ValueError):
            step = np.linalg.lstsq(H, G, rcond=None)[0]
        decrement = 0.5 * float(G @ step)
        if decrement < tol**2 or float(np.max(np.abs(step))) < tol:
            break
        t = 1.0
        while True:
            cand = theta - t * step
            Gc, Hc, Jc = pooled(cand)
            if Jc <= J - 1e-4 * t * float(G @ step):
                break
            t *= 0.5
            if t < 1e-10:  # no decrease along the Newton direction: at the optimum to rounding
                return LogisticModel.from_vector(theta)
        theta, G, H, J = cand, Gc, Hc, Jc
    return LogisticModel.from_vector(theta)


# ============================================================================ reading the model
def selected_features(
    model: LogisticModel, names: Sequence[str], tol: float = 0.0
) -> list[tuple[str, float]]:
    """The features with ``|coef| > tol``, largest ``|coef|`` first (ties keep column order).

    Parameters
    ----------
    model : LogisticModel
    names : sequence of str
        The p feature names, in column order.
    tol : float
        Threshold on ``|coef|``; 0 keeps every non-zero coefficient.

    Returns
    -------
    list of (name, coef)
    """
    if len(names) != model.n_features:
        raise ValueError(f"{len(names)} names for {model.n_features} weights")
    w = model.weights
    keep = [i for i in range(w.size) if abs(w[i]) > tol]
    keep.sort(key=lambda i: -abs(w[i]))
    return [(str(names[i]), float(w[i])) for i in keep]


# ============================================================================ stacking
FitFn = Callable[[F64, F64], Callable[[F64], npt.ArrayLike]]


def out_of_fold_scores(
    fit_fn: FitFn,
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    k: int = 5,
    seed: int = 0,
    stratified: bool = True,
) -> tuple[F64, I64]:
    """k-fold out-of-fold scores at one site, for a stacked model.

    Each fold's rows are scored by a model fitted on the other k - 1 folds only, so every row gets
    exactly one score from a model that never saw it.

    Parameters
    ----------
    fit_fn : callable
        ``fit_fn(X_train, y_train)`` returns a predictor ``predict(X_test) -> scores`` (one score
        per row, e.g. a probability).
    X : array_like, shape (n, p)
    y : array_like, shape (n,)
    k : int
        Number of folds, ``2 <= k <= n``.
    seed : int
        Seeds the fold assignment (the result is deterministic given the seed).
    stratified : bool
        Deal each class round-robin over the folds after shuffling (default), so the folds keep
        the outcome rate; otherwise plain shuffled folds.

    Returns
    -------
    scores : ndarray, shape (n,)
        Out-of-fold score of every row.
    folds : ndarray of int, shape (n,)
        The fold (0..k-1) each row was held out in.
    """
    A = _as_matrix(X)
    yy = np.asarray(y, dtype=np.float64).ravel()
    n = A.shape[0]
    if yy.shape[0] != n:
        raise ValueError(f"X has {n} rows but y has {yy.shape[0]} values")
    if not 2 <= k <= n:
        raise ValueError(f"k must lie in [2, n={n}], got {k}")
    rng = np.random.default_rng(seed)
    folds = np.empty(n, dtype=np.int64)
    if stratified:
        offset = 0
        for cls in np.unique(yy):
            idx = rng.permutation(np.flatnonzero(yy == cls))
            folds[idx] = (np.arange(idx.size) + offset) % k
            offset += idx.size
    else:
        folds[rng.permutation(n)] = np.arange(n) % k
    scores = np.full(n, np.nan)
    for f in range(k):
        test = folds == f
        if not test.any():
            continue
        predict = fit_fn(A[~test], yy[~test])
        s = np.asarray(predict(A[test]), dtype=np.float64).ravel()
        if s.shape[0] != int(test.sum()):
            raise ValueError("the predictor returned the wrong number of scores")
        scores[test] = s
    return scores, folds


def stack_features(
    score_columns: Mapping[str, npt.ArrayLike], logit: bool = False, eps: float = 1e-6
) -> tuple[F64, list[str]]:
    """Arrange base-model scores as the stacked model's feature matrix.

    Parameters
    ----------
    score_columns : mapping of name -> array, shape (n,)
        One score vector per base model (e.g. out-of-fold probabilities).
    logit : bool
        Replace probabilities by their logits (clipped to ``[eps, 1 - eps]`` first); the stacked
        logistic model is then linear on the log-odds scale.
    eps : float
        Clipping for ``logit=True``.

    Returns
    -------
    X : ndarray, shape (n, m)
        Columns in sorted name order, so that every site builds the same layout whatever order
        its dict was filled in.
    names : list of str
        The column names.
    """
    if not score_columns:
        raise ValueError("no score columns")
    names = sorted(score_columns)
    cols = [np.asarray(score_columns[nm], dtype=np.float64).ravel() for nm in names]
    n = cols[0].shape[0]
    if any(c.shape[0] != n for c in cols):
        raise ValueError("score columns differ in length")
    Xs = np.column_stack(cols)
    if logit:
        if np.any((Xs < 0) | (Xs > 1)):
            raise ValueError("logit=True needs scores in [0, 1]")
        P = np.clip(Xs, eps, 1.0 - eps)
        Xs = np.log(P) - np.log1p(-P)
    return Xs, names


__all__ = [
    "FeatureSums",
    "LogisticModel",
    "RoundRecord",
    "Standardiser",
    "combine_sums",
    "fedavg",
    "feature_sums",
    "federated_fit",
    "federated_newton",
    "fit_standardiser",
    "local_train",
    "lipschitz_bound",
    "log_loss",
    "newton_logistic_sums",
    "objective",
    "out_of_fold_scores",
    "penalty_value",
    "predict_proba",
    "selected_features",
    "stack_features",
]
