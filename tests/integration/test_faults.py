"""Faults with real processes: coordinator killed and resumed (simulation and deployment), a
site killed mid-round that rejoins later, and a tampered app bundle refused at the site."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hcc_fl.shared.audit import read_audit
from tests.conftest import script
from tests.integration.test_deployment import SITES, _free_port, _site_yaml, _stop, make_pki

SIM = ["strategy=fedavg", "baselines.centralized=false", "baselines.local=false", "--quiet"]


def _checkpoint_round(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["round"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def _kill_tree(root: int) -> None:
    """SIGKILL a process and every descendant at once, as a crash of the machine's coordinator
    would (the SuperLink, SuperExec, simulation and Ray processes sit in sessions of their own,
    so a process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    todo, tree = [root], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_simulation_killed_and_resumed_equals_uninterrupted(small_phantom: Path,
                                                             tmp_path: Path) -> None:
    """With a server optimiser (FedYogi): its moments travel in the checkpoint, and the resumed
    run's model equals the uninterrupted one (the deployment test below resumes FedAvg)."""
    common = [script("hcc-fl"), "simulate", f"data_root={small_phantom}",
              f"runs_dir={tmp_path}", "federation.rounds=3"]
    sim = ["strategy=fedyogi", *SIM[1:]]
    ref = subprocess.run([*common, "run_name=ref", *sim], capture_output=True, text=True,
                         timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = subprocess.Popen([*common, "run_name=cut", *sim], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp_path / ".cut.partial" / "arms" / "fedyogi" / "checkpoint.pt"
    try:
        _wait(lambda: _checkpoint_round(ckpt) >= 1, 600, "the first checkpoint")
    finally:
        _kill_tree(cut.pid)  # the coordinator dies, and everything it started
        cut.wait()
    killed_after = _checkpoint_round(ckpt)
    assert not (tmp_path / "cut").exists()
    res = subprocess.run([script("hcc-fl"), "simulate", "--resume", str(tmp_path / "cut"),
                          "--quiet"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    fed = json.loads((tmp_path / "cut" / "metrics.json").read_text())["federated"]["fedyogi"]
    assert fed["resumed_after_round"] == killed_after
    assert fed["aggregated_rounds"] == [1, 2, 3]
    a = torch.load(tmp_path / "ref" / "models" / "fedyogi.pt")
    b = torch.load(tmp_path / "cut" / "models" / "fedyogi.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-6, rtol=0), k
    hist = [json.loads(x) for x in (tmp_path / "cut" / "history.jsonl").read_text().splitlines()]
    assert sorted({h["round"] for h in hist if h["phase"] == "train"}) == [1, 2, 3]
    # nothing to resume once a run is complete
    again = subprocess.run([script("hcc-fl"), "simulate", "--resume", str(tmp_path / "cut")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "is complete; nothing to resume" in again.stderr


@pytest.mark.slow
def test_site_killed_mid_round_then_coordinator_killed_and_resumed(
        small_phantom: Path, tmp_path: Path) -> None:
    """site_C dies during round 1 (the round completes with A and B, min_sites=2) and is
    restarted; the coordinator is killed after round 1 and resumed with --resume; round 2 runs
    with all three sites (the restarted one rejoined)."""
    pki = make_pki(tmp_path / "pki", SITES)
    port = _free_port()
    server_cmd = [script("hcc-fl-server"), "--pki", str(pki), "--port", str(port), "--quiet"]
    run_args = [f"runs_dir={tmp_path / 'runs'}", "run_name=faults", "strategy=fedavg",
                "federation.rounds=2", "federation.min_sites=2",
                "federation.round_timeout_s=150", "federation.discovery_timeout_s=300"]
    server = subprocess.Popen([*server_cmd, *run_args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    clients: dict[str, subprocess.Popen[str]] = {}
    configs = {}

    def start(site: str) -> None:
        clients[site] = subprocess.Popen(
            [script("hcc-fl-client"), "--site-config", str(configs[site])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)

    partial = tmp_path / "runs" / ".faults.partial"
    ckpt = partial / "arms" / "fedavg" / "checkpoint.pt"
    audit_c = tmp_path / ".hcc-fl-site_C" / "audit.jsonl"
    resumed = None
    try:
        for site, role in SITES.items():
            configs[site] = _site_yaml(tmp_path, site, role, small_phantom / site / "manifest.csv",
                                       port, pki / "sites" / site / "ca.crt",
                                       pki / "sites" / site / f"{site}.key")
            start(site)
        _wait(lambda: any(e.get("type") == "train" and e["event"] == "received"
                          for e in read_audit(audit_c)), 600, "site_C to receive round 1")
        os.killpg(clients["site_C"].pid, signal.SIGKILL)  # killed mid-round
        clients["site_C"].wait()
        _wait(lambda: _checkpoint_round(ckpt) >= 1, 600, "round 1 to end without site_C")
        os.kill(server.pid, signal.SIGKILL)  # the coordinator crashes after round 1
        start("site_C")  # restarted: rejoins after the coordinator's resume
        server.wait()
        resumed = subprocess.Popen([*server_cmd, "--resume", str(tmp_path / "runs" / "faults")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        out, _ = resumed.communicate(timeout=900)
        assert resumed.returncode == 0, out[-4000:]
    finally:
        for proc in [*clients.values(), server, *([resumed] if resumed else [])]:
            _stop(proc)
    run = tmp_path / "runs" / "faults"
    metrics = json.loads((run / "metrics.json").read_text())
    fed = metrics["federated"]["fedavg"]
    assert fed["resumed_after_round"] == 1 and fed["aggregated_rounds"] == [1, 2]
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    trained = {r: {h["site"] for h in hist if h["phase"] == "train" and h["round"] == r}
               for r in (1, 2)}
    assert trained[1] == {"site_A", "site_B"}
    assert trained[2] == {"site_A", "site_B", "site_C"}  # the restarted site rejoined
    missing = [r for r in metrics["rejected_replies"] if r["site"] == "site_C"]
    assert missing and missing[0]["round"] == 1
    assert metrics["external"]["fedavg"]["n"] == 10
    audit = read_audit(run / "logs" / "audit-coordinator.jsonl")
    assert any(e["event"] == "resume" and e["round"] == 1 for e in audit)
    assert any(e["event"] == "timeout" or "rejected" in e.get("decision", "")
               for e in audit if e.get("peer") == "site_C" and e.get("round") == 1)


HOSTILE_DIR = Path(__file__).resolve().parent / "hostile_site"


@pytest.mark.slow
def test_a_hostile_site_cannot_take_over_the_federation(small_phantom: Path,
                                                        tmp_path: Path) -> None:
    """site_B (test-only sitecustomize, ``HCC_FL_TEST_HOSTILE``) sends 1e6-scaled updates and
    pooled-validation sums with forged (x10) counts: its updates are rejected every round, its
    sums are excluded, and the run completes with the honest sites A and C."""
    env = {**os.environ, "HCC_FL_TEST_HOSTILE": "site_B",
           "PYTHONPATH": os.pathsep.join(
               [str(HOSTILE_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])}
    res = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={small_phantom}", f"runs_dir={tmp_path}",
         "run_name=hostile", "federation.rounds=2", "federation.min_sites=2", *SIM],
        capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "hostile"
    metrics = json.loads((run / "metrics.json").read_text())
    fed = metrics["federated"]["fedavg"]
    assert fed["aggregated_rounds"] == [1, 2]
    rejected = [r for r in metrics["rejected_replies"] if r["site"] == "site_B"]
    assert sorted(r["round"] for r in rejected) == [1, 2]
    assert all("update norm" in r["reason"] for r in rejected)
    assert {r["site"] for r in metrics["rejected_replies"]} == {"site_B"}
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    trained = {h["site"] for h in hist if h["phase"] == "train" and h["arm"] == "fedavg"}
    assert trained == {"site_A", "site_C"}
    validation = metrics["validation"]["fedavg"]
    assert [e["site"] for e in validation["excluded"]] == ["site_B"]
    assert "declared" in validation["excluded"][0]["reason"]
    sites = {s["site"]: s for s in metrics["sites"]}
    assert validation["pooled"]["n"] == sites["site_A"]["n_val"] + sites["site_C"]["n_val"]
    model = torch.load(run / "models" / "fedavg.pt")
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in model.values()
               if v.is_floating_point())
    audit = read_audit(run / "logs" / "audit-coordinator.jsonl")
    assert any(e.get("peer") == "site_B" and e["event"] == "excluded" for e in audit)
