"""Clinical statistics (public API). Results are frozen dataclasses.

Binary outcomes: :func:`auc_ci`, :func:`delong_test`, :func:`delong_unpaired_test`,
:func:`partial_auc`, :func:`youden_threshold`,
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
    DeLongSummary,
    DeLongTest,
    HosmerLemeshow,
    UnpairedDeLongTest,
    auc_ci,
    binary_metrics,
    calibration,
    delong_summary,
    delong_test,
    delong_unpaired_from_summaries,
    delong_unpaired_test,
    hosmer_lemeshow,
    net_benefit,
    partial_auc,
    partial_auc_from_roc,
    roc_points,
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
    "AUCResult", "BinaryMetrics", "Calibration", "CoxResult", "DeLongSummary", "DeLongTest",
    "DecisionCurve", "HosmerLemeshow", "KMCurve", "LogRank", "ScoreGrid", "UnpairedDeLongTest",
    "auc_ci", "binary_metrics", "c_index", "calibration", "cox_fit", "delong_summary",
    "delong_test", "delong_unpaired_from_summaries", "delong_unpaired_test", "dice",
    "hosmer_lemeshow", "kaplan_meier", "logrank", "net_benefit", "net_benefit_survival",
    "partial_auc", "partial_auc_from_roc", "roc_points", "site_histograms", "wilson_interval",
    "youden_from_histograms", "youden_threshold",
]
