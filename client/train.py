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
    objective: str = "bce"  # bce | barlow (self-supervised, two views) | siamese (seg + BCE)
    freeze_encoder: bool = False  # linear probe: only parameters outside ``model.encoder`` train


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

    ``cfg.objective``: ``bce`` - BCE-with-logits with ``pos_weight = n_neg / n_pos`` (this
    site's own counts); ``barlow`` - the Barlow Twins loss of two augmented views of each
    sample (labels unused; ``model`` is a :class:`~hcc_fl.shared.models.phcc.BarlowTwinsModel`);
    ``siamese`` - segmentation loss at both time points plus the weighted BCE of the outcome
    (``data.masks`` needed). With ``cfg.proximal_mu > 0`` the FedProx term
    ``mu/2 * ||w - w_start||^2`` is added, where ``w_start`` are the weights the call started
    from (the global model). ``cfg.freeze_encoder`` trains only the parameters outside
    ``model.encoder`` (linear probe).
    """
    device = resolve_device(cfg.device)
    model.to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed)  # batching and augmentation
    torch.manual_seed(cfg.seed)  # dropout draws from the global generator
    n = len(data)
    n_pos = float(data.label.sum())
    pos_weight = torch.tensor([(n - n_pos) / max(n_pos, 1.0)], device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    encoder = getattr(model, "encoder", None) if cfg.freeze_encoder else None
    if cfg.freeze_encoder and encoder is None:
        raise ValueError("freeze_encoder needs a model with an 'encoder' part")
    frozen = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    params = [p for p in model.parameters() if id(p) not in frozen]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else []
    total, count, steps = 0.0, 0, 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # a batch of one gives noisy GroupNorm statistics; skip the remainder
            loss = _batch_loss(model, data, idx, cfg, gen, device, loss_fn)
            if start:
                prox = sum(
                    ((p - s) ** 2).sum() for p, s in zip(params, start, strict=True)
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


def _batch_loss(model: nn.Module, data: SiteData, idx: torch.Tensor, cfg: TrainConfig,
                gen: torch.Generator, device: str, loss_fn: nn.Module) -> torch.Tensor:
    """The training loss of one batch under ``cfg.objective``."""
    video = data.video[idx]
    if cfg.objective == "barlow":
        from hcc_fl.shared.ssl_augment import two_views

        v1, v2 = two_views(video, gen)
        return model(v1.to(device), v2.to(device))  # type: ignore[no-any-return]
    if cfg.objective == "siamese":
        from hcc_fl.shared.models.siamese import siamese_loss

        if data.masks is None:
            raise ValueError("the siamese objective needs segmentation masks")
        seg, logit = model.segment_and_score(video.to(device))  # type: ignore[operator]
        return siamese_loss(seg, data.masks[idx].to(device), logit,  # type: ignore[no-any-return]
                            data.label[idx].to(device),
                            pos_weight=getattr(loss_fn, "pos_weight", None))
    if cfg.objective != "bce":
        raise ValueError(f"unknown training objective '{cfg.objective}'")
    if cfg.augment:
        video = _augment(video, gen)
    logits = model(video.to(device), data.clinical[idx].to(device)).squeeze(1)
    return loss_fn(logits, data.label[idx].to(device))  # type: ignore[no-any-return]


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
