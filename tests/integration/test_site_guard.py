"""The coordinator's exposed port serves the fleet API only, and a site refuses an app bundle
that would run code other than its installed hcc-fl (real SuperLink, nginx, SuperNode)."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from hcc_fl.server.flower_runtime import Deployment, deployment_superlink, flwr_run
from hcc_fl.shared.audit import read_audit
from hcc_fl.shared.version import code_version
from tests.conftest import script
from tests.integration.test_deployment import _free_port, _site_yaml, _stop, make_pki

EVIL_CLIENT = """\
from pathlib import Path
Path({marker!r}).write_text("the coordinator's code ran at the site")
from flwr.clientapp import ClientApp
app = ClientApp()
"""

EVIL_SERVER = """\
import json, time
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import ServerApp
app = ServerApp()

@app.main()
def main(grid, context):
    deadline = time.time() + 120
    while not list(grid.get_node_ids()) and time.time() < deadline:
        time.sleep(1)
    msgs = [Message(RecordDict({{"config": ConfigRecord({{"x": 1}})}}),
                    message_type=MessageType.TRAIN, dst_node_id=n) for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    out = [{{"error": r.error.reason if r.has_error() else None}} for r in replies]
    open({out!r}, "w").write(json.dumps(out))
"""


def _tampered_app(folder: Path, marker: Path, out: Path) -> Path:
    """An app bundle whose ClientApp (and a shadowing copy of hcc_fl) would run code."""
    (folder / "hcc_fl" / "client").mkdir(parents=True)
    (folder / "evilclient.py").write_text(EVIL_CLIENT.format(marker=str(marker)))
    (folder / "evilserver.py").write_text(EVIL_SERVER.format(out=str(out)))
    (folder / "hcc_fl" / "__init__.py").write_text("")
    (folder / "hcc_fl" / "client" / "__init__.py").write_text("")
    (folder / "hcc_fl" / "client" / "flower_app.py").write_text(
        EVIL_CLIENT.format(marker=str(marker)))
    (folder / "LICENSE").write_text("test\n")
    (folder / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tampered"
        version = "0.1.0"
        license = {{file = "LICENSE"}}
        dependencies = ["flwr>=1.41.0"]
        [tool.flwr.app]
        publisher = "intruder"
        fab-format-version = 1
        flwr-version-target = "1.41.0"
        [tool.flwr.app.components]
        serverapp = "evilserver:app"
        clientapp = "evilclient:app"
        [tool.flwr.app.config]
        code-version = "{code_version()}"
        """))
    return folder


@pytest.mark.slow
def test_fleet_only_port_and_tampered_bundle_refused(small_phantom: Path,
                                                      tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["site_A"])
    port = _free_port()
    ca = str(pki / "ca" / "ca.crt")
    marker, out = tmp_path / "marker.txt", tmp_path / "replies.json"
    with deployment_superlink(tmp_path / "flwr", Deployment(pki, "127.0.0.1", port),
                              tmp_path / "link.db", tmp_path / "superlink.log") as link:
        # -- the control API is refused on the exposed port, but answers on loopback --------
        headers = {"content-type": "application/protobuf"}
        outside = httpx.post(f"https://127.0.0.1:{port}/v1/control/list-nodes", content=b"",
                             headers=headers, verify=ca, timeout=10)
        inside = httpx.post(f"https://127.0.0.1:{link.port}/v1/control/list-nodes",
                            content=b"", headers=headers, verify=ca, timeout=10)
        assert outside.status_code == 403 and inside.status_code == 200
        runtime = httpx.post(f"https://127.0.0.1:{port}/v1/runtime/get-nodes", content=b"",
                             headers=headers, verify=ca, timeout=10)
        assert runtime.status_code == 403
        assert link.port != port

        # -- a site behind the exposed port, then a tampered bundle -------------------------
        cfg = _site_yaml(tmp_path, "site_A", "train", small_phantom / "site_A" / "manifest.csv",
                         port, pki / "sites/site_A/ca.crt", pki / "sites/site_A/site_A.key")
        site = subprocess.Popen([script("hcc-fl-client"), "--site-config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            app = _tampered_app(tmp_path / "tampered", marker, out)
            t0 = time.monotonic()
            flwr_run(link, app, None, tmp_path / "flwr-run.log", timeout_s=400)
            assert out.is_file(), (tmp_path / "flwr-run.log").read_text()[-3000:]
        finally:
            _stop(site)
        site_out = site.stdout.read() if site.stdout else ""
    replies = json.loads(out.read_text())
    assert len(replies) == 1 and replies[0]["error"], replies
    assert "carries files other than configuration" in replies[0]["error"]
    assert not marker.exists(), "the bundle's code ran at the site"
    state = tmp_path / ".hcc-fl-site_A"
    assert not list(state.rglob("evilclient.py")), "the bundle was unpacked at the site"
    refused = [e for e in read_audit(state / "audit.jsonl") if e["event"] == "bundle"]
    assert refused and refused[0]["decision"].startswith("refused: app bundle")
    assert "refused the coordinator's app bundle" in site_out
    assert time.monotonic() - t0 < 400
