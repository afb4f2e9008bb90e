"""The external site's `external_compare` handler (issue 20) against a hostile or mistaken
coordinator: only the external site answers, and only for 2 to 16 distinct arms."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hcc_fl.client import flower_app as client_app
from hcc_fl.shared import records as R

handler = client_app.external_compare.__wrapped__  # the handler without the audit wrapper


@pytest.fixture(autouse=True)
def identity() -> Iterator[None]:
    """Flower needs a task identity to build a Message outside a running app."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    yield


def _context(tmp: Path, role: str) -> Context:
    return Context(run_id=1, node_id=11, node_config={
        "manifest": str(tmp / "manifest.csv"), "site": "site_EXT", "role": role,
        "state": str(tmp)}, state=RecordDict(), run_config={
        "task": "ki67_ceus", "profile": "tiny", "device": "cpu"})


def _message(arms: object) -> Message:
    content = RecordDict({R.CONFIG: ConfigRecord({R.COMPARE_ARMS: json.dumps(arms)})})
    return Message(content, dst_node_id=11, message_type=f"query.{R.ACTION_COMPARE}")


def test_a_training_site_refuses_to_compare(tmp_path: Path) -> None:
    with pytest.raises(PermissionError, match="not the external site"):
        handler(_message(["fedavg", "fedprox"]), _context(tmp_path, R.ROLE_TRAIN))


@pytest.mark.parametrize("arms", [["fedavg"], [f"arm{i}" for i in range(R.MAX_COMPARED + 1)],
                                  ["fedavg", "fedavg"], {"fedavg": 1, "fedprox": 2}])
def test_the_external_site_refuses_a_malformed_arm_list(tmp_path: Path, arms: object) -> None:
    """Before any model is built or any patient read: one arm, more than 16 (a coordinator
    probing with many models), repeated names, or not a list."""
    with pytest.raises(ValueError, match="distinct arm names"):
        handler(_message(arms), _context(tmp_path, R.ROLE_EXTERNAL))
