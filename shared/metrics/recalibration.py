"""Logistic recalibration, fitted across sites from summed sums (no score leaves a site).

A model's probability ``p`` is recalibrated to ``expit(a + b * logit(p))``: the intercept ``a``
and slope ``b`` are the maximum-likelihood logistic regression of the outcome on ``logit(p)``
(Cox's recalibration; the same regression whose ``b`` is the calibration slope in
:func:`hcc_fl.shared.metrics.calibration`). Recalibration with ``b > 0`` is strictly
increasing, so every rank statistic (AUC, ROC curve, the patients above a mapped threshold)
is unchanged.

Federated fit: at a coefficient vector each site returns ``[n, g_a, g_b, I_aa, I_ab, I_bb,
loglik]`` (its count, score vector, observed information and log-likelihood,
:func:`site_recalibration_sums`); the coordinator adds the vectors and takes a Newton step
(:func:`fit_recalibration`), halving it when the summed log-likelihood falls. Summed over the
sites this is exactly the Newton iteration on the pooled patients, so the pooled fit equals the
central fit to the convergence tolerance (default: every score component below 1e-9 x n and
the next Newton step below 1e-10 relative to the coefficients).
The starting point comes from the pooled class-wise histograms the sites already sent for the
Youden threshold (:func:`binned_recalibration`, a fit on the bin centres): from there Newton
typically needs two or three messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import expit

from hcc_fl.shared.metrics.classification import _as_binary, _logit

F64 = npt.NDArray[np.float64]
SUMS_LENGTH = 7  # n, score (2), observed information (3 unique entries), log-likelihood


@dataclass(frozen=True)
class Recalibration:
    """A fitted logistic recalibration ``p -> expit(intercept + slope * logit(p))``.

    ``method`` is ``newton`` (exact fit on the sites' patients) or ``binned`` (fit on the
    pooled histograms' bin centres); ``converged`` says whether every score component fell
    below the tolerance within ``iterations`` evaluations.
    """

    intercept: float
    slope: float
    n: int
    log_likelihood: float
    score_norm: float
    iterations: int
    converged: bool
    method: str

    def apply(self, prob: npt.ArrayLike) -> F64:
        """Recalibrated probabilities (same shape as ``prob``)."""
        return recalibrate(prob, self.intercept, self.slope)

    def usable(self) -> bool:
        """Converged, finite and rank-preserving (slope > 0)."""
        return (self.converged and math.isfinite(self.intercept) and math.isfinite(self.slope)
                and self.slope > 0)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recalibration:
        """Inverse of :meth:`as_dict`; raises ValueError on a malformed entry."""
        try:
            out = cls(float(d["intercept"]), float(d["slope"]), int(d["n"]),
                      float(d["log_likelihood"]), float(d["score_norm"]), int(d["iterations"]),
                      bool(d["converged"]), str(d["method"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed recalibration: {exc}") from None
        if not (math.isfinite(out.intercept) and math.isfinite(out.slope)):
            raise ValueError("recalibration coefficients must be finite")
        return out


def recalibrate(prob: npt.ArrayLike, intercept: float, slope: float) -> F64:
    """``expit(intercept + slope * logit(p))``; ``p`` is clipped to [1e-12, 1 - 1e-12] as in
    the calibration slope."""
    p = np.asarray(prob, dtype=np.float64)
    if not (math.isfinite(intercept) and math.isfinite(slope)):
        raise ValueError("recalibration coefficients must be finite")
    return np.asarray(expit(intercept + slope * _logit(p.ravel())),
                      dtype=np.float64).reshape(p.shape)


def _sums(y: F64, lp: F64, coef: tuple[float, float], w: F64 | None = None) -> F64:
    a, b = coef
    eta = a + b * lp
    mu = expit(eta)
    ww = np.ones_like(y) if w is None else w
    r = ww * (y - mu)
    v = ww * mu * (1.0 - mu)
    loglik = float(np.sum(ww * (y * eta - np.logaddexp(0.0, eta))))
    return np.array([ww.sum(), r.sum(), (r * lp).sum(), v.sum(), (v * lp).sum(),
                     (v * lp * lp).sum(), loglik], dtype=np.float64)


def site_recalibration_sums(y: npt.ArrayLike, prob: npt.ArrayLike,
                            coef: tuple[float, float]) -> F64:
    """One site's sums at ``coef = (intercept, slope)``: ``[n, sum (y - mu), sum (y - mu) x,
    sum w, sum w x, sum w x^2, loglik]`` with ``x = logit(p)``, ``mu = expit(a + b x)`` and
    ``w = mu (1 - mu)``."""
    yy, p = _as_binary(y, prob)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    a, b = float(coef[0]), float(coef[1])
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError("recalibration coefficients must be finite")
    return _sums(yy, _logit(p), (a, b))


def check_sums(vec: npt.ArrayLike, n_expected: int | None = None) -> F64:
    """Validate one site's (or a sum of sites') recalibration sums; ValueError names the
    problem. ``n_expected`` is the count the site declared in the pooled-validation pass."""
    v = np.asarray(vec, dtype=np.float64).ravel()
    if v.shape != (SUMS_LENGTH,):
        raise ValueError(f"recalibration sums must have {SUMS_LENGTH} values, got {v.size}")
    if not np.all(np.isfinite(v)):
        raise ValueError("recalibration sums contain non-finite values")
    n, _, _, i00, i01, i11, loglik = v
    if n < 0 or n != round(n):
        raise ValueError(f"recalibration count {n} is not a non-negative integer")
    if n_expected is not None and int(n) != int(n_expected):
        raise ValueError(f"recalibration count {int(n)} differs from the {n_expected} patients "
                         "declared in the validation pass")
    if i00 < 0 or i11 < 0 or i00 * i11 - i01 * i01 < -1e-9 * max(1.0, i00 * i11):
        raise ValueError("recalibration information matrix is not positive semi-definite")
    if i00 > n / 4 * (1 + 1e-12) + 1e-12:
        raise ValueError("recalibration weights exceed n/4")
    if loglik > 1e-9 * max(1.0, n):
        raise ValueError("recalibration log-likelihood is positive")
    return v


def fit_recalibration(
    ask: Callable[[tuple[float, float]], F64],
    start: tuple[float, float] = (0.0, 1.0),
    tol: float = 1e-9,
    max_evaluations: int = 50,
    method: str = "newton",
    step_tol: float = 1e-10,
) -> Recalibration:
    """Newton-Raphson on summed sums: ``ask(coef)`` returns the sum over sites of
    :func:`site_recalibration_sums` at ``coef``. Stops when every score component is at most
    ``tol * n`` and the next Newton step is below ``step_tol`` relative to the coefficients;
    a step that lowers the log-likelihood is halved (up to 30 times)."""
    coef = (float(start[0]), float(start[1]))
    s = check_sums(ask(coef))
    evaluations = 1
    while True:
        n = s[0]
        if n == 0:
            raise ValueError("recalibration needs at least one patient")
        grad = s[1:3]
        norm = float(np.max(np.abs(grad)))
        if s[6] > -1e-9 * n:  # log-likelihood ~ 0: the outcome is separated, no MLE exists
            return Recalibration(coef[0], coef[1], int(n), float(s[6]), norm, evaluations,
                                 False, method)
        info = np.array([[s[3], s[4]], [s[4], s[5]]])
        try:
            step = np.linalg.solve(info, grad)
        except np.linalg.LinAlgError:
            step = np.full(2, np.nan)
        if (norm <= tol * max(1.0, n) and np.all(np.isfinite(step))
                and float(np.max(np.abs(step))) <= step_tol * (1.0 + max(map(abs, coef)))):
            return Recalibration(coef[0], coef[1], int(n), float(s[6]), norm, evaluations,
                                 True, method)
        if not np.all(np.isfinite(step)) or evaluations >= max_evaluations:
            return Recalibration(coef[0], coef[1], int(n), float(s[6]), norm, evaluations,
                                 False, method)
        for _ in range(31):
            trial = (coef[0] + float(step[0]), coef[1] + float(step[1]))
            t = check_sums(ask(trial))
            evaluations += 1
            if t[6] >= s[6] - 1e-12 * abs(s[6]) or evaluations >= max_evaluations:
                break
            step = step / 2.0
        coef, s = trial, t
        if abs(coef[0]) > 1e6 or abs(coef[1]) > 1e6:  # separation: the MLE does not exist
            return Recalibration(coef[0], coef[1], int(s[0]), float(s[6]),
                                 float(np.max(np.abs(s[1:3]))), evaluations, False, method)


def binned_recalibration(pos: npt.ArrayLike, neg: npt.ArrayLike, edges: npt.ArrayLike,
                         tol: float = 1e-9) -> Recalibration:
    """The recalibration fitted on pooled class-wise histograms: every case (control) in a bin
    is put at the bin's centre. Approximate (within a bin scores differ); the starting point of
    the exact federated fit, and the fit under secure aggregation, where only the pooled
    histograms reach the coordinator."""
    p1 = np.asarray(pos, dtype=np.float64).ravel()
    p0 = np.asarray(neg, dtype=np.float64).ravel()
    e = np.asarray(edges, dtype=np.float64).ravel()
    if not (p1.shape == p0.shape and e.size == p1.size + 1):
        raise ValueError("histograms and edges do not match")
    lp_bins = _logit((e[:-1] + e[1:]) / 2.0)
    keep1, keep0 = p1 > 0, p0 > 0
    lp = np.concatenate([lp_bins[keep1], lp_bins[keep0]])
    y = np.concatenate([np.ones(keep1.sum()), np.zeros(keep0.sum())])
    w = np.concatenate([p1[keep1], p0[keep0]])
    return fit_recalibration(lambda c: _sums(y, lp, c, w), tol=tol, method="binned")
