"""Clinical statistics (public API). Results are frozen dataclasses.

Binary outcomes: :func:`auc_ci`, :func:`delong_test`, :func:`youden_threshold`,
:func:`binary_metrics`, :func:`calibration`, :func:`hosmer_lemeshow`, :func:`net_benefit`.
Survival: :func:`c_index`, :func:`logrank`, :func:`kaplan_meier`, :func:`cox_fit`,
:func:`net_benefit_survival`. Segmentation: :func:`dice`. Pooling across sites from summed
sufficient statistics: :mod:`hcc_fl.shared.metrics.pooled`.
"""

from hcc_fl.shared.metrics.classification import (
    AUCResult,
    BinaryMetrics,
    Calibration,
    DecisionCurve,
    DeLongTest,
    HosmerLemeshow,
    auc_ci,
    binary_metrics,
    calibration,
    delong_test,
    hosmer_lemeshow,
    net_benefit,
    wilson_interval,
    youden_threshold,
)
from hcc_fl.shared.metrics.pooled import ScoreGrid, site_histograms, youden_from_histograms
from hcc_fl.shared.metrics.segmentation import dice
from hcc_fl.shared.metrics.survival import (
    CoxResult,
    KMCurve,
    LogRank,
    c_index,
    cox_fit,
    kaplan_meier,
    logrank,
    net_benefit_survival,
)

__all__ = [
    "AUCResult", "BinaryMetrics", "Calibration", "CoxResult", "DeLongTest", "DecisionCurve",
    "HosmerLemeshow", "KMCurve", "LogRank", "ScoreGrid", "auc_ci", "binary_metrics",
    "c_index", "calibration", "cox_fit", "delong_test", "dice", "hosmer_lemeshow",
    "kaplan_meier", "logrank", "net_benefit", "net_benefit_survival", "site_histograms",
    "wilson_interval", "youden_from_histograms", "youden_threshold",
]
