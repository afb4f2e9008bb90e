"""Real deployment on 127.0.0.1: `hcc-fl-server` with TLS and site keys, four `hcc-fl-client`
processes (three training sites and the external site), ports chosen free at run time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import script

SITES = {"site_A": "train", "site_B": "train", "site_C": "train", "site_EXT": "external"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _site_yaml(folder: Path, site: str, role: str, manifest: Path, port: int, ca: Path,
               key: Path) -> Path:
    path = folder / f"{site}.yaml"
    path.write_text(
        f"site: {site}\nrole: {role}\ntask: ki67_ceus\nmanifest: {manifest}\n"
        f"coordinator: 127.0.0.1:{port}\nca_certificate: {ca}\nprivate_key: {key}\n"
        f"runtime_port: {_free_port()}\n"
    )
    return path


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def deployment(small_phantom: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[dict[str, object]]:
    work = tmp_path_factory.mktemp("deploy")
    pki = work / "pki"
    subprocess.run([script("hcc-fl"), "certs", "init", "--dir", str(pki)], check=True,
                   capture_output=True, timeout=60)
    for site in SITES:
        subprocess.run([script("hcc-fl"), "certs", "add-site", site, "--dir", str(pki)],
                       check=True, capture_output=True, timeout=60)
    other = work / "other-pki"  # a key the coordinator never registered
    subprocess.run([script("hcc-fl"), "certs", "init", "--dir", str(other)], check=True,
                   capture_output=True, timeout=60)
    subprocess.run([script("hcc-fl"), "certs", "add-site", "intruder", "--dir", str(other)],
                   check=True, capture_output=True, timeout=60)
    port = _free_port()
    server = subprocess.Popen(
        [script("hcc-fl-server"), "--pki", str(pki), "--port", str(port), "--quiet",
         f"runs_dir={work / 'runs'}", "run_name=deploy", "strategy=fedavg",
         "federation.rounds=2", "federation.discovery_timeout_s=300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 120
        for line in server.stdout:
            if "coordinator ready" in line:
                break
            assert time.monotonic() < deadline, "coordinator did not start"
        # an unregistered key is refused by the SuperLink
        bad = _site_yaml(work, "intruder", "train", small_phantom / "site_A" / "manifest.csv",
                         port, pki / "ca" / "ca.crt", other / "sites/intruder/intruder.key")
        intruder = subprocess.run([script("hcc-fl-client"), "--site-config", str(bad)],
                                  capture_output=True, text=True, timeout=120)
        plain = work / "plaintext.yaml"  # no TLS against the TLS coordinator
        plain.write_text(
            f"site: site_A\nrole: train\ntask: ki67_ceus\n"
            f"manifest: {small_phantom / 'site_A' / 'manifest.csv'}\n"
            f"coordinator: 127.0.0.1:{port}\ninsecure: true\nmax_retries: 2\n"
            f"runtime_port: {_free_port()}\n"
        )
        plaintext = subprocess.run([script("hcc-fl-client"), "--site-config", str(plain)],
                                   capture_output=True, text=True, timeout=120)
        for site, role in SITES.items():
            cfg = _site_yaml(work, site, role, small_phantom / site / "manifest.csv", port,
                             pki / "sites" / site / "ca.crt",
                             pki / "sites" / site / f"{site}.key")
            clients.append(subprocess.Popen(
                [script("hcc-fl-client"), "--site-config", str(cfg)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            ))
        out, _ = server.communicate(timeout=1200)
        yield {"work": work, "server_rc": server.returncode, "server_out": out,
               "intruder": intruder, "plaintext": plaintext, "run": work / "runs" / "deploy"}
    finally:
        for proc in [*clients, server]:
            _stop(proc)


@pytest.mark.slow
def test_tls_deployment_completes(deployment: dict[str, object]) -> None:
    assert deployment["server_rc"] == 0, str(deployment["server_out"])[-3000:]
    run = deployment["run"]
    assert isinstance(run, Path)
    m = json.loads((run / "metrics.json").read_text())
    assert list(m["external"]) == ["fedavg"]
    ext = m["external"]["fedavg"]
    assert ext["n"] == 10 and 0 <= ext["auc"] <= 1
    assert {s["site"]: s["role"] for s in m["sites"]} == SITES
    assert (run / "report.html").is_file()
    lines = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert {(x["round"], x["site"]) for x in lines if x["phase"] == "train"} == {
        (r, s) for r in (1, 2) for s in ("site_A", "site_B", "site_C")}


@pytest.mark.slow
def test_unregistered_site_key_is_refused(deployment: dict[str, object]) -> None:
    res = deployment["intruder"]
    assert isinstance(res, subprocess.CompletedProcess)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "the coordinator refused this site" in text, text[-2000:]


@pytest.mark.slow
def test_plaintext_client_is_refused(deployment: dict[str, object]) -> None:
    res = deployment["plaintext"]
    assert isinstance(res, subprocess.CompletedProcess)
    assert res.returncode != 0
    assert "could not connect to the coordinator" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_deployment_equals_simulation(deployment: dict[str, object], small_phantom: Path,
                                      tmp_path: Path) -> None:
    """Same configuration, same seed: the TLS deployment and the simulation agree."""
    out = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={small_phantom}", f"runs_dir={tmp_path}",
         "run_name=sim", "strategy=fedavg", "federation.rounds=2",
         "baselines.centralized=false", "baselines.local=false", "--quiet"],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = deployment["run"]
    assert isinstance(run, Path)
    dep = json.loads((run / "metrics.json").read_text())["external"]["fedavg"]
    sim = json.loads((tmp_path / "sim" / "metrics.json").read_text())["external"]["fedavg"]
    for key in ("auc", "threshold", "sensitivity", "specificity"):
        assert dep[key] == pytest.approx(sim[key], abs=1e-6), key


@pytest.mark.slow
def test_too_few_sites_ends_cleanly(tmp_path: Path) -> None:
    """No site connects: the coordinator stops after the bounded wait and names who is missing."""
    pki = tmp_path / "pki"
    subprocess.run([script("hcc-fl"), "certs", "init", "--dir", str(pki)], check=True,
                   capture_output=True, timeout=60)
    t0 = time.monotonic()
    out = subprocess.run(
        [script("hcc-fl-server"), "--pki", str(pki), "--port", str(_free_port()), "--quiet",
         f"runs_dir={tmp_path / 'runs'}", "run_name=empty", "strategy=fedavg",
         "federation.discovery_timeout_s=15"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1
    assert "sites missing after 15 s: site_A, site_B, site_C, site_EXT" in out.stderr
    assert time.monotonic() - t0 < 240
    assert not (tmp_path / "runs" / "empty").exists()  # no half-written run directory
