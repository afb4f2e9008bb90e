"""Identity bound to the key, with real processes (TLS deployment on 127.0.0.1, as in
test_deployment.py): impostors holding another site's key are refused, a site revoked
mid-run leaves the run, and a resumed coordinator starts without a revoked key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hcc_fl.shared.audit import read_audit
from tests.conftest import script
from tests.integration.test_deployment import SITES, _free_port, _site_yaml, _stop, make_pki
from tests.integration.test_faults import _checkpoint_round, _wait

# the pooled recalibration is up to 25 more queries (seconds each in deployment) that these
# tests do not need
FAST = ("evaluation.recalibration=false",)


def _server(pki: Path, port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([script("hcc-fl-server"), "--pki", str(pki), "--port", str(port),
                             "--quiet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _client(cfg: Path, out: Path | None = None) -> subprocess.Popen[str]:
    sink = out.open("w") if out is not None else subprocess.DEVNULL
    return subprocess.Popen([script("hcc-fl-client"), "--site-config", str(cfg)],
                            stdout=sink, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_ready(server: subprocess.Popen[str], timeout: float = 120) -> None:
    assert server.stdout is not None
    deadline = time.monotonic() + timeout
    for line in server.stdout:
        if "coordinator ready" in line:
            return
        assert time.monotonic() < deadline, "coordinator did not start"
    raise AssertionError("coordinator exited before it was ready")


def _trained(run: Path) -> dict[int, set[str]]:
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    out: dict[int, set[str]] = {}
    for h in hist:
        if h["phase"] == "train":
            out.setdefault(int(h["round"]), set()).add(h["site"])
    return out


@pytest.mark.slow
def test_impostors_are_refused_and_the_run_goes_on(small_phantom: Path, tmp_path: Path) -> None:
    """The holder of site_A's key claims to be site_B; the holder of site_D's (a training
    site's) key claims to be the external site. Both are refused and named; the run completes
    with site_B and site_C, and the external statistics come from the real site_EXT."""
    pki = make_pki(tmp_path / "pki", {**SITES, "site_D": "train"})
    port = _free_port()
    server = _server(pki, port, f"runs_dir={tmp_path / 'runs'}", "run_name=impostors",
                     "strategy=fedavg", "federation.rounds=1", "federation.min_sites=2",
                     "federation.discovery_timeout_s=300", *FAST)
    clients = []
    try:
        _wait_ready(server)
        for site in ("site_B", "site_C", "site_EXT"):
            cfg = _site_yaml(tmp_path, site, SITES[site], small_phantom / site / "manifest.csv",
                             port, pki / "ca" / "ca.crt", pki / "sites" / site / f"{site}.key")
            clients.append(_client(cfg))
        impostors = {"fake_B": ("site_B", "train", "site_A"),  # holds site_A's key
                     "fake_EXT": ("site_EXT", "external", "site_D")}  # holds site_D's key
        for folder, (claim, role, key) in impostors.items():
            (tmp_path / folder).mkdir()
            data = "site_A" if role == "train" else "site_EXT"
            cfg = _site_yaml(tmp_path / folder, claim, role,
                             small_phantom / data / "manifest.csv", port, pki / "ca" / "ca.crt",
                             pki / "sites" / key / f"{key}.key")
            clients.append(_client(cfg))
        out, _ = server.communicate(timeout=900)
    finally:
        for proc in [*clients, server]:
            _stop(proc)
    assert server.returncode == 0, out[-4000:]
    run = tmp_path / "runs" / "impostors"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {s["site"]: s["role"] for s in metrics["sites"]} == {
        "site_B": "train", "site_C": "train", "site_EXT": "external"}
    assert _trained(run) == {1: {"site_B", "site_C"}}
    assert metrics["external"]["fedavg"]["n"] == 10  # the real external site's test split
    audit = read_audit(run / "logs" / "audit-coordinator.jsonl")
    refused = {e["peer"]: e["decision"] for e in audit if e["event"] == "refused"}
    assert refused == {
        "site_A": "refused: claims to be site_B but authenticated with the key of site_A",
        "site_D": "refused: claims to be site_EXT but authenticated with the key of site_D"}
    # the impostors got their site_info query and nothing else; the real site_EXT evaluated
    for folder in impostors:
        state = next((tmp_path / folder).glob(".hcc-fl-*"))
        kinds = {e.get("type") for e in read_audit(state / "audit.jsonl")
                 if e["event"] == "received"}
        assert kinds == {"site-info"}, (folder, kinds)
    ext = {e.get("type") for e in read_audit(tmp_path / ".hcc-fl-site_EXT" / "audit.jsonl")
           if e["event"] == "received"}
    assert "external-eval" in ext, ext
    assert "refused node" in out and "site_A" in out  # named on the console too


@pytest.mark.slow
def test_site_revoked_mid_run_leaves_the_run(small_phantom: Path, tmp_path: Path) -> None:
    """3 rounds; site_C is revoked (`hcc-fl certs revoke-site`) after round 1: it trains in no
    later round, what it still sends is refused, its key is unregistered, all audited."""
    pki = make_pki(tmp_path / "pki", SITES)
    port = _free_port()
    server = _server(pki, port, f"runs_dir={tmp_path / 'runs'}", "run_name=revoke",
                     "strategy=fedavg", "federation.rounds=3", "federation.min_sites=2",
                     "federation.round_timeout_s=300", "federation.discovery_timeout_s=300", *FAST)
    clients = {}
    ckpt = tmp_path / "runs" / ".revoke.partial" / "arms" / "fedavg" / "checkpoint.pt"
    try:
        _wait_ready(server)
        for site, role in SITES.items():
            cfg = _site_yaml(tmp_path, site, role, small_phantom / site / "manifest.csv", port,
                             pki / "ca" / "ca.crt", pki / "sites" / site / f"{site}.key")
            clients[site] = _client(cfg, tmp_path / f"{site}.out")
        _wait(lambda: _checkpoint_round(ckpt) >= 1, 600, "round 1")
        revoked_at = time.time()
        res = subprocess.run([script("hcc-fl"), "certs", "revoke-site", "site_C", "--dir",
                              str(pki)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        out, _ = server.communicate(timeout=900)
    finally:
        for proc in [*clients.values(), server]:
            _stop(proc)
    assert server.returncode == 0, out[-4000:]
    run = tmp_path / "runs" / "revoke"
    trained = _trained(run)
    assert trained == {1: {"site_A", "site_B", "site_C"}, 2: {"site_A", "site_B"},
                       3: {"site_A", "site_B"}}
    audit = read_audit(run / "logs" / "audit-coordinator.jsonl")
    mine = [e for e in audit if e.get("peer") == "site_C"]
    assert any(e["event"] == "refused" and "revoked" in e["decision"] for e in mine), mine
    assert any(e["event"] == "key-unregistered" for e in mine), mine
    # after the revocation nothing site_C sent was accepted
    late = [e for e in mine if e["event"] == "received" and e.get("decision") == "accepted"
            and time.mktime(time.strptime(e["time"][:19], "%Y-%m-%dT%H:%M:%S"))
            - time.timezone > revoked_at + 1]
    assert late == [], late
    metrics = json.loads((run / "metrics.json").read_text())
    assert {s["site"] for s in metrics["sites"]} == set(SITES)
    assert metrics["external"]["fedavg"]["n"] == 10
    site_c = read_audit(tmp_path / ".hcc-fl-site_C" / "audit.jsonl")
    assert not any(e.get("type") == "train" and e.get("round") == 3 for e in site_c)


@pytest.mark.slow
def test_resume_after_revocation_starts_without_the_revoked_key(small_phantom: Path,
                                                               tmp_path: Path) -> None:
    """The coordinator registers site_A and site_B, then dies; site_B is revoked; the resumed
    coordinator (same SuperLink database) unregisters site_B's key at start, so site_B's
    SuperNode is refused by the SuperLink itself."""
    pki = make_pki(tmp_path / "pki", SITES)
    port = _free_port()
    server = _server(pki, port, f"runs_dir={tmp_path / 'runs'}", "run_name=res",
                     "strategy=fedavg", "federation.discovery_timeout_s=120")
    registry = tmp_path / "runs" / ".res.partial" / ".flwr" / "registered-keys.json"
    resumed = None
    try:
        _wait_ready(server)
        assert {e["site"] for e in json.loads(registry.read_text()).values()} == set(SITES)
        os.kill(server.pid, signal.SIGKILL)  # the coordinator crashes
        server.wait()
        res = subprocess.run([script("hcc-fl"), "certs", "revoke-site", "site_B", "--dir",
                              str(pki)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        resumed = _server(pki, port, "--resume", str(tmp_path / "runs" / "res"))
        _wait_ready(resumed)
        assert {e["site"] for e in json.loads(registry.read_text()).values()} == \
            set(SITES) - {"site_B"}
        # the SuperLink itself refuses the revoked key: no stale registration survived
        cfg = _site_yaml(tmp_path, "site_B", "train", small_phantom / "site_B" / "manifest.csv",
                         port, pki / "ca" / "ca.crt", pki / "sites" / "site_B" / "site_B.key")
        site_b = subprocess.run([script("hcc-fl-client"), "--site-config", str(cfg)],
                                capture_output=True, text=True, timeout=120)
        assert site_b.returncode == 1
        assert "the coordinator refused this site" in site_b.stderr, site_b.stderr[-2000:]
    finally:
        for proc in [server, *([resumed] if resumed else [])]:
            _stop(proc)
    audit = read_audit(tmp_path / "runs" / ".res.partial" / "logs" / "audit-coordinator.jsonl")
    assert any(e["event"] == "key-unregistered" and e["peer"] == "site_B" for e in audit)
