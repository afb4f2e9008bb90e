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


def dice_per_case(
    pred: npt.ArrayLike, target: npt.ArrayLike, empty_value: float = 1.0, spatial_dims: int = 2
) -> npt.NDArray[np.float64]:
    """Dice 2|A n B| / (|A| + |B|) of each case of a batch of binary masks.

    Parameters
    ----------
    pred, target : array-like
        Masks of the same shape; non-zero = inside (threshold probabilities first). The last
        ``spatial_dims`` axes are the image; the leading axes index cases (and, e.g., time
        points): (N, H, W) gives N values, (N, 2, H, W) gives (N, 2).
    empty_value : float
        Empty-empty rule: a case where both masks are empty is a perfect prediction and gets
        ``empty_value`` (default 1.0, as MONAI ``DiceMetric(ignore_empty=False)``; pass NaN to
        leave such cases out of a ``nanmean``, as ``ignore_empty=True`` does). An empty mask
        against a non-empty one gives 0.

    Returns
    -------
    ndarray of float64 with the leading shape.
    """
    a = np.asarray(pred).astype(bool)
    b = np.asarray(target).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    if spatial_dims < 1 or a.ndim < spatial_dims:
        raise ValueError(f"masks of shape {a.shape} have fewer than {spatial_dims} spatial axes")
    axes = tuple(range(a.ndim - spatial_dims, a.ndim))
    inter = np.logical_and(a, b).sum(axis=axes).astype(np.float64)
    total = (a.sum(axis=axes) + b.sum(axis=axes)).astype(np.float64)
    out = np.full(total.shape, float(empty_value), dtype=np.float64)
    np.divide(2.0 * inter, total, out=out, where=total > 0)
    return out
