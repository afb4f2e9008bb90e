"""Survival statistics: Harrell's C, Kaplan-Meier, log-rank, Cox, survival decision curves.

Convention: a higher ``risk`` means shorter survival (lifelines' ``concordance_index`` uses the
opposite convention; :func:`c_index` negates for you). Kaplan-Meier, log-rank and Cox are
computed by lifelines; :func:`cox_fit` then polishes lifelines' coefficients with Newton steps on
the Efron likelihood of :mod:`hcc_fl.shared.cox` until the score is below 1e-9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index
from lifelines.utils.concordance import _concordance_summary_statistics
from scipy import linalg, stats

from hcc_fl.shared.cox import cox_site_sums
from hcc_fl.shared.metrics.classification import DecisionCurve

ArrayLike = npt.ArrayLike


def _survival_arrays(time: ArrayLike, event: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event, dtype=np.float64).ravel()
    if t.shape != e.shape:
        raise ValueError(f"time has {t.size} values but event has {e.size}")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("times must be finite and >= 0")
    if not np.all(np.isin(e, (0.0, 1.0))):
        raise ValueError("event must contain only 0 (censored) and 1 (event)")
    return t, e


def c_index(time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> float:
    """Harrell's concordance index; higher ``risk`` = shorter survival.

    Comparable pairs have the shorter time observed as an event; ties in risk count one half.
    Computed as ``lifelines.utils.concordance_index(time, -risk, event)``.
    """
    t, e = _survival_arrays(time, event)
    r = np.asarray(risk, dtype=np.float64).ravel()
    if r.shape != t.shape:
        raise ValueError(f"risk has {r.size} values but time has {t.size}")
    return float(concordance_index(t, -r, e))


@dataclass(frozen=True)
class LogRank:
    """Log-rank test (k groups): chi-square statistic, degrees of freedom, p-value."""

    statistic: float
    df: int
    p_value: float


def logrank(time: ArrayLike, event: ArrayLike, group: ArrayLike) -> LogRank:
    """Log-rank test of equal survival across the groups in ``group``."""
    t, e = _survival_arrays(time, event)
    g = np.asarray(group).ravel()
    if len(np.unique(g)) < 2:
        raise ValueError("the log-rank test needs at least two groups")
    res = multivariate_logrank_test(t, g, e)
    return LogRank(float(res.test_statistic), int(res.degrees_of_freedom), float(res.p_value))


@dataclass(frozen=True)
class KMCurve:
    """Kaplan-Meier estimate: step function at ``times`` with pointwise CIs and numbers at risk.

    CIs are lifelines' exponential Greenwood ("log(-log)") intervals.
    """

    times: tuple[float, ...]
    survival: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    at_risk: tuple[int, ...]

    def at(self, t: float) -> float:
        """S(t) (right-continuous step function)."""
        idx = int(np.searchsorted(np.asarray(self.times), t, side="right")) - 1
        return 1.0 if idx < 0 else self.survival[idx]


def kaplan_meier(time: ArrayLike, event: ArrayLike, level: float = 0.95) -> KMCurve:
    """Kaplan-Meier curve with pointwise confidence intervals (lifelines)."""
    t, e = _survival_arrays(time, event)
    kmf = KaplanMeierFitter(alpha=1 - level).fit(t, e)
    sf = kmf.survival_function_.iloc[:, 0]
    ci = kmf.confidence_interval_survival_function_
    at_risk = kmf.event_table["at_risk"].reindex(sf.index).fillna(0).astype(int)
    return KMCurve(tuple(map(float, sf.index)), tuple(map(float, sf.values)),
                   tuple(map(float, ci.iloc[:, 0].values)), tuple(map(float, ci.iloc[:, 1].values)),
                   tuple(int(x) for x in at_risk.values))


@dataclass(frozen=True)
class CoxResult:
    """A fitted Cox model (Efron ties): coefficients, standard errors, p-values, C-index.

    ``score_norm`` is max |d l / d beta| (the score of the Efron log partial likelihood, summed
    over strata) at ``coef``; :func:`cox_fit` drives it to <= 1e-9 (R's printed precision and
    beyond). ``newton_steps`` counts the Newton steps taken after lifelines' fit.
    """

    coef: dict[str, float]
    se: dict[str, float]
    p_value: dict[str, float]
    concordance: float
    log_likelihood: float
    strata: tuple[str, ...]
    score_norm: float = math.nan
    newton_steps: int = 0


#: :func:`cox_fit` polishes lifelines' coefficients until the score's max-abs norm is this small.
COX_SCORE_TOL = 1e-9


def _efron_total(beta: np.ndarray, blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """Efron score, Hessian and log partial likelihood summed over strata (``shared.cox``)."""
    p = beta.size
    g, h, ll = np.zeros(p), np.zeros((p, p)), 0.0
    for X, t, e in blocks:
        gk, hk, lk = cox_site_sums(beta, X, t, e)
        g, h, ll = g + gk, h + hk, ll + lk
    return g, h, ll


def _newton_polish(beta: np.ndarray, blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   tol: float = COX_SCORE_TOL, max_steps: int = 25
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
    """Newton steps on the Efron likelihood from ``beta`` until max |score| <= ``tol``.

    A step that lowers the likelihood is halved; the loop also stops once a step no longer
    reduces the score (its rounding floor, which for covariates of huge magnitude can lie above
    ``tol``: the caller sees it in ``score_norm``). Returns (beta, score, Hessian, loglik, steps).
    """
    g, h, ll = _efron_total(beta, blocks)
    steps = 0
    while steps < max_steps and np.max(np.abs(g)) > tol:
        step = linalg.solve(-h, g, assume_a="pos")
        for _ in range(30):
            cand = beta + step
            g_c, h_c, ll_c = _efron_total(cand, blocks)
            if np.isfinite(ll_c) and ll_c >= ll - 1e-12 * max(1.0, abs(ll)):
                break
            step = step / 2
        else:
            break
        if np.max(np.abs(g_c)) >= np.max(np.abs(g)):
            break  # at the rounding floor: keep the better point
        beta, g, h, ll = cand, g_c, h_c, ll_c
        steps += 1
    return beta, g, h, ll, steps


def cox_fit(
    data: pd.DataFrame,
    duration: str,
    event: str,
    covariates: list[str],
    strata: list[str] | None = None,
) -> CoxResult:
    """Fit a (optionally stratified) Cox proportional-hazards model, Efron ties.

    lifelines' ``CoxPHFitter`` gives the fit; it stops on a relative change of the log
    likelihood, a few 1e-6 from the maximum in a coefficient (e.g. ``sex`` in R's ``lung``).
    Newton steps on the same Efron likelihood (:func:`hcc_fl.shared.cox.cox_site_sums`, each
    stratum its own risk sets) then drive the score to max |d l / d beta| <= 1e-9
    (``CoxResult.score_norm``). Standard errors (inverse observed information), Wald p-values,
    the log partial likelihood and the C-index are those of the final coefficients.
    """
    cols = [duration, event, *covariates, *(strata or [])]
    missing = [c for c in cols if c not in data.columns]
    if missing:
        raise KeyError(f"columns not in the data: {', '.join(missing)}")
    cph = CoxPHFitter()
    cph.fit(data[cols], duration_col=duration, event_col=event, strata=strata or None)
    names = [str(k) for k in cph.params_.index]
    frame = data[cols]
    parts = [g for _, g in frame.groupby(strata, sort=True)] if strata else [frame]
    blocks = [(g[names].to_numpy(np.float64), g[duration].to_numpy(np.float64),
               g[event].to_numpy(np.float64)) for g in parts]
    beta, score, hess, ll, steps = _newton_polish(cph.params_.to_numpy(np.float64), blocks)
    cov = linalg.inv(-hess)
    se = np.sqrt(np.diag(0.5 * (cov + cov.T)))
    p = 2.0 * stats.norm.sf(np.abs(beta / se))
    # lifelines' C-index of a Cox fit (pairs within a stratum), at the final coefficients
    correct = tied = pairs = 0.0
    for X, t, e in blocks:
        if t.size > 1:
            c, ti, n = _concordance_summary_statistics(t, -(X @ beta), e)
            correct, tied, pairs = correct + c, tied + ti, pairs + n
    conc = (correct + 0.5 * tied) / pairs if pairs else math.nan
    return CoxResult(
        dict(zip(names, map(float, beta), strict=True)),
        dict(zip(names, map(float, se), strict=True)),
        dict(zip(names, map(float, p), strict=True)),
        float(conc), float(ll), tuple(strata or ()), float(np.max(np.abs(score))), steps,
    )


def net_benefit_survival(
    time: ArrayLike, event: ArrayLike, risk: ArrayLike, horizon: float, thresholds: ArrayLike
) -> DecisionCurve:
    """Survival decision curve at ``horizon`` (dcurves' conventions).

    For each threshold pt, test-positives have ``risk >= pt``; their event risk is
    1 - KM(horizon) among them. NB = P(pos) * (risk_pos - (1 - risk_pos) * pt / (1 - pt));
    treat-all uses 1 - KM(horizon) of everyone.
    """
    t, e = _survival_arrays(time, event)
    r = np.asarray(risk, dtype=np.float64).ravel()
    pts = np.asarray(thresholds, dtype=np.float64)
    n = len(t)

    def km_risk(mask: np.ndarray) -> float:
        return 1.0 - kaplan_meier(t[mask], e[mask]).at(horizon)

    all_risk = km_risk(np.ones(n, dtype=bool))
    model, all_ = [], []
    for pt in pts:
        odds = pt / (1 - pt)
        pos = r >= pt
        if pos.any():
            rp = km_risk(pos)
            frac = pos.mean()
            model.append(float(rp * frac - (1 - rp) * frac * odds))
        else:
            model.append(0.0)
        all_.append(float(all_risk - (1 - all_risk) * odds))
    return DecisionCurve(tuple(map(float, pts)), tuple(model), tuple(all_),
                         tuple(0.0 for _ in pts))
