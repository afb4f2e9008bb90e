"""Message-API strategies that know which node is which site.

``HccFedAvg`` and ``HccFedProx`` extend Flower's FedAvg/FedProx:
- training and per-round validation go only to the training sites (the external site never
  trains and never sees an intermediate model);
- replies are screened by the rules of :mod:`hcc_fl.server.screen` (exact names, shapes and
  dtypes of the record sent, ``num-examples`` bounded by the size the site declared, finite
  values, an update norm bounded by ``max_norm_ratio`` x a reference scale no single site can
  inflate); rejected replies are logged and audited by site;
- the accepted updates are averaged with capped weights (``max_site_weight``), or by the
  coordinate-wise median or trimmed mean (``aggregation``);
- per-site metrics of every round are kept for ``history.jsonl`` (a sample-weighted mean of
  per-site AUCs is not a pooled AUC, so nothing here averages AUCs);
- ``run_rounds`` is the round loop (Flower's ``Strategy.start`` does the same calls) with a
  checkpoint after every round and a start round other than 1 when resuming;
- every message sent and every reply with its decision goes to the coordinator's audit log.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from hcc_fl.server import screen
from hcc_fl.server.aggregate import (
    NPY_STYPE,
    all_finite,
    array_view,
    coordinatewise,
    mean_and_distances,
    sq_distance,
    weighted_mean,
)
from hcc_fl.server.fedopt import KINDS, ServerOptimizer, from_arm
from hcc_fl.shared import records as R
from hcc_fl.shared.audit import AuditLog, metric_names, payload_bytes
from hcc_fl.shared.wire import is_packed, layout_of, pack, unpack

log = logging.getLogger("hcc_fl.coordinator")
CHECKPOINT_VERSION = 1


def _weighted_loss_only(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Aggregate only the loss-type metrics (weighted mean is right for a loss, not for AUC)."""
    agg = aggregate_metricrecords(replies, weight_key)
    return MetricRecord({k: v for k, v in agg.items() if "auc" not in k})


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a temporary file, fsync, then rename over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    state: dict[str, Any] = torch.load(path, weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} is not "
                         f"{CHECKPOINT_VERSION}")
    return state


class CentralDP:
    """Central DP with Flower's ``DifferentialPrivacyServerSideFixedClipping``: each site's
    update is clipped to ``clip`` in L2 at the coordinator, the updates are averaged with equal
    weights, and Gaussian noise of std ``sigma * clip / m`` is added to the average. Accounting
    (Opacus' RDP accountant, every site every round, so no subsampling) gives site-level
    (epsilon, delta) per release; a run stops before a round that would exceed ``budget``."""

    def __init__(self, inner: Any, sigma: float, clip: float, m: int, delta: float,
                 budget: float | None) -> None:
        from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

        self.wrapper = DifferentialPrivacyServerSideFixedClipping(
            inner, noise_multiplier=sigma, clipping_norm=clip, num_sampled_clients=m)
        self.sigma, self.clip, self.m, self.delta, self.budget = sigma, clip, m, delta, budget
        self.releases = 0
        self.stopped_before_round: int | None = None

    def epsilon(self, releases: int) -> float:
        """Site-level epsilon after ``releases`` noisy aggregates."""
        if releases <= 0:
            return 0.0
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = [(self.sigma, 1.0, releases)]
        return float(acc.get_epsilon(self.delta))

    def summary(self) -> dict[str, Any]:
        """What metrics.json reports."""
        return {"noise_multiplier": self.sigma, "clipping_norm": self.clip, "sites": self.m,
                "delta": self.delta, "budget": self.budget, "releases": self.releases,
                "epsilon": self.epsilon(self.releases),
                "stopped_before_round": self.stopped_before_round}


class SiteAwareMixin:
    """Restricts rounds to training sites, screens replies, records per-site history."""

    arrayrecord_key: str
    insecure: bool = False
    central: CentralDP | None = None
    secagg: dict[str, Any] | None = None  # SecAggConfig fields except n and threshold
    transfer: str = "per-tensor"  # how round messages carry the model (shared/wire.py)
    server_opt: ServerOptimizer | None = None  # FedOpt (server/fedopt.py); None = the aggregate
    local_keys: tuple[str, ...] = ()  # FedBN (server/fedbn.py): entries that stay at the sites
    _norm_init: ArrayRecord | None = None  # FedBN: what a site without its own state starts from

    def setup_sites(
        self, arm: str, site_names: dict[int, str], training_nodes: list[int], min_sites: int,
        max_norm_ratio: float = 0.0, audit: AuditLog | None = None,
        describe: Callable[[list[int]], dict[int, dict[str, Any]]] | None = None,
        training_sites: Iterable[str] = (),
        site_sizes: dict[str, dict[str, Any]] | None = None,
        size_keys: tuple[str, ...] = ("n-train",), max_site_weight: float = 1.0,
        aggregation: str = "mean", trim_fraction: float = 0.0,
    ) -> None:
        """Tell the strategy the node id -> site map, which nodes may train, the quorum, the
        norm screen (0 = off), the audit log, and how to identify nodes that join later.

        ``site_sizes`` (site -> its ``site_info`` counts) bound each site's ``num-examples`` by
        the sum of its ``size_keys`` (``n-train``; ``n-train`` + ``n-val`` for the
        self-supervised stage); ``max_site_weight`` caps a site's share of the weights (1 =
        off); ``aggregation`` is ``mean``, ``median`` or ``trimmed_mean`` (``trim_fraction``)."""
        self.arm = arm
        self.min_sites = min_sites
        self.max_norm_ratio = float(max_norm_ratio)
        self.site_names = dict(site_names)
        self.training_nodes = list(training_nodes)
        self.training_sites = set(training_sites) or {site_names[n] for n in training_nodes}
        self.audit = audit or AuditLog(None, "coordinator")
        self.describe = describe
        self.history: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.aggregated_rounds: list[int] = []
        self.secagg_rounds: list[dict[str, Any]] = []
        self._global: dict[str, np.ndarray] | None = None
        self.size_keys = tuple(size_keys)
        self.declared: dict[str, int] = {}
        self.site_sizes: dict[str, dict[str, Any]] = {}
        for site, sizes in (site_sizes or {}).items():
            self._declare(site, sizes)
        self.max_site_weight = float(max_site_weight)
        self.aggregation = str(aggregation)
        self.trim_fraction = float(trim_fraction)
        self.norm_history: list[float] = []  # the median accepted update norm of each round
        self._round_norm: float | None = None
        self._global_norm: float | None = None

    def _declare(self, site: str, sizes: dict[str, Any]) -> None:
        """Record the examples ``site`` may claim (its declared sizes); a site that declares
        again (a restart) keeps the smaller bound."""
        try:
            n = screen.declared_rows(sizes, [k.removeprefix("n-") for k in self.size_keys])
        except ValueError as exc:
            log.warning("site %s: %s; its replies will be rejected", site, exc)
            n = 0
        self.declared[site] = min(n, self.declared.get(site, n))
        self.site_sizes.setdefault(site, dict(sizes))

    def set_global(self, arrays: ArrayRecord) -> None:
        """The record the round's training messages carry: replies must match its names,
        shapes and dtypes, and their updates are measured against it (zero-copy views; the
        record outlives the round)."""
        self._global = {k: array_view(v) for k, v in arrays.items()}
        self._layout = screen.expected_layout(self._global)
        self._global_norm = None

    # --- state for checkpoints -----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything the strategy needs to continue: history, rejections and, for strategies
        with a server optimiser, its moments (any numpy attributes named ``m_t``/``v_t``)."""
        extra: dict[str, Any] = {}
        if self.server_opt is not None:
            extra = self.server_opt.state()
            for k in ("m", "v"):  # checkpoints hold tensors (torch.load with weights_only)
                extra[k] = {name: torch.from_numpy(a) for name, a in extra[k].items()}
        return {"history": list(self.history), "rejections": list(self.rejections),
                "aggregated_rounds": list(self.aggregated_rounds), "optimizer": extra,
                "central_releases": self.central.releases if self.central else 0,
                "norm_history": list(self.norm_history)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        self.history = list(state["history"])
        self.rejections = list(state["rejections"])
        self.aggregated_rounds = list(state["aggregated_rounds"])
        self.norm_history = [float(x) for x in state.get("norm_history", [])]
        if self.central is not None:
            self.central.releases = int(state.get("central_releases", 0))
        opt = state.get("optimizer") or {}
        if self.server_opt is not None:
            if not opt:
                raise ValueError("the checkpoint has no server-optimiser state for this arm")
            self.server_opt.load_state({**opt, **{k: {n: t.numpy() for n, t in opt[k].items()}
                                                  for k in ("m", "v")}})
        elif opt:
            raise ValueError("the checkpoint holds a server optimiser's state; this arm has none")

    # --- sampling: only training sites ---------------------------------------------------------
    def _refresh_sites(self, grid: Grid) -> None:
        """Identify nodes that connected since the last round (a restarted site rejoins)."""
        new = [n for n in grid.get_node_ids() if n not in self.site_names]
        if not new or self.describe is None:
            return
        for nid, info in self.describe(new).items():
            self.site_names[nid] = str(info["site"])
            if info["site"] in self.training_sites:
                self._declare(str(info["site"]), info)
            if info["site"] in self.training_sites and info["role"] == R.ROLE_TRAIN:
                self.training_nodes.append(nid)
                log.info("site %s (re)joined as node %d", info["site"], nid)

    def _only_training(self, messages: Iterable[Message]) -> list[Message]:
        allowed = set(self.training_nodes)
        return [m for m in messages if m.metadata.dst_node_id in allowed]

    def _audit_sent(self, server_round: int, messages: list[Message], kind: str) -> None:
        for m in messages:
            self.audit.record("sent", arm=self.arm, round=server_round, type=kind,
                              peer=self.site_names.get(m.metadata.dst_node_id, "?"),
                              bytes=payload_bytes(m.content),
                              metrics=metric_names(m.content.config_records.values()))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure training for the training sites only."""
        if self.insecure:
            log.warning("round %d runs WITHOUT TLS or site authentication (--insecure): "
                        "updates travel in clear text", server_round)
        self.set_global(arrays)
        self._refresh_sites(grid)
        out = self._only_training(
            super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        )
        self._attach_norm_init(out)
        self._audit_sent(server_round, out, "train")
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Per-round validation at the training sites only."""
        out = self._only_training(
            super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        )
        self._attach_norm_init(out)
        self._audit_sent(server_round, out, "evaluate")
        return out

    # --- FedBN: normalisation state stays at the sites ----------------------------------------
    def _attach_norm_init(self, messages: Iterable[Message]) -> None:
        """FedBN: every round message also carries the normalisation state of the arm's start
        (record ``norm-init``), which a site uses until it has its own."""
        if self._norm_init is None:
            return
        for m in messages:
            m.content[R.NORM_INIT] = self._norm_init

    def _shared_part(self, arrays: ArrayRecord) -> ArrayRecord:
        """The record round messages carry: without the FedBN-local entries (or all of it)."""
        if not self.local_keys:
            return arrays
        local = set(self.local_keys)
        return ArrayRecord({k: v for k, v in arrays.items() if k not in local})

    @staticmethod
    def _merged(new: ArrayRecord, current: ArrayRecord) -> ArrayRecord:
        """``current`` with the entries of ``new`` (an aggregate of the shared part) replaced,
        in ``current``'s order."""
        return ArrayRecord({k: new.get(k, v) for k, v in current.items()})

    # --- screening and history -----------------------------------------------------------------
    def _origin(self, msg: Message) -> int:
        """The node a reply is about: its sender, or for an error the SuperLink generated
        (e.g. "Node Unavailable"), the node the original message went to."""
        src = msg.metadata.src_node_id
        if src in self.site_names:
            return src
        return self._dst_of.get(msg.metadata.reply_to_message_id, src)

    def _site(self, msg: Message) -> str:
        node = self._origin(msg)
        return self.site_names.get(node, f"node-{node}")

    _dst_of: dict[str, int] = {}

    def _sent(self, messages: list[Message]) -> None:
        """Remember message id -> destination of what was just sent (ids are set on push)."""
        self._dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

    def _received(self, server_round: int, msg: Message, kind: str, decision: str) -> None:
        content_ok = not msg.has_error()
        self.audit.record(
            "received", arm=self.arm, round=server_round, type=kind, peer=self._site(msg),
            bytes=payload_bytes(msg.content) if content_ok else 0,
            metrics=metric_names(msg.content.metric_records.values()) if content_ok else [],
            decision=decision,
        )

    def _reject(self, server_round: int, msg: Message, reason: str, kind: str = "train") -> None:
        site = self._site(msg)
        log.warning("round %d: rejected the reply of %s: %s", server_round, site, reason)
        self.rejections.append({"arm": self.arm, "round": server_round, "site": site,
                                "reason": reason})
        self._received(server_round, msg, kind, f"rejected: {reason}")

    def _screen_cheap(self, server_round: int, replies: Iterable[Message]
                      ) -> list[tuple[Message, dict[str, np.ndarray]]]:
        """The checks that do not read parameter values: errors, sender, records, names,
        shapes and dtypes (:func:`hcc_fl.server.screen.check_arrays`), the weight
        (:func:`~hcc_fl.server.screen.check_num_examples` against the declared size), loss.
        Returns the candidates (site order) with zero-copy views of their arrays."""
        out = []
        layout = getattr(self, "_layout", None) if self._global is not None else None
        weight_key = self.weighted_by_key  # type: ignore[attr-defined]
        for msg in sorted(replies, key=self._site):
            if msg.has_error():
                self._reject(server_round, msg, f"site error: {msg.error.reason}")
                continue
            if self._origin(msg) not in set(self.training_nodes):
                self._reject(server_round, msg, "reply from a node that is not a training site")
                continue
            content = msg.content
            if len(content.array_records) != 1 or len(content.metric_records) != 1:
                self._reject(server_round, msg, "malformed reply (records)")
                continue
            if layout is None:
                self._reject(server_round, msg, "no global model to check the reply against")
                continue
            arrays = next(iter(content.array_records.values()))
            try:
                views = {k: array_view(v) for k, v in arrays.items()}
            except (ValueError, TypeError) as exc:
                self._reject(server_round, msg, f"unreadable parameters ({exc})")
                continue
            reason = screen.check_arrays(views, layout)
            if reason is not None:
                self._reject(server_round, msg, reason)
                continue
            metrics = next(iter(content.metric_records.values()))
            reason = screen.check_num_examples(metrics.get(R.NUM_EXAMPLES),
                                               self.declared.get(self._site(msg)))
            if reason is None and weight_key != R.NUM_EXAMPLES and metrics.get(weight_key) != 1:
                reason = f"{weight_key} must be 1 (equal weights)"
            if reason is not None:
                self._reject(server_round, msg, reason)
                continue
            loss = metrics.get("train-loss")
            if isinstance(loss, bool) or not isinstance(loss, (int, float)) \
                    or not math.isfinite(loss):
                self._reject(server_round, msg, "missing or non-finite train-loss")
                continue
            if not all(isinstance(metrics.get(k, 0.0), (int, float)) and
                       math.isfinite(cast(float, metrics.get(k, 0.0)))
                       for k in ("dp-epsilon", "dp-delta")):
                self._reject(server_round, msg, "non-numeric privacy metrics")
                continue
            out.append((msg, views))
        return out

    def _shares(self, msgs: list[Message]) -> list[float]:
        """The accepted replies' weights as shares, no site above ``max_site_weight``."""
        key = self.weighted_by_key  # type: ignore[attr-defined]
        return screen.capped_shares([self._weight(m, key) for m in msgs], self.max_site_weight)

    def _bound(self, norms: list[float]) -> screen.NormBound | None:
        """This round's norm bound; the global model's norm is read only when the round's and
        the history's scales alone would reject a reply (so an honest round costs no pass)."""
        bound = screen.norm_bound(norms, self.norm_history, 0.0, self.max_norm_ratio)
        if bound is not None and all(x <= bound.bound for x in norms):
            return bound
        if self._global_norm is None and self._global is not None:
            self._global_norm = math.sqrt(sq_distance(self._global, None))
        return screen.norm_bound(norms, self.norm_history, self._global_norm or 0.0,
                                 self.max_norm_ratio)

    def _screen_values(self, server_round: int,
                       cands: list[tuple[Message, dict[str, np.ndarray]]],
                       sq: list[float]) -> list[tuple[Message, dict[str, np.ndarray]]]:
        """Reject non-finite updates, then updates whose L2 distance to the global model
        exceeds the round's bound (:func:`hcc_fl.server.screen.norm_bound`; ``sq``: squared
        distances, non-finite iff a value is or the distance overflows; an overflow is then
        screened as an outlier)."""
        good, norms = [], []
        for (msg, views), d2 in zip(cands, sq, strict=True):
            if not math.isfinite(d2) and not all_finite(views):
                self._reject(server_round, msg, "non-finite parameters")
                continue
            good.append((msg, views))
            norms.append(math.sqrt(d2) if math.isfinite(d2) else math.inf)
        if self._global is None or not good:
            return good
        bound = self._bound(norms)
        kept, kept_norms = [], []
        for (m, views), norm in zip(good, norms, strict=True):
            if bound is not None and norm > bound.bound:
                self._reject(server_round, m, f"update norm {norm:.3g} exceeds "
                             f"{bound.describe(self.max_norm_ratio)}")
            else:
                kept.append((m, views))
                kept_norms.append(norm)
        self._round_norm = float(np.median(kept_norms)) if kept_norms else None
        return kept

    def _screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """All screens, without aggregating (central DP clips only screened replies)."""
        cands = self._screen_cheap(server_round, replies)
        sq = [sq_distance(views, self._global) for _, views in cands]
        return [m for m, _ in self._screen_values(server_round, cands, sq)]

    def _combine(self, kept: list[tuple[Message, dict[str, np.ndarray]]],
                 dtypes: dict[str, np.dtype[Any]] | None) -> dict[str, Any]:
        """The aggregate of the kept updates by the configured rule."""
        views = [v for _, v in kept]
        if self.aggregation == "mean":
            return weighted_mean(views, self._shares([m for m, _ in kept]), dtypes)
        return coordinatewise(views, self.aggregation, self.trim_fraction, dtypes)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, record per-site training metrics, aggregate.

        With ``aggregation: mean`` the update distances for the norm screen and the weighted
        mean (capped shares) come from one pass over the updates
        (:func:`hcc_fl.server.aggregate.mean_and_distances`, zero-copy reads, no model-sized
        temporaries); only when the screen rejects an update is the mean of the rest computed
        again. Replies are taken in site order: the order of the floating-point sums, and so
        the result, does not depend on the order in which replies arrived."""
        cands = self._screen_cheap(server_round, list(replies))
        mean: dict[str, Any] | None = None
        self._round_norm = None
        # The result keeps the global model's dtypes (float32 when it travelled as float16).
        dtypes = {k: np.dtype(np.float32) if v.dtype == np.float16 else v.dtype
                  for k, v in self._global.items()} if self._global else None
        if cands:
            self._check_and_log_replies(  # type: ignore[attr-defined]
                [m for m, _ in cands], is_train=True, validate=False)
            if self.aggregation == "mean":
                mean, sq = mean_and_distances([v for _, v in cands],
                                              self._shares([m for m, _ in cands]),
                                              self._global, dtypes)
            else:
                sq = [sq_distance(v, self._global) for _, v in cands]
            kept = self._screen_values(server_round, cands, sq)
            if len(kept) != len(cands):
                mean = None
        else:
            kept = []
        good = [m for m, _ in kept]
        if len(good) < self.min_sites:
            log.warning(
                "round %d: only %d usable replies (min_sites=%d): the global model is unchanged",
                server_round, len(good), self.min_sites,
            )
            for msg in good:
                self._received(server_round, msg, "train", "not aggregated: too few replies")
            return None, None
        for msg in good:
            self._received(server_round, msg, "train", "accepted")
            metrics = next(iter(msg.content.metric_records.values()))
            entry = {
                "arm": self.arm, "round": server_round, "site": self._site(msg),
                "phase": "train", "train_loss": float(metrics["train-loss"]),  # type: ignore[arg-type]
                "n": int(metrics[R.NUM_EXAMPLES]),  # type: ignore[arg-type]
            }
            if "dp-epsilon" in metrics:  # local DP: epsilon this run has spent at the site
                entry["dp_epsilon"] = float(metrics["dp-epsilon"])  # type: ignore[arg-type]
                entry["dp_delta"] = float(metrics.get("dp-delta", math.nan))  # type: ignore[arg-type]
            self.history.append(entry)
        if mean is None:  # something was rejected, or a coordinate-wise rule
            mean = self._combine(kept, dtypes)
        if self._round_norm is not None:
            self.norm_history.append(self._round_norm)
        arrays = ArrayRecord({k: Array(dtype=str(dt), shape=shape, stype=NPY_STYPE, data=data)
                              for k, (dt, shape, data) in mean.items()})
        weight_key = self.weighted_by_key  # type: ignore[attr-defined]
        shares = self._shares(good)
        # Metrics from the screened values only (a site's extra keys never reach Flower's
        # aggregation, which refuses replies whose metric keys differ).
        clean = [RecordDict({"metrics": MetricRecord({
            "train-loss": float(cast(Any, next(iter(m.content.metric_records.values()))[
                "train-loss"])), weight_key: share})}) for m, share in zip(good, shares,
                                                                          strict=True)]
        agg_metrics = self.train_metrics_aggr_fn(clean, weight_key)  # type: ignore[attr-defined]
        self.aggregated_rounds.append(server_round)
        return arrays, agg_metrics

    @staticmethod
    def _weight(msg: Message, key: str) -> float:
        return float(cast(Any, next(iter(msg.content.metric_records.values()))[key]))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record per-site validation loss and AUC; aggregate only the loss (from the screened
        values: finite loss, ``num-examples`` within the declared ``n-val``, AUC in [0, 1])."""
        good: list[RecordDict] = []
        weight_key = self.weighted_by_key  # type: ignore[attr-defined]
        for msg in sorted(replies, key=self._site):
            if msg.has_error():
                self._reject(server_round, msg, f"site error: {msg.error.reason}", "evaluate")
                continue
            metrics = next(iter(msg.content.metric_records.values()), None)
            site = self._site(msg)
            sizes = self.site_sizes.get(site)
            try:
                declared = screen.declared_rows(sizes, ["val"]) if sizes is not None else None
            except ValueError:
                declared = 0
            loss = metrics.get("val-loss") if metrics is not None else None
            n = metrics.get(R.NUM_EXAMPLES) if metrics is not None else None
            auc = metrics.get("val-auc", math.nan) if metrics is not None else math.nan
            if metrics is None or self._origin(msg) not in set(self.training_nodes) \
                    or isinstance(loss, bool) or not isinstance(loss, (int, float)) \
                    or not math.isfinite(loss) or screen.check_num_examples(n, declared) \
                    or isinstance(auc, bool) or not isinstance(auc, (int, float)) \
                    or not (math.isnan(auc) or 0.0 <= auc <= 1.0):
                self._reject(server_round, msg, "malformed validation reply", "evaluate")
                continue
            weight = float(cast(Any, n)) if weight_key == R.NUM_EXAMPLES else 1.0
            self._received(server_round, msg, "evaluate", "accepted")
            good.append(RecordDict({"metrics": MetricRecord({"val-loss": float(loss),
                                                             weight_key: weight})}))
            self.history.append({
                "arm": self.arm, "round": server_round, "site": site,
                "phase": "validate", "val_loss": float(loss),
                "val_auc": None if not math.isfinite(auc) else float(auc),
                "n": int(cast(Any, n)),
            })
        if not good:
            return None
        return self.evaluate_metrics_aggr_fn(good, weight_key)  # type: ignore[attr-defined,no-any-return]

    def _note_missing(self, server_round: int, sent: list[Message], replies: list[Message],
                      timeout: float) -> None:
        """Sites that did not reply within the round timeout (a crashed or very slow site)."""
        got = {self._origin(m) for m in replies}
        for m in sent:
            if m.metadata.dst_node_id not in got:
                site = self.site_names.get(m.metadata.dst_node_id, "?")
                reason = f"no reply within the round timeout ({timeout:.0f} s)"
                log.warning("round %d: %s: %s", server_round, site, reason)
                self.rejections.append({"arm": self.arm, "round": server_round, "site": site,
                                        "reason": reason})
                self.audit.record("timeout", arm=self.arm, round=server_round, type="train",
                                  peer=site, decision=reason)

    # --- secure aggregation (client/secagg.py) -------------------------------------------------
    def _exchange(self, grid: Grid, rnd: int, action: str, per_node: dict[int, RecordDict],
                  timeout: float) -> dict[int, Message]:
        """One protocol message to each node; the good replies by node."""
        msgs = [Message(content=c, message_type=f"{MessageType.QUERY}.{action}", dst_node_id=n)
                for n, c in per_node.items()]
        self._audit_sent(rnd, msgs, action)
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        self._sent(msgs)
        out = {}
        for r in replies:
            if r.has_error():
                self._reject(rnd, r, f"site error: {r.error.reason}", action)
                continue
            self._received(rnd, r, action, "accepted")
            out[self._origin(r)] = r
        for n in sorted(set(per_node) - set(out) - {self._origin(r) for r in replies}):
            self.audit.record("timeout", arm=self.arm, round=rnd, type=action,
                              peer=self.site_names.get(n, "?"), decision="no reply")
        return out

    def secure_aggregate(
        self, grid: Grid, rnd: int, tag: str, nodes: list[int],
        masked_content: Callable[[int, dict[str, Any]], RecordDict],
        expected: list[tuple[int, ...]], timeout: float, max_weight: float,
    ) -> tuple[dict[int, Message], float, list[np.ndarray], dict[str, Any]] | None:
        """Run SecAgg+ once over ``nodes``: set-up, share, masked (content from
        ``masked_content(node, config_entries)``), unmask. Returns the masked replies (for their
        metrics), the summed weights, the weighted mean and a summary; None if it failed."""
        from hcc_fl.client.secagg import SecAggConfig, unmask_sum

        cfg = SecAggConfig.for_sites(len(nodes), **{**(self.secagg or {}),
                                                     "max_weight": max_weight})
        cfg.check()
        base: dict[str, Any] = {"server-round": rnd, R.SA_TAG: tag,
                                R.SA_CONFIG: json.dumps(cfg.__dict__)}

        def config(**extra: Any) -> RecordDict:
            return RecordDict({R.CONFIG: ConfigRecord({**base, **extra})})

        def failed(reason: str) -> None:
            log.warning("%s: %s", tag, reason)
            self.audit.record("secagg-aborted", arm=self.arm, round=rnd, type=tag,
                              decision=reason)

        # 1. signed key advertisements (U1)
        keys = self._exchange(grid, rnd, R.ACTION_SECAGG_SETUP,
                              {n: config() for n in nodes}, timeout)
        adverts = {n: {k: str(m.content[R.INFO][k])
                       for k in (R.SA_SITE, R.SA_C_PK, R.SA_S_PK, R.SA_SIG)}
                   for n, m in keys.items()}
        if len(adverts) < cfg.threshold:
            failed(f"{len(adverts)} sites set up secure aggregation, threshold {cfg.threshold}")
            return None
        # 2. encrypted shares (U2: the sites whose shares are delivered)
        shared = self._exchange(grid, rnd, R.ACTION_SECAGG_SHARE,
                                {n: config(**{R.SA_PUBLIC: json.dumps(adverts)})
                                 for n in adverts}, timeout)
        inbox: dict[int, dict[str, str]] = {n: {} for n in shared}
        for src, m in shared.items():
            for dst, ct in json.loads(str(m.content[R.INFO][R.SA_CIPHERTEXTS])).items():
                if int(dst) in inbox:
                    inbox[int(dst)][str(src)] = ct
        if len(shared) < cfg.threshold:
            failed(f"{len(shared)} sites shared their keys, threshold {cfg.threshold}")
            return None
        # 3. masked vectors (U3)
        replies = self._exchange(grid, rnd, R.ACTION_SECAGG_MASKED, {
            n: masked_content(n, {**base, R.SA_INBOX: json.dumps(inbox[n])})
            for n in shared}, timeout)
        masked: dict[int, list[np.ndarray]] = {}
        good: dict[int, Message] = {}
        for n, m in sorted(replies.items()):
            recs = list(m.content.array_records.values())
            vec = [a.numpy() for a in recs[0].values()] if len(recs) == 1 else []
            if [tuple(a.shape) for a in vec] != expected:
                self._reject(rnd, m, "malformed masked vector", R.ACTION_SECAGG_MASKED)
                continue
            masked[n], good[n] = vec, m
        if len(masked) < max(self.min_sites, cfg.threshold):
            failed(f"{len(masked)} masked vectors (min_sites {self.min_sites}, threshold "
                   f"{cfg.threshold})")
            return None
        survivors, dropped = sorted(masked), sorted(set(shared) - set(masked))
        # 4. consistency: the survivors sign the survivor list
        signed = self._exchange(grid, rnd, R.ACTION_SECAGG_CONSISTENCY,
                                {n: config(**{R.SA_SURVIVORS: json.dumps(survivors)})
                                 for n in survivors}, timeout)
        sigs = {str(n): str(m.content[R.INFO][R.SA_SIG]) for n, m in signed.items()}
        if len(sigs) < cfg.threshold:
            failed(f"{len(sigs)} survivors signed the survivor list, threshold "
                   f"{cfg.threshold}")
            return None
        # 5. unmask
        unmask = self._exchange(
            grid, rnd, R.ACTION_SECAGG_UNMASK,
            {int(n): config(**{R.SA_SURVIVORS: json.dumps(survivors),
                               R.SA_DROPPED: json.dumps(dropped),
                               R.SA_SIGNATURES: json.dumps(sigs)}) for n in sigs}, timeout)
        shares = [{int(k): (v[0], base64.b64decode(v[1])) for k, v in
                   json.loads(str(m.content[R.INFO][R.SA_SHARES])).items()}
                  for m in unmask.values()]
        public = {n: (adverts[n][R.SA_C_PK], adverts[n][R.SA_S_PK]) for n in shared}
        try:
            weight_sum, mean = unmask_sum(cfg, public, masked, shares)
        except ValueError as exc:
            failed(str(exc))
            return None
        declared = self._declared_weight(good, cfg.max_weight)
        step = 2 * cfg.clipping_range / cfg.quantization_range
        if declared is None or abs(weight_sum - declared) > (len(masked) + 1) * step \
                or not all(np.all(np.isfinite(a)) for a in mean):
            failed(f"the unmasked weight sum {weight_sum:.6g} is not the survivors' declared "
                   f"{declared}: the sum is corrupt and is not used")
            return None
        info = {"round": rnd, "purpose": tag.split("-")[0], "sites": len(shared),
                "survivors": len(survivors),
                "dropped": [self.site_names.get(d, "?") for d in sorted(set(nodes) - set(masked))]}
        self.secagg_rounds.append(info)
        return good, weight_sum, mean, info

    @staticmethod
    def _declared_weight(replies: dict[int, Message], max_weight: float) -> float | None:
        """The weight sum the survivors' plain ``num-examples`` imply (None if one is
        missing): what the unmasked weight must equal."""
        total = 0.0
        for m in replies.values():
            metrics = next(iter(m.content.metric_records.values()), None)
            value = metrics.get(R.NUM_EXAMPLES) if metrics is not None else None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            total += float(value)
        return total / max_weight

    def _secagg_round(self, grid: Grid, rnd: int, arrays: ArrayRecord,
                      train_config: ConfigRecord, timeout: float) -> ArrayRecord | None:
        """One training round through SecAgg+: the coordinator only ever holds masked vectors
        and the unmasked *sum*. Returns the new global arrays, or None if the round failed."""
        self._refresh_sites(grid)

        def content(node: int, entries: dict[str, Any]) -> RecordDict:
            rd = RecordDict({R.CONFIG: ConfigRecord({**entries, **dict(train_config),
                                                     R.SA_PURPOSE: "train"})})
            rd[R.ARRAYS] = arrays
            if self._norm_init is not None:
                rd[R.NORM_INIT] = self._norm_init
            return rd

        expected = [(1,), *(tuple(v.shape) for v in arrays.values())]
        out = self.secure_aggregate(grid, rnd, f"train-{rnd}", sorted(self.training_nodes),
                                    content, expected, timeout,
                                    float((self.secagg or {}).get("max_weight") or 1000.0))
        if out is None:
            return None
        replies, _, mean, _ = out
        for n, m in replies.items():
            metrics = next(iter(m.content.metric_records.values()), None)
            loss = metrics.get("train-loss") if metrics is not None else None
            if metrics is None or screen.check_num_examples(metrics.get(R.NUM_EXAMPLES), None) \
                    or isinstance(loss, bool) or not isinstance(loss, (int, float)):
                continue  # the masked vector is in the sum; its metrics are not recorded
            self.history.append({
                "arm": self.arm, "round": rnd, "site": self.site_names.get(n, f"node-{n}"),
                "phase": "train", "train_loss": float(cast(Any, metrics["train-loss"])),
                "n": int(cast(Any, metrics[R.NUM_EXAMPLES])), "secure_aggregation": True})
        dtypes = [v.numpy().dtype for v in arrays.values()]
        return ArrayRecord({k: torch.from_numpy(np.asarray(a, dtype=dt)) for k, a, dt in
                            zip(list(arrays.keys()), mean, dtypes, strict=True)})

    def _train_round(self, grid: Grid, driver: Any, rnd: int, arrays: ArrayRecord,
                     train_config: ConfigRecord, timeout: float) -> ArrayRecord | None:
        """One plain (or central-DP) training round; the new global arrays or None."""
        central = self.central
        sent = list(driver.configure_train(rnd, arrays, train_config, grid))
        replies = list(grid.send_and_receive(messages=sent, timeout=timeout))
        self._sent(sent)
        self._note_missing(rnd, sent, replies, timeout)
        if central is not None:  # screen first: Flower's clipping needs clean replies
            replies = self._screen_train(rnd, replies)
        new, _ = driver.aggregate_train(rnd, replies)
        if central is not None and new is not None:
            central.releases += 1
        return new  # type: ignore[no-any-return]

    # --- the model on the wire ----------------------------------------------------------------
    def _to_wire(self, arrays: ArrayRecord, transfer: str) -> ArrayRecord:
        """The record the round's messages carry: packed (fp32 or fp16), or as it is."""
        if transfer == "per-tensor":
            return arrays
        packed = pack({k: array_view(v) for k, v in arrays.items()}, transfer)
        return ArrayRecord({k: Array(v) for k, v in packed.items()})

    @staticmethod
    def _from_wire(new: ArrayRecord, template: ArrayRecord) -> ArrayRecord:
        """A packed aggregate back in the layout of ``template`` (the previous global)."""
        if not is_packed(new.keys()):
            return new
        state = unpack({k: array_view(v) for k, v in new.items()},
                       layout_of({k: array_view(v) for k, v in template.items()}))
        return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in state.items()})

    def _server_step(self, current: ArrayRecord, aggregate: ArrayRecord) -> ArrayRecord:
        """The new global model: the aggregate itself, or the server optimiser's step with it."""
        if self.server_opt is None:
            return aggregate
        out = self.server_opt.step({k: array_view(v) for k, v in current.items()},
                                   {k: array_view(v) for k, v in aggregate.items()})
        return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in out.items()})

    # --- the round loop ------------------------------------------------------------------------
    def run_rounds(
        self, grid: Grid, arrays: ArrayRecord, first_round: int, num_rounds: int,
        timeout: float, train_config: ConfigRecord, evaluate_config: ConfigRecord,
        on_round_end: Callable[[int, ArrayRecord], None] | None = None,
    ) -> ArrayRecord:
        """Rounds ``first_round..num_rounds``: train, aggregate, validate, then
        ``on_round_end(round, global_arrays)`` (the checkpoint). Returns the final arrays."""
        central = self.central
        driver: Any = central.wrapper if central is not None else self
        transfer = self.transfer if self.secagg is None else "per-tensor"
        if self.local_keys:  # FedBN: the global model's normalisation entries never change
            missing = set(self.local_keys) - set(arrays.keys())
            if missing:
                raise ValueError(f"FedBN: the model lacks {', '.join(sorted(missing)[:3])}")
            self._norm_init = ArrayRecord({k: arrays[k] for k in self.local_keys})
        for rnd in range(first_round, num_rounds + 1):
            if central is not None and central.budget is not None and \
                    central.epsilon(central.releases + 1) > central.budget:
                central.stopped_before_round = rnd
                log.warning("central DP budget epsilon=%g would be exceeded by round %d: the "
                            "run stops and keeps the rounds done so far", central.budget, rnd)
                self.audit.record("budget-exhausted", arm=self.arm, round=rnd)
                break
            flwr_log(INFO, "")
            flwr_log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            t0 = time.monotonic()
            train_cfg = ConfigRecord(dict(train_config))
            shared = self._shared_part(arrays)
            if self.secagg is not None:
                new = self._secagg_round(grid, rnd, shared, train_cfg, timeout)
                if new is not None:
                    self.aggregated_rounds.append(rnd)
            else:
                new = self._train_round(grid, driver, rnd, self._to_wire(shared, transfer),
                                        train_cfg, timeout)
                if new is not None:
                    new = self._from_wire(new, shared)
            if new is not None:
                arrays = self._server_step(arrays, self._merged(new, arrays))
            sent = list(self.configure_evaluate(rnd, self._to_wire(self._shared_part(arrays),
                                                                   transfer),
                                                ConfigRecord(dict(evaluate_config)), grid))
            replies = list(grid.send_and_receive(messages=sent, timeout=timeout))
            self._sent(sent)
            self.aggregate_evaluate(rnd, replies)
            log.info("round %d/%d done in %.1f s", rnd, num_rounds, time.monotonic() - t0)
            if on_round_end is not None:
                on_round_end(rnd, arrays)
        return arrays


class HccFedAvg(SiteAwareMixin, FedAvg):
    """FedAvg over the training sites (McMahan et al. 2017), sample-size weighted."""


class HccFedProx(SiteAwareMixin, FedProx):
    """FedProx: FedAvg aggregation; the sites add ``mu/2 ||w - w_global||^2`` to their loss."""


class HccFedBN(SiteAwareMixin, FedAvg):
    """FedBN (Li et al. 2021): FedAvg of every entry except the normalisation layers'
    (``local_keys``), which each site keeps in its state folder; round messages and replies
    carry the model without them (server/fedbn.py)."""


def build_strategy(name: str, n_training: int, proximal_mu: float = 0.0,
                   equal_weights: bool = False, arm: dict[str, Any] | None = None,
                   local_keys: Iterable[str] = ()) -> FedAvg:
    """Build a strategy by name (``fedavg``, ``fedprox``, ``fedbn`` with the model's
    normalisation entries ``local_keys`` kept at the sites, or a FedOpt server optimiser:
    ``fedadam``, ``fedyogi``, ``fedadagrad``, with the arm's ``server_lr``, ``beta_1``,
    ``beta_2``, ``tau``; the sites train as under FedAvg) for ``n_training`` sites.

    ``equal_weights`` averages the sites' updates with equal weights (central DP's sensitivity
    analysis assumes it): the sites then send ``unit-weight = 1``."""
    common: dict[str, Any] = {
        "weighted_by_key": "unit-weight" if equal_weights else R.NUM_EXAMPLES,
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
    if name == "fedbn":
        fedbn = HccFedBN(**common)
        fedbn.local_keys = tuple(local_keys)
        return fedbn
    if name in KINDS:
        strategy = HccFedAvg(**common)
        strategy.server_opt = from_arm({**(arm or {}), "name": name})
        return strategy
    raise KeyError(f"unknown strategy '{name}'; known: fedavg, fedprox, fedbn, "
                   f"{', '.join(KINDS)}")
