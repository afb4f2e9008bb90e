"""The phantom: deterministic, real DICOM with the right tags, inputs for all five tasks."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from sklearn.metrics import roc_auc_score

from hcc_fl.client.manifest import validate_manifest
from hcc_fl.shared.phantom import MANIFEST_COLUMNS, generate
from hcc_fl.shared.tasks import TASKS

SITES = ("site_A", "site_B", "site_C", "site_EXT")


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    from hcc_fl.shared.phantom import default_sites

    sites = [s.__class__(**{**s.__dict__, "n": 3}) for s in default_sites()]
    generate(tmp_path / "a", seed=7, sites=sites)
    generate(tmp_path / "b", seed=7, sites=sites)
    generate(tmp_path / "c", seed=8, sites=sites)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_layout_and_truth_kept_apart(small_phantom: Path) -> None:
    for site in SITES:
        with (small_phantom / site / "manifest.csv").open() as fh:
            header = next(csv.reader(fh))
        assert header == MANIFEST_COLUMNS
        assert not list((small_phantom / site).rglob("truth*"))
    truth = pd.read_csv(small_phantom / "truth.csv")
    assert {"a", "u_img", "lp_ki67", "eta_death"} <= set(truth.columns)
    ext = pd.read_csv(small_phantom / "site_EXT" / "manifest.csv")
    assert set(ext["split"]) == {"test"}
    a = pd.read_csv(small_phantom / "site_A" / "manifest.csv")
    assert set(a["split"]) == {"train", "val"}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_validates_on_every_site(small_phantom: Path, task: str) -> None:
    for site in SITES:
        m = validate_manifest(small_phantom / site / "manifest.csv", TASKS[task])
        assert len(m.rows) >= 8


def test_dicom_tags(small_phantom: Path) -> None:
    row = pd.read_csv(small_phantom / "site_A" / "manifest.csv").iloc[0]
    base = small_phantom / "site_A"
    cine = pydicom.dcmread(base / row["ceus_cine"])
    assert cine.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1"
    assert cine.Modality == "US"
    assert int(cine.NumberOfFrames) == 121  # 0-120 s at 1 fps
    assert float(cine.FrameTime) == pytest.approx(1000.0)
    assert cine.FrameIncrementPointer == pydicom.tag.Tag(0x0018, 0x1063)
    assert cine.pixel_array.shape == (121, 64, 64)
    assert cine.SequenceOfUltrasoundRegions[0].PhysicalUnitsXDirection == 3
    assert cine.PatientID == row["patient_id"]  # pseudonymous
    for col in ("bmode", "ceus_ap", "ceus_pp", "us_t0", "us_t1"):
        ds = pydicom.dcmread(base / row[col])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"
        assert ds.pixel_array.shape == (64, 64)
    series = set()
    for j, phase in enumerate(("pre", "art", "pv", "del")):
        files = sorted((base / row[f"mr_{phase}_dir"]).glob("*.dcm"))
        assert len(files) == 3
        ds = pydicom.dcmread(files[0])
        assert ds.Modality == "MR" and ds.SeriesDescription == phase.upper()
        assert int(ds.TemporalPositionIdentifier) == j + 1
        assert ds.pixel_array.dtype == np.uint16
        series.add(ds.SeriesInstanceUID)
        assert ds.StudyInstanceUID == cine.StudyInstanceUID
    assert len(series) == 4


def test_external_site_is_shifted(small_phantom: Path) -> None:
    a = pydicom.dcmread(next((small_phantom / "site_A" / "patients").glob("*/ceus_cine.dcm")))
    x = pydicom.dcmread(next((small_phantom / "site_EXT" / "patients").glob("*/ceus_cine.dcm")))
    assert int(x.NumberOfFrames) == 61 and float(x.FrameTime) == pytest.approx(2000.0)
    assert x.Manufacturer != a.Manufacturer


def test_oracle_auc_band(demo_phantom: Path) -> None:
    """science.md 6.4: the latent predictor separates Ki-67 well at every site."""
    truth = pd.read_csv(demo_phantom / "truth.csv")
    for site in SITES:
        m = pd.read_csv(demo_phantom / site / "manifest.csv")
        m = m.merge(truth, on=["patient_id", "site"])
        assert 0.75 <= roc_auc_score(m["ki67_high"], m["lp_ki67"]) <= 0.99, site
