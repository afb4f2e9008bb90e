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
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from hcc_fl.server.strategy import build_strategy
from hcc_fl.shared import records as R
from hcc_fl.shared.evaluation import combine_pass1, finish_pass2
from hcc_fl.shared.jsonio import write_json
from hcc_fl.shared.metrics.pooled import ScoreGrid
from hcc_fl.shared.models import build_model
from hcc_fl.shared.version import code_version

log = logging.getLogger("hcc_fl.coordinator")
app = ServerApp()


class FederationError(RuntimeError):
    """The federation cannot go on (sites missing, every round failed, ...)."""


def _query(grid_: Grid, node_ids: list[int], action: str, content: RecordDict,
           timeout: float) -> list[Message]:
    messages = [
        Message(content=content, message_type=f"{MessageType.QUERY}.{action}", dst_node_id=n)
        for n in node_ids
    ]
    return list(grid_.send_and_receive(messages, timeout=timeout))


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


def pooled_validation(
    grid_: Grid, train_nodes: list[int], names: dict[int, str], final: ArrayRecord,
    grid: ScoreGrid, timeout: float,
) -> tuple[float, dict[str, Any]]:
    """Two passes of summed sufficient statistics over the training sites' validation split.

    Pass 1 (histograms, calibration sums) gives the Youden threshold and calibration; pass 2
    (placement sums against the broadcast pooled histograms) gives the AUC with its DeLong CI.
    """
    content = RecordDict({R.ARRAYS: final, R.CONFIG: ConfigRecord()})
    pass1: dict[str, dict[str, Any]] = {}
    for reply in _query(grid_, train_nodes, R.ACTION_VALIDATION, content, timeout):
        site = names.get(reply.metadata.src_node_id, "?")
        if reply.has_error():
            log.warning("validation statistics failed at %s: %s", site, reply.error.reason)
            continue
        m = reply.content[R.METRICS]
        auc = float(cast(Any, m["auc"]))
        pass1[site] = {
            "pos": m["pos"], "neg": m["neg"], "calibration": m["calibration"],
            "n": int(cast(Any, m["n"])), "n_pos": int(cast(Any, m["n-pos"])),
            "loss": float(cast(Any, m["loss"])),
            "auc": auc if np.isfinite(auc) else None,
            "auc_ci": ([float(cast(Any, m["auc-lower"])), float(cast(Any, m["auc-upper"]))]
                       if np.isfinite(auc) else None),
        }
    if not pass1:
        raise FederationError("no training site returned validation statistics")
    threshold, (pos, neg), validation = combine_pass1(pass1, grid)
    content = RecordDict({R.ARRAYS: final, R.METRICS: MetricRecord(
        {"pos": pos.tolist(), "neg": neg.tolist()})})
    vectors = []
    responders = [n for n in train_nodes if names[n] in pass1]
    for reply in _query(grid_, responders, R.ACTION_PLACEMENTS, content, timeout):
        if reply.has_error():
            log.warning("validation placements failed at %s: %s",
                        names.get(reply.metadata.src_node_id), reply.error.reason)
            continue
        vectors.append(np.asarray(reply.content[R.METRICS]["sums"], dtype=np.float64))
    if vectors:
        validation = finish_pass2(validation, vectors)
    return threshold, validation


def external_evaluation(
    grid_: Grid, node: int, final: ArrayRecord, threshold: float, timeout: float
) -> dict[str, Any]:
    """Ask the external site for its aggregate statistics of the final model."""
    content = RecordDict({R.ARRAYS: final, R.CONFIG: ConfigRecord({"threshold": threshold})})
    reply = _query(grid_, [node], R.ACTION_EXTERNAL, content, timeout)[0]
    if reply.has_error():
        raise FederationError(f"external evaluation failed: {reply.error.reason}")
    return json.loads(str(reply.content[R.INFO][R.REPORT]))  # type: ignore[no-any-return]


@app.main()
def main(grid_: Grid, context: Context) -> None:
    """Run one federated arm; a failure is also written as ``error.json`` for the driver."""
    arm_dir = Path(str(context.run_config["arm-dir"]))
    try:
        run_arm(grid_, context)
    except FederationError as exc:
        arm_dir.mkdir(parents=True, exist_ok=True)
        write_json(arm_dir / "error.json", {"error": str(exc)})
        log.error("%s", exc)
        raise


def run_arm(grid_: Grid, context: Context) -> None:
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

    sites = discover_sites(grid_, training, external, float(fed["discovery_timeout_s"]))
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
    strategy.insecure = bool(rc.get("insecure", False))  # type: ignore[attr-defined]
    train_config = ConfigRecord({
        "local-epochs": int(fed["local_epochs"]),
        "batch-size": int(cfg["model"]["batch_size"]),
        "lr": float(cfg["model"]["lr"]),
        "weight-decay": float(cfg["model"]["weight_decay"]),
    })
    t0 = time.monotonic()
    result = strategy.start(
        grid=grid_,
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

    grid = ScoreGrid(int(cfg["evaluation"]["histogram_bins"]))
    timeout = float(fed["round_timeout_s"])
    threshold, validation = pooled_validation(grid_, train_nodes, names, final, grid, timeout)
    external_stats = (external_evaluation(grid_, ext_nodes[0], final, threshold, timeout)
                      if ext_nodes else None)

    torch.save(model.state_dict(), arm_dir / "model.pt")
    write_json(arm_dir / "result.json", {
        "arm": arm,
        "strategy": arm_cfg,
        "code_version": mine,
        "train_seconds": train_seconds,
        "threshold": threshold,
        "validation": validation,
        "external": external_stats,
        "sites": [
            {"site": v["site"], "role": v["role"], "code_version": v["code-version"],
             "manifest_sha256": v["manifest-sha256"],
             "n_train": v["n-train"], "n_val": v["n-val"], "n_test": v["n-test"]}
            for v in sites.values()
        ],
        "history": strategy.history,  # type: ignore[attr-defined]
        "rejections": strategy.rejections,  # type: ignore[attr-defined]
    })
    log.info("%s finished: external AUC %s", arm, external_stats and external_stats.get("auc"))
