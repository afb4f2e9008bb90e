"""The site's SecAgg+ message handlers (the ClientApp functions a SuperNode runs), driven with
real Flower messages as a malicious coordinator would send them: every attack is refused, the
refusal is audited at the site, the tag's secrets are wiped, and nothing is written outside the
site's state folder. (Stage 3 trains, so it runs here through ``site_masked`` on the state file
the handlers keep; its replay goes through the handler.)"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hcc_fl.client import flower_app as fa
from hcc_fl.client.secagg import (
    SecAggConfig,
    SiteState,
    run_hash,
    site_masked,
    write_identity_keys,
)
from hcc_fl.shared import records as R
from hcc_fl.shared.audit import read_audit

SITES = {11: "site_A", 12: "site_B", 13: "site_C"}
RUN_KEY, RUN_ID = "demo-x/fedavg", 7


@pytest.fixture(autouse=True)
def identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.task_id = RUN_ID, 1
    yield


@pytest.fixture()
def contexts(tmp_path: Path) -> dict[int, Context]:
    write_identity_keys(tmp_path / "peers", list(SITES.values()))
    out = {}
    for node, site in SITES.items():
        nc: dict[str, Any] = {
            "manifest": str(tmp_path / f"{site}.csv"), "site": site, "role": "train",
            "state": str(tmp_path / site), "audit": str(tmp_path / f"{site}.jsonl"),
            R.NC_SECAGG_KEY: str(tmp_path / "peers" / f"{site}.key"),
            R.NC_SECAGG_PEERS: str(tmp_path / "peers"), R.NC_SECAGG_MIN_SITES: 3}
        out[node] = Context(RUN_ID, node, nc, RecordDict(), {"run-key": RUN_KEY})
    return out


def _send(handler: Any, action: str, node: int, context: Context, **entries: Any) -> Message:
    TaskIdentity.node_id = 1
    cfg = {"server-round": 1, R.SA_TAG: "train-1",
           R.SA_CONFIG: json.dumps(SecAggConfig.for_sites(3, max_weight=100.0).__dict__),
           **entries}
    msg = Message(RecordDict({R.CONFIG: ConfigRecord(cfg)}), dst_node_id=node,
                  message_type=f"{MessageType.QUERY}.{action}")
    TaskIdentity.node_id = node
    return handler(msg, context)  # type: ignore[no-any-return]


def _state_path(context: Context, tag: str = "train-1") -> Path:
    return (Path(str(context.node_config["state"])) / "secagg" /
            run_hash(RUN_KEY, RUN_ID) / f"{tag}.json")


def _to_masked(contexts: dict[int, Context]) -> dict[str, str]:
    """Stages 1-2 through the handlers, stage 3 on the handlers' state files."""
    adverts = {n: dict(_send(fa.secagg_setup, R.ACTION_SECAGG_SETUP, n, c).content[R.INFO])
               for n, c in contexts.items()}
    inbox: dict[int, dict[int, bytes]] = {n: {} for n in contexts}
    for n, c in contexts.items():
        reply = _send(fa.secagg_share, R.ACTION_SECAGG_SHARE, n, c,
                      **{R.SA_PUBLIC: json.dumps(adverts)})
        for dst, ct in json.loads(str(reply.content[R.INFO][R.SA_CIPHERTEXTS])).items():
            inbox[int(dst)][n] = base64.b64decode(ct)
    for n, c in contexts.items():
        state = SiteState.load(_state_path(c))
        site_masked(state, inbox[n], [np.full(4, 0.1 * n)], 10.0 + n)
        state.save(_state_path(c))
    return {str(n): json.dumps({str(k): base64.b64encode(v).decode() for k, v in inbox[n].items()})
            for n in contexts}


def test_the_honest_protocol_through_the_handlers(contexts: dict[int, Context]) -> None:
    _to_masked(contexts)
    survivors = json.dumps(sorted(contexts))
    sigs = {str(n): str(_send(fa.secagg_consistency, R.ACTION_SECAGG_CONSISTENCY, n, c,
                              **{R.SA_SURVIVORS: survivors}).content[R.INFO][R.SA_SIG])
            for n, c in contexts.items()}
    for n, c in contexts.items():
        reply = _send(fa.secagg_unmask, R.ACTION_SECAGG_UNMASK, n, c,
                      **{R.SA_SURVIVORS: survivors, R.SA_DROPPED: "[]",
                         R.SA_SIGNATURES: json.dumps(sigs)})
        shares = json.loads(str(reply.content[R.INFO][R.SA_SHARES]))
        assert sorted(shares) == ["11", "12", "13"] and {v[0] for v in shares.values()} == {"b"}
        assert not _state_path(c).exists()  # deleted once used


def test_a_replayed_masking_message_is_refused(contexts: dict[int, Context]) -> None:
    inboxes = _to_masked(contexts)
    c = contexts[11]
    with pytest.raises(PermissionError, match="at stage 'masked', not 'shared'"):
        _send(fa.secagg_masked, R.ACTION_SECAGG_MASKED, 11, c,
              **{R.SA_INBOX: inboxes["11"], R.SA_PURPOSE: "train",
                 R.SA_CONFIG: json.dumps(SecAggConfig.for_sites(3, max_weight=1e9).__dict__)})
    assert not _state_path(c).exists()  # a violation wipes the tag's secrets
    audit = read_audit(Path(str(c.node_config["audit"])))
    assert any(e.get("decision", "").startswith("refused: secagg:") for e in audit)
    with pytest.raises(PermissionError, match="no set-up"):  # and the tag cannot restart
        _send(fa.secagg_consistency, R.ACTION_SECAGG_CONSISTENCY, 11, c,
              **{R.SA_SURVIVORS: "[11, 12, 13]"})
    with pytest.raises(PermissionError, match="a tag runs once"):
        _send(fa.secagg_setup, R.ACTION_SECAGG_SETUP, 11, c)


def test_a_forged_survivor_list_is_refused_by_the_handlers(contexts: dict[int, Context]
                                                           ) -> None:
    _to_masked(contexts)

    def consistency(node: int, survivors: str) -> Message:
        return _send(fa.secagg_consistency, R.ACTION_SECAGG_CONSISTENCY, node, contexts[node],
                     **{R.SA_SURVIVORS: survivors})

    def unmask(node: int, survivors: str, dropped: str, sigs: dict[str, str]) -> Message:
        return _send(fa.secagg_unmask, R.ACTION_SECAGG_UNMASK, node, contexts[node],
                     **{R.SA_SURVIVORS: survivors, R.SA_DROPPED: dropped,
                        R.SA_SIGNATURES: json.dumps(sigs)})

    with pytest.raises(PermissionError, match="fewer than the threshold"):
        consistency(11, "[11]")  # "site_A is the only survivor"
    sigs = {str(n): str(consistency(n, "[12, 13]").content[R.INFO][R.SA_SIG]) for n in (12, 13)}
    with pytest.raises(PermissionError, match="dropped sites are not"):
        unmask(12, "[12, 13]", "[]", sigs)  # site_A hidden from the dropped list
    with pytest.raises(PermissionError, match="differ from those this site signed"):
        unmask(13, "[11, 12, 13]", "[]", sigs)
    with pytest.raises(PermissionError, match="no set-up"):  # every refusal wiped the secrets
        unmask(11, "[12, 13]", "[11]", sigs)
    assert not any(_state_path(c).exists() for c in contexts.values())


@pytest.mark.parametrize("tag", ["../../../outside-1", "train-1/../../x-1", "/tmp/x-1",
                                 "train-2", "train_again-1"])  # one sum per purpose, round
def test_a_path_like_tag_writes_nothing(tag: str, contexts: dict[int, Context],
                                        tmp_path: Path) -> None:
    before = set(tmp_path.parent.rglob("*"))
    with pytest.raises(PermissionError, match="malformed tag"):
        _send(fa.secagg_setup, R.ACTION_SECAGG_SETUP, 11, contexts[11], **{R.SA_TAG: tag})
    new = set(tmp_path.parent.rglob("*")) - before
    assert all(p.is_relative_to(tmp_path) and p.suffix in ("", ".jsonl") for p in new), new
    assert not Path("/tmp/x-1.json").exists()


def test_a_low_threshold_or_too_few_sites_are_refused(contexts: dict[int, Context]) -> None:
    weak = {"n": 3, "threshold": 1, "clipping_range": 8.0, "quantization_range": 2**22,
            "modulus": 2**32, "max_weight": 10.0}
    with pytest.raises(PermissionError, match="threshold 1 must be in"):
        _send(fa.secagg_setup, R.ACTION_SECAGG_SETUP, 11, contexts[11],
              **{R.SA_CONFIG: json.dumps(weak)})
    with pytest.raises(PermissionError, match="fewer than this site's minimum 3"):
        _send(fa.secagg_setup, R.ACTION_SECAGG_SETUP, 12, contexts[12],
              **{R.SA_CONFIG: json.dumps({**weak, "n": 2, "threshold": 2})})
