"""Feature blocks read from a site's DICOM export, and the errors that name file, line, column."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from hcc_fl.client.features import feature_block
from hcc_fl.client.io import read_mask
from hcc_fl.shared.errors import DataError
from hcc_fl.shared.perfusion import tic_feature_names


def test_feature_blocks_of_a_site(small_phantom: Path) -> None:
    manifest = small_phantom / "site_A" / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    n = sum(r["split"] in ("train", "val") for r in rows)
    tic = feature_block(manifest, "tace_ceus", "tic", ("train", "val"))
    assert tic.X.shape == (n, len(tic_feature_names())) and tic.names == tuple(
        tic_feature_names())
    assert tic.y.tolist() == [float(r["tace_or"]) for r in rows if r["split"] != "test"]
    assert set(tic.split) <= {"train", "val"}
    # the phantom's lesion TIC fits well: peak enhancement and timing are measured
    assert np.isfinite(tic.X[:, tic.names.index("lesion_pe")]).mean() > 0.8
    bmode = feature_block(manifest, "tace_ceus", "bmode", ("train",))
    assert "bmode_firstorder_Mean" in bmode.names and "bmode_glrlm_RunEntropy" in bmode.names
    rad = feature_block(manifest, "er_ceus", "radiomics", ("train",))
    assert rad.X.shape == (bmode.X.shape[0], 3 * len(bmode.names))
    assert {n.split("_")[0] for n in rad.names} == {"bmode", "ceus"}
    # B-mode radiomics of er_ceus equal those of tace_ceus (same image, same mask)
    j = rad.names.index("bmode_glcm_Contrast")
    assert rad.X[:, j] == pytest.approx(bmode.X[:, bmode.names.index("bmode_glcm_Contrast")])
    with pytest.raises(ValueError, match="unknown feature block"):
        feature_block(manifest, "tace_ceus", "shape", ("train",))


def _copy_site(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "site_A", dst / "site_A")
    return dst / "site_A" / "manifest.csv"


def test_a_bad_mask_is_reported_with_file_line_and_column(small_phantom: Path,
                                                           tmp_path: Path) -> None:
    manifest = _copy_site(small_phantom, tmp_path)
    rows = list(csv.DictReader(manifest.open()))
    target = manifest.parent / rows[1]["ceus_lesion_mask"]
    np.save(target.with_suffix(".npy"), np.ones((10, 10), dtype=np.uint8))
    rows[1]["ceus_lesion_mask"] = str(Path(rows[1]["ceus_lesion_mask"]).with_suffix(".npy"))
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    split = rows[1]["split"]
    with pytest.raises(DataError) as err:
        feature_block(manifest, "tace_ceus", "bmode", (split,))
    issue = err.value.issues[0]
    assert issue.row == 3 and issue.column == "ceus_lesion_mask"
    assert "10x10" in issue.message and "64x64" in issue.message


def test_read_mask_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((4, 4)))
    with pytest.raises(DataError, match="empty"):
        read_mask(empty)
    with pytest.raises(DataError, match="not found"):
        read_mask(tmp_path / "nope.png")
    bad = tmp_path / "mask.jpg2"
    bad.write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported mask format"):
        read_mask(bad)
    ok = tmp_path / "ok.npy"
    np.save(ok, np.eye(3))
    assert read_mask(ok).sum() == 3
