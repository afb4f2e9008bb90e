"""pHCC-SSL of seed S3 (science.md 1.4 and 4): a 2-D ResNet encoder over DCE-MRI phase patches,
pretrained with Barlow Twins and fine-tuned with a linear head for the proliferative subtype.

Input patches are (B, 4, H, W): the standardised PRE, ART (arterial), PV (portal-venous) and DEL
(delayed) phases on a tumour-centred slice, in that fixed order. Both models add two kinetic
channels inside ``forward`` (``with_kinetics``), so the encoder always sees 6 channels and the
augmentations of ``hcc_fl.shared.ssl_augment`` act on the 4 acquired phases only.

The encoder is MONAI's ``ResNet`` (``tiny``: basic blocks [1,1,1,1], widths 16/32/64/128 at
64x64; ``full``: ResNet-18 at 224x224) with every BatchNorm swapped for GroupNorm, as in
``hcc_fl.shared.models.er``: the same weights then train under Opacus and FedAvg without batch
statistics. The encoder *is* the MONAI ResNet (a subclass), so its layers keep MONAI's names
(``layer4`` ...) and its state_dict moves unchanged from the SSL model to the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.losses import BarlowTwinsLoss
from monai.networks.nets import ResNet
from torch import Tensor, nn

from hcc_fl.shared.models.er import batchnorm_to_groupnorm

PHASES = ("pre", "art", "pv", "del")
CHANNELS = (*PHASES, "wash_in", "wash_out")
_PRE, _ART, _DEL = 0, 1, 3


@dataclass(frozen=True)
class PhccConfig:
    """Encoder size; ``size`` is the square patch side in pixels the profile is meant for."""

    size: int
    widths: tuple[int, ...] = (16, 32, 64, 128)
    layers: tuple[int, ...] = (1, 1, 1, 1)
    dropout: float = 0.0


PHCC_PROFILES = {
    "tiny": PhccConfig(size=64),
    # MONAI resnet18: basic blocks [2,2,2,2], widths 64/128/256/512
    "full": PhccConfig(size=224, widths=(64, 128, 256, 512), layers=(2, 2, 2, 2)),
}


def with_kinetics(x: Tensor) -> Tensor:
    """Append wash-in (ART - PRE) and wash-out (ART - DEL) to the four phases.

    ``x`` shape (B, 4, H, W) in the order PRE, ART, PV, DEL; returns (B, 6, H, W) with channels
    ``CHANNELS``.

    Raises
    ------
    ValueError
        ``x`` is not 4-D with 4 channels.
    """
    if x.ndim != 4 or x.shape[1] != len(PHASES):
        raise ValueError(f"expected phases of shape (B, 4, H, W), got {tuple(x.shape)}")
    art = x[:, _ART : _ART + 1]
    return torch.cat([x, art - x[:, _PRE : _PRE + 1], art - x[:, _DEL : _DEL + 1]], dim=1)


class PhccEncoder(ResNet):
    """MONAI 2-D ``ResNet`` on the 6 kinetic channels, GroupNorm, no fc: (B, 6, H, W) -> (B, F).

    ``out_features`` is F (``widths[-1]``: 128 tiny, 512 full).
    """

    def __init__(self, cfg: PhccConfig) -> None:
        super().__init__("basic", list(cfg.layers), list(cfg.widths), spatial_dims=2,
                         n_input_channels=len(CHANNELS), feed_forward=False)
        batchnorm_to_groupnorm(self)
        self.cfg = cfg
        self.out_features = cfg.widths[-1]


class PhccClassifier(nn.Module):
    """Encoder plus a linear head: phases (B, 4, H, W) -> logits (B, 1).

    ``clinical`` is accepted for the common call signature and ignored. The logit has shape
    (B, 1), so ``monai.visualize.GradCAM`` works with ``class_idx=0``.
    """

    def __init__(self, cfg: PhccConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = PhccEncoder(cfg)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.encoder.out_features, 1))

    def freeze_encoder(self, flag: bool = True) -> None:
        """Freeze (``flag=True``: linear probe) or unfreeze the encoder; head stays trainable."""
        for p in self.encoder.parameters():
            p.requires_grad_(not flag)

    def forward(self, x: Tensor, clinical: Tensor | None = None) -> Tensor:
        """Return logits (B, 1) for phases ``x`` of shape (B, 4, H, W)."""
        return self.head(self.encoder(with_kinetics(x)))  # type: ignore[no-any-return]


class BarlowTwinsModel(nn.Module):
    """Encoder plus projector, trained with MONAI's ``BarlowTwinsLoss`` (science.md 4).

    Projector: Linear(F, d0) - GroupNorm - ReLU - Linear(d0, d1) with ``proj_dims = (d0, d1)``.
    ``forward(view1, view2)`` takes two augmented views of the same phase patches, each
    (B, 4, H, W) with B > 1, and returns the scalar loss. Hand ``encoder.state_dict()`` to
    ``PhccClassifier.encoder`` after pretraining.
    """

    def __init__(self, cfg: PhccConfig, proj_dims: tuple[int, int] = (256, 256),
                 lambd: float = 0.005) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = PhccEncoder(cfg)
        d0, d1 = proj_dims
        # built with BatchNorm1d, then the same BatchNorm -> GroupNorm rule as the encoder
        self.projector = batchnorm_to_groupnorm(nn.Sequential(
            nn.Linear(self.encoder.out_features, d0), nn.BatchNorm1d(d0), nn.ReLU(),
            nn.Linear(d0, d1),
        ))
        self.loss = BarlowTwinsLoss(lambd=lambd)

    def embed(self, x: Tensor) -> Tensor:
        """Projector output (B, d1) for phases ``x`` of shape (B, 4, H, W)."""
        return self.projector(self.encoder(with_kinetics(x)))  # type: ignore[no-any-return]

    def forward(self, view1: Tensor, view2: Tensor) -> Tensor:
        """Barlow Twins loss of two views, each (B, 4, H, W).

        Raises
        ------
        ValueError
            The views differ in shape, or the batch size is below 2 (the loss standardises each
            feature over the batch).
        """
        if view1.shape != view2.shape:
            raise ValueError(f"views differ in shape: {tuple(view1.shape)} vs "
                             f"{tuple(view2.shape)}")
        if view1.shape[0] < 2:
            raise ValueError(f"Barlow Twins needs batch size > 1, got batch size "
                             f"{view1.shape[0]}")
        return self.loss(self.embed(view1), self.embed(view2))  # type: ignore[no-any-return]


__all__ = ["CHANNELS", "PHASES", "PHCC_PROFILES", "BarlowTwinsModel", "PhccClassifier",
           "PhccConfig", "PhccEncoder", "with_kinetics"]
