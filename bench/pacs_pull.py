"""Pull throughput: `hcc-fl-client pull` from a local Orthanc against a plain copy of the files.

Usage: python bench/pacs_pull.py [--patients 40] [--task ki67_ceus] [--repeats 2]

A phantom site (``--patients`` patients) is uploaded to a throw-away Orthanc on 127.0.0.1
(tests/orthanc.py: Debian's orthanc + orthanc-dicomweb, `make system-deps`). Each mode pulls the
task's series into a fresh export with the CLI, as a site runs it: DICOMweb over plain HTTP and
over HTTPS (nginx TLS front, verified with a CA file), DIMSE C-GET and C-MOVE. The baseline
copies the same DICOM files with ``shutil.copy2``. Per mode: wall time (best of ``--repeats``,
including the search and the CLI's start), studies per minute and MB/s of DICOM written.
Writes bench/results/pacs_pull.json.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import write_result  # noqa: E402
from hcc_fl.shared.phantom import default_sites, generate  # noqa: E402
from hcc_fl.shared.tasks import get_task  # noqa: E402
from tests.orthanc import PASSWORD, USER, free_port, start_orthanc  # noqa: E402

COHORT_SKIP = {"site", "fps", "gain_db", "gamma"}


def _cohort(phantom: Path, task: str, out: Path) -> tuple[int, list[Path]]:
    """Cohort CSV (by StudyInstanceUID) and the DICOM files the task reads."""
    import pydicom

    spec = get_task(task)
    rows = list(csv.DictReader((phantom / "site_A" / "manifest.csv").open()))
    keep = [c.name for c in spec.columns if c.kind not in ("cine", "dicom", "dicom_dir")]
    files: list[Path] = []
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*keep, "study_uid"])
        for r in rows:
            first = next((phantom / "site_A" / "patients" / r["patient_id"]).rglob("*.dcm"))
            uid = pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID
            w.writerow([r.get(k, "") for k in keep] + [uid])
            for c in spec.columns:
                if c.kind in ("cine", "dicom"):
                    files.append(phantom / "site_A" / r[c.name])
                elif c.kind == "dicom_dir":
                    files += sorted((phantom / "site_A" / r[c.name]).iterdir())
    return len(rows), files


def _site_yaml(folder: Path, task: str, pacs: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pacs.pw").write_text(PASSWORD)
    path = folder / "SITE.yaml"
    path.write_text(f"site: bench\ntask: {task}\nmanifest: export/manifest.csv\n"
                    f"coordinator: 127.0.0.1:1\ninsecure: true\npacs:\n{pacs}")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--task", default="ki67_ceus")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4)
    a = p.parse_args()
    exe = str(Path(sys.executable).parent / "hcc-fl-client")
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        root = Path(tmp)
        site = dataclasses.replace(default_sites()[0], n=a.patients)
        generate(root / "phantom", seed=0, sites=[site])
        cohort = root / "cohort.csv"
        n, files = _cohort(root / "phantom", a.task, cohort)
        nbytes = sum(f.stat().st_size for f in files)
        move_port = free_port()
        server = start_orthanc(root / "orthanc", {"HCCFLBENCH": ("127.0.0.1", move_port)})
        rows: list[dict[str, Any]] = []
        try:
            server.start_tls_front()
            server.upload(sorted((root / "phantom").rglob("*.dcm")))
            common = f"  concurrency: {a.concurrency}\n"
            web = f"  protocol: dicomweb\n  username: {USER}\n  password_file: pacs.pw\n"
            dimse = (f"  protocol: dimse\n  host: 127.0.0.1\n  port: {server.dicom_port}\n"
                     f"  called_ae: ORTHANC\n  calling_ae: HCCFLBENCH\n"
                     f"  move_port: {move_port}\n")
            modes = {
                "DICOMweb (HTTP)": web + f"  url: {server.url}/dicom-web\n",
                "DICOMweb (HTTPS, CA file)": web + f"  url: {server.https_url}\n"
                                                   f"  ca_file: {server.ca_file}\n",
                "DIMSE C-GET": dimse + "  retrieve: get\n",
                "DIMSE C-MOVE": dimse + "  retrieve: move\n",
            }
            for _ in range(a.repeats):
                dst = root / f"copy-{time.monotonic_ns()}"
                t0 = time.perf_counter()
                for f in files:
                    target = dst / f.relative_to(root / "phantom")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)
                rows.append({"mode": "plain copy (shutil.copy2)", "wall_s": time.perf_counter()
                             - t0})
            for mode, pacs in modes.items():
                for k in range(a.repeats):
                    folder = root / f"{mode.split()[0]}-{len(rows)}-{k}"
                    site_yaml = _site_yaml(folder, a.task, pacs + common)
                    t0 = time.perf_counter()
                    out = subprocess.run([exe, "pull", "--site-config", str(site_yaml),
                                          "--cohort", str(cohort), "--no-progress"],
                                         capture_output=True, text=True, timeout=1800)
                    wall = time.perf_counter() - t0
                    if out.returncode != 0:
                        raise SystemExit(f"{mode}: pull failed:\n{out.stdout}\n{out.stderr}")
                    rows.append({"mode": mode, "wall_s": wall})
        finally:
            server.stop()
    best: dict[str, float] = {}
    for r in rows:
        best[r["mode"]] = min(best.get(r["mode"], float("inf")), r["wall_s"])
    base = best["plain copy (shutil.copy2)"]
    table = [{"mode": m, "task": a.task, "studies": n, "files": len(files),
              "MB": round(nbytes / 1e6, 1), "wall_s": round(w, 2),
              "studies_per_min": round(n / w * 60, 1), "MB_per_s": round(nbytes / 1e6 / w, 2),
              "x_plain_copy": round(w / base, 1)} for m, w in best.items()]
    path = write_result("pacs_pull", table, repeats=a.repeats, concurrency=a.concurrency,
                        notes="wall time of the whole CLI run (start, search, retrieve, "
                              "manifest check), best of the repeats")
    for r in table:
        print(r)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
