"""T0/T1 ultrasound pair loading for aclf_us (science.md 6.2: the phantom shrinks the liver)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from hcc_fl.client.longitudinal import load_pairs
from hcc_fl.shared.errors import DataError


def _rows(manifest: Path, split: str) -> list[tuple[int, dict[str, str]]]:
    with manifest.open(newline="") as fh:
        return [(i + 2, r) for i, r in enumerate(csv.DictReader(fh)) if r["split"] == split]


def _copy_site(small_phantom: Path, tmp_path: Path) -> Path:
    site = tmp_path / "site_A"
    shutil.copytree(small_phantom / "site_A", site)
    return site / "manifest.csv"


def test_pairs_match_the_manifest_and_the_mask_files(small_phantom: Path) -> None:
    manifest = small_phantom / "site_A" / "manifest.csv"
    rows = _rows(manifest, "train")
    data = load_pairs(manifest, ("train",), 64)
    n = len(rows)
    assert n >= 4 and len(data) == n
    assert data.images.shape == (n, 2, 64, 64) and data.images.dtype == torch.float32
    assert data.masks.shape == (n, 2, 64, 64) and data.masks.dtype == torch.float32
    assert set(torch.unique(data.masks).tolist()) == {0.0, 1.0}
    # the phantom is 64x64, so at size 64 the masks are the PNG files themselves
    for k, (_, row) in enumerate(rows):
        for t, col in enumerate(("liver_mask_t0", "liver_mask_t1")):
            png = cv2.imread(str(manifest.parent / row[col]), cv2.IMREAD_GRAYSCALE)
            assert png is not None
            assert np.array_equal(data.masks[k, t].numpy().astype(bool), png > 0)
    # labels, clinical values and survival equal the manifest, in manifest order
    assert data.label.tolist() == [float(r["death_30d"]) for _, r in rows]
    assert data.label.shape == (n,)
    expected = torch.tensor([[float(r["age"]), float(r["meld"])] for _, r in rows])
    assert data.clinical.shape == (n, 2) and torch.equal(data.clinical, expected)
    assert np.array_equal(data.os_time, [float(r["os_time"]) for _, r in rows])
    assert np.array_equal(data.os_event, [float(r["os_event"]) for _, r in rows])
    assert data.split == ("train",) * n
    # one standardisation per pair: zero mean, unit SD over both images
    flat = data.images.reshape(n, -1).double()
    assert torch.allclose(flat.mean(1), torch.zeros(n, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(flat.std(1, correction=0), torch.ones(n, dtype=torch.float64),
                          atol=1e-3)
    # liver shrinkage from T0 to T1: never larger, smaller on average
    area = data.masks.sum(dim=(2, 3))
    assert bool((area[:, 1] <= area[:, 0]).all())
    assert float(area[:, 1].mean()) < float(area[:, 0].mean())


def test_resizing_keeps_masks_binary(small_phantom: Path) -> None:
    manifest = small_phantom / "site_A" / "manifest.csv"
    full = load_pairs(manifest, ("train", "val"), 64)
    small = load_pairs(manifest, ("train", "val"), 32)
    assert small.images.shape == (len(full), 2, 32, 32)
    assert set(torch.unique(small.masks).tolist()) == {0.0, 1.0}
    # nearest neighbour keeps the area at about a quarter
    ratio = small.masks.sum() / full.masks.sum()
    assert 0.2 < float(ratio) < 0.3
    assert set(small.split) == {"train", "val"}
    with pytest.raises(ValueError, match="size"):
        load_pairs(manifest, ("train",), 0)


def test_bad_masks_name_line_and_column(small_phantom: Path, tmp_path: Path) -> None:
    manifest = _copy_site(small_phantom, tmp_path)
    rows = _rows(manifest, "train")
    (line_a, row_a), (line_b, row_b) = rows[1], rows[3]
    cv2.imwrite(str(manifest.parent / row_a["liver_mask_t1"]), np.full((32, 32), 255, np.uint8))
    cv2.imwrite(str(manifest.parent / row_b["liver_mask_t0"]), np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError) as info:
        load_pairs(manifest, ("train",), 64)
    issues = {(i.row, i.column): i for i in info.value.issues}
    assert set(issues) == {(line_a, "liver_mask_t1"), (line_b, "liver_mask_t0")}
    wrong = issues[(line_a, "liver_mask_t1")]
    assert wrong.file == str(manifest)
    assert "mask is 32x32 but the image is 64x64" in wrong.message
    assert "empty" in issues[(line_b, "liver_mask_t0")].message
    assert f"line {line_a}, column 'liver_mask_t1'" in str(info.value)


def test_missing_files_name_the_column(small_phantom: Path, tmp_path: Path) -> None:
    manifest = _copy_site(small_phantom, tmp_path)
    rows = _rows(manifest, "train")
    assert len(load_pairs(manifest, ("train",), 64)) == len(rows)  # validated and cached
    # removed after validation: the loader itself reports it
    line, row = rows[2]
    (manifest.parent / row["us_t0"]).unlink()
    with pytest.raises(DataError) as info:
        load_pairs(manifest, ("train",), 64)
    [issue] = info.value.issues
    assert (issue.row, issue.column, issue.file) == (line, "us_t0", str(manifest))
    assert "file not found" in issue.message
    # removed before validation (a fresh copy): the manifest check reports it
    other = _copy_site(small_phantom, tmp_path / "fresh")
    line, row = rows[0]
    (other.parent / row["liver_mask_t1"]).unlink()
    with pytest.raises(DataError) as info:
        load_pairs(other, ("train",), 64)
    assert [(i.row, i.column) for i in info.value.issues] == [(line, "liver_mask_t1")]
    assert "file not found" in info.value.issues[0].message


def test_no_rows_in_split(small_phantom: Path) -> None:
    with pytest.raises(DataError) as info:
        load_pairs(small_phantom / "site_A" / "manifest.csv", ("test",), 64)
    assert info.value.issues[0].column == "split"
