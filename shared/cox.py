"""Federated Cox proportional-hazards model from summed per-site statistics, without Flower.

This is the survival building block of the ACLF study (science.md 1.6: the combined Cox model on
[DL risk logit, MELD, age], reported with Harrell's C and 30-day survival). Everything here is
numpy/scipy; nothing imports Flower or torch.

Pieces
------
* **Site sums** (:func:`cox_site_sums`): one site's score vector, Hessian and log partial
  likelihood with Efron's handling of tied event times, the site being its own stratum (its own
  risk sets). They are plain sums, so they can travel through secure aggregation.
* **Federated fit** (:func:`federated_cox`, driver :func:`cox_newton`): Newton-Raphson with step
  halving on the summed sums, i.e. the maximiser of the *site-stratified* partial likelihood
  ``sum_k l_k(beta)``. It equals a pooled fit with ``strata=["site"]`` (lifelines, R
  ``coxph(... + strata(site))``).
* **Baseline hazard** (:func:`baseline_hazard_sums`, :class:`BreslowSums`): per-site event counts
  and risk-set sums of ``exp((x - center).beta)`` on an agreed time grid; summed over sites they
  give the pooled (one-stratum) Breslow estimate ``H0(t)``, and :func:`survival_at` gives
  ``S(t | x) = exp(-H0(t) exp((x - center).beta))``.
* **Harrell's C** (:func:`concordance`): higher risk = shorter survival.

Model and conventions
---------------------
With stratum (site) ``k``, linear predictor ``eta_i = x_i.beta`` and, at each distinct event time
``t`` of the stratum, the ``d`` tied events ``D(t)`` and the risk set ``R(t) = {j : t_j >= t}``,
Efron's log partial likelihood is::

    l_k(beta) = sum_t [ sum_{i in D(t)} eta_i
                        - sum_{r=0}^{d-1} log( sum_{R(t)} e^eta_j - (r/d) sum_{D(t)} e^eta_j ) ]

:func:`cox_site_sums` returns ``l_k``, its gradient (the score) and its Hessian (negative
semi-definite). ``l_k`` and its derivatives do not change when a constant vector is added to
every ``x_i`` of the stratum, so each site centres its covariates on its own mean and shifts
``eta`` by its maximum before exponentiating (no overflow, no cancellation), and the results are
still exact sums of the uncentred model.

The federated objective is ``sum_k l_k(beta) - 0.5 * l2 * ||beta||^2``; standard errors are the
square roots of the diagonal of the inverse observed information ``-(sum_k H_k) + l2 * I``.

Privacy: per-site sums are aggregates over patients (p + p^2 + 1 numbers a round; the Breslow
sums are 2 numbers per grid time). A site with very few patients can still be identifiable from
them; route them through secure aggregation where that matters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import linalg as sla

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: Summed statistics at one ``beta``: (gradient (p,), Hessian (p, p), log partial likelihood).
CoxSums = tuple[F64, F64, float]

_CHUNK = 4_000_000  # pair comparisons per block in :func:`concordance`


# ============================================================================ input checks
def _as_vector(a: npt.ArrayLike, what: str) -> F64:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    return arr


def _survival_data(time: npt.ArrayLike, event: npt.ArrayLike) -> tuple[F64, F64]:
    """Validated ``time`` (finite, >= 0) and ``event`` (0/1) of equal length."""
    t = _as_vector(time, "time")
    e = _as_vector(event, "event")
    if t.size != e.size:
        raise ValueError(f"time has {t.size} values but event has {e.size}")
    if t.size == 0:
        raise ValueError("no patients (time and event are empty)")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"time contains {int(np.sum(~np.isfinite(t)))} non-finite value(s)")
    if np.any(t < 0):
        raise ValueError("time contains negative values")
    if not np.all((e == 0.0) | (e == 1.0)):
        raise ValueError("event must contain only 0 (censored) and 1 (event)")
    return t, e


def _site_arrays(
    X: npt.ArrayLike, time: npt.ArrayLike, event: npt.ArrayLike
) -> tuple[F64, F64, F64]:
    """Validated (X, time, event) of one site."""
    t, e = _survival_data(time, event)
    A = np.asarray(X, dtype=np.float64)
    if A.ndim == 1 and t.size == A.size:  # one covariate given as a vector
        A = A.reshape(-1, 1)
    if A.ndim != 2:
        raise ValueError(f"X must be a 2-D array (patients x covariates), got {A.ndim}-D")
    if A.shape[0] != t.size:
        raise ValueError(f"X has {A.shape[0]} rows but time has {t.size} values")
    if A.shape[1] == 0:
        raise ValueError("X has no covariates")
    bad = ~np.all(np.isfinite(A), axis=0)
    if np.any(bad):
        cols = ", ".join(str(int(c)) for c in np.flatnonzero(bad))
        raise ValueError(f"X contains non-finite values (NaN or inf) in column(s) {cols}")
    return A, t, e


def _coef(beta: npt.ArrayLike, p: int) -> F64:
    b = _as_vector(beta, "beta")
    if b.size != p:
        raise ValueError(f"beta has {b.size} values but X has {p} covariates")
    if not np.all(np.isfinite(b)):
        raise ValueError("beta contains non-finite values")
    return b


def _center(center: npt.ArrayLike | None, p: int) -> F64:
    if center is None:
        return np.zeros(p)
    c = _as_vector(center, "center")
    if c.size != p or not np.all(np.isfinite(c)):
        raise ValueError(f"center must hold {p} finite values (one per covariate)")
    return c


# ============================================================================ site sums
def _group_sum(groups: I64, M: F64, K: int) -> F64:
    """Row sums of ``M`` per group label in ``0..K-1``, shape (K, M.shape[1])."""
    return np.stack([np.bincount(groups, weights=col, minlength=K) for col in M.T], axis=1)


def _efron_sums(beta: F64, X: F64, time: F64, event: F64) -> CoxSums:
    """Efron gradient, Hessian and log partial likelihood of one stratum (validated input)."""
    n, p = X.shape
    if not np.any(event == 1.0):
        return np.zeros(p), np.zeros((p, p)), 0.0
    Xc = X - X.mean(axis=0)  # exact: l, gradient and Hessian are invariant (module docstring)
    eta = Xc @ beta
    w = np.exp(eta - eta.max())  # exact: the shift cancels within the stratum

    # distinct times u_0 < ... < u_{K-1}; per-time sums of w and w*x (all rows and events)
    u, inv = np.unique(time, return_inverse=True)
    K = u.size
    ev = event == 1.0
    w_all = np.bincount(inv, weights=w, minlength=K)
    wx_all = _group_sum(inv, w[:, None] * Xc, K)
    w_ev = np.bincount(inv[ev], weights=w[ev], minlength=K)
    wx_ev = _group_sum(inv[ev], w[ev, None] * Xc[ev], K)
    d = np.bincount(inv[ev], minlength=K)

    # risk-set sums at u_k: everybody with time >= u_k (reverse cumulative sums)
    S0 = np.cumsum(w_all[::-1])[::-1]
    S1 = np.cumsum(wx_all[::-1], axis=0)[::-1]

    # one Efron term per event: event r (0-based) of the d tied at u_k uses fraction r/d
    ev_k = np.sort(inv[ev])  # time index of each event, grouped by time
    first = np.searchsorted(ev_k, ev_k, side="left")
    frac = (np.arange(ev_k.size) - first) / d[ev_k]
    phi0 = S0[ev_k] - frac * w_ev[ev_k]
    a = (S1[ev_k] - frac[:, None] * wx_ev[ev_k]) / phi0[:, None]

    shift = float(eta.max())
    loglik = float(np.sum(eta[ev] - shift) - np.sum(np.log(phi0)))
    grad = Xc[ev].sum(axis=0) - a.sum(axis=0)

    # sum over Efron terms of phi2/phi0, with phi2 = S2(u_k) - frac * T2(u_k), written as
    # X' diag(v) X: row j enters S2(u_k) for every event time u_k <= t_j (weight sum 1/phi0)
    # and, if it is an event, T2 of its own time (weight sum frac/phi0).
    c_k = np.bincount(ev_k, weights=1.0 / phi0, minlength=K)
    f_k = np.bincount(ev_k, weights=frac / phi0, minlength=K)
    v = w * (np.cumsum(c_k)[inv] - np.where(ev, f_k[inv], 0.0))
    second = (Xc * v[:, None]).T @ Xc - a.T @ a
    hess = -0.5 * (second + second.T)
    return grad, hess, loglik


def cox_site_sums(
    beta: npt.ArrayLike, X: npt.ArrayLike, time: npt.ArrayLike, event: npt.ArrayLike
) -> CoxSums:
    """One site's score, Hessian and Efron log partial likelihood (the site is one stratum).

    Parameters
    ----------
    beta : array_like, shape (p,)
        Coefficients at which to evaluate.
    X : array_like, shape (n, p)
        Covariates (finite; a 1-D array is one covariate).
    time : array_like, shape (n,)
        Follow-up times (finite, >= 0).
    event : array_like, shape (n,)
        1 = event observed at ``time``, 0 = censored at ``time``.

    Returns
    -------
    gradient : ndarray, shape (p,)
        ``d l / d beta`` (a sum over the site's events, not a mean).
    hessian : ndarray, shape (p, p)
        ``d^2 l / d beta^2`` (negative semi-definite; the observed information is its negative).
    loglik : float
        Efron log partial likelihood ``l`` of the site's stratum.

    Notes
    -----
    A site without events contributes nothing to the stratified likelihood and returns zeros.
    """
    A, t, e = _site_arrays(X, time, event)
    return _efron_sums(_coef(beta, A.shape[1]), A, t, e)


# ============================================================================ Newton-Raphson
@dataclass(frozen=True)
class CoxFit:
    """Result of :func:`federated_cox` / :func:`cox_newton`.

    Attributes
    ----------
    coef : ndarray, shape (p,)
        Log hazard ratios.
    se : ndarray, shape (p,)
        Standard errors, ``sqrt(diag(covariance))``.
    covariance : ndarray, shape (p, p)
        Inverse of the observed information ``-sum H + l2 * I`` at ``coef``.
    loglik : float
        Log partial likelihood at ``coef`` (summed over strata, without the penalty).
    iterations : int
        Newton steps taken.
    converged : bool
        True when the objective changed by at most ``tol * max(1, |objective|)`` in the last
        full Newton step (or the remaining predicted gain was below that).
    names : tuple of str or None
        Covariate names, if given.
    l2 : float
        Ridge strength used (penalty ``0.5 * l2 * ||beta||^2``).
    objective_history : tuple of float
        Penalised log partial likelihood at the start and after every accepted step
        (non-decreasing).
    step_halvings : int
        Number of times a step was halved over the whole fit (each is one extra round).
    """

    coef: F64
    se: F64
    covariance: F64
    loglik: float
    iterations: int
    converged: bool
    names: tuple[str, ...] | None = None
    l2: float = 0.0
    objective_history: tuple[float, ...] = ()
    step_halvings: int = 0

    @property
    def hazard_ratio(self) -> F64:
        """``exp(coef)``."""
        return np.exp(self.coef)

    def as_dict(self) -> dict[str, float]:
        """``{name: coef}`` (names default to ``x0, x1, ...``)."""
        names = self.names or tuple(f"x{i}" for i in range(self.coef.size))
        return {n: float(c) for n, c in zip(names, self.coef, strict=True)}


def cox_newton(
    total_sums: Callable[[F64], CoxSums],
    n_features: int,
    max_iter: int = 50,
    tol: float = 1e-10,
    l2: float = 0.0,
    names: Sequence[str] | None = None,
    max_halvings: int = 40,
) -> CoxFit:
    """Maximise ``sum_k l_k(beta) - 0.5 l2 ||beta||^2`` from summed site statistics.

    Newton-Raphson from ``beta = 0``; a step that lowers the objective (or makes it non-finite)
    is halved until it does not. Every call of ``total_sums`` is one federated round.

    Parameters
    ----------
    total_sums : callable
        ``beta -> (gradient, hessian, loglik)`` summed over the sites (see :func:`cox_site_sums`).
    n_features : int
        Number of coefficients p.
    max_iter : int
        Maximum number of Newton steps.
    tol : float
        Relative tolerance on the objective: stop when a full step gains at most
        ``tol * max(1, |objective|)``. That step is kept, and Newton's convergence being
        quadratic, the coefficients are then far more accurate than ``sqrt(tol)`` standard
        errors.
    l2 : float
        Ridge strength (>= 0).
    names : sequence of str, optional
        Covariate names kept in the result.
    max_halvings : int
        Give up (``converged=False``) after this many halvings of one step.

    Returns
    -------
    CoxFit
    """
    p = int(n_features)
    if p < 1:
        raise ValueError("n_features must be >= 1")
    if max_iter < 0:
        raise ValueError("max_iter must be >= 0")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError("tol must be a positive finite number")
    if not (l2 >= 0 and math.isfinite(l2)):
        raise ValueError("l2 must be a finite number >= 0")
    names_t = None if names is None else tuple(str(s) for s in names)
    if names_t is not None and len(names_t) != p:
        raise ValueError(f"{len(names_t)} names given for {p} covariates")

    def evaluate(b: F64) -> tuple[F64, F64, float, float]:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            g, H, ll = total_sums(b)  # a wild trial step may be non-finite: it is halved
        g = np.asarray(g, dtype=np.float64)
        H = np.asarray(H, dtype=np.float64)
        if g.shape != (p,) or H.shape != (p, p):
            raise ValueError(f"summed statistics have shapes {g.shape}, {H.shape}; expected p={p}")
        g_pen = g - l2 * b
        info = -H + l2 * np.eye(p)
        obj = float(ll) - 0.5 * l2 * float(b @ b)
        return g_pen, info, float(ll), obj

    def solve(info: F64, g: F64) -> F64:
        try:
            return sla.solve(info, g, assume_a="pos")
        except (sla.LinAlgError, ValueError) as exc:
            raise ValueError(
                "the information matrix is singular (collinear or constant covariates, or too "
                "few events); drop covariates or use l2 > 0"
            ) from exc

    beta = np.zeros(p)
    g, info, ll, obj = evaluate(beta)
    if not math.isfinite(obj):
        raise ValueError("the log partial likelihood is not finite at beta = 0")
    history = [obj]
    iterations = halvings = 0
    converged = False
    for _ in range(max_iter):
        step = solve(info, g)
        scale = tol * max(1.0, abs(obj))
        predicted = 0.5 * float(g @ step)  # gain of the full step on the quadratic model
        t = 1.0
        accepted = False
        for _ in range(max_halvings + 1):
            cand = beta + t * step
            g_c, info_c, ll_c, obj_c = evaluate(cand)
            if math.isfinite(obj_c) and obj_c >= obj:
                accepted = True
                break
            if t * predicted <= scale:  # at the maximum to rounding
                converged = True
                break
            t *= 0.5
            halvings += 1
        if not accepted:
            break
        gain = obj_c - obj
        beta, g, info, ll, obj = cand, g_c, info_c, ll_c, obj_c
        iterations += 1
        history.append(obj)
        if t == 1.0 and gain <= tol * max(1.0, abs(obj)):
            converged = True
            break

    cov = solve(info, np.eye(p))
    cov = 0.5 * (cov + cov.T)
    return CoxFit(
        coef=beta,
        se=np.sqrt(np.diag(cov)),
        covariance=cov,
        loglik=ll,
        iterations=iterations,
        converged=converged,
        names=names_t,
        l2=float(l2),
        objective_history=tuple(history),
        step_halvings=halvings,
    )


def federated_cox(
    site_data: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]],
    max_iter: int = 50,
    tol: float = 1e-10,
    l2: float = 0.0,
    names: Sequence[str] | None = None,
) -> CoxFit:
    """Site-stratified Cox model by Newton-Raphson on summed per-site Efron statistics.

    The in-process reference driver: in a federation each round the coordinator broadcasts
    ``beta``, every site returns :func:`cox_site_sums` and the coordinator adds them up. The
    result equals a pooled Cox fit stratified by site (Efron ties).

    Parameters
    ----------
    site_data : sequence of (X, time, event)
        One entry per site; every X has the same p columns in the same order.
    max_iter, tol, l2, names
        See :func:`cox_newton`.

    Returns
    -------
    CoxFit
    """
    if not site_data:
        raise ValueError("no sites")
    sites = []
    for k, entry in enumerate(site_data):
        if len(entry) != 3:
            raise ValueError(f"site {k}: expected (X, time, event), got {len(entry)} items")
        try:
            sites.append(_site_arrays(*entry))
        except ValueError as exc:
            raise ValueError(f"site {k}: {exc}") from exc
    p = sites[0][0].shape[1]
    for k, (A, _, _) in enumerate(sites):
        if A.shape[1] != p:
            raise ValueError(f"site {k} has {A.shape[1]} covariates but site 0 has {p}")
    if not any(np.any(e == 1.0) for _, _, e in sites):
        raise ValueError("no events at any site: the Cox model cannot be fitted")

    def total(beta: F64) -> CoxSums:
        g = np.zeros(p)
        H = np.zeros((p, p))
        ll = 0.0
        for A, t, e in sites:
            gk, Hk, lk = _efron_sums(beta, A, t, e)
            g += gk
            H += Hk
            ll += lk
        return g, H, ll

    return cox_newton(total, p, max_iter=max_iter, tol=tol, l2=l2, names=names)


# ============================================================================ baseline hazard
def _grid(grid: npt.ArrayLike) -> F64:
    gr = _as_vector(grid, "grid")
    if gr.size == 0:
        raise ValueError("grid is empty")
    if not np.all(np.isfinite(gr)):
        raise ValueError("grid contains non-finite values")
    if np.any(np.diff(gr) <= 0):
        raise ValueError("grid must be strictly increasing")
    return gr


@dataclass(frozen=True)
class BreslowSums:
    """One site's (or several sites' summed) statistics for the Breslow baseline hazard.

    Attributes
    ----------
    grid : ndarray, shape (m,)
        The agreed, strictly increasing time grid ``g_0 < ... < g_{m-1}``.
    events : ndarray, shape (m,)
        Number of events with ``g_{k-1} < t <= g_k`` (``g_{-1} = -inf``); an event in that
        interval is recorded at ``g_k``.
    risk_sum : ndarray, shape (m,)
        Sum of ``exp((x - center).beta)`` over patients still at risk at ``g_k``: censored with
        ``t >= g_k``, or with an event recorded at or after ``g_k``.
    """

    grid: F64
    events: F64
    risk_sum: F64

    def __add__(self, other: BreslowSums) -> BreslowSums:
        if not np.array_equal(self.grid, other.grid):
            raise ValueError("Breslow sums on different time grids cannot be added")
        return BreslowSums(
            self.grid.copy(), self.events + other.events, self.risk_sum + other.risk_sum
        )

    def cumulative_hazard(self) -> F64:
        """Breslow ``H0`` at every grid time: ``cumsum(events / risk_sum)``."""
        if np.any((self.events > 0) & (self.risk_sum <= 0)):
            raise ValueError("events with an empty (or underflowed) risk set; check center/beta")
        safe = np.where(self.risk_sum > 0, self.risk_sum, 1.0)
        return np.cumsum(np.where(self.events > 0, self.events / safe, 0.0))

    def at(self, t: float) -> float:
        """``H0(t)``: the cumulative hazard at the last grid time <= ``t`` (0 before the grid).

        Raises ValueError beyond the last grid time (events there are not counted).
        """
        if not math.isfinite(t):
            raise ValueError("t must be finite")
        if t > self.grid[-1]:
            raise ValueError(f"t = {t} lies beyond the last grid time {self.grid[-1]}")
        k = int(np.searchsorted(self.grid, t, side="right"))
        return 0.0 if k == 0 else float(self.cumulative_hazard()[k - 1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists of Python floats)."""
        return {
            "grid": self.grid.tolist(),
            "events": self.events.tolist(),
            "risk_sum": self.risk_sum.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BreslowSums:
        """Inverse of :meth:`to_dict`."""
        gr = _grid(d["grid"])
        ev = _as_vector(d["events"], "events")
        rs = _as_vector(d["risk_sum"], "risk_sum")
        if ev.size != gr.size or rs.size != gr.size:
            raise ValueError("events and risk_sum must have one value per grid time")
        return cls(gr, ev, rs)


def baseline_hazard_sums(
    beta: npt.ArrayLike,
    X: npt.ArrayLike,
    time: npt.ArrayLike,
    event: npt.ArrayLike,
    grid: npt.ArrayLike,
    center: npt.ArrayLike | None = None,
) -> BreslowSums:
    """One site's event counts and risk-set sums on an agreed time grid (see :class:`BreslowSums`).

    Summed over sites (``sum(sums[1:], sums[0])``), :meth:`BreslowSums.cumulative_hazard` is the
    pooled Breslow estimate of a one-stratum model with coefficients ``beta``; a single site's
    sums give its own stratum's baseline. The estimate is exact (identical to Breslow on the
    patient rows) when the grid contains every event time, e.g. every day up to the horizon for
    times in whole days; otherwise it is Breslow on event times rounded up to the grid.

    Parameters
    ----------
    beta : array_like, shape (p,)
    X : array_like, shape (n, p)
    time, event : array_like, shape (n,)
    grid : array_like, shape (m,)
        Strictly increasing agreed times.
    center : array_like, shape (p,), optional
        Agreed covariate values of the baseline patient (default 0). The pooled covariate mean
        (from :func:`hcc_fl.shared.tabular.feature_sums`) matches lifelines' ``baseline_*_``
        and keeps ``exp`` in range. Use the same ``center`` in :func:`survival_at`.

    Returns
    -------
    BreslowSums
    """
    A, t, e = _site_arrays(X, time, event)
    b = _coef(beta, A.shape[1])
    gr = _grid(grid)
    c = _center(center, A.shape[1])
    with np.errstate(over="ignore"):
        w = np.exp((A - c) @ b)
    if not np.all(np.isfinite(w)):
        raise ValueError("exp((x - center).beta) overflows; pass center (e.g. the pooled mean)")
    m = gr.size
    ev = e == 1.0
    k_ev = np.searchsorted(gr, t, side="left")  # interval (g_{k-1}, g_k] of each time
    in_grid = ev & (k_ev < m)
    events = np.bincount(k_ev[in_grid], minlength=m).astype(np.float64)
    # effective time: an event in (g_{k-1}, g_k] is recorded at g_k
    t_eff = np.where(in_grid, gr[np.minimum(k_ev, m - 1)], t)
    last = np.searchsorted(gr, t_eff, side="right")  # at risk at g_0 .. g_{last-1}
    per = np.asarray(np.bincount(last, weights=w, minlength=m + 1), dtype=np.float64)
    risk_sum = np.cumsum(per[::-1])[::-1][1:]
    return BreslowSums(gr.copy(), events, risk_sum)


def survival_at(
    H0_t: float, beta: npt.ArrayLike, X: npt.ArrayLike, center: npt.ArrayLike | None = None
) -> F64:
    """Predicted survival ``exp(-H0(t) * exp((x - center).beta))`` at one time ``t``.

    Parameters
    ----------
    H0_t : float
        Baseline cumulative hazard at ``t`` (e.g. ``sums.at(30.0)`` for 30 days).
    beta : array_like, shape (p,)
    X : array_like, shape (n, p)
    center : array_like, shape (p,), optional
        The ``center`` used for the baseline sums (default 0).

    Returns
    -------
    ndarray, shape (n,)
    """
    if not (math.isfinite(H0_t) and H0_t >= 0):
        raise ValueError("H0_t must be a finite number >= 0")
    A = np.asarray(X, dtype=np.float64)
    if A.ndim == 1:
        A = A.reshape(1, -1)
    if A.ndim != 2:
        raise ValueError(f"X must be a 2-D array (patients x covariates), got {A.ndim}-D")
    if not np.all(np.isfinite(A)):
        raise ValueError("X contains non-finite values (NaN or inf)")
    b = _coef(beta, A.shape[1])
    c = _center(center, A.shape[1])
    with np.errstate(over="ignore"):
        return np.exp(-H0_t * np.exp((A - c) @ b))


# ============================================================================ Harrell's C
def concordance(time: npt.ArrayLike, event: npt.ArrayLike, risk: npt.ArrayLike) -> float:
    """Harrell's concordance index; a higher ``risk`` means shorter survival.

    Comparable pairs (i, j): ``event_i = 1`` and either ``t_j > t_i`` or ``t_j = t_i`` with
    ``event_j = 0`` (censored at the same time counts as surviving longer). A pair is concordant
    when ``risk_i > risk_j`` and counts one half when the risks are equal. Equals
    ``lifelines.utils.concordance_index(time, -risk, event)`` (lifelines scores longer survival
    higher). Exact O(n^2) pair count in blocks.

    Parameters
    ----------
    time, event, risk : array_like, shape (n,)

    Returns
    -------
    float
    """
    t, e = _survival_data(time, event)
    r = _as_vector(risk, "risk")
    if r.size != t.size:
        raise ValueError(f"risk has {r.size} values but time has {t.size}")
    if not np.all(np.isfinite(r)):
        raise ValueError("risk contains non-finite values")
    idx = np.flatnonzero(e == 1.0)
    if idx.size == 0:
        raise ValueError("no events: Harrell's C needs at least one observed event")
    censored = e == 0.0
    block = max(1, _CHUNK // t.size)
    n_conc = n_tied = n_pairs = 0
    for s in range(0, idx.size, block):
        i = idx[s : s + block]
        ti, ri = t[i, None], r[i, None]
        comparable = (t > ti) | ((t == ti) & censored)
        n_pairs += int(comparable.sum())
        n_conc += int((comparable & (r < ri)).sum())
        n_tied += int((comparable & (r == ri)).sum())
    if n_pairs == 0:
        raise ValueError("no comparable pairs (every event is at or after every other time)")
    return (n_conc + 0.5 * n_tied) / n_pairs
