"""Site-side evaluation: only aggregate statistics leave this module, never patient scores."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import nn

from hcc_fl.client.data import SiteData
from hcc_fl.client.train import bce_loss, predict
from hcc_fl.shared.metrics import ScoreGrid, auc_ci, binary_metrics, site_histograms


def validation_metrics(
    model: nn.Module, data: SiteData, device: str = "cpu"
) -> dict[str, int | float | list[int] | list[float]]:
    """Loss and AUC (NaN when the split has one class) on a site's validation split."""
    prob = predict(model, data, device)
    y = data.label.numpy().astype(np.float64)
    auc = float("nan")
    if 0 < y.sum() < len(y):
        auc = auc_ci(y, prob).auc
    return {"val-loss": bce_loss(prob, y), "val-auc": auc, "num-examples": float(len(y))}


def threshold_histograms(
    model: nn.Module, data: SiteData, n_bins: int, device: str = "cpu"
) -> tuple[list[float], list[float]]:
    """Class-wise histograms of predicted probabilities on the agreed grid (cases, controls)."""
    prob = predict(model, data, device)
    pos, neg = site_histograms(data.label.numpy(), prob, ScoreGrid(n_bins))
    return pos.tolist(), neg.tolist()


def external_statistics(
    model: nn.Module, data: SiteData, threshold: float, device: str = "cpu"
) -> dict[str, Any]:
    """The external site's headline statistics, computed where the patients are.

    AUC with DeLong 95 % CI and, at the training-site Youden ``threshold``, sensitivity,
    specificity, accuracy, PPV and NPV with the confusion counts.
    """
    prob = predict(model, data, device)
    y = data.label.numpy().astype(np.float64)
    out: dict[str, Any] = {"n": int(len(y)), "n_pos": int(y.sum())}
    if 0 < y.sum() < len(y):
        res = auc_ci(y, prob, method="delong")
        out.update(auc=res.auc, auc_ci=[res.lower, res.upper], auc_variance=res.variance)
    else:
        out.update(auc=math.nan, auc_ci=[math.nan, math.nan], auc_variance=math.nan)
    bm = binary_metrics(y, prob, threshold)
    out.update(
        threshold=threshold, sensitivity=bm.sensitivity, specificity=bm.specificity,
        accuracy=bm.accuracy, ppv=bm.ppv, npv=bm.npv, tp=bm.tp, fp=bm.fp, tn=bm.tn, fn=bm.fn,
        loss=bce_loss(prob, y),
    )
    return out
