"""Two-view augmentation of DCE-MRI phase patches for Barlow Twins pretraining (science.md 4).

Each view of a (B, 4, H, W) batch of standardised PRE/ART/PV/DEL patches gets, per sample:

* a random resized crop (area fraction in ``crop_scale``, width/height in ``aspect_ratio``)
  resampled back to H x W, a random horizontal flip and a rotation by a multiple of 90
  degrees, all in one bilinear ``grid_sample`` so the four phases move together (the phases
  are co-registered and the kinetic channels ART - PRE, ART - DEL must stay meaningful);
* an intensity scale and shift drawn per sample and shared by the four phases (the phase
  order and the relative enhancement carry the timing signal, so they are kept);
* additive Gaussian noise, independent per pixel and phase.

Only torch operations are used and every random number comes from the caller's
``torch.Generator``, so a seed fixes both views.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def augment(batch: Tensor, generator: torch.Generator, *,
            crop_scale: tuple[float, float] = (0.6, 1.0),
            aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3),
            intensity_scale: tuple[float, float] = (0.8, 1.2),
            intensity_shift: float = 0.1,
            noise_std: float = 0.05) -> Tensor:
    """One random view of ``batch`` (B, C, H, W); see the module docstring."""
    if batch.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(batch.shape)}")
    b = batch.shape[0]
    g = generator
    # crop: side fractions (in normalised coordinates the crop spans 2*w by 2*h around centre t)
    area = _uniform(b, crop_scale[0], crop_scale[1], g)
    log_ratio = _uniform(b, math.log(aspect_ratio[0]), math.log(aspect_ratio[1]), g)
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    tx = (1 - w) * _uniform(b, -1.0, 1.0, g)
    ty = (1 - h) * _uniform(b, -1.0, 1.0, g)
    flip = torch.where(torch.rand(b, generator=g, device=g.device) < 0.5, -1.0, 1.0)
    quarter = torch.randint(0, 4, (b,), generator=g, device=g.device).to(torch.float32)
    cos, sin = torch.cos(quarter * math.pi / 2).round(), torch.sin(quarter * math.pi / 2).round()
    # input location = diag(w, h) @ rotation @ diag(flip, 1) @ output location + (tx, ty)
    theta = torch.zeros(b, 2, 3, device=g.device)
    theta[:, 0, 0] = w * cos * flip
    theta[:, 0, 1] = -w * sin
    theta[:, 1, 0] = h * sin * flip
    theta[:, 1, 1] = h * cos
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    scale = _uniform(b, intensity_scale[0], intensity_scale[1], g)
    shift = _uniform(b, -intensity_shift, intensity_shift, g)
    noise = torch.randn(batch.shape, generator=g, device=g.device)

    x = batch if batch.is_floating_point() else batch.float()
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x * scale.to(x).view(b, 1, 1, 1) + shift.to(x).view(b, 1, 1, 1)
    return x + noise_std * noise.to(x)


def two_views(batch: Tensor, generator: torch.Generator, *,
              crop_scale: tuple[float, float] = (0.6, 1.0),
              aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3),
              intensity_scale: tuple[float, float] = (0.8, 1.2),
              intensity_shift: float = 0.1,
              noise_std: float = 0.05) -> tuple[Tensor, Tensor]:
    """Two independent augmentations of ``batch`` (B, 4, H, W), each of the same shape.

    The keyword arguments set the strength of each augmentation (see ``augment``); a fixed
    ``generator`` state gives the same two views.
    """
    view = partial(augment, crop_scale=crop_scale, aspect_ratio=aspect_ratio,
                   intensity_scale=intensity_scale, intensity_shift=intensity_shift,
                   noise_std=noise_std)
    return view(batch, generator), view(batch, generator)


__all__ = ["augment", "two_views"]
