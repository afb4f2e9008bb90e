"""Site discovery of the ServerApp: each node asked once, answers collected whenever they come,
and a wait that ends only when no new site has answered for ``discovery_timeout_s``.

A fake grid with real Flower ``Message`` objects (replies built with ``reply_to`` as a ClientApp
does); nodes answer after a given number of polls, as slow sites reading their data do."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hcc_fl.server import flower_app
from hcc_fl.server.flower_app import FederationError, discover_sites
from hcc_fl.shared import records as R


@pytest.fixture(autouse=True)
def identity() -> Iterator[None]:
    TaskIdentity.run_id = 7
    TaskIdentity.task_id = 1
    yield


class SlowGrid:
    """Node ``n`` answers ``site_info`` on the ``delay[n]``-th pull after it was asked
    (``None``: never)."""

    def __init__(self, sites: dict[int, str], delay: dict[int, int | None]) -> None:
        self.sites, self.delay = sites, delay
        self.asked: list[int] = []
        self.sent: dict[str, tuple[Message, int]] = {}  # message id -> (message, pulls seen)

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id + str(m.metadata.dst_node_id)
            self.asked.append(m.metadata.dst_node_id)
            self.sent[m.metadata.message_id] = (m, 0)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for mid in message_ids:
            msg, seen = self.sent[mid]
            seen += 1
            self.sent[mid] = (msg, seen)
            node = msg.metadata.dst_node_id
            wait = self.delay[node]
            if wait is not None and seen == wait:
                out.append(self._reply(msg, node))
        return out

    def _reply(self, sent: Message, node: int) -> Message:
        TaskIdentity.node_id = node
        role = R.ROLE_TRAIN if self.sites[node] != "site_EXT" else "external"
        content = RecordDict({
            R.INFO: ConfigRecord({"site": self.sites[node], "role": role,
                                  "code-version": "x", "manifest-sha256": "0"}),
            R.METRICS: MetricRecord({"n-train": 6, "n-val": 2, "n-test": 0}),
        })
        reply = Message(content, reply_to=sent)
        TaskIdentity.node_id = 1
        return reply


SITES = {10 + i: f"site_{i:03d}" for i in range(40)} | {99: "site_EXT"}
TRAINING = [s for s in SITES.values() if s != "site_EXT"]


def test_many_slow_sites_are_each_asked_once_and_all_found() -> None:
    """Answers trickle in one per poll for longer than the timeout: discovery keeps waiting
    while new sites answer, and never asks a node twice."""
    TaskIdentity.node_id = 1
    flower_app.AUDIT = flower_app.AuditLog(None, "coordinator")
    delay: dict[int, int | None] = {n: i + 1 for i, n in enumerate(SITES)}
    grid = SlowGrid(SITES, delay)
    found = discover_sites(grid, TRAINING, "site_EXT", timeout_s=0.05,  # type: ignore[arg-type]
                           poll_s=0.01)
    assert {v["site"] for v in found.values()} == set(SITES.values())
    assert sorted(grid.asked) == sorted(SITES)  # once each


def test_a_site_that_never_answers_ends_discovery_after_the_quiet_timeout() -> None:
    TaskIdentity.node_id = 1
    flower_app.AUDIT = flower_app.AuditLog(None, "coordinator")
    sites = {11: "site_A", 12: "site_B", 13: "site_EXT"}
    grid = SlowGrid(sites, {11: 1, 12: None, 13: 2})
    with pytest.raises(FederationError, match=r"sites missing after 0 s without a new site "
                       r"answering .*: site_B \(connected: site_A, site_EXT\)"):
        discover_sites(grid, ["site_A", "site_B"], "site_EXT", timeout_s=0.1,  # type: ignore[arg-type]
                       poll_s=0.01)
    assert sorted(grid.asked) == [11, 12, 13]


def test_nobody_answering_names_every_missing_site() -> None:
    TaskIdentity.node_id = 1
    flower_app.AUDIT = flower_app.AuditLog(None, "coordinator")
    grid = SlowGrid({}, {})
    with pytest.raises(FederationError, match=r"sites missing after 0 s: site_A, site_EXT "
                       r"\(connected: none\)"):
        discover_sites(grid, ["site_A"], "site_EXT", timeout_s=0.05,  # type: ignore[arg-type]
                       poll_s=0.01)


def test_a_long_missing_list_is_shortened() -> None:
    TaskIdentity.node_id = 1
    flower_app.AUDIT = flower_app.AuditLog(None, "coordinator")
    grid = SlowGrid({}, {})
    with pytest.raises(FederationError, match=r"site_019 and 21 more \(connected: none\)"):
        discover_sites(grid, TRAINING, "site_EXT", timeout_s=0.02,  # type: ignore[arg-type]
                       poll_s=0.01)


def test_a_site_error_reply_reaches_the_console_and_audit(tmp_path) -> None:
    """Issue 19: the PHI-free reason a site sends (rule and count) is in the coordinator's error
    and audit log instead of a bare 'sites missing'."""
    from flwr.app import Error

    class FailingGrid(SlowGrid):
        def _reply(self, sent: Message, node: int) -> Message:
            if node != 12:
                return super()._reply(sent, node)
            TaskIdentity.node_id = node
            reply = Message(Error(code=0, reason="site-info: site data check failed: 2 data "
                                  "problem(s) in ceus_cine (2)"), reply_to=sent)
            TaskIdentity.node_id = 1
            return reply

    TaskIdentity.node_id = 1
    audit = tmp_path / "audit.jsonl"
    flower_app.AUDIT = flower_app.AuditLog(str(audit), "coordinator")
    grid = FailingGrid({11: "site_A", 12: "site_B", 13: "site_EXT"}, {11: 1, 12: 1, 13: 1})
    with pytest.raises(FederationError, match=r"site_B .*answered with an error: site-info: "
                       r"site data check failed: 2 data problem\(s\) in ceus_cine \(2\)"):
        discover_sites(grid, ["site_A", "site_B"], "site_EXT", timeout_s=0.05,  # type: ignore[arg-type]
                       poll_s=0.01)
    assert "site error: site-info: site data check failed: 2 data problem(s)" in audit.read_text()
