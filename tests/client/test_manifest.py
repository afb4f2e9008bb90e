"""Manifest validation: every bad row is reported with file, line and column; exit code 1."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest

from hcc_fl.client.manifest import validate_manifest
from hcc_fl.shared.errors import DataError
from hcc_fl.shared.tasks import TASKS
from tests.conftest import script

KI67 = TASKS["ki67_ceus"]


def _copy_site(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "site_A", dst / "site_A")
    return dst / "site_A" / "manifest.csv"


def _rewrite(path: Path, edits: dict[tuple[int, str], str]) -> None:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
        header = list(rows[0].keys())
    for (i, col), value in edits.items():
        rows[i][col] = value
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


def test_bad_rows_each_named(tmp_path: Path, small_phantom: Path) -> None:
    path = _copy_site(small_phantom, tmp_path)
    with path.open() as fh:
        first_id = next(csv.DictReader(fh))["patient_id"]
    mr_file = next((tmp_path / "site_A" / "patients").glob("*/mr/PRE/slice_000.dcm"))
    _rewrite(path, {
        (0, "age"): "fifty",
        (1, "ki67_high"): "2",
        (2, "ceus_cine"): "patients/missing/ceus.dcm",
        (3, "ceus_cine"): str(mr_file.relative_to(tmp_path / "site_A")),
        (4, "patient_id"): first_id,
        (5, "sex"): "X",
        (6, "afp"): "-3",
    })
    with pytest.raises(DataError) as err:
        validate_manifest(path, KI67)
    text = [str(i) for i in err.value.issues]
    assert any("line 2" in t and "'age'" in t and "expected a number" in t for t in text)
    assert any("line 3" in t and "'ki67_high'" in t and "expected 0 or 1" in t for t in text)
    assert any("line 4" in t and "'ceus_cine'" in t and "file not found" in t for t in text)
    assert any("line 5" in t and "expected Modality US, found MR" in t for t in text)
    assert any("line 6" in t and "duplicate patient_id (first on line 2)" in t for t in text)
    assert any("line 7" in t and "'sex'" in t for t in text)
    assert any("line 8" in t and "'afp'" in t and "below the allowed minimum" in t for t in text)
    assert all(str(path) in t for t in text)
    assert all(first_id not in t for t in text)  # identifiers are never echoed


def test_missing_column(tmp_path: Path, small_phantom: Path) -> None:
    path = _copy_site(small_phantom, tmp_path)
    text = path.read_text().replace("ki67_high", "ki67_hi")
    path.write_text(text)
    with pytest.raises(DataError, match=r"line 1: missing required column\(s\).*ki67_high"):
        validate_manifest(path, KI67)


def test_corrupt_dicom_referenced(tmp_path: Path, small_phantom: Path) -> None:
    path = _copy_site(small_phantom, tmp_path)
    with path.open() as fh:
        cine = next(csv.DictReader(fh))["ceus_cine"]
    (tmp_path / "site_A" / cine).write_bytes(b"garbage")
    with pytest.raises(DataError, match="line 2, column 'ceus_cine': not a readable DICOM"):
        validate_manifest(path, KI67)


def test_check_data_cli(tmp_path: Path, small_phantom: Path) -> None:
    good = subprocess.run(
        [script("hcc-fl-client"), "check-data", "--manifest",
         str(small_phantom / "site_A" / "manifest.csv"), "--task", "ki67_ceus"],
        capture_output=True, text=True, timeout=120,
    )
    assert good.returncode == 0, good.stderr
    assert "OK for task ki67_ceus" in good.stdout
    path = _copy_site(small_phantom, tmp_path)
    _rewrite(path, {(2, "tumor_size_cm"): "abc"})
    bad = subprocess.run(
        [script("hcc-fl-client"), "check-data", "--manifest", str(path), "--task", "ki67_ceus"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 1
    assert f"{path}, line 4, column 'tumor_size_cm': expected a number" in bad.stderr


def test_external_role_needs_test_rows(small_phantom: Path) -> None:
    with pytest.raises(DataError, match="no rows in split"):
        validate_manifest(small_phantom / "site_A" / "manifest.csv", KI67, splits=("test",))
