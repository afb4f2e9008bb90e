"""The coordinator's strategy: reply screening by site, and atomic checkpoints.

Real Flower ``Message`` objects (replies built with ``reply_to`` as a ClientApp does)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hcc_fl.server.strategy import build_strategy, load_checkpoint, save_checkpoint
from hcc_fl.shared.audit import AuditLog, read_audit

SITES = {11: "site_A", 12: "site_B", 13: "site_C", 14: "site_D"}
GLOBAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture(autouse=True)
def identity() -> Iterator[None]:
    TaskIdentity.run_id = 7
    TaskIdentity.task_id = 1
    yield


def _reply(node: int, update: dict[str, np.ndarray] | None, n: float = 10,
           loss: float = 0.5, extra_record: bool = False) -> Message:
    TaskIdentity.node_id = 1  # the coordinator sends ...
    sent = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node  # ... the site replies
    content = RecordDict({"metrics": MetricRecord({"num-examples": n, "train-loss": loss})})
    if update is not None:
        content["arrays"] = ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in update.items()})
    if extra_record:
        content["more"] = MetricRecord({"num-examples": 1})
    return Message(content, reply_to=sent)


def _strategy(tmp_path: Path, ratio: float = 10.0):  # type: ignore[no-untyped-def]
    s = build_strategy("fedavg", 4)
    s.setup_sites("fedavg", SITES, list(SITES), min_sites=2, max_norm_ratio=ratio,  # type: ignore[attr-defined]
                  audit=AuditLog(tmp_path / "audit.jsonl", "coordinator"))
    s._expected = {k: v.shape for k, v in GLOBAL.items()}  # type: ignore[attr-defined]
    s._global = GLOBAL  # type: ignore[attr-defined]
    return s


def _update(scale: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, scale, np.float32) for k, v in GLOBAL.items()}


def test_bad_replies_are_rejected_by_site_and_the_rest_aggregated(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    nan = _update(1.0)
    nan["w"][0, 0] = np.nan
    wrong = {"w": np.ones((3, 3), np.float32), "b": np.ones(3, np.float32)}
    replies = [_reply(11, _update(1.0), n=10), _reply(12, _update(3.0), n=30), _reply(13, nan),
               _reply(14, wrong)]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    agg = {k: v.numpy() for k, v in arrays.items()}
    np.testing.assert_allclose(agg["w"], 2.5)  # (10 * 1 + 30 * 3) / 40
    reasons = {r["site"]: r["reason"] for r in s.rejections}  # type: ignore[attr-defined]
    assert reasons == {"site_C": "non-finite parameters",
                       "site_D": "parameters of the wrong names or shapes"}
    audit = read_audit(tmp_path / "audit.jsonl")
    decisions = {e["peer"]: e["decision"] for e in audit if e["event"] == "received"}
    assert decisions["site_A"] == "accepted" and decisions["site_C"].startswith("rejected")
    assert all("num-examples" in e["metrics"] for e in audit if e["peer"] in ("site_A", "site_B"))


def test_an_update_far_above_the_median_norm_is_rejected(tmp_path: Path) -> None:
    s = _strategy(tmp_path, ratio=10.0)
    replies = [_reply(11, _update(1.0)), _reply(12, _update(1.2)), _reply(13, _update(0.9)),
               _reply(14, _update(50.0))]
    arrays, _ = s.aggregate_train(3, replies)
    assert arrays is not None
    assert [r["site"] for r in s.rejections] == ["site_D"]  # type: ignore[attr-defined]
    assert "exceeds 10 x the median" in s.rejections[0]["reason"]  # type: ignore[attr-defined]
    assert float(np.max(arrays["w"].numpy())) < 2.0  # the outlier did not enter the mean
    off = _strategy(tmp_path, ratio=0.0)  # 0 switches the screen off
    assert off.aggregate_train(3, replies)[0] is not None and off.rejections == []  # type: ignore[attr-defined]


def test_malformed_and_too_few_replies_leave_the_model_unchanged(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    replies = [_reply(11, _update(1.0)), _reply(12, None), _reply(13, _update(1.0), n=-1),
               _reply(14, _update(1.0), loss=float("inf"))]
    arrays, metrics = s.aggregate_train(2, replies)
    assert arrays is None and metrics is None  # 1 usable reply < min_sites = 2
    reasons = sorted(r["reason"] for r in s.rejections)  # type: ignore[attr-defined]
    assert reasons == ["malformed reply (records)", "missing or invalid num-examples",
                       "missing or non-finite train-loss"]
    assert s.aggregated_rounds == []  # type: ignore[attr-defined]


def test_replies_from_a_non_training_node_are_rejected(tmp_path: Path) -> None:
    s = build_strategy("fedavg", 2)
    s.setup_sites("fedavg", {11: "site_A", 12: "site_B", 99: "site_EXT"},  # type: ignore[attr-defined]
                  [11, 12], min_sites=2)
    s._expected = {k: v.shape for k, v in GLOBAL.items()}  # type: ignore[attr-defined]
    s._global = GLOBAL  # type: ignore[attr-defined]
    arrays, _ = s.aggregate_train(1, [_reply(11, _update(1.0)), _reply(12, _update(1.0)),
                                      _reply(99, _update(1.0))])
    assert arrays is not None
    assert [r["site"] for r in s.rejections] == ["site_EXT"]  # type: ignore[attr-defined]


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    s.aggregate_train(1, [_reply(11, _update(1.0)), _reply(12, _update(2.0))])
    state = {"version": 1, "arm": "fedavg", "round": 1, "config_sha256": "x",
             "model": {"w": torch.randn(4, 3), "b": torch.randn(3)},
             "strategy": s.state(), "train_seconds": 1.5}  # type: ignore[attr-defined]
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint(path, state)
    assert not path.with_name("checkpoint.pt.tmp").exists()
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["strategy"]["history"] == s.history  # type: ignore[attr-defined]
    assert back["strategy"]["aggregated_rounds"] == [1]
    other = _strategy(tmp_path)
    other.load_state(back["strategy"])  # type: ignore[attr-defined]
    assert json.dumps(other.state()) == json.dumps(s.state())  # type: ignore[attr-defined]
    save_checkpoint(path, {**state, "version": 99})
    with pytest.raises(ValueError, match="checkpoint version 99"):
        load_checkpoint(path)
