"""Early-recurrence model of seed 003: one shared 2-D ResNet over the B-mode, arterial-phase and
portal-phase images, the three feature vectors concatenated into one logit.

The backbone is MONAI's ``ResNet`` (``tiny``: basic blocks [1,1,1,1], widths 8/16/32/64 at
64x64; ``full``: ResNet-50 at 224x224). MONAI's residual blocks keep BatchNorm whatever ``norm``
says (science.md 1.1 a), so every BatchNorm is swapped for GroupNorm after construction: batch
statistics of small, non-IID site batches would otherwise be averaged by FedAvg, and Opacus
refuses BatchNorm under DP-SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

IMAGES = ("bmode", "ceus_ap", "ceus_pp")


@dataclass(frozen=True)
class ErConfig:
    """Size of the shared backbone; ``size`` is the square input side in pixels."""

    size: int
    widths: tuple[int, ...] = (8, 16, 32, 64)
    layers: tuple[int, ...] = (1, 1, 1, 1)
    resnet50: bool = False
    dropout: float = 0.3


ER_PROFILES = {
    "tiny": ErConfig(size=64),
    "full": ErConfig(size=224, resnet50=True),
}


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (1/2/3-D) inside ``module`` by GroupNorm, and in-place ReLUs by
    plain ones (in place, returns ``module``)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.GroupNorm(_groups(child.num_features), child.num_features))
        elif isinstance(child, nn.ReLU):
            setattr(module, name, nn.ReLU(inplace=False))
        else:
            batchnorm_to_groupnorm(child)
    return module


class SharedResNet2D(nn.Module):
    """One 2-D ResNet applied to each of the ``len(IMAGES)`` images of a patient.

    Input ``images`` shape (B, 3, H, W), one standardised grey image per channel; ``clinical``
    is accepted for a uniform call signature and ignored. Output: logits (B, 1).
    """

    def __init__(self, cfg: ErConfig) -> None:
        from monai.networks.nets import ResNet, resnet50  # here: monai costs seconds to import

        super().__init__()
        self.cfg = cfg
        if cfg.resnet50:
            backbone: nn.Module = resnet50(spatial_dims=2, n_input_channels=1,
                                           feed_forward=False)
            feats = 2048
        else:
            backbone = ResNet("basic", list(cfg.layers), list(cfg.widths), spatial_dims=2,
                              n_input_channels=1, feed_forward=False)
            feats = cfg.widths[-1]
        self.backbone = batchnorm_to_groupnorm(backbone)
        self.out_features = feats
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(len(IMAGES) * feats, 1))

    def features(self, images: Tensor) -> Tensor:
        """The concatenated per-image features, shape (B, 3 x F)."""
        b, k, h, w = images.shape
        f = self.backbone(images.reshape(b * k, 1, h, w))
        return f.reshape(b, k * self.out_features)

    def forward(self, images: Tensor, clinical: Tensor | None = None) -> Tensor:
        """Return logits (B, 1)."""
        return self.head(self.features(images))  # type: ignore[no-any-return]


__all__ = ["ER_PROFILES", "IMAGES", "ErConfig", "SharedResNet2D", "batchnorm_to_groupnorm"]
