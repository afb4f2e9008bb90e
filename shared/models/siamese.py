"""Siamese U-Net of seed 004 (HBV-ACLF): liver segmentation on T0 and T1 ultrasound plus a
30-day mortality logit from the change between the two examinations (science.md 1.6).

One MONAI ``BasicUNet`` (2-D, one input and one output channel) is applied to the T0 and to the
T1 image with the same weights. Its forward is re-done here from its submodules (``conv_0``,
``down_1`` .. ``down_4``, ``upcat_4`` .. ``upcat_1``, ``final_conv``) so that the bottleneck
tensor is available: its global average pool gives ``f0`` and ``f1``, and the risk head maps
``[f0, f1, f1 - f0]`` through dropout and a linear layer to one logit.

DP notes (science.md 1.7): MONAI's default activation is ``LeakyReLU(inplace=True)``, which breaks
Opacus' backward hooks, so the activation is rebuilt out of place. The default norm is
``InstanceNorm2d(affine=True)``, which is per sample (no batch statistics), so it is kept; there is
no BatchNorm to swap. The two time points go through the U-Net as two separate calls with batch
size B (not one call with batch 2B) so that Opacus' per-sample gradients have one row per
patient, summed over the two uses of the shared weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from torch import Tensor, nn

TIME_POINTS = ("t0", "t1")
# MONAI's default activation, but out of place (Opacus hooks fail on in-place ops after hooks).
ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": False})
# MONAI's default smoothing terms of DiceLoss, so the loss below equals DiceCELoss.
_SMOOTH = 1e-5


@dataclass(frozen=True)
class SiameseConfig:
    """Size of the Siamese U-Net.

    ``size``: square input side in pixels; ``features``: the six BasicUNet feature numbers (five
    encoder levels, then the last decoder level; the bottleneck has ``features[4]`` channels);
    ``hidden``: 0 for a single linear risk layer, otherwise the width of one hidden layer (ReLU).
    """

    size: int
    features: tuple[int, int, int, int, int, int] = (32, 32, 64, 128, 256, 32)
    dropout: float = 0.3
    hidden: int = 0


SIAMESE_PROFILES = {
    "tiny": SiameseConfig(size=64, features=(8, 8, 16, 32, 64, 8)),
    "full": SiameseConfig(size=256),
}


class SiameseUNet(nn.Module):
    """Shared-weight U-Net over a T0/T1 ultrasound pair with a mortality head.

    Input ``images`` (B, 2, H, W): channel 0 is T0, channel 1 is T1, each a standardised grey
    image (H and W ideally multiples of 16). :meth:`forward` returns the mortality logit (B, 1);
    :meth:`segment_and_score` also returns the liver segmentation logits (B, 2, H, W).
    """

    def __init__(self, cfg: SiameseConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unet = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1,
                              features=cfg.features, act=ACT)
        self.bottleneck_channels = cfg.features[4]
        n_in = 3 * self.bottleneck_channels
        head: list[nn.Module] = [nn.Dropout(cfg.dropout)]
        if cfg.hidden > 0:
            head += [nn.Linear(n_in, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1)]
        else:
            head.append(nn.Linear(n_in, 1))
        self.head = nn.Sequential(*head)

    @staticmethod
    def _check(images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != len(TIME_POINTS):
            raise ValueError(f"images must have shape (B, 2, H, W) (T0, T1), got "
                             f"{tuple(images.shape)}")

    def _encode(self, x: Tensor) -> list[Tensor]:
        """Encoder outputs x0 .. x4 of one image batch (B, 1, H, W); x4 is the bottleneck."""
        u = self.unet
        xs = [u.conv_0(x)]
        for down in (u.down_1, u.down_2, u.down_3, u.down_4):
            xs.append(down(xs[-1]))
        return xs

    def _decode(self, xs: list[Tensor]) -> Tensor:
        """Segmentation logits (B, 1, H, W) from the encoder outputs."""
        u = self.unet
        x0, x1, x2, x3, x4 = xs
        d = u.upcat_4(x4, x3)
        d = u.upcat_3(d, x2)
        d = u.upcat_2(d, x1)
        d = u.upcat_1(d, x0)
        return u.final_conv(d)  # type: ignore[no-any-return]

    def _pool(self, bottleneck: Tensor) -> Tensor:
        return bottleneck.mean(dim=(2, 3))

    def _score(self, f0: Tensor, f1: Tensor) -> Tensor:
        return self.head(torch.cat([f0, f1, f1 - f0], dim=1))  # type: ignore[no-any-return]

    def features(self, images: Tensor) -> Tensor:
        """The head's input ``[f0, f1, f1 - f0]``, shape (B, 3 x bottleneck channels)."""
        self._check(images)
        f0 = self._pool(self._encode(images[:, 0:1])[-1])
        f1 = self._pool(self._encode(images[:, 1:2])[-1])
        return torch.cat([f0, f1, f1 - f0], dim=1)

    def segment_and_score(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Return (segmentation logits (B, 2, H, W), mortality logit (B, 1))."""
        self._check(images)
        segs, pooled = [], []
        for t in range(len(TIME_POINTS)):
            xs = self._encode(images[:, t:t + 1])
            segs.append(self._decode(xs))
            pooled.append(self._pool(xs[-1]))
        return torch.cat(segs, dim=1), self._score(pooled[0], pooled[1])

    def forward(self, images: Tensor, clinical: Tensor | None = None) -> Tensor:
        """Return the mortality logit (B, 1) (encoder only; ``clinical`` is accepted for a
        uniform call signature and ignored)."""
        self._check(images)
        f0 = self._pool(self._encode(images[:, 0:1])[-1])
        f1 = self._pool(self._encode(images[:, 1:2])[-1])
        return self._score(f0, f1)


def segmentation_loss(seg_logits: Tensor, masks: Tensor, reduction: str = "mean") -> Tensor:
    """Soft Dice + BCE on sigmoid logits, summed over the time points (channels).

    For one channel and ``reduction="mean"`` this equals MONAI's ``DiceCELoss(sigmoid=True)``
    (Dice per sample and channel with smooth terms 1e-5, BCE averaged over pixels).

    ``seg_logits`` and ``masks`` (B, T, H, W); ``reduction``: ``"mean"``, ``"sum"`` or ``"none"``
    (per-sample loss, shape (B,)).
    """
    if seg_logits.shape != masks.shape:
        raise ValueError(f"seg_logits {tuple(seg_logits.shape)} and masks "
                         f"{tuple(masks.shape)} differ in shape")
    target = masks.to(seg_logits.dtype)
    prob = torch.sigmoid(seg_logits)
    dims = tuple(range(2, seg_logits.ndim))
    inter = (prob * target).sum(dim=dims)
    denom = prob.sum(dim=dims) + target.sum(dim=dims)
    dice_loss = 1.0 - (2.0 * inter + _SMOOTH) / (denom + _SMOOTH)  # (B, T)
    bce = F.binary_cross_entropy_with_logits(seg_logits, target, reduction="none").mean(dim=dims)
    return _reduce((dice_loss + bce).sum(dim=1), reduction)


def siamese_loss(
    seg_logits: Tensor,
    masks: Tensor,
    logit: Tensor,
    label: Tensor,
    seg_weight: float = 1.0,
    pos_weight: float | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``seg_weight`` x (DiceCE at T0 + DiceCE at T1) + BCE-with-logits of the mortality label.

    Parameters
    ----------
    seg_logits, masks : Tensor
        (B, 2, H, W) segmentation logits and {0, 1} liver masks at T0 and T1.
    logit : Tensor
        (B, 1) or (B,) mortality logit.
    label : Tensor
        (B,) or (B, 1) 30-day death, 0 or 1.
    seg_weight : float
        Weight of the segmentation term (science.md 1.6 weights the BCE by about 0.5 instead;
        ``seg_weight=2`` gives the same optimum up to a factor).
    pos_weight : float or Tensor, optional
        Weight of positive labels in the BCE (``BCEWithLogitsLoss(pos_weight=...)``).
    reduction : str
        ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-sample losses, shape (B,)). Every term
        is a per-sample quantity, so the mean decomposes over patients (fine for DP-SGD).
    """
    seg = segmentation_loss(seg_logits, masks, reduction="none")
    z = logit.reshape(-1)
    y = label.reshape(-1).to(z.dtype)
    if z.shape[0] != seg.shape[0] or y.shape[0] != seg.shape[0]:
        raise ValueError(f"batch sizes differ: segmentation {seg.shape[0]}, logit {z.shape[0]}, "
                         f"label {y.shape[0]}")
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=z.dtype,
                                                          device=z.device)
    risk = F.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="none")
    return _reduce(seg_weight * seg + risk, reduction)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction '{reduction}' (use mean, sum or none)")


__all__ = ["SIAMESE_PROFILES", "TIME_POINTS", "SiameseConfig", "SiameseUNet",
           "segmentation_loss", "siamese_loss"]
