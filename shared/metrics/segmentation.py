"""Segmentation overlap."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def dice(pred_mask: npt.ArrayLike, true_mask: npt.ArrayLike, empty: float = 1.0) -> float:
    """Dice coefficient 2|A n B| / (|A| + |B|) of two binary masks of the same shape.

    Empty-empty rule: when both masks are empty the prediction is perfect and ``empty``
    (default 1.0, as MONAI's ``DiceMetric(ignore_empty=False)``) is returned.
    """
    a = np.asarray(pred_mask).astype(bool)
    b = np.asarray(true_mask).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum() + b.sum())
    if total == 0:
        return float(empty)
    return float(2.0 * np.logical_and(a, b).sum() / total)
