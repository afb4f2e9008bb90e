"""Local training and prediction in plain PyTorch (no Flower here).

The same functions train a site's round under Flower, the centralized baseline and the local
baselines, so the arms differ only in which data and which starting weights they see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from hcc_fl.client.data import SiteData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one local training call."""

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    proximal_mu: float = 0.0
    seed: int = 0
    device: str = "cpu"
    augment: bool = True


@dataclass(frozen=True)
class TrainOutcome:
    """What one local training call reports (aggregates only)."""

    loss: float
    n_examples: int
    steps: int


def resolve_device(name: str) -> str:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _augment(video: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(video.shape[0], generator=gen) < 0.5
    flip = flip.view(-1, *([1] * (video.dim() - 1)))
    video = torch.where(flip, video.flip(-1), video)
    noise = torch.randn(video.shape, generator=gen) * 0.05
    return video + noise


def train_one_round(
    model: nn.Module,
    data: SiteData,
    cfg: TrainConfig,
    on_step: Callable[[float], None] | None = None,
) -> TrainOutcome:
    """Train ``model`` in place for ``cfg.epochs`` epochs on ``data``.

    BCE-with-logits with ``pos_weight = n_neg / n_pos`` (this site's own counts). With
    ``cfg.proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_start||^2`` is added, where
    ``w_start`` are the weights the call started from (the global model).
    """
    device = resolve_device(cfg.device)
    model.to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed)  # batching and augmentation
    torch.manual_seed(cfg.seed)  # dropout draws from the global generator
    n = len(data)
    n_pos = float(data.label.sum())
    pos_weight = torch.tensor([(n - n_pos) / max(n_pos, 1.0)], device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = (
        [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else []
    )
    total, count, steps = 0.0, 0, 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # a batch of one gives noisy GroupNorm statistics; skip the remainder
            video = data.video[idx]
            if cfg.augment:
                video = _augment(video, gen)
            logits = model(video.to(device), data.clinical[idx].to(device)).squeeze(1)
            loss = loss_fn(logits, data.label[idx].to(device))
            if start:
                prox = sum(
                    ((p - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True)
                )
                loss = loss + 0.5 * cfg.proximal_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            steps += 1
            if on_step:
                on_step(float(loss.detach()))
    return TrainOutcome(total / max(count, 1), n, steps)


@torch.no_grad()
def predict(model: nn.Module, data: SiteData, device: str = "cpu", batch_size: int = 16
            ) -> npt.NDArray[np.float64]:
    """Predicted probabilities, shape (N,)."""
    device = resolve_device(device)
    model.to(device).eval()
    out = []
    for i in range(0, len(data), batch_size):
        logits = model(
            data.video[i : i + batch_size].to(device), data.clinical[i : i + batch_size].to(device)
        ).squeeze(1)
        out.append(torch.sigmoid(logits.double()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def bce_loss(prob: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> float:
    """Mean binary cross-entropy of probabilities (unweighted)."""
    p = np.clip(prob, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
