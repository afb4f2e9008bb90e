"""Site-side evaluation: only aggregate statistics leave this module, never patient scores."""

from __future__ import annotations

import numpy as np
import torch
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


@torch.no_grad()
def ssl_validation(model: nn.Module, data: SiteData, seed: int = 0
                   ) -> dict[str, int | float | list[int] | list[float]]:
    """The self-supervised loss on a site's validation patches (two fixed-seed views of each;
    NaN when the split has fewer than two patients); no AUC in this stage."""
    from hcc_fl.shared.ssl_augment import two_views

    model.eval()
    loss = float("nan")
    if len(data) > 1:
        v1, v2 = two_views(data.video, torch.Generator().manual_seed(seed))
        loss = float(model(v1, v2))
    return {"val-loss": loss, "val-auc": float("nan"), "num-examples": float(len(data))}
