"""Issue 22: `hcc-fl-client pull` against a real Orthanc (DICOMweb plugin + DIMSE port).

One Orthanc per module holds a small phantom (site_A and site_B, 4 patients each) whose patient
tags carry PHI canaries. Pulls run as the site would run them (the CLI in a subprocess) with
each protocol; every output that leaves the export folder is searched for the canaries.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from hcc_fl.client.data import load_site
from hcc_fl.shared.phantom import default_sites, generate
from tests.conftest import script
from tests.orthanc import (
    PASSWORD,
    USER,
    Orthanc,
    free_port,
    orthanc_binary,
    start_orthanc,
    tls_material,
)

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # a real Orthanc, CLI subprocesses

KI67_COHORT = ["patient_id", "split", "ceus_roi_x0", "ceus_roi_y0", "ceus_roi_x1", "ceus_roi_y1",
               "age", "sex", "afp", "tumor_size_cm", "hbv", "cirrhosis", "bclc", "ki67_high"]
MOVE_AE = "HCCFLTEST"


@dataclasses.dataclass
class Pacs:
    server: Orthanc
    phantom: Path
    cohorts: dict[str, Path]
    canaries: list[str]
    move_port: int
    root: Path


def _canary(pid: str) -> dict[str, str]:
    return {"PatientName": f"CANARYNAME^{pid}", "PatientID": f"MRNCANARY{pid}",
            "AccessionNumber": f"ACCCANARY{pid}", "PatientBirthDate": "19010203",
            "OtherPatientIDs": f"OTHERCANARY{pid}"}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Pacs:
    if orthanc_binary() is None:
        pytest.fail("Orthanc is not installed: `make system-deps` installs orthanc and "
                    "orthanc-dicomweb (Debian)")
    root = tmp_path_factory.mktemp("pacs")
    phantom = root / "phantom"
    sites = [dataclasses.replace(s, n=4) for s in default_sites()[:2]]
    generate(phantom, seed=5, sites=sites)
    canaries: list[str] = []
    for f in phantom.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        pid = str(ds.PatientID)
        for k, v in _canary(pid).items():
            setattr(ds, k, v)
        ds.save_as(f, enforce_file_format=True)
    move_port = free_port()
    server = start_orthanc(root / "orthanc", {MOVE_AE: ("127.0.0.1", move_port)})
    server.start_tls_front()  # DICOMweb is pulled over HTTPS, verified with a CA file
    cohorts = {}
    for site in ("site_A", "site_B"):
        rows = list(csv.DictReader((phantom / site / "manifest.csv").open()))
        upload = []
        cohort = root / f"cohort_{site}.csv"
        with cohort.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([*KI67_COHORT, "study_uid", "accession_number"])
            for i, r in enumerate(rows):
                pid = r["patient_id"]
                files = sorted((phantom / site / "patients" / pid).rglob("*.dcm"))
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                canaries += [uid, *_canary(pid).values()]
                if site == "site_B" and i == 1:
                    files = []  # the study is not in the PACS
                if site == "site_B" and i == 2:
                    files = [f for f in files if f.name != "ceus_cine.dcm"]  # no CEUS cine
                upload += files
                # half the cohort by StudyInstanceUID, half by accession number
                ident = [uid, ""] if i % 2 == 0 else ["", _canary(pid)["AccessionNumber"]]
                w.writerow([r[c] for c in KI67_COHORT] + ident)
        server.upload(upload)
        cohorts[site] = cohort
    yield Pacs(server, phantom, cohorts, canaries, move_port, root)
    server.stop()


def _site_yaml(folder: Path, pacs: Pacs, protocol: str, task: str = "ki67_ceus",
               password: str = PASSWORD, port: int | None = None, retrieve: str = "get",
               extra: str = "", ca_file: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pacs.pw").write_text(password + "\n")
    if protocol == "dicomweb":
        url = (f"https://127.0.0.1:{port}/dicom-web" if port else pacs.server.https_url)
        section = (f"  url: {url}\n  username: {USER}\n  password_file: pacs.pw\n"
                   f"  ca_file: {ca_file or pacs.server.ca_file}\n")
    else:
        section = (f"  host: 127.0.0.1\n  port: {port or pacs.server.dicom_port}\n"
                   f"  called_ae: ORTHANC\n  calling_ae: {MOVE_AE}\n  retrieve: {retrieve}\n"
                   f"  move_port: {pacs.move_port}\n")
    path = folder / "SITE.yaml"
    path.write_text(f"site: site_X\ntask: {task}\nmanifest: export/manifest.csv\n"
                    f"pacs:\n  protocol: {protocol}\n{section}  retries: 1\n"
                    f"  timeout_s: 10\n{extra}")
    return path


def _run(pacs: Pacs, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the client CLI; no canary may appear in what it prints."""
    out = subprocess.run([script("hcc-fl-client"), *args], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "TQDM_DISABLE": "0"})
    _no_canary(pacs, out.stdout + out.stderr, " ".join(args[:1]))
    return out


def _no_canary(pacs: Pacs, text: str, where: str) -> None:
    leaked = [c for c in pacs.canaries if c in text]
    assert not leaked, f"{where}: {len(leaked)} PHI canaries/UIDs in the output"


def _pull(pacs: Pacs, site_yaml: Path, site: str, *extra: str
          ) -> subprocess.CompletedProcess[str]:
    out = _run(pacs, "pull", "--site-config", str(site_yaml), "--cohort",
               str(pacs.cohorts[site]), *extra)
    manifest = site_yaml.parent / "export" / "manifest.csv"
    if manifest.exists():
        _no_canary(pacs, manifest.read_text(), "manifest.csv")
    return out


def _check_data(pacs: Pacs, manifest: Path, task: str = "ki67_ceus") -> None:
    out = _run(pacs, "check-data", "--manifest", str(manifest), "--task", task)
    assert out.returncode == 0, out.stderr
    assert "OK for task" in out.stdout


def _same_data(original: Path, pulled: Path, task: str = "ki67_ceus") -> None:
    """The pulled export gives the model exactly the original inputs (same tensors, labels and
    clinical vectors for the same patients), so every metric computed on it is the same."""
    pulled_ids = [r["patient_id"] for r in csv.DictReader(pulled.open())]
    rows = [r for r in csv.DictReader(original.open()) if r["patient_id"] in pulled_ids]
    assert [r["patient_id"] for r in rows] == pulled_ids
    sub = pulled.parent / ".original-subset.csv"
    with sub.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # the original's relative paths point into the phantom: resolve them there
    text = sub.read_text().replace("patients/", f"{original.parent}/patients/")
    sub.write_text(text)
    splits = ("train", "val", "test")
    from hcc_fl.client.manifest import allow_roots

    allow_roots([original.parent])  # paths outside the manifest's folder: allowed explicitly
    try:
        a, b = load_site(sub, task, "tiny", splits), load_site(pulled, task, "tiny", splits)
    finally:
        allow_roots([])
    sub.unlink()
    assert len(a) == len(b) == len(pulled_ids)
    assert torch.equal(a.video, b.video)
    assert torch.equal(a.clinical, b.clinical) and torch.equal(a.label, b.label)


def test_dicomweb_pull_check_data_and_same_inputs(pacs: Pacs, tmp_path: Path) -> None:
    site = _site_yaml(tmp_path / "web", pacs, "dicomweb")
    out = _pull(pacs, site, "site_A")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("complete ") == 4, out.stdout
    assert "pull:" in out.stderr  # progress bar (file count and ETA) and the summary log
    manifest = tmp_path / "web" / "export" / "manifest.csv"
    _check_data(pacs, manifest)
    _same_data(pacs.phantom / "site_A" / "manifest.csv", manifest)
    state = tmp_path / "web" / ".hcc-fl-site_X"
    assert (state / "pull-map.json").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    # never over an existing export without --force; with it, verified files are kept
    again = _pull(pacs, site, "site_A")
    assert again.returncode == 1 and "already exists" in again.stderr
    # nor into a folder with files of its own
    other = _site_yaml(tmp_path / "other", pacs, "dicomweb")
    (tmp_path / "other" / "export").mkdir()
    (tmp_path / "other" / "export" / "notes.txt").write_text("keep me")
    refused = _pull(pacs, other, "site_A")
    assert refused.returncode == 1 and "no pull of this site wrote" in refused.stderr
    assert (tmp_path / "other" / "export" / "notes.txt").read_text() == "keep me"
    forced = _pull(pacs, site, "site_A", "--force")
    assert forced.returncode == 0 and " 0 file(s)" in forced.stdout, forced.stdout


def test_dimse_get_pull_matches_dicomweb(pacs: Pacs, tmp_path: Path) -> None:
    site = _site_yaml(tmp_path / "dimse", pacs, "dimse")
    out = _pull(pacs, site, "site_A")
    assert out.returncode == 0, out.stdout + out.stderr
    manifest = tmp_path / "dimse" / "export" / "manifest.csv"
    _check_data(pacs, manifest)
    _same_data(pacs.phantom / "site_A" / "manifest.csv", manifest)


def test_dimse_move_pulls_dce_mri_phases(pacs: Pacs, tmp_path: Path) -> None:
    cohort = pacs.root / "cohort_mri.csv"
    rows = list(csv.DictReader((pacs.phantom / "site_A" / "manifest.csv").open()))
    with cohort.open("w", newline="") as fh, pacs.cohorts["site_A"].open() as src:
        w = csv.writer(fh)
        w.writerow(["patient_id", "split", "prolif", "study_uid", "accession_number"])
        for r, c in zip(rows, csv.DictReader(src), strict=True):
            w.writerow([r["patient_id"], r["split"], r["prolif"], c["study_uid"],
                        c["accession_number"]])
    pacs.cohorts["mri"] = cohort
    site = _site_yaml(tmp_path / "move", pacs, "dimse", task="phcc_mri", retrieve="move")
    out = _pull(pacs, site, "mri")
    assert out.returncode == 0, out.stdout + out.stderr
    manifest = tmp_path / "move" / "export" / "manifest.csv"
    _check_data(pacs, manifest, "phcc_mri")
    pulled = list(csv.DictReader(manifest.open()))
    for r, o in zip(pulled, rows, strict=True):
        for phase in ("pre", "art", "pv", "del"):
            got = sorted((manifest.parent / r[f"mr_{phase}_dir"]).iterdir())
            want = sorted((pacs.phantom / "site_A" / o[f"mr_{phase}_dir"]).iterdir())
            assert len(got) == len(want) == 3
            for g, x in zip(got, want, strict=True):
                assert np.array_equal(pydicom.dcmread(g).pixel_array,
                                      pydicom.dcmread(x).pixel_array)


def test_missing_study_and_series_reported_per_patient(pacs: Pacs, tmp_path: Path) -> None:
    site = _site_yaml(tmp_path / "b", pacs, "dicomweb")
    out = _pull(pacs, site, "site_B")
    assert out.returncode == 2, out.stdout + out.stderr
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln.startswith("B")}
    assert "MISSING" in lines["B0002"] and "no study with this accession number" in lines["B0002"]
    assert "MISSING" in lines["B0003"] and "ceus_cine" in lines["B0003"]
    assert all("complete" in lines[p] for p in ("B0001", "B0004"))
    manifest = tmp_path / "b" / "export" / "manifest.csv"
    assert [r["patient_id"] for r in csv.DictReader(manifest.open())] == ["B0001", "B0004"]
    _check_data(pacs, manifest)


def test_killed_pull_resumes_to_the_same_result(pacs: Pacs, tmp_path: Path) -> None:
    reference = tmp_path / "ref"
    ref = _pull(pacs, _site_yaml(reference, pacs, "dicomweb"), "site_A")
    assert ref.returncode == 0
    # concurrency 1 and a rate cap, so that the kill lands between two files
    site = _site_yaml(tmp_path / "kill", pacs, "dicomweb",
                      extra="  concurrency: 1\n  max_mb_per_s: 0.5\n")
    journal = tmp_path / "kill" / ".hcc-fl-site_X" / "pull-journal.jsonl"
    proc = subprocess.Popen([script("hcc-fl-client"), "pull", "--site-config", str(site),
                             "--cohort", str(pacs.cohorts["site_A"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the pull ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = journal.read_text().count("\n")
    assert 1 <= done < 4
    export = tmp_path / "kill" / "export"
    assert not (export / "manifest.csv").exists()
    resumed = _pull(pacs, _site_yaml(tmp_path / "kill", pacs, "dicomweb"), "site_A")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f" {4 - done} file(s)" in resumed.stdout, resumed.stdout  # only the rest fetched
    files = sorted(p.relative_to(export) for p in export.rglob("*") if p.is_file())
    ref_files = sorted(p.relative_to(reference / "export")
                       for p in (reference / "export").rglob("*") if p.is_file())
    assert files == ref_files
    for f in files:
        assert (export / f).read_bytes() == (reference / "export" / f).read_bytes(), f


def test_wrong_credentials_and_unreachable_pacs(pacs: Pacs, tmp_path: Path) -> None:
    wrong = _pull(pacs, _site_yaml(tmp_path / "w", pacs, "dicomweb", password="nope"),
                  "site_A")
    assert wrong.returncode == 1
    assert "refused the credentials (HTTP 401)" in wrong.stderr, wrong.stderr
    dead = free_port()
    for protocol in ("dicomweb", "dimse"):
        out = _pull(pacs, _site_yaml(tmp_path / protocol, pacs, protocol, port=dead), "site_A")
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"cannot reach the PACS at {'https://' if protocol == 'dicomweb' else ''}" \
               f"127.0.0.1:{dead}" in out.stderr, out.stderr
        assert not (tmp_path / protocol / "export" / "manifest.csv").exists()
    # a DIMSE association to the wrong AE title is rejected by the PACS
    site = _site_yaml(tmp_path / "ae", pacs, "dimse")
    site.write_text(site.read_text().replace("called_ae: ORTHANC", "called_ae: NOTTHEPACS"))
    out = _pull(pacs, site, "site_A")
    assert out.returncode == 1 and "rejected the association from AE" in out.stderr, out.stderr
    # a PACS certificate that the site's CA file does not vouch for
    _, other_ca = tls_material(tmp_path / "other-pki")
    out = _pull(pacs, _site_yaml(tmp_path / "ca", pacs, "dicomweb", ca_file=other_ca), "site_A")
    assert out.returncode == 1 and "TLS verification of the PACS" in out.stderr, out.stderr


def test_bad_cohort_names_line_and_column(pacs: Pacs, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    text = pacs.cohorts["site_A"].read_text().splitlines()
    head = text[0].split(",")
    row = text[2].split(",")
    row[head.index("sex")] = "X"
    row[head.index("study_uid")] = row[head.index("accession_number")] = ""
    bad.write_text("\n".join([text[0], text[1], ",".join(row)]) + "\n")
    pacs.cohorts["bad"] = bad
    out = _pull(pacs, _site_yaml(tmp_path / "s", pacs, "dicomweb"), "bad")
    assert out.returncode == 1
    assert f"{bad}, line 3, column 'sex'" in out.stderr
    assert f"{bad}, line 3, column 'study_uid': needs a study_uid or an accession_number" \
           in out.stderr


def test_aclf_pull_copies_masks_from_the_cohort(pacs: Pacs, tmp_path: Path) -> None:
    """T0/T1 stills by their series rules over DICOMweb, masks copied from the cohort's paths."""
    cohort = pacs.root / "cohort_aclf.csv"
    rows = list(csv.DictReader((pacs.phantom / "site_A" / "manifest.csv").open()))
    cols = ["patient_id", "split", "age", "meld", "death_30d", "os_time", "os_event"]
    with cohort.open("w", newline="") as fh, pacs.cohorts["site_A"].open() as src:
        w = csv.writer(fh)
        w.writerow([*cols, "liver_mask_t0", "liver_mask_t1", "study_uid", "accession_number"])
        for r, c in zip(rows, csv.DictReader(src), strict=True):
            masks = [f"phantom/site_A/{r[m]}" for m in ("liver_mask_t0", "liver_mask_t1")]
            w.writerow([r[k] for k in cols] + masks + [c["study_uid"], c["accession_number"]])
    pacs.cohorts["aclf"] = cohort
    out = _pull(pacs, _site_yaml(tmp_path / "aclf", pacs, "dicomweb", task="aclf_us"), "aclf")
    assert out.returncode == 0, out.stdout + out.stderr
    manifest = tmp_path / "aclf" / "export" / "manifest.csv"
    _check_data(pacs, manifest, "aclf_us")
    for r, o in zip(csv.DictReader(manifest.open()), rows, strict=True):
        for col in ("us_t0", "us_t1", "liver_mask_t0", "liver_mask_t1"):
            got, want = manifest.parent / r[col], pacs.phantom / "site_A" / o[col]
            if col.startswith("us_"):
                assert np.array_equal(pydicom.dcmread(got).pixel_array,
                                      pydicom.dcmread(want).pixel_array), col
            else:
                assert got.read_bytes() == want.read_bytes(), col


def test_series_rules_pick_every_task_on_the_phantom(pacs: Pacs) -> None:
    """The built-in rules find every image column of all five tasks in a phantom study, and
    a SITE.yaml override replaces a rule (here: one that matches nothing)."""
    from hcc_fl.client.pacs import select_series
    from hcc_fl.client.pacs_net import InstanceInfo, SeriesInfo
    from hcc_fl.shared.tasks import TASKS

    series: dict[str, SeriesInfo] = {}
    for f in sorted((pacs.phantom / "site_A" / "patients" / "A0001").rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        s = series.setdefault(str(ds.SeriesInstanceUID), SeriesInfo(
            str(ds.SeriesInstanceUID), str(ds.Modality), str(ds.SeriesDescription),
            int(ds.SeriesNumber)))
        s.instances.append(InstanceInfo(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                        int(ds.get("NumberOfFrames", 1) or 1),
                                        int(ds.InstanceNumber)))
    described = {s.uid: s.description for s in series.values()}
    expected = {"ceus_cine": "CEUS", "bmode": "BMODE", "ceus_ap": "CEUS_AP", "ceus_pp": "CEUS_PP",
                "us_t0": "US_T0", "us_t1": "US_T1", "mr_pre_dir": "PRE", "mr_art_dir": "ART",
                "mr_pv_dir": "PV", "mr_del_dir": "DEL"}
    for task in TASKS.values():
        picks = select_series(task, list(series.values()))
        for col, pick in picks.items():
            assert pick.series is not None, (task.name, col, pick.reason)
            assert described[pick.series.uid] == expected[col], (task.name, col)
        assert set(picks) == {c.name for c in task.columns if c.name in expected}
    none = select_series(TASKS["ki67_ceus"], list(series.values()), {"ceus_cine": "kontrast"})
    assert none["ceus_cine"].series is None and "ceus_cine" in none["ceus_cine"].reason
