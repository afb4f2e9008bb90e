"""Flower ServerApp of the coordinator: the only server module that runs the round loop.

Reads: build the model -> discover the sites (bounded wait) -> ``strategy.start`` over the
training sites -> pooled Youden threshold from summed site histograms -> external-site statistics
-> write the arm's result into the run directory. Nothing here sees a patient-level record.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from hcc_fl.server.strategy import build_strategy
from hcc_fl.shared import records as R
from hcc_fl.shared.metrics import youden_from_histograms
from hcc_fl.shared.models import build_model
from hcc_fl.shared.version import code_version

log = logging.getLogger("hcc_fl.coordinator")
app = ServerApp()


class FederationError(RuntimeError):
    """The federation cannot go on (sites missing, every round failed, ...)."""


def _query(grid: Grid, node_ids: list[int], action: str, content: RecordDict,
           timeout: float) -> list[Message]:
    messages = [
        Message(content=content, message_type=f"{MessageType.QUERY}.{action}", dst_node_id=n)
        for n in node_ids
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


def discover_sites(
    grid: Grid, training: list[str], external: str | None, timeout_s: float
) -> dict[int, dict[str, Any]]:
    """Ask every connected node who it is until all expected sites answered or time runs out.

    Returns node id -> {"site", "role", "code-version", "n-train", "n-val", "n-test"}.

    Raises
    ------
    FederationError
        When the expected sites have not all answered within ``timeout_s`` seconds.
    """
    expected = set(training) | ({external} if external else set())
    known: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        new = [n for n in grid.get_node_ids() if n not in known]
        if new:
            for reply in _query(grid, new, R.ACTION_SITE_INFO, RecordDict(), timeout=60.0):
                if reply.has_error():
                    log.warning("node %d could not describe itself: %s",
                                reply.metadata.src_node_id, reply.error.reason)
                    continue
                info = dict(reply.content[R.INFO])
                info.update({k: int(cast(Any, v)) for k, v in reply.content[R.METRICS].items()})
                known[reply.metadata.src_node_id] = info
        found = {v["site"] for v in known.values()}
        if expected <= found:
            return known
        if time.monotonic() > deadline:
            raise FederationError(
                f"sites missing after {timeout_s:.0f} s: {', '.join(sorted(expected - found))}"
                f" (connected: {', '.join(sorted(found)) or 'none'})"
            )
        time.sleep(1.0)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _nan_to_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated arm (FedAvg or FedProx) and write its result into the run directory."""
    rc = context.run_config
    cfg = json.loads(Path(str(rc["config-path"])).read_text())
    arm = str(rc["arm"])
    arm_dir = Path(str(rc["arm-dir"]))
    arm_dir.mkdir(parents=True, exist_ok=True)
    fed = cfg["federation"]
    arm_cfg = next(a for a in cfg["strategy"]["arms"] if a["name"] == arm)
    training = list(fed["training_sites"])
    external = fed.get("external_site")

    sites = discover_sites(grid, training, external, float(fed["discovery_timeout_s"]))
    names = {nid: str(v["site"]) for nid, v in sites.items()}
    train_nodes = [nid for nid, v in sites.items() if v["site"] in training]
    ext_nodes = [nid for nid, v in sites.items() if v["site"] == external]
    mine = code_version()
    for nid, v in sites.items():
        if v["code-version"] != mine:
            log.warning("site %s runs hcc-fl %s, coordinator %s", names[nid], v["code-version"],
                        mine)
    log.info("sites: %s", ", ".join(f"{v['site']} ({v['role']})" for v in sites.values()))

    torch.manual_seed(int(cfg["seed"]))
    model = build_model(cfg["task"]["name"], cfg["model"]["profile"])
    strategy = build_strategy(arm, len(train_nodes), float(arm_cfg.get("proximal_mu", 0.0)))
    strategy.setup_sites(arm, names, train_nodes, int(fed["min_sites"]))  # type: ignore[attr-defined]
    train_config = ConfigRecord({
        "local-epochs": int(fed["local_epochs"]),
        "batch-size": int(cfg["model"]["batch_size"]),
        "lr": float(cfg["model"]["lr"]),
        "weight-decay": float(cfg["model"]["weight_decay"]),
    })
    t0 = time.monotonic()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(fed["rounds"]),
        timeout=float(fed["round_timeout_s"]),
        train_config=train_config,
        evaluate_config=ConfigRecord(),
    )
    train_seconds = time.monotonic() - t0
    if len(result.arrays) == 0:
        raise FederationError(f"{arm}: no round produced a model (every round failed)")
    final = result.arrays
    model.load_state_dict(final.to_torch_state_dict())

    # Pooled Youden threshold from summed class-wise histograms of the training sites.
    content = RecordDict({R.ARRAYS: final, R.CONFIG: ConfigRecord()})
    replies = _query(grid, train_nodes, R.ACTION_THRESHOLD, content, float(fed["round_timeout_s"]))
    pos = neg = None
    for reply in replies:
        if reply.has_error():
            log.warning("threshold statistics failed at %s: %s",
                        names.get(reply.metadata.src_node_id), reply.error.reason)
            continue
        m = reply.content[R.METRICS]
        p = np.asarray(m["pos"], dtype=np.float64)
        q = np.asarray(m["neg"], dtype=np.float64)
        pos = p if pos is None else pos + p
        neg = q if neg is None else neg + q
    if pos is None or neg is None:
        raise FederationError(f"{arm}: no training site returned threshold statistics")
    threshold = youden_from_histograms(pos, neg)

    external_stats: dict[str, Any] | None = None
    if ext_nodes:
        content = RecordDict({R.ARRAYS: final, R.CONFIG: ConfigRecord({"threshold": threshold})})
        reply = _query(grid, ext_nodes, R.ACTION_EXTERNAL, content,
                       float(fed["round_timeout_s"]))[0]
        if reply.has_error():
            raise FederationError(f"{arm}: external evaluation failed: {reply.error.reason}")
        stats = {k: float(v) for k, v in reply.content[R.METRICS].items()}  # type: ignore[arg-type]
        external_stats = _nan_to_none({
            "auc": stats["auc"],
            "auc_ci": [stats["auc_lower"], stats["auc_upper"]],
            **{k: stats[k] for k in ("threshold", "sensitivity", "specificity", "accuracy",
                                     "ppv", "npv", "loss", "auc_variance")},
            **{k: int(stats[k]) for k in ("n", "n_pos", "tp", "fp", "tn", "fn")},
        })
        if external_stats["auc_ci"][0] is None or not np.isfinite(stats["auc_lower"]):
            external_stats["auc_ci"] = None

    torch.save(model.state_dict(), arm_dir / "model.pt")
    _write_json(arm_dir / "result.json", {
        "arm": arm,
        "strategy": arm_cfg,
        "code_version": mine,
        "train_seconds": train_seconds,
        "threshold": threshold,
        "threshold_counts": {"cases": int(pos.sum()), "controls": int(neg.sum())},
        "external": external_stats,
        "sites": [
            {"site": v["site"], "role": v["role"], "code_version": v["code-version"],
             "n_train": v["n-train"], "n_val": v["n-val"], "n_test": v["n-test"]}
            for v in sites.values()
        ],
        "history": strategy.history,  # type: ignore[attr-defined]
        "rejections": strategy.rejections,  # type: ignore[attr-defined]
    })
    log.info("%s finished: external AUC %s", arm, external_stats and external_stats.get("auc"))
