"""The coordinator's strategy: reply screening by site, and atomic checkpoints.

Real Flower ``Message`` objects (replies built with ``reply_to`` as a ClientApp does)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
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


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


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
    s.set_global(_record(GLOBAL))  # type: ignore[attr-defined]
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
    assert set(reasons) == {"site_C", "site_D"}
    assert reasons["site_C"] == "non-finite parameters"
    assert reasons["site_D"].startswith("parameters of the wrong names or shapes (w: (3, 3)")
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
    assert "exceeds 10 x the round's lower median" in s.rejections[0]["reason"]  # type: ignore[attr-defined]
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
    s.set_global(_record(GLOBAL))  # type: ignore[attr-defined]
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


# --- one site cannot take over or destroy the global model (issue 15) -----------------------
HONEST = {11: (1.0, 10), 12: (2.0, 30), 13: (1.5, 20)}  # node -> (update value, examples)
DECLARED = {"site_A": {"n-train": 10, "n-val": 4}, "site_B": {"n-train": 30, "n-val": 6},
            "site_C": {"n-train": 20, "n-val": 5}, "site_D": {"n-train": 25, "n-val": 5}}


def _guarded(tmp_path: Path, sites: dict[int, str] | None = None, **kw):  # type: ignore[no-untyped-def]
    sites = sites or SITES
    s = build_strategy("fedavg", len(sites))
    s.setup_sites("fedavg", sites, list(sites), min_sites=kw.pop("min_sites", 2),  # type: ignore[attr-defined]
                  max_norm_ratio=kw.pop("ratio", 10.0),
                  audit=AuditLog(tmp_path / "audit.jsonl", "coordinator"),
                  site_sizes={v: DECLARED.get(v, {"n-train": 50, "n-val": 5})
                              for v in sites.values()}, **kw)
    s.set_global(_record(GLOBAL))  # type: ignore[attr-defined]
    return s


def _fedavg(parts: list[tuple[float, float]]) -> float:
    return sum(v * n for v, n in parts) / sum(n for _, n in parts)


def _honest(nodes: list[int]) -> list[Message]:
    return [_reply(n, _update(HONEST[n][0]), n=HONEST[n][1]) for n in nodes]


def _rejected(s) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {r["site"]: r["reason"] for r in s.rejections}


def _assert_global(arrays: ArrayRecord | None, value: float) -> None:
    assert arrays is not None
    for k, v in arrays.items():
        got = v.numpy()
        assert got.dtype == np.float32 and got.shape == GLOBAL[k].shape, k
        np.testing.assert_allclose(got, value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("forged", [1e12, 26.0, 10.5, float("nan"), [1e12]])
def test_a_forged_example_count_is_rejected_and_named(tmp_path: Path, forged: Any) -> None:
    s = _guarded(tmp_path)
    hostile = _reply(14, _update(1.2), n=forged)  # site_D declared 25 training examples
    arrays, _ = s.aggregate_train(1, [*_honest([11, 12, 13]), hostile])
    _assert_global(arrays, _fedavg([HONEST[n] for n in (11, 12, 13)]))
    assert list(_rejected(s)) == ["site_D"]
    reason = _rejected(s)["site_D"]
    if isinstance(forged, list) or forged in (10.5,) or forged != forged:
        assert reason == "missing or invalid num-examples"
    else:
        assert reason == f"num-examples {forged:g} exceeds the 25 examples the site declared"
    audit = read_audit(tmp_path / "audit.jsonl")
    assert any(e.get("peer") == "site_D" and e.get("decision", "").startswith("rejected: ")
               for e in audit)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float64, np.float16])
def test_arrays_of_another_dtype_are_rejected_before_any_arithmetic(tmp_path: Path,
                                                                   dtype: type) -> None:
    s = _guarded(tmp_path)
    big = {np.int64: 4e14, np.int32: 2e9, np.float64: 4e14, np.float16: 1.0}[dtype]
    bad = {k: np.full(v.shape, big, dtype) for k, v in GLOBAL.items()}
    arrays, _ = s.aggregate_train(1, [*_honest([11, 12, 13]), _reply(14, bad, n=25)])
    _assert_global(arrays, _fedavg([HONEST[n] for n in (11, 12, 13)]))
    assert _rejected(s)["site_D"].startswith("parameter ")
    assert np.dtype(dtype).name in _rejected(s)["site_D"]


def test_wrong_names_shapes_and_nan_are_rejected(tmp_path: Path) -> None:
    s = _guarded(tmp_path, min_sites=1)
    nan = _update(1.0)
    nan["b"][1] = np.nan
    extra = {**_update(1.0), "extra": np.zeros(2, np.float32)}
    flat = {"w": np.zeros(12, np.float32), "b": np.zeros(3, np.float32)}
    sites = {11: "site_A", 12: "site_B", 13: "site_C", 14: "site_D", 15: "site_E"}
    s = _guarded(tmp_path, sites, min_sites=1)
    arrays, _ = s.aggregate_train(1, [_reply(11, _update(1.0), n=10), _reply(12, nan, n=30),
                                      _reply(13, extra, n=20), _reply(14, flat, n=25),
                                      _reply(15, {"w": GLOBAL["w"]}, n=5)])
    _assert_global(arrays, 1.0)
    reasons = _rejected(s)
    assert reasons["site_B"] == "non-finite parameters"
    assert all(reasons[x].startswith("parameters of the wrong names or shapes")
               for x in ("site_C", "site_D", "site_E"))


def test_a_scaled_update_is_rejected_with_only_two_sites(tmp_path: Path) -> None:
    """The round's median of two norms is their mean, so a median rule cannot reject; the
    lower median (and the global model's norm) can."""
    two = {11: "site_A", 12: "site_B"}
    s = _guarded(tmp_path, two, min_sites=1)
    hostile = _reply(12, _update(1e6), n=30)
    arrays, _ = s.aggregate_train(1, [_reply(11, _update(1.0), n=10), hostile])
    _assert_global(arrays, 1.0)
    assert list(_rejected(s)) == ["site_B"]
    assert "exceeds 10 x the round's lower median" in _rejected(s)["site_B"]
    # A site that sends the global model back unchanged (norm 0) drags the lower median to 0:
    # the global model's norm and the history keep the honest site in.
    g = {k: np.full(v.shape, 1.0, np.float32) for k, v in GLOBAL.items()}
    s = _guarded(tmp_path, two, min_sites=1)
    s.set_global(_record(g))  # type: ignore[attr-defined]
    arrays, _ = s.aggregate_train(1, [_reply(11, _update(1.5), n=10),
                                      _reply(12, _update(1.0), n=30)])
    assert arrays is not None and s.rejections == []  # type: ignore[attr-defined]
    assert s.norm_history and s.norm_history[-1] > 0  # type: ignore[attr-defined]
    # the next round: the history remembers the honest scale
    s.set_global(arrays)  # type: ignore[attr-defined]
    base = float(arrays["w"].numpy()[0, 0])
    arrays2, _ = s.aggregate_train(2, [_reply(11, _update(base + 0.3), n=10),
                                       _reply(12, _update(base + 3e5), n=30)])
    _assert_global(arrays2, base + 0.3)
    assert "site_B" in _rejected(s)


def test_site_weights_are_capped_and_redistributed(tmp_path: Path) -> None:
    big = {11: "site_A", 12: "site_B", 13: "site_C"}
    sizes = {"site_A": 10, "site_B": 90, "site_C": 20}
    s = build_strategy("fedavg", 3)
    s.setup_sites("fedavg", big, list(big), min_sites=2, max_norm_ratio=10.0,  # type: ignore[attr-defined]
                  site_sizes={k: {"n-train": v} for k, v in sizes.items()}, max_site_weight=0.5)
    s.set_global(_record(GLOBAL))  # type: ignore[attr-defined]
    arrays, metrics = s.aggregate_train(1, [_reply(11, _update(1.0), n=10),
                                            _reply(12, _update(2.0), n=90),
                                            _reply(13, _update(1.3), n=20)])
    # site_B is capped at half the weight; A and C share the other half 1 : 2
    _assert_global(arrays, 0.5 * 2.0 + 0.5 * (1.0 * 10 + 1.3 * 20) / 30)
    assert metrics is not None and "train-loss" in metrics
    assert s.rejections == []  # type: ignore[attr-defined]


def test_extra_metric_keys_and_bad_metric_values_do_not_crash(tmp_path: Path) -> None:
    s = _guarded(tmp_path)
    odd = _reply(13, _update(1.5), n=20)
    next(iter(odd.content.metric_records.values()))["something-else"] = [1.0, 2.0]
    dp = _reply(14, _update(1.5), n=25)
    next(iter(dp.content.metric_records.values()))["dp-epsilon"] = [1.0]
    arrays, metrics = s.aggregate_train(1, [*_honest([11, 12]), odd, dp])
    _assert_global(arrays, _fedavg([HONEST[11], HONEST[12], HONEST[13]]))
    assert list(_rejected(s)) == ["site_D"] and metrics is not None
    ev = [_eval_reply(11, 0.4, 4), _eval_reply(12, 0.5, 6), _eval_reply(13, 0.5, 1e9),
          _eval_reply(14, float("nan"), 5)]
    out = s.aggregate_evaluate(1, ev)
    assert out is not None and out["val-loss"] == pytest.approx((0.4 * 4 + 0.5 * 6) / 10)
    assert {r["site"] for r in s.rejections if r["round"] == 1} == {  # type: ignore[attr-defined]
        "site_C", "site_D"}


def _eval_reply(node: int, loss: float, n: float) -> Message:
    TaskIdentity.node_id = 1
    sent = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                   message_type=MessageType.EVALUATE)
    TaskIdentity.node_id = node
    return Message(RecordDict({"metrics": MetricRecord(
        {"val-loss": loss, "val-auc": 0.7, "num-examples": n})}), reply_to=sent)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_coordinatewise_rules_ignore_one_hostile_site(tmp_path: Path, rule: str) -> None:
    sites = {20 + i: f"site_{i}" for i in range(6)}
    s = _guarded(tmp_path, sites, aggregation=rule, trim_fraction=0.2, ratio=0.0)
    values = [1.0, 1.1, 0.9, 1.2, 0.8]
    replies = [_reply(20 + i, _update(v), n=10) for i, v in enumerate(values)]
    replies.append(_reply(25, _update(500.0), n=50))  # screen off: only the rule resists
    arrays, _ = s.aggregate_train(1, replies)
    expected = 1.05 if rule == "median" else float(np.mean(sorted([*values, 500.0])[1:-1]))
    _assert_global(arrays, expected)
    assert float(np.max(arrays["w"].numpy())) < 1.3  # type: ignore[index]
