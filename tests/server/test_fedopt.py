"""Server optimisers (server/fedopt.py) against Flower's own FedAdam, FedYogi and FedAdagrad
(flwr.serverapp.strategy, the reference implementation of Reddi et al. 2021 that Flower ships),
and their checkpoint state."""

from __future__ import annotations

from collections.abc import Iterator
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
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi
from flwr.supercore.task_identity import TaskIdentity

from hcc_fl.server.fedopt import ServerOptimizer, from_arm
from hcc_fl.server.strategy import build_strategy, load_checkpoint, save_checkpoint

FLOWER = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


@pytest.fixture(autouse=True)
def identity() -> Iterator[None]:
    TaskIdentity.run_id = 7
    TaskIdentity.task_id = 1
    yield


def _reply(node: int, arrays: dict[str, np.ndarray]) -> Message:
    TaskIdentity.node_id = 1
    sent = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=sent)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_steps_equal_flowers_reference(kind: str) -> None:
    rng = np.random.default_rng(0)
    x = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    beta_1 = 0.0 if kind == "fedadagrad" else 0.9  # Flower's FedAdagrad has no momentum
    ours = ServerOptimizer(kind, lr=0.05, beta_1=beta_1, beta_2=0.99, tau=1e-3)
    extra = {} if kind == "fedadagrad" else {"beta_1": 0.9, "beta_2": 0.99}
    ref = FLOWER[kind](eta=0.05, tau=1e-3, **extra)
    cur_ours = {k: v.copy() for k, v in x.items()}
    ref.current_arrays = {k: v.copy() for k, v in x.items()}
    for t in range(1, 6):
        agg = {k: v + rng.normal(scale=0.1, size=v.shape) for k, v in cur_ours.items()}
        cur_ours = ours.step(cur_ours, agg)
        # Flower's FedAdam bias-corrects with exponent server_round + 1: our step t
        new, _ = ref.aggregate_train(t - 1, [_reply(1, agg)])
        assert new is not None
        ref.current_arrays = {k: a.numpy() for k, a in new.items()}
        for k in x:
            np.testing.assert_allclose(cur_ours[k], ref.current_arrays[k], rtol=0, atol=1e-12)


def test_normalisation_statistics_and_integers_take_the_aggregate() -> None:
    opt = ServerOptimizer("fedadam", lr=0.5)
    cur = {"bn.running_var": np.ones(3, np.float32), "bn.num_batches_tracked": np.array(4),
           "w": np.zeros(3, np.float32)}
    agg = {"bn.running_var": np.full(3, 0.25, np.float32),
           "bn.num_batches_tracked": np.array(9), "w": np.full(3, 0.1, np.float32)}
    out = opt.step(cur, agg)
    assert np.array_equal(out["bn.running_var"], agg["bn.running_var"])
    assert out["bn.num_batches_tracked"] == 9
    assert out["w"].dtype == np.float32 and not np.allclose(out["w"], agg["w"])
    assert set(opt.m) == {"w"}


def test_bad_settings_are_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="server_lr"):
        from_arm({"name": "fedadam", "server_lr": -1})
    with pytest.raises(ValueError, match="beta_2"):
        from_arm({"name": "fedyogi", "beta_2": 1.0})
    assert from_arm({"name": "fedavg"}) is None


def test_resume_continues_bit_exactly(tmp_path: Any) -> None:
    """The optimiser state goes through a checkpoint file and the resumed run's next steps equal
    the uninterrupted run's exactly."""
    rng = np.random.default_rng(3)
    x = {"w": rng.normal(size=(5, 5)).astype(np.float32)}
    aggs = [{"w": (x["w"] + rng.normal(scale=0.05, size=(5, 5))).astype(np.float32)}
            for _ in range(4)]
    straight = build_strategy("fedyogi", 3, arm={"server_lr": 0.02})
    cur = dict(x)
    for a in aggs:
        cur = straight.server_opt.step(cur, a)  # type: ignore[attr-defined]
    first = build_strategy("fedyogi", 3, arm={"server_lr": 0.02})
    first.setup_sites("fedyogi", {1: "a"}, [1], 1)  # type: ignore[attr-defined]
    mid = dict(x)
    for a in aggs[:2]:
        mid = first.server_opt.step(mid, a)  # type: ignore[attr-defined]
    save_checkpoint(tmp_path / "c.pt", {"version": 1, "strategy": first.state(),  # type: ignore[attr-defined]
                                         "model": {k: torch.from_numpy(v) for k, v in mid.items()}})
    ckpt = load_checkpoint(tmp_path / "c.pt")
    resumed = build_strategy("fedyogi", 3, arm={"server_lr": 0.02})
    resumed.setup_sites("fedyogi", {1: "a"}, [1], 1)  # type: ignore[attr-defined]
    resumed.load_state(ckpt["strategy"])  # type: ignore[attr-defined]
    cur2 = {k: t.numpy() for k, t in ckpt["model"].items()}
    for a in aggs[2:]:
        cur2 = resumed.server_opt.step(cur2, a)  # type: ignore[attr-defined]
    assert np.array_equal(cur2["w"], cur["w"])
    other = build_strategy("fedyogi", 3, arm={"server_lr": 0.03})
    other.setup_sites("fedyogi", {1: "a"}, [1], 1)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="lr"):
        other.load_state(ckpt["strategy"])  # type: ignore[attr-defined]
