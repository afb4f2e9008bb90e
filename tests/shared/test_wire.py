"""Packed model transfer: exact round trip in fp32, bounded error in fp16, layout checks, and
the byte count Flower actually serialises for each encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from hcc_fl.shared.models import build_model
from hcc_fl.shared.wire import (
    array_view,
    fingerprint,
    is_packed,
    layout_of,
    pack,
    unpack,
    wire_dtype,
)


def _state() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    return {k: v.numpy().copy() for k, v in net.state_dict().items()}


def test_fp32_round_trip_is_exact_and_keeps_integer_buffers() -> None:
    state = _state()
    packed = pack(state, "fp32")
    assert is_packed(packed) and len(packed) == 2  # floats + the int64 BatchNorm counter
    back = unpack(packed, layout_of(state))
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]), k
    assert wire_dtype(packed, packed) == "fp32"


def test_fp16_halves_the_floats_within_half_precision() -> None:
    state = _state()
    packed = pack(state, "fp16")
    assert wire_dtype(packed, packed) == "fp16"
    back = unpack(packed, layout_of(state))
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_allclose(back[k], v, rtol=1e-3, atol=1e-4)


def test_a_record_of_another_model_is_refused_naming_both_layouts() -> None:
    state = _state()
    other = dict(state)
    other["0.weight"] = np.zeros((4, 1, 5, 5), np.float32)
    with pytest.raises(ValueError, match=fingerprint(layout_of(state))):
        unpack(pack(other), layout_of(state))
    with pytest.raises(ValueError, match="fp32 or fp16"):
        pack(state, "fp8")


def _wire_bytes(arrays: ArrayRecord) -> int:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    msg = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}),
                  dst_node_id=1, message_type="train")
    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def test_packing_cuts_objects_and_bytes_of_a_real_model() -> None:
    state = {k: v.numpy() for k, v in build_model("ki67_ceus", "tiny").state_dict().items()}
    fp32 = sum(v.nbytes for v in state.values())
    per_tensor = ArrayRecord({k: Array(v) for k, v in state.items()})
    packed = ArrayRecord({k: Array(v) for k, v in pack(state).items()})
    half = ArrayRecord({k: Array(v) for k, v in pack(state, "fp16").items()})
    assert _wire_bytes(packed) < 1.01 * fp32 < _wire_bytes(per_tensor)
    assert _wire_bytes(half) < 0.51 * fp32
    n_per_tensor = len(get_all_nested_objects(per_tensor))
    assert len(get_all_nested_objects(packed)) <= 4 < n_per_tensor
    views = {k: array_view(v) for k, v in packed.items()}
    back = unpack(views, layout_of(state))
    assert all(np.array_equal(back[k], state[k]) for k in state)
