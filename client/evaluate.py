"""Site-side evaluation: only aggregate statistics leave this module, never patient scores."""

from __future__ import annotations

import numpy as np
from torch import nn

from hcc_fl.client.data import SiteData
from hcc_fl.client.train import bce_loss, predict
from hcc_fl.shared.metrics import auc_ci


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
