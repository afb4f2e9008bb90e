"""Baselines without Flower: the same model and budget on pooled data or on one site alone.

``centralized`` trains on the training sites' pooled train splits; ``local:<site>`` on one
site's train split. Each trains ``rounds x local_epochs`` epochs from the same initial weights as
the federated arms, picks its Youden threshold on training-site validation predictions and is
evaluated on the external site by the same code the external site runs under Flower.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcc_fl.client.components import (
    SiteScorer,
    deep_model_extras,
    external_components,
    in_process_asker,
)
from hcc_fl.client.data import SiteData, load_site
from hcc_fl.client.disclosure import DisclosureRefused, ReleasePolicy
from hcc_fl.client.evaluate import validation_metrics
from hcc_fl.client.statistics import (
    external_report,
    pooled_validation,
    pooled_validation_probs,
    recalibrated_report,
    site_auc,
)
from hcc_fl.client.train import TrainConfig, predict, train_one_round
from hcc_fl.shared.components import (
    TaskComponents,
    fit_components,
    main_models,
    selection_summary,
)
from hcc_fl.shared.evaluation import recalibration_of, threshold_splits
from hcc_fl.shared.metrics.pooled import ScoreGrid
from hcc_fl.shared.models import build_model

log = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    """Outcome of one baseline arm."""

    name: str
    external: dict[str, Any]
    threshold: float
    validation: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    train_seconds: float = 0.0
    component_thresholds: dict[str, float] = field(default_factory=dict)
    component_validation: dict[str, Any] = field(default_factory=dict)
    tabular: dict[str, Any] = field(default_factory=dict)
    cross_site: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> its AUC


def run_baselines(
    cfg: dict[str, Any],
    data_root: Path,
    index: dict[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
) -> list[BaselineResult]:
    """Train and evaluate the enabled baselines of ``cfg`` on the data under ``data_root``."""
    task, profile = cfg["task"]["name"], cfg["model"]["profile"]
    fed = cfg["federation"]
    device = cfg["device"]
    grid = ScoreGrid(int(cfg["evaluation"]["histogram_bins"]))
    thr_splits = threshold_splits(cfg["evaluation"]["threshold_split"])
    recalibrate = bool(cfg["evaluation"].get("recalibration", True))
    policy = ReleasePolicy.from_mapping(cfg.get("disclosure") or {})
    epochs = int(fed["rounds"]) * int(fed["local_epochs"])
    sites = list(fed["training_sites"])

    def manifest(site: str) -> Path:
        return data_root / index["sites"][site]["manifest"]

    train = {s: load_site(manifest(s), task, profile, ("train",)) for s in sites}
    val = {s: load_site(manifest(s), task, profile, ("val",)) for s in sites}
    thr_data = {s: load_site(manifest(s), task, profile, thr_splits) for s in sites}
    ext = load_site(manifest(fed["external_site"]), task, profile, ("test",))

    arms: list[tuple[str, list[str]]] = []
    if cfg["baselines"]["centralized"]:
        arms.append(("centralized", sites))
    if cfg["baselines"]["local"]:
        arms.extend((f"local:{s}", [s]) for s in sites)

    comps = TaskComponents.from_task_config(cfg["task"])
    results = []
    for name, members in arms:
        torch.manual_seed(int(cfg["seed"]))
        model = build_model(task, profile)
        data = SiteData.concat([train[s] for s in members])
        history: list[dict[str, Any]] = []
        t0 = time.monotonic()
        ssl = cfg["task"].get("ssl") or {}
        freeze = False
        if ssl.get("enabled"):
            unlabelled = SiteData.concat([load_site(manifest(s), task, profile, ("train", "val"))
                                          for s in members])
            history += _pretrain(model, unlabelled, cfg, name, members)
            freeze = cfg["task"].get("finetune", "full") == "linear"
        for epoch in range(1, epochs + 1):
            out = train_one_round(model, data, TrainConfig(
                epochs=1, batch_size=int(cfg["model"]["batch_size"]), lr=float(cfg["model"]["lr"]),
                weight_decay=float(cfg["model"]["weight_decay"]),
                seed=int(cfg["seed"]) * 100003 + epoch * 101 + zlib.crc32(name.encode()),
                device=device, objective=str(cfg["task"].get("objective", "bce")),
                freeze_encoder=freeze,
            ))
            history.append({"arm": name, "round": epoch, "site": "+".join(members),
                            "phase": "train", "train_loss": out.loss, "n": out.n_examples})
            for s in members:
                m = validation_metrics(model, val[s], device)
                auc = m["val-auc"]
                history.append({"arm": name, "round": epoch, "site": s, "phase": "validate",
                                "val_loss": m["val-loss"],
                                "val_auc": None if np.isnan(auc) else auc,
                                "n": len(val[s])})
            if progress:
                progress(name, epoch, epochs)
        seconds = time.monotonic() - t0
        # the cross-site matrix: this model on every training site's threshold split
        cross = {s: site_auc(model, thr_data[s], device) for s in sites}
        try:
            threshold, validation = _validate(
                model, {s: thr_data[s] for s in members}, grid, device, recalibrate, policy)
        except ValueError:
            log.warning("%s: threshold split has one class; using train+val predictions", name)
            both = {s: load_site(manifest(s), task, profile, ("train", "val")) for s in members}
            threshold, validation = _validate(model, both, grid, device, recalibrate, policy)
        try:
            stats = external_report(model, ext, threshold, ext.survival, device, policy=policy)
        except DisclosureRefused as exc:
            log.warning("%s: %s; the baseline's external report is computed exact", name, exc)
            stats = external_report(model, ext, threshold, ext.survival, device)
            stats["disclosure"] = f"exact ({exc})"
        fit = recalibration_of(validation)
        if fit is not None:
            stats["recalibrated"] = recalibrated_report(
                ext.label.numpy().astype(np.float64), predict(model, ext, device), threshold, fit,
                policy)
        stats.update(deep_model_extras(model, ext, device))
        result = BaselineResult(
            name, stats, threshold, validation, history,
            {k: v.detach().cpu() for k, v in model.state_dict().items()}, seconds,
            cross_site=cross,
        )
        if len(comps.names) > 1:
            _components(result, model, comps, members, manifest, cfg, ext)
        results.append(result)
    return results


def _validate(model: torch.nn.Module, parts: dict[str, SiteData], grid: ScoreGrid, device: str,
              recalibrate: bool, policy: ReleasePolicy) -> tuple[float, dict[str, Any]]:
    """The pooled validation of a baseline under the sites' release policy; exact (and said so
    in the block) when the policy refuses the baseline's split (a baseline runs in the
    simulation, where no data leaves anything)."""
    try:
        return pooled_validation(model, parts, grid, device, recalibrate, policy)
    except DisclosureRefused as exc:
        log.warning("baseline validation: %s; computed exact", exc)
        threshold, block = pooled_validation(model, parts, grid, device, recalibrate)
        block["disclosure"] = f"exact ({exc})"
        return threshold, block


def _pretrain(model: torch.nn.Module, data: SiteData, cfg: dict[str, Any], name: str,
              members: list[str]) -> list[dict[str, Any]]:
    """The baseline's self-supervised stage: Barlow Twins on its unlabelled patches for
    ``ssl.rounds x ssl.local_epochs`` epochs (the federated arms' budget), then the pretrained
    encoder goes into ``model``."""
    from hcc_fl.shared.models import build_ssl_model

    ssl = cfg["task"]["ssl"]
    torch.manual_seed(int(cfg["seed"]) + 1)
    ssl_model = build_ssl_model(cfg["task"]["name"], cfg["model"]["profile"])
    history = []
    for epoch in range(1, int(ssl["rounds"]) * int(ssl["local_epochs"]) + 1):
        out = train_one_round(ssl_model, data, TrainConfig(
            epochs=1, batch_size=int(ssl["batch_size"]), lr=float(ssl["lr"]),
            weight_decay=float(cfg["model"]["weight_decay"]), objective="barlow",
            seed=int(cfg["seed"]) * 100003 + epoch * 101 + zlib.crc32(name.encode()) + 7,
            device=cfg["device"]))
        history.append({"arm": f"{name}:ssl", "round": epoch, "site": "+".join(members),
                        "phase": "train", "train_loss": out.loss, "n": out.n_examples})
    model.encoder.load_state_dict(ssl_model.encoder.state_dict())  # type: ignore[union-attr,operator]
    return history


def _components(result: BaselineResult, model: torch.nn.Module, comps: TaskComponents,
                members: list[str], manifest: Callable[[str], Path], cfg: dict[str, Any],
                ext: SiteData) -> None:
    """Fit the task's tabular and stacked models on the baseline's data (pooled for the
    centralized arm) and evaluate every component on the external site, as the federated arms
    do; fills the result's ``external`` blocks, thresholds and selected features."""
    task, profile, device = cfg["task"]["name"], cfg["model"]["profile"], cfg["device"]
    seed = int(cfg["seed"])
    grid = ScoreGrid(int(cfg["evaluation"]["histogram_bins"]))
    scorers = [SiteScorer(manifest(s), task, profile, comps, model, seed=seed, device=device)
               for s in members]
    try:
        states = fit_components(comps, in_process_asker(scorers, pooled=len(members) > 1),
                                resplits=0)
    except ValueError as exc:
        log.warning("%s: the tabular models could not be fitted (%s)", result.name, exc)
        return
    thresholds = {comps.deep: result.threshold}
    for sc in scorers:
        sc.set_bundle(states)
    splits = threshold_splits(cfg["evaluation"]["threshold_split"])
    for name in comps.names[1:]:
        try:
            thresholds[name], result.component_validation[name] = pooled_validation_probs(
                {sc.manifest.parent.name: (sc.labels(splits), sc.probs(name, splits))
                 for sc in scorers}, grid, recalibrate=False)
        except ValueError:
            both = ("train", "val")
            thresholds[name], result.component_validation[name] = pooled_validation_probs(
                {sc.manifest.parent.name: (sc.labels(both), sc.probs(name, both))
                 for sc in scorers}, grid, recalibrate=False)
    ext_scorer = SiteScorer(manifest(cfg["federation"]["external_site"]), task, profile, comps,
                            model, states, seed=seed, device=device)
    result.external.update(external_components(ext_scorer, thresholds, ext.survival))
    result.component_thresholds = thresholds
    result.tabular = {k: selection_summary(st) for k, st in main_models(states).items()}
