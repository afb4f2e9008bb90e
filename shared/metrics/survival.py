"""Survival statistics: Harrell's C, Kaplan-Meier, log-rank, Cox, survival decision curves.

Convention: a higher ``risk`` means shorter survival (lifelines' ``concordance_index`` uses the
opposite convention; :func:`c_index` negates for you). Kaplan-Meier, log-rank and Cox are
computed by lifelines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index

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
    """A fitted Cox model (Efron ties): coefficients, standard errors, p-values, C-index."""

    coef: dict[str, float]
    se: dict[str, float]
    p_value: dict[str, float]
    concordance: float
    log_likelihood: float
    strata: tuple[str, ...]


def cox_fit(
    data: pd.DataFrame,
    duration: str,
    event: str,
    covariates: list[str],
    strata: list[str] | None = None,
) -> CoxResult:
    """Fit a (optionally stratified) Cox proportional-hazards model with lifelines."""
    cols = [duration, event, *covariates, *(strata or [])]
    missing = [c for c in cols if c not in data.columns]
    if missing:
        raise KeyError(f"columns not in the data: {', '.join(missing)}")
    cph = CoxPHFitter()
    cph.fit(data[cols], duration_col=duration, event_col=event, strata=strata or None)
    s = cph.summary
    return CoxResult(
        {k: float(v) for k, v in s["coef"].items()},
        {k: float(v) for k, v in s["se(coef)"].items()},
        {k: float(v) for k, v in s["p"].items()},
        float(cph.concordance_index_), float(cph.log_likelihood_), tuple(strata or ()),
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
