"""Message-API strategies that know which node is which site.

``HccFedAvg`` and ``HccFedProx`` extend Flower's FedAvg/FedProx:
- training and per-round validation go only to the training sites (the external site never
  trains and never sees an intermediate model);
- replies that are non-finite, of the wrong shape or missing keys are rejected and logged by site
  before Flower aggregates the rest;
- per-site metrics of every round are kept for ``history.jsonl`` (a sample-weighted mean of
  per-site AUCs is not a pooled AUC, so nothing here averages AUCs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from hcc_fl.shared import records as R

log = logging.getLogger("hcc_fl.coordinator")


def _weighted_loss_only(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Aggregate only the loss-type metrics (weighted mean is right for a loss, not for AUC)."""
    agg = aggregate_metricrecords(replies, weight_key)
    return MetricRecord({k: v for k, v in agg.items() if "auc" not in k})


class SiteAwareMixin:
    """Restricts rounds to training sites, screens replies, records per-site history."""

    arrayrecord_key: str

    def setup_sites(
        self, arm: str, site_names: dict[int, str], training_nodes: list[int], min_sites: int
    ) -> None:
        """Tell the strategy the node id -> site map, which nodes may train, and the quorum."""
        self.arm = arm
        self.min_sites = min_sites
        self.site_names = site_names
        self.training_nodes = list(training_nodes)
        self.history: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self._expected: dict[str, tuple[int, ...]] | None = None

    # --- sampling: only training sites ---------------------------------------------------------
    def _only_training(self, messages: Iterable[Message]) -> list[Message]:
        allowed = set(self.training_nodes)
        return [m for m in messages if m.metadata.dst_node_id in allowed]

    insecure: bool = False

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure training for the training sites only."""
        if self.insecure:
            log.warning("round %d runs WITHOUT TLS or site authentication (--insecure): "
                        "updates travel in clear text", server_round)
        if self._expected is None:
            self._expected = {k: tuple(v.shape) for k, v in arrays.items()}
        return self._only_training(
            super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Per-round validation at the training sites only."""
        return self._only_training(
            super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        )

    # --- screening and history -----------------------------------------------------------------
    def _site(self, msg: Message) -> str:
        return self.site_names.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")

    def _reject(self, server_round: int, msg: Message, reason: str) -> None:
        site = self._site(msg)
        log.warning("round %d: rejected the reply of %s: %s", server_round, site, reason)
        self.rejections.append({"arm": self.arm, "round": server_round, "site": site,
                                "reason": reason})

    def _screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        good = []
        for msg in sorted(replies, key=self._site):
            if msg.has_error():
                self._reject(server_round, msg, f"site error: {msg.error.reason}")
                continue
            content = msg.content
            if len(content.array_records) != 1 or len(content.metric_records) != 1:
                self._reject(server_round, msg, "malformed reply (records)")
                continue
            arrays = next(iter(content.array_records.values()))
            shapes = {k: tuple(v.shape) for k, v in arrays.items()}
            if self._expected is not None and shapes != self._expected:
                self._reject(server_round, msg, "parameters of the wrong names or shapes")
                continue
            if not all(np.all(np.isfinite(v.numpy())) for v in arrays.values()):
                self._reject(server_round, msg, "non-finite parameters")
                continue
            metrics = next(iter(content.metric_records.values()))
            n = metrics.get(R.NUM_EXAMPLES)
            if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
                self._reject(server_round, msg, "missing or invalid num-examples")
                continue
            good.append(msg)
        return good

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, record per-site training metrics, then aggregate with Flower."""
        # Aggregate in a fixed (site name) order: replies arrive in any order, and the order of
        # the floating-point sums must not change the result between runs.
        good = sorted(self._screen_train(server_round, list(replies)), key=self._site)
        if len(good) < self.min_sites:
            log.warning(
                "round %d: only %d usable replies (min_sites=%d): the global model is unchanged",
                server_round, len(good), self.min_sites,
            )
            return None, None
        for msg in good:
            metrics = next(iter(msg.content.metric_records.values()))
            self.history.append({
                "arm": self.arm, "round": server_round, "site": self._site(msg),
                "phase": "train", "train_loss": float(metrics["train-loss"]),  # type: ignore[arg-type]
                "n": int(metrics[R.NUM_EXAMPLES]),  # type: ignore[arg-type]
            })
        return super().aggregate_train(server_round, good)  # type: ignore[misc]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record per-site validation loss and AUC; aggregate only the loss."""
        good = []
        for msg in sorted(replies, key=self._site):
            if msg.has_error():
                self._reject(server_round, msg, f"site error: {msg.error.reason}")
                continue
            good.append(msg)
            metrics = next(iter(msg.content.metric_records.values()))
            auc = float(metrics.get("val-auc", math.nan))  # type: ignore[arg-type]
            self.history.append({
                "arm": self.arm, "round": server_round, "site": self._site(msg),
                "phase": "validate", "val_loss": float(metrics["val-loss"]),  # type: ignore[arg-type]
                "val_auc": None if math.isnan(auc) else auc,
                "n": int(metrics[R.NUM_EXAMPLES]),  # type: ignore[arg-type]
            })
        return super().aggregate_evaluate(server_round, good)  # type: ignore[misc]


class HccFedAvg(SiteAwareMixin, FedAvg):
    """FedAvg over the training sites (McMahan et al. 2017), sample-size weighted."""


class HccFedProx(SiteAwareMixin, FedProx):
    """FedProx: FedAvg aggregation; the sites add ``mu/2 ||w - w_global||^2`` to their loss."""


def build_strategy(name: str, n_training: int, proximal_mu: float = 0.0) -> FedAvg:
    """Build a strategy by name (``fedavg`` or ``fedprox``) for ``n_training`` sites."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
        "evaluate_metrics_aggr_fn": _weighted_loss_only,
    }
    if name == "fedavg":
        return HccFedAvg(**common)
    if name == "fedprox":
        return HccFedProx(proximal_mu=proximal_mu, **common)
    raise KeyError(f"unknown strategy '{name}'; known: fedavg, fedprox")
