"""Grad-CAM maps of the pHCC classifier and a test that they fall on the lesion (science.md 1.4).

``grad_cam`` wraps ``monai.visualize.GradCAM``. Two MONAI details matter here:

* its default post-processing, ``default_normalizer``, maps (min, max) to (1, 0), i.e. it
  *inverts* the map; we pass our own per-case min-max scaling to [0, 1] instead;
* it registers forward and backward hooks on the target layer for good and calls
  ``zero_grad`` on the model, so it runs on a private copy of the model (with every parameter
  requiring grad, so a frozen encoder still yields gradients at the target layer).

``cam_in_mask_rate`` and ``cam_mask_test`` measure localisation against known lesion masks (the
phantom's ground truth): the share of the top CAM mass inside the mask, against the share a
spatially uniform map would put there (the mask's area fraction).
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from monai.visualize import GradCAM
from scipy import stats
from torch import Tensor, nn

ArrayLike = Tensor | npt.NDArray[np.generic]


def _minmax(maps: Tensor) -> Tensor:
    """Scale each map of (B, 1, ...) to [0, 1]; a constant map becomes all zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp(min=1e-12), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def grad_cam(model: nn.Module, x: Tensor, target_layer: str = "encoder.layer4",
             class_idx: int = 0, **kwargs: object) -> Tensor:
    """Grad-CAM maps of ``model`` for inputs ``x`` (B, C, H, W), shape (B, H, W) in [0, 1].

    ``model`` must return logits of shape (B, K); for the pHCC classifier K = 1 and
    ``class_idx=0`` is the positive-class logit. Extra ``kwargs`` (e.g. ``clinical``) are passed
    to the model. ``model`` itself is left untouched (no hooks, gradients or mode change).
    A case whose map is zero everywhere (no positive evidence at the target layer) gets an
    all-zero map.
    """
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.requires_grad_(True)
    if target_layer not in {name for name, _ in work.named_modules()}:
        raise KeyError(f"model has no layer '{target_layer}'")
    cam = GradCAM(nn_module=work, target_layers=target_layer, postprocessing=_minmax)
    with torch.enable_grad():
        maps = cam(x, class_idx=class_idx, **kwargs)
    return maps[:, 0].detach()


def _as_tensor(a: ArrayLike) -> Tensor:
    return a.detach().cpu() if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))


def cam_in_mask_rate(cams: ArrayLike, masks: ArrayLike, top_fraction: float = 0.1) -> Tensor:
    """Per case, the share of the CAM mass of its top ``top_fraction`` pixels inside the mask.

    ``cams`` (B, H, W) non-negative maps, ``masks`` (B, H, W) lesion masks (bool or 0/1).
    Returns (B,) fractions in [0, 1]. The top pixels are the ceil(top_fraction * H * W) largest
    CAM values; their CAM values are the weights. A case whose top pixels carry no mass (an
    all-zero map) gets its mask's area fraction, the value of a spatially uniform map.
    """
    c = _as_tensor(cams).to(torch.float64)
    m = _as_tensor(masks).to(torch.bool)
    if c.shape != m.shape or c.ndim != 3:
        raise ValueError(f"cams and masks must both be (B, H, W); got {tuple(c.shape)} and "
                         f"{tuple(m.shape)}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    flat_c = c.reshape(c.shape[0], -1)
    flat_m = m.reshape(m.shape[0], -1).to(torch.float64)
    k = math.ceil(top_fraction * flat_c.shape[1])
    values, idx = flat_c.topk(k, dim=1)
    inside = flat_m.gather(1, idx)
    mass = values.sum(dim=1)
    share = (values * inside).sum(dim=1) / mass.clamp(min=1e-300)
    return torch.where(mass > 0, share, flat_m.mean(dim=1))


class CamMaskTest(NamedTuple):
    """Result of ``cam_mask_test`` over the ``n`` cases with a non-empty mask."""

    mean_in_mask: float
    chance: float
    p_value: float
    n: int


def cam_mask_test(cams: ArrayLike, masks: ArrayLike, top_fraction: float = 0.1) -> CamMaskTest:
    """Does the top CAM mass fall inside the lesion more often than by chance?

    For each case with a non-empty mask: the in-mask share of its top CAM mass
    (``cam_in_mask_rate``) and its chance level, the mask's area fraction (the share a uniform
    map would give). Returns the mean share, the mean chance level, and the p-value of a
    one-sided Wilcoxon signed-rank test (paired, share > chance; zero differences dropped;
    p = 1 when every difference is zero).

    Raises
    ------
    ValueError
        No case has a non-empty mask.
    """
    m = _as_tensor(masks).to(torch.bool)
    rate = cam_in_mask_rate(cams, m, top_fraction)
    area = m.reshape(m.shape[0], -1).to(torch.float64).mean(dim=1)
    keep = area > 0
    if not bool(keep.any()):
        raise ValueError("cam_mask_test needs at least one case with a non-empty mask")
    share, chance = rate[keep].numpy(), area[keep].numpy()
    diff = share - chance
    if np.all(diff == 0):
        p = 1.0
    else:
        p = float(stats.wilcoxon(share, chance, alternative="greater").pvalue)
    return CamMaskTest(float(share.mean()), float(chance.mean()), p, int(keep.sum()))


__all__ = ["CamMaskTest", "cam_in_mask_rate", "cam_mask_test", "grad_cam"]
