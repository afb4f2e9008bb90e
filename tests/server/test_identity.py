"""Identity bound to the key (server/identity.py): a node is the allow-listed site whose key it
authenticated with; claims that disagree, unknown keys and revoked keys are refused.

The allow-list, keys and roles are real (``hcc_fl.server.certs``); the grid is a stand-in that
reports each node's registered public key as Flower's ``Grid.get_nodes()`` does (PEM), and the
messages are real Flower messages (replies built with ``reply_to`` as a ClientApp does)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hcc_fl.server import flower_app
from hcc_fl.server.certs import (
    CertError,
    add_site,
    init_pki,
    public_key_der,
    revoke_site,
    site_role,
)
from hcc_fl.server.identity import AllowList, Identity, SiteGate, claim_problem
from hcc_fl.shared import records as R
from hcc_fl.shared.audit import AuditLog, read_audit
from tests.conftest import script


@pytest.fixture(autouse=True)
def identity() -> Iterator[None]:
    TaskIdentity.run_id = 7
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1
    yield
    flower_app.GATE = None


def _pem(pub: Path) -> bytes:
    """A key as Flower's SuperLink stores and reports it (PEM SubjectPublicKeyInfo)."""
    key = serialization.load_ssh_public_key(pub.read_bytes())
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    init_pki(folder, ["localhost"])
    add_site(folder, "site_A")
    add_site(folder, "site_B")
    add_site(folder, "site_EXT", role="external")
    add_site(folder, "site_D")  # a training site that is not part of the run
    other = tmp_path / "other"
    init_pki(other, ["localhost"])
    add_site(other, "intruder")
    return folder


class KeyGrid:
    """Nodes with registered keys; node ``n`` answers a message with ``answers[n]`` (a
    ``site_info`` claim (site, role), or "train"/"query" replies) on the next pull."""

    def __init__(self, keys: dict[int, bytes], claims: dict[int, tuple[str, str]]) -> None:
        self.keys, self.claims = keys, claims
        self.sent: dict[str, Message] = {}
        self.pushed: list[int] = []
        self.silent: set[int] = set()

    def get_nodes(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(node_id=n, public_key=k) for n, k in self.keys.items()]

    def get_node_ids(self) -> list[int]:
        return list(self.keys)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"{m.object_id}-{m.metadata.dst_node_id}"
            self.sent[m.metadata.message_id] = m
            self.pushed.append(m.metadata.dst_node_id)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for mid in list(message_ids):
            sent = self.sent[mid]
            node = sent.metadata.dst_node_id
            if node in self.silent:
                continue
            TaskIdentity.node_id = node
            site, role = self.claims[node]
            content = RecordDict({
                R.INFO: ConfigRecord({"site": site, "role": role, "code-version": "x",
                                      "manifest-sha256": "0"}),
                R.METRICS: MetricRecord({"n-train": 6, "n-val": 2, "n-test": 0}),
            })
            out.append(Message(content, reply_to=sent))
            TaskIdentity.node_id = 1
        return out


def _gate(pki: Path, grid: KeyGrid, audit: Path) -> SiteGate:
    gate = SiteGate(grid, AllowList(pki / "authorized"), AuditLog(audit, "coordinator"),
                    flower_app._refusal)
    gate.expected = {"site_A": "train", "site_B": "train", "site_EXT": "external"}
    gate.poll_s = 0.01
    return gate


def _keys(pki: Path, tmp_path: Path) -> dict[str, bytes]:
    keys = {s: _pem(pki / "authorized" / f"{s}.pub") for s in ("site_A", "site_B", "site_EXT",
                                                                 "site_D")}
    keys["intruder"] = _pem(tmp_path / "other" / "authorized" / "intruder.pub")
    return keys


def test_public_keys_compare_in_any_encoding(pki: Path) -> None:
    pub = pki / "authorized" / "site_A.pub"
    assert public_key_der(pub.read_bytes()) == public_key_der(_pem(pub))
    assert public_key_der(pub.read_bytes()) != public_key_der(
        (pki / "authorized" / "site_B.pub").read_bytes())
    with pytest.raises(ValueError):
        public_key_der(b"ecdsa-sha2-nistp384 AAAAnot-a-key")


def test_roles_are_declared_at_the_coordinator(pki: Path, tmp_path: Path) -> None:
    assert site_role(pki, "site_A") == "train"
    assert site_role(pki, "site_EXT") == "external"
    assert (pki / "authorized" / "site_EXT.role").read_text() == "external\n"
    with pytest.raises(CertError, match="role 'admin'"):
        add_site(pki, "site_X", role="admin")
    (pki / "authorized" / "site_A.role").unlink()  # a PKI from before roles existed
    assert site_role(pki, "site_A") == "train"
    (pki / "authorized" / "site_B.role").write_text("superuser\n")  # tampered role file
    with pytest.raises(CertError, match="superuser"):
        site_role(pki, "site_B")
    assert "site_B" not in {i.site for i in AllowList(pki / "authorized").current().values()}
    out = subprocess.run([script("hcc-fl"), "certs", "list", "--dir", str(pki)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "site_B.role: role 'superuser'" in out.stderr
    (pki / "authorized" / "site_B.role").unlink()
    revoke_site(pki, "site_EXT")  # the role goes with the key
    assert (pki / "revoked" / "site_EXT.role").is_file()
    assert not (pki / "authorized" / "site_EXT.role").exists()
    out = subprocess.run([script("hcc-fl"), "certs", "list", "--dir", str(pki)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()}
    assert rows == {"site_A": "train", "site_B": "train", "site_D": "train"}
    out = subprocess.run([script("hcc-fl"), "certs", "add-site", "site_E", "--role", "external",
                          "--dir", str(pki)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "registered, role external" in out.stdout
    assert site_role(pki, "site_E") == "external"


def test_claim_problems() -> None:
    a = Identity("site_A", "train", b"k")
    assert claim_problem(a, "site_A", "train", "train") is None
    assert claim_problem(a, "site_B", "train", "train") == (
        "claims to be site_B but authenticated with the key of site_A")
    assert "claims the role external; the allow-list declares site_A train" in str(
        claim_problem(a, "site_A", "external", "train"))
    assert "the run's configuration has it external" in str(
        claim_problem(a, "site_A", "train", "external"))
    assert claim_problem(a, "site_A", "train", None) is None  # not in this run: no opinion


def test_the_key_decides_who_a_node_is(pki: Path, tmp_path: Path) -> None:
    """site_A's key claiming site_B, site_D's key claiming the external site, and a key from
    another PKI are refused; the honest nodes are found and discovery does not wait for the
    site whose key the impostor holds."""
    keys = _keys(pki, tmp_path)
    grid = KeyGrid(
        {1: keys["site_A"], 2: keys["site_B"], 3: keys["site_EXT"], 4: keys["site_D"],
         5: keys["intruder"]},
        {1: ("site_B", "train"), 2: ("site_B", "train"), 3: ("site_EXT", "external"),
         4: ("site_EXT", "external"), 5: ("site_A", "train")})
    audit = tmp_path / "audit.jsonl"
    gate = _gate(pki, grid, audit)
    flower_app.GATE = gate
    flower_app.AUDIT = AuditLog(audit, "coordinator")
    t0 = time.monotonic()
    found = flower_app.discover_sites(gate, ["site_A", "site_B"], "site_EXT",  # type: ignore[arg-type]
                                      timeout_s=30, poll_s=0.01)
    assert time.monotonic() - t0 < 5  # site_A's key is refused: nothing left to wait for
    assert {n: v["site"] for n, v in found.items()} == {2: "site_B", 3: "site_EXT"}
    assert 5 not in grid.pushed  # an unknown key is sent nothing at all
    assert set(gate.refused) == {1, 4, 5}
    assert gate.get_node_ids() == [2, 3]
    assert gate.push_messages(flower_app._messages([1, 2], R.ACTION_VALIDATION,
                                                   RecordDict())) [0] == ""
    assert grid.pushed.count(1) == 1  # only its site_info query, never anything after
    entries = [e for e in read_audit(audit) if e["event"] == "refused"]
    assert {e["peer"]: e["decision"] for e in entries} == {
        "site_A": "refused: claims to be site_B but authenticated with the key of site_A",
        "site_D": "refused: claims to be site_EXT but authenticated with the key of site_D",
        "node-5": "refused: its key is not on the coordinator's allow-list",
    }
    assert any(e["event"] == "not-sent" and e["peer"] == "site_A" for e in read_audit(audit))


def test_role_claimed_against_the_allow_list_is_refused(pki: Path, tmp_path: Path) -> None:
    keys = _keys(pki, tmp_path)
    grid = KeyGrid({2: keys["site_B"], 3: keys["site_EXT"]},
                   {2: ("site_B", "external"), 3: ("site_EXT", "external")})
    gate = _gate(pki, grid, tmp_path / "audit.jsonl")
    gate.get_node_ids()
    assert gate.check_claim(2, "site_B", "external") == (
        "claims the role external; the allow-list declares site_B train")
    assert gate.check_claim(3, "site_EXT", "external") is None
    assert gate.get_node_ids() == [3]


def test_a_revoked_key_leaves_the_run_at_once(pki: Path, tmp_path: Path) -> None:
    """Revoked while a message to it is out: the wait for it ends with a refusal (not the
    timeout), its late reply is refused, and it is sent nothing more."""
    keys = _keys(pki, tmp_path)
    grid = KeyGrid({1: keys["site_A"], 2: keys["site_B"]},
                   {1: ("site_A", "train"), 2: ("site_B", "train")})
    audit = tmp_path / "audit.jsonl"
    gate = _gate(pki, grid, audit)
    assert gate.get_node_ids() == [1, 2]
    grid.silent = {2}  # site_B is still training...
    msgs = flower_app._messages([1, 2], R.ACTION_VALIDATION, RecordDict())
    ids = gate.push_messages(msgs)
    revoke_site(pki, "site_B")  # ... when the coordinator's operator revokes it
    t0 = time.monotonic()
    grid.silent = set()
    replies = gate.pull_messages(ids)  # its reply comes in after the revocation
    assert time.monotonic() - t0 < 5
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert not by_node[1].has_error()
    assert by_node[2].has_error() and "site_B its key was revoked" in by_node[2].error.reason
    assert gate.get_node_ids() == [1]
    # a round already waiting for it stops waiting (a refusal stands for its reply)
    grid.silent = {1}
    revoke_site(pki, "site_A")
    t0 = time.monotonic()
    out = gate.send_and_receive(flower_app._messages([1], R.ACTION_VALIDATION, RecordDict()),
                                timeout=60)
    assert out == [] and time.monotonic() - t0 < 5  # not sent at all: revoked before
    entries = read_audit(audit)
    assert any(e["event"] == "refused" and e["peer"] == "site_B" for e in entries)
    assert any(e["event"] == "received" and e["peer"] == "site_B"
               and e["decision"].startswith("refused: its key was revoked") for e in entries)


def test_pending_reply_of_a_key_revoked_mid_wait_is_not_waited_for(pki: Path,
                                                                    tmp_path: Path) -> None:
    keys = _keys(pki, tmp_path)
    grid = KeyGrid({1: keys["site_A"], 2: keys["site_B"]},
                   {1: ("site_A", "train"), 2: ("site_B", "train")})
    gate = _gate(pki, grid, tmp_path / "audit.jsonl")
    gate.get_node_ids()
    grid.silent = {2}
    real_pull = grid.pull_messages
    calls = [0]

    def pull(ids: Iterable[str]) -> list[Message]:
        calls[0] += 1
        if calls[0] == 2:
            revoke_site(pki, "site_B")
        return real_pull(ids)

    grid.pull_messages = pull  # type: ignore[method-assign]
    grid.silent = {1, 2}
    t0 = time.monotonic()
    out = gate.send_and_receive(flower_app._messages([1, 2], R.ACTION_VALIDATION,
                                                     RecordDict()), timeout=3)
    assert time.monotonic() - t0 >= 2.9  # site_A (silent) is still waited for...
    assert [r.metadata.src_node_id for r in out] == [2]  # ... site_B's wait ended refused
    assert out[0].has_error() and "revoked" in out[0].error.reason
