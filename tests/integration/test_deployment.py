"""Real deployment on 127.0.0.1: `hcc-fl-server` with TLS and site keys, four `hcc-fl-client`
processes (three training sites and the external site), ports chosen free at run time."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pydicom
import pytest

from hcc_fl.server.deploy_demo import compare_metrics
from hcc_fl.shared.audit import read_audit
from tests.conftest import script

SITES = {"site_A": "train", "site_B": "train", "site_C": "train", "site_EXT": "external"}
# PHI canaries: planted in DICOM tags, the manifest and file paths; they must never leave a site
# nor appear in any log, audit file, metrics, report or checkpoint.
CANARY_NAME, CANARY_ID = "Zebulon^Canaryfield", "CANARY-7731"
CANARIES = (CANARY_NAME, CANARY_ID, "Zebulon", "Canaryfield")


def _rewrite_manifest(manifest: Path, row_index: int, old: str, new: str, pid: str) -> None:
    with manifest.open(newline="") as fh:
        rows = list(csv.reader(fh))
    rows[row_index + 1] = [c.replace(old, new) for c in rows[row_index + 1]]
    rows[row_index + 1][0] = pid
    with manifest.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def plant_canaries(src: Path, dst: Path) -> Path:
    """Copy a phantom and plant the canaries at every site: the first patient's DICOM
    PatientName/PatientID, its manifest patient_id, and its folder name."""
    shutil.copytree(src, dst)
    for site in SITES:
        manifest = dst / site / "manifest.csv"
        with manifest.open(newline="") as fh:
            first = next(csv.DictReader(fh))
        old = f"patients/{first['patient_id']}/"
        new = f"patients/{CANARY_NAME.replace('^', '_')}_{CANARY_ID}/"
        (dst / site / old).rename(dst / site / new)
        for f in (dst / site / new).rglob("*.dcm"):
            ds = pydicom.dcmread(f)
            ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
            ds.save_as(f)
        _rewrite_manifest(manifest, 0, old, new, CANARY_ID)
    return dst


def find_canaries(paths: list[Path], texts: dict[str, str]) -> list[str]:
    """Where any canary occurs: files (bytes, recursively) and captured outputs."""
    hits = []
    needles = [c.encode() for c in CANARIES]
    for root in paths:
        for f in [root] if root.is_file() else sorted(root.rglob("*")):
            if f.is_file() and any(n in f.read_bytes() for n in needles):
                hits.append(str(f))
    hits += [name for name, text in texts.items() if any(c in text for c in CANARIES)]
    return hits


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
        # the phantom's splits are below the cells policy's minimums (docs/privacy.md)
        "disclosure: {mode: exact}\n"
    )
    return path


def make_pki(folder: Path, sites: Iterable[str] | Mapping[str, str]) -> Path:
    """A PKI made with the real CLI: `hcc-fl certs init`, then `add-site` for each site (with
    its role when ``sites`` maps names to roles; else ``train``)."""
    subprocess.run([script("hcc-fl"), "certs", "init", "--dir", str(folder)], check=True,
                   capture_output=True, timeout=60)
    for site in sites:
        role = sites[site] if isinstance(sites, Mapping) else "train"
        subprocess.run([script("hcc-fl"), "certs", "add-site", site, "--dir", str(folder),
                        "--role", role], check=True, capture_output=True, timeout=60)
    return folder


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
    phantom = plant_canaries(small_phantom, work / "phantom")
    pki = make_pki(work / "pki", SITES)
    other = make_pki(work / "other-pki", ["intruder"])  # a key the coordinator never registered
    port = _free_port()
    server = subprocess.Popen(
        [script("hcc-fl-server"), "--pki", str(pki), "--port", str(port), "--quiet",
         f"runs_dir={work / 'runs'}", "run_name=deploy", "strategy=fedavg_fedprox",
         "federation.rounds=1", "federation.discovery_timeout_s=300"],
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
        bad = _site_yaml(work, "intruder", "train", phantom / "site_A" / "manifest.csv",
                         port, pki / "ca" / "ca.crt", other / "sites/intruder/intruder.key")
        intruder = subprocess.run([script("hcc-fl-client"), "--site-config", str(bad)],
                                  capture_output=True, text=True, timeout=120)
        plain = work / "plaintext.yaml"  # no TLS against the TLS coordinator
        plain.write_text(
            f"site: site_A\nrole: train\ntask: ki67_ceus\n"
            f"manifest: {phantom / 'site_A' / 'manifest.csv'}\n"
            f"coordinator: 127.0.0.1:{port}\ninsecure: true\nmax_retries: 2\n"
            f"runtime_port: {_free_port()}\ndisclosure: {{mode: exact}}\n"
        )
        plaintext = subprocess.run([script("hcc-fl-client"), "--site-config", str(plain)],
                                   capture_output=True, text=True, timeout=120)
        for site, role in SITES.items():
            cfg = _site_yaml(work, site, role, phantom / site / "manifest.csv", port,
                             pki / "sites" / site / "ca.crt",
                             pki / "sites" / site / f"{site}.key")
            clients.append(subprocess.Popen(
                [script("hcc-fl-client"), "--site-config", str(cfg)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            ))
        out, _ = server.communicate(timeout=1200)
        site_out = {}
        for site, proc in zip(SITES, clients, strict=True):
            _stop(proc)
            site_out[site] = proc.stdout.read() if proc.stdout else ""
        yield {"work": work, "server_rc": server.returncode, "server_out": out,
               "intruder": intruder, "plaintext": plaintext, "run": work / "runs" / "deploy",
               "phantom": phantom, "site_out": site_out}
    finally:
        for proc in [*clients, server]:
            _stop(proc)


@pytest.mark.slow
def test_tls_deployment_completes(deployment: dict[str, object]) -> None:
    assert deployment["server_rc"] == 0, str(deployment["server_out"])[-3000:]
    run = deployment["run"]
    assert isinstance(run, Path)
    m = json.loads((run / "metrics.json").read_text())
    assert list(m["external"]) == ["fedavg", "fedprox"]
    ext = m["external"]["fedavg"]
    assert ext["n"] == 10 and 0 <= ext["auc"] <= 1
    assert {s["site"]: s["role"] for s in m["sites"]} == SITES
    assert (run / "report.html").is_file()
    lines = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert {(x["arm"], x["round"], x["site"]) for x in lines if x["phase"] == "train"} == {
        (a, 1, s) for a in ("fedavg", "fedprox") for s in ("site_A", "site_B", "site_C")}
    # the paired DeLong test between the arms came from the external site (issue 20)
    (cmp,) = m["comparisons"]
    assert (cmp["a"], cmp["b"]) == ("fedavg", "fedprox")
    assert cmp["auc_a"] == pytest.approx(ext["auc"], abs=1e-12)
    # and every arm counted its messages: one train message per site and round
    for arm in ("fedavg", "fedprox"):
        msgs = m["federated"][arm]["messages"]
        assert [v["messages"] for k, v in msgs.items() if k.startswith("train")] == [3]
        assert msgs["total"]["errors"] == 0


@pytest.mark.slow
def test_no_phi_leaves_a_site(deployment: dict[str, object], tmp_path: Path) -> None:
    """The canaries are in the data (else this test proves nothing), and nowhere else: not in
    the run directory (metrics, report, history, models, checkpoints, coordinator logs and
    audit), not in the sites' audit logs and state, not in any process's output."""
    work, run, phantom = deployment["work"], deployment["run"], deployment["phantom"]
    assert isinstance(work, Path) and isinstance(run, Path) and isinstance(phantom, Path)
    assert find_canaries([phantom], {}), "the canaries were not planted"
    states = sorted(work.glob(".hcc-fl-*"))
    assert {p.name for p in states} >= {f".hcc-fl-{s}" for s in SITES}
    for s in SITES:
        assert any(e["event"] == "sent" for e in read_audit(work / f".hcc-fl-{s}" /
                                                              "audit.jsonl")), s
    assert (run / "logs" / "audit-coordinator.jsonl").is_file()
    assert (run / "checkpoints" / "fedavg.pt").is_file()
    site_out = deployment["site_out"]
    assert isinstance(site_out, dict)
    texts = {"coordinator output": str(deployment["server_out"]),
             **{f"{k} output": v for k, v in site_out.items()}}
    assert find_canaries([run, *states], texts) == []

    # a file that cannot be read, in a folder named after the patient: the site refuses to
    # start and says where (manifest, line, column) without echoing the path or identifiers
    broken = tmp_path / "site_B"
    shutil.copytree(phantom / "site_B", broken)
    folder = broken / "patients" / f"{CANARY_NAME.replace('^', '_')}_{CANARY_ID}"
    (folder / "broken.dcm").write_bytes(b"this is not DICOM")
    _rewrite_manifest(broken / "manifest.csv", 0, "ceus_cine.dcm", "broken.dcm", CANARY_ID)
    cfg = tmp_path / "site_B.yaml"
    cfg.write_text(f"site: site_B\nrole: train\ntask: ki67_ceus\nmanifest: "
                   f"{broken / 'manifest.csv'}\ncoordinator: 127.0.0.1:9\ninsecure: true\n")
    res = subprocess.run([script("hcc-fl-client"), "--site-config", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "line 2, column 'ceus_cine': not a readable DICOM file" in res.stderr, res.stderr
    check = subprocess.run([script("hcc-fl-client"), "check-data", "--manifest",
                            str(broken / "manifest.csv"), "--task", "ki67_ceus"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "line 2" in check.stderr
    assert find_canaries([], {"site output": res.stdout + res.stderr,
                              "check-data output": check.stdout + check.stderr}) == []


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
def test_deployment_equals_simulation(deployment: dict[str, object], tmp_path: Path) -> None:
    """Same configuration, same seed: the TLS deployment and the simulation agree."""
    phantom = deployment["phantom"]
    out = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={phantom}", f"runs_dir={tmp_path}",
         "run_name=sim", "strategy=fedavg_fedprox", "federation.rounds=1",
         "baselines.centralized=false", "baselines.local=false", "--quiet"],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = deployment["run"]
    assert isinstance(run, Path)
    dep = json.loads((run / "metrics.json").read_text())
    sim = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    # every number of the external results, the components and the arms' comparisons
    compared, bad = compare_metrics(dep, sim)
    assert not bad and compared > 100, bad[:10]


@pytest.mark.slow
def test_too_few_sites_ends_cleanly(tmp_path: Path) -> None:
    """No site connects: the coordinator stops after the bounded wait and names who is missing."""
    pki = make_pki(tmp_path / "pki", [])
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
