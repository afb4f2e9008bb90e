"""CECMM (seed 000): channel-separated 3-D CNN on the CEUS cine + clinical MLP, late fusion.

The video branch is an interaction-reduced channel-separated network (ir-CSN, Tran et al.,
ICCV 2019): a 3-D ResNet with bottleneck blocks whose 3x3x3 convolution is depthwise
(``groups = width``), so channels mix only in the 1x1x1 convolutions. Normalisation is GroupNorm
and every activation and residual add is out of place, so the same model trains under Opacus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _groups(channels: int) -> int:
    return min(32, max(1, channels // 4))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


class CSNBottleneck(nn.Module):
    """ir-CSN bottleneck: 1x1x1 reduce, 3x3x3 depthwise, 1x1x1 expand, residual."""

    def __init__(self, in_ch: int, width: int, stride: int, expansion: int = 4) -> None:
        super().__init__()
        out_ch = width * expansion
        self.reduce = nn.Conv3d(in_ch, width, 1, bias=False)
        self.norm1 = _norm(width)
        self.depthwise = nn.Conv3d(
            width, width, 3, stride=stride, padding=1, groups=width, bias=False
        )
        self.norm2 = _norm(width)
        self.expand = nn.Conv3d(width, out_ch, 1, bias=False)
        self.norm3 = _norm(out_ch)
        self.act = nn.ReLU(inplace=False)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block; x shape (B, C, T, H, W)."""
        out = self.act(self.norm1(self.reduce(x)))
        out = self.act(self.norm2(self.depthwise(out)))
        out = self.norm3(self.expand(out))
        return self.act(out + self.shortcut(x))


class CSNEncoder(nn.Module):
    """ir-CSN video encoder; returns globally pooled features of size ``widths[-1] * 4``."""

    def __init__(
        self, in_channels: int, stem: int, widths: tuple[int, ...], blocks: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, stem, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3),
                      bias=False),
            _norm(stem),
            nn.ReLU(inplace=False),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        stages: list[nn.Module] = []
        ch = stem
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layers: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(CSNBottleneck(ch, w, stride))
                ch = w * 4
            stages.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_features = ch

    def forward(self, x: Tensor) -> Tensor:
        """Encode a clip (B, C, T, H, W) to (B, F)."""
        return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)


@dataclass(frozen=True)
class CecmmConfig:
    """Size of the CECMM model; ``tiny`` for CPU and tests, ``full`` (ir-CSN-50) for GPU."""

    stem: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    frames: int
    size: int
    n_clinical: int = 7
    dropout: float = 0.3


PROFILES = {
    "tiny": CecmmConfig(stem=8, widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1), frames=16, size=48),
    "full": CecmmConfig(stem=64, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), frames=32,
                        size=112),
}


class CECMM(nn.Module):
    """Channel-separated CNN + clinical MLP with late fusion, one logit for P(Ki-67 high).

    Inputs: ``video`` shape (B, 1, T, H, W) standardised per clip; ``clinical`` shape
    (B, n_clinical) standardised. Output: logits shape (B, 1). With ``n_clinical=0`` the clinical
    branch is absent (the R-DLCEUS video-only variant).
    """

    def __init__(self, cfg: CecmmConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.video = CSNEncoder(1, cfg.stem, cfg.widths, cfg.blocks)
        self.video_head = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(self.video.out_features, 128), nn.ReLU(inplace=False)
        )
        clin_dim = 0
        self.clinical: nn.Module | None = None
        if cfg.n_clinical > 0:
            self.clinical = nn.Sequential(
                nn.Linear(cfg.n_clinical, 32), nn.ReLU(inplace=False), nn.Linear(32, 32),
                nn.ReLU(inplace=False),
            )
            clin_dim = 32
        self.fusion = nn.Sequential(
            nn.Linear(128 + clin_dim, 64), nn.ReLU(inplace=False), nn.Linear(64, 1)
        )

    def forward(self, video: Tensor, clinical: Tensor | None = None) -> Tensor:
        """Return logits (B, 1)."""
        feats = self.video_head(self.video(video))
        if self.clinical is not None:
            if clinical is None:
                raise ValueError("this CECMM has a clinical branch: pass clinical (B, n)")
            feats = torch.cat([feats, self.clinical(clinical)], dim=1)
        return self.fusion(feats)
