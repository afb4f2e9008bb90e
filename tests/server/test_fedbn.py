"""FedBN at the coordinator: round messages and replies without the normalisation layers, the
rest aggregated exactly as FedAvg, the averaged normalisation state of the end, the arm's
configuration; and the site's side of a round message (the ClientApp's own functions)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from hcc_fl.client import flower_app as client_app
from hcc_fl.client.flower_app import _received_keys
from hcc_fl.server import flower_app as server_app
from hcc_fl.server.config import ConfigError, check_config, compose_config
from hcc_fl.server.fedbn import average_norm_states, check_norm_reply
from hcc_fl.server.strategy import HccFedBN, build_strategy
from hcc_fl.shared import records as R
from hcc_fl.shared.models import build_model
from hcc_fl.shared.normstate import norm_keys
from hcc_fl.shared.wire import array_view, is_packed, layout_of, pack, unpack

SITES = {11: "site_A", 12: "site_B", 13: "site_C"}
N = {"site_A": 10, "site_B": 30, "site_C": 20}


@pytest.fixture(autouse=True)
def identity() -> Iterator[None]:
    TaskIdentity.run_id = 7
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1
    yield


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 1))


class SiteGrid:
    """Three sites that each move every float entry they receive by their own offset (site A
    +1, B +2, C +3; what a local epoch would do, deterministically) and keep their own
    normalisation state, replying with exactly the entries they received (``send_all``: the
    normalisation entries too, as a site that ignores FedBN would)."""

    def __init__(self, send_all: tuple[str, ...] = ()) -> None:
        self.template = _model().state_dict()
        self.send_all = send_all
        self.seen: list[Message] = []
        self.own: dict[str, dict[str, np.ndarray]] = {}

    def get_node_ids(self) -> list[int]:
        return list(SITES)

    def _received(self, arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], list[str]]:
        keys = _received_keys(arrays, _model())
        if is_packed(arrays.keys()):
            return dict(unpack({k: array_view(v) for k, v in arrays.items()},
                               layout_of({k: self.template[k] for k in keys}))), keys
        return {k: array_view(v) for k, v in arrays.items()}, keys

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        out = []
        for m in messages:
            self.seen.append(m)
            node = m.metadata.dst_node_id
            site = SITES[node]
            if not m.metadata.message_type.startswith("train"):
                TaskIdentity.node_id = node
                out.append(Message(RecordDict({R.METRICS: MetricRecord(
                    {"val-loss": 0.5, "val-auc": 0.5, R.NUM_EXAMPLES: 5.0})}), reply_to=m))
                TaskIdentity.node_id = 1
                continue
            arrays = m.content[R.ARRAYS]
            state, keys = self._received(arrays)
            offset = float(list(SITES).index(node) + 1)
            new = {k: (v + offset).astype(v.dtype) if np.issubdtype(v.dtype, np.floating)
                   else v.copy() for k, v in state.items()}
            if site in self.send_all:
                new.update({k: self.template[k].numpy() + offset for k in norm_keys(_model())
                            if self.template[k].is_floating_point()})
                new.update({k: self.template[k].numpy() for k in norm_keys(_model())
                            if not self.template[k].is_floating_point()})
                new = {k: new[k] for k in self.template}
            if is_packed(arrays.keys()) and site not in self.send_all:
                rec = ArrayRecord({k: Array(v) for k, v in pack(new, "fp32").items()})
            else:
                rec = ArrayRecord({k: Array(np.array(v)) for k, v in new.items()})
            TaskIdentity.node_id = node
            out.append(Message(RecordDict({R.ARRAYS: rec, R.METRICS: MetricRecord(
                {R.NUM_EXAMPLES: N[site], "train-loss": 0.3})}), reply_to=m))
            TaskIdentity.node_id = 1
        return out


def _run(name: str, grid: SiteGrid, transfer: str, rounds: int = 1) -> dict[str, np.ndarray]:
    model = _model()
    strategy = build_strategy(name, 3, local_keys=norm_keys(model) if name == "fedbn" else ())
    strategy.setup_sites(name, SITES, list(SITES), min_sites=2)  # type: ignore[attr-defined]
    strategy.transfer = transfer  # type: ignore[attr-defined]
    final = strategy.run_rounds(  # type: ignore[attr-defined]
        grid, ArrayRecord(model.state_dict()), 1, rounds, 10.0,
        ConfigRecord({"local-epochs": 1}), ConfigRecord())
    return {k: np.array(v.numpy()) for k, v in final.items()}


@pytest.mark.parametrize("transfer", ["per-tensor", "fp32"])
def test_fedbn_aggregates_the_rest_as_fedavg_and_never_moves_the_norm_layers(
        transfer: str) -> None:
    init = {k: v.numpy() for k, v in _model().state_dict().items()}
    local = norm_keys(_model())
    assert len(local) == 7  # BatchNorm: 2 affine + 3 statistics; GroupNorm: 2 affine
    fedbn_grid, fedavg_grid = SiteGrid(), SiteGrid()
    fedbn = _run("fedbn", fedbn_grid, transfer, rounds=2)
    fedavg = _run("fedavg", fedavg_grid, transfer, rounds=2)
    shared = [k for k in init if k not in local]
    for k in shared:  # the invariant: FedAvg's aggregate of the non-normalisation entries
        np.testing.assert_array_equal(fedbn[k], fedavg[k], err_msg=k)
        if init[k].dtype.kind == "f":  # (10 x 1 + 30 x 2 + 20 x 3) / 60 per round
            np.testing.assert_allclose(fedbn[k], init[k] + 2 * 130 / 60, rtol=1e-5)
    for k in local:  # the coordinator never changes (or sees) them
        np.testing.assert_array_equal(fedbn[k], init[k], err_msg=k)
        assert not np.array_equal(fedavg[k], init[k]) or init[k].dtype.kind != "f"
    for m in fedbn_grid.seen:  # nothing of the normalisation layers goes out but norm-init
        keys = _received_keys(m.content[R.ARRAYS], _model())
        assert not set(keys) & set(local)
        assert set(m.content[R.NORM_INIT].keys()) == set(local)
        for k, v in m.content[R.NORM_INIT].items():
            np.testing.assert_array_equal(v.numpy(), init[k])
    assert all(R.NORM_INIT not in m.content.array_records for m in fedavg_grid.seen)


def test_a_reply_with_normalisation_entries_is_rejected() -> None:
    model = _model()
    strategy = build_strategy("fedbn", 3, local_keys=norm_keys(model))
    assert isinstance(strategy, HccFedBN)
    strategy.setup_sites("fedbn", SITES, list(SITES), min_sites=2)
    strategy.transfer = "per-tensor"
    strategy.run_rounds(SiteGrid(send_all=("site_B",)), ArrayRecord(model.state_dict()), 1, 1,
                        10.0, ConfigRecord({"local-epochs": 1}), ConfigRecord())
    assert [r["site"] for r in strategy.rejections] == ["site_B"]
    assert "unexpected" in strategy.rejections[0]["reason"]
    assert strategy.aggregated_rounds == [1]


def test_averaged_norm_state_is_screened_and_weighted() -> None:
    expected = {"g.weight": ((4,), np.dtype(np.float32)),
                "bn.num_batches_tracked": ((), np.dtype(np.int64))}
    a = {"g.weight": np.full(4, 1.0, np.float32), "bn.num_batches_tracked": np.array(4)}
    b = {"g.weight": np.full(4, 4.0, np.float32), "bn.num_batches_tracked": np.array(10)}
    assert check_norm_reply(a, expected, 10, 20) is None
    assert "exceeds" in str(check_norm_reply(a, expected, 30, 20))
    nan = {**a, "g.weight": np.array([1, np.nan, 1, 1], np.float32)}
    assert check_norm_reply(nan, expected, 10, 20) == "non-finite values in g.weight"
    assert "wrong names" in str(check_norm_reply({"g.weight": a["g.weight"]}, expected, 10,
                                                 20))
    mean = average_norm_states([a, b], [10, 30])
    np.testing.assert_allclose(mean["g.weight"], 0.25 * 1 + 0.75 * 4)
    assert mean["g.weight"].dtype == np.float32
    assert mean["bn.num_batches_tracked"].dtype == np.int64
    assert int(mean["bn.num_batches_tracked"]) == round(0.25 * 4 + 0.75 * 10)
    capped = average_norm_states([a, b], [10, 30], max_site_weight=0.5)
    np.testing.assert_allclose(capped["g.weight"], 2.5)


class NormStateGrid:
    """The sites' answers to ``query.norm_state``: A and C their state, B a forged count."""

    def __init__(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self.states = states

    def get_node_ids(self) -> list[int]:
        return list(SITES)

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        out = []
        for m in messages:
            assert m.metadata.message_type == f"query.{R.ACTION_NORM_STATE}"
            assert not m.content.array_records  # the coordinator sends no model
            site = SITES[m.metadata.dst_node_id]
            TaskIdentity.node_id = m.metadata.dst_node_id
            n = 10_000 if site == "site_B" else N[site]
            out.append(Message(RecordDict({R.ARRAYS: ArrayRecord(self.states[site]),
                                           R.METRICS: MetricRecord({R.NUM_EXAMPLES: n})}),
                               reply_to=m))
            TaskIdentity.node_id = 1
        return out


def test_fedbn_averaged_model_from_the_sites_states() -> None:
    model = _model()
    local = norm_keys(model)
    strategy = build_strategy("fedbn", 3, local_keys=local)
    strategy.setup_sites("fedbn", SITES, list(SITES), min_sites=2,  # type: ignore[attr-defined]
                         site_sizes={s: {"n-train": N[s]} for s in N})
    final = ArrayRecord(model.state_dict())
    states = {s: {k: (v + i + 1 if v.is_floating_point() else v + 10 * (i + 1))
                  for k, v in model.state_dict().items() if k in local}
              for i, s in enumerate(N)}
    out, summary = server_app.fedbn_averaged(NormStateGrid(states), strategy, final, 10.0)
    assert summary["sites"] == ["site_A", "site_C"]
    assert summary["refused"][0]["site"] == "site_B"
    assert "exceeds" in summary["refused"][0]["reason"]
    got = out.to_torch_state_dict()
    for k, v in model.state_dict().items():
        if k not in local:
            assert torch.equal(got[k], v), k
        elif v.is_floating_point():  # A (+1, 10 examples) and C (+3, 20): +7/3
            torch.testing.assert_close(got[k], v + 7 / 3)
        else:
            assert int(got[k]) == round((10 * 10 + 20 * 30) / 30)


def test_fedbn_configuration() -> None:
    cfg = compose_config(["strategy=fedavg_fedbn"])
    assert [a["name"] for a in cfg["strategy"]["arms"]] == ["fedavg", "fedbn"]
    check_config(cfg)
    assert [a["name"] for a in compose_config(["strategy=fedbn"])["strategy"]["arms"]] == [
        "fedbn"]
    with pytest.raises(ConfigError, match="fedbn"):
        check_config(compose_config(["strategy=fedbn", "secure_aggregation.enabled=true"]))
    with pytest.raises(ConfigError, match="fedbn"):
        check_config(compose_config(["strategy=fedbn", "privacy=central-dp"]))


def _site_context(state: Path, role: str = R.ROLE_TRAIN, fedbn: int = 1) -> Context:
    return Context(run_id=1, node_id=11, node_config={
        "manifest": str(state / "manifest.csv"), "site": "site_A", "role": role,
        "state": str(state)}, state=RecordDict(), run_config={
        "task": "ki67_ceus", "profile": "tiny", "run-key": "study-1/fedbn", R.RC_FEDBN: fedbn})


def _round_message(global_state: dict[str, torch.Tensor], local: list[str], rnd: int,
                   with_init: bool = True) -> Message:
    shared = {k: v.numpy() for k, v in global_state.items() if k not in set(local)}
    content = RecordDict({R.ARRAYS: ArrayRecord({k: Array(v) for k, v in
                                                 pack(shared, "fp32").items()}),
                          R.CONFIG: ConfigRecord({"server-round": rnd})})
    if with_init:
        content[R.NORM_INIT] = ArrayRecord({k: global_state[k] for k in local})
    return Message(content, dst_node_id=11, message_type="train")


def test_the_site_overlays_its_own_state_and_replies_without_it(tmp_path: Path) -> None:
    """The ClientApp's own functions: a packed record without the normalisation entries; the
    site's state of the round before (a repeated round after a resume starts alike), else
    norm-init; the reply carries exactly the received entries."""
    torch.manual_seed(3)
    model = build_model("ki67_ceus", "tiny")
    glob = {k: v + 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    local = norm_keys(model)
    ctx = _site_context(tmp_path)
    first = client_app._model(_round_message(glob, local, 1), ctx, training=True)
    for k, v in first.state_dict().items():  # round 1: the global entries and norm-init
        assert torch.equal(v, glob[k]), k
    store = client_app._norm_store(ctx, client_app.resolve_site(ctx))
    assert store.folder == tmp_path / "fedbn" / "study-1__fedbn"
    for r in (1, 2):
        store.save(r, {k: glob[k] + 10 * r for k in local})
    msg = _round_message(glob, local, 2)
    again = client_app._model(msg, ctx, training=True).state_dict()
    for k in local:  # round 2 (again, after a resume) starts from round 1's own state
        assert torch.equal(again[k], glob[k] + 10), k
    evaluated = client_app._model(msg, ctx).state_dict()
    assert all(torch.equal(evaluated[k], glob[k] + 20) for k in local)  # newest for the rest
    reply = client_app._reply_arrays(msg, first)
    assert set(reply.keys()) == set(msg.content[R.ARRAYS].keys())
    # the external site (and any non-FedBN run) takes the model as sent: it must be complete
    for other in (_site_context(tmp_path, role=R.ROLE_EXTERNAL), _site_context(tmp_path, fedbn=0)):
        with pytest.raises(RuntimeError, match="Missing key"):
            client_app._model(msg, other)
