"""Issue 19: declared sizes checked before decoding, task rules at check time, paths inside the
export, PHI-free failure reasons (the fuzz test covers the same ground at random)."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from pydicom.uid import RLELossless

from hcc_fl.client.decode_check import SizeLimits, active_limits, use_limits
from hcc_fl.client.io import read_cine
from hcc_fl.client.manifest import validate_manifest
from hcc_fl.client.site_config import load_site_config
from hcc_fl.shared import records as R
from hcc_fl.shared.errors import DataError
from hcc_fl.shared.tasks import TASKS

KI67 = TASKS["ki67_ceus"]


def _site(src: Path, dst: Path, name: str = "site_A") -> Path:
    """A copy of a phantom site (hard links: only the manifest is ever rewritten)."""
    shutil.copytree(src / name, dst / name, copy_function=os.link)
    return dst / name / "manifest.csv"


def _edit(path: Path, edits: dict[tuple[int, str], str]) -> list[dict[str, str]]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    for (i, col), value in edits.items():
        rows[i][col] = value
    path.unlink()
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def _messages(exc: pytest.ExceptionInfo[DataError]) -> list[str]:
    return [str(i) for i in exc.value.issues]


def test_rle_file_declaring_gigabytes_is_refused_before_decoding(tmp_path: Path,
                                                                 small_phantom: Path) -> None:
    ds = pydicom.dcmread(next((small_phantom / "site_A" / "patients").glob("*/ceus_cine.dcm")))
    ds.compress(RLELossless)
    ds.NumberOfFrames, ds.Rows, ds.Columns = 8000, 2048, 2048  # 31 GiB of 8-bit frames
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=False)
    assert bomb.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"8000 frame\(s\) x 2048 rows x 2048 columns .*above "
                           r"the site's limit of 2,048 MiB per image") as err:
            read_cine(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * bomb.stat().st_size + (1 << 20)  # the header and the file, nothing more
    assert "nothing was decoded" in str(err.value)


def test_video_frame_count_from_the_container(tmp_path: Path) -> None:
    path = tmp_path / "long.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (640, 480), False)
    for t in range(30):
        vw.write(np.full((480, 640), t, np.uint8))
    vw.release()
    with pytest.raises(DataError, match=r"container declares 30 frames of 640 x 480"):
        read_cine(path, SizeLimits(16 << 20))
    assert read_cine(path, SizeLimits(256 << 20)).frames.shape == (30, 480, 640)


def test_limits_are_validated() -> None:
    assert SizeLimits.from_mb(None).mb == 2048
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_image_mb"):
            SizeLimits.from_mb(bad)


def test_task_rules_each_located_and_no_value_echoed(tmp_path: Path,
                                                     small_phantom: Path) -> None:
    path = _site(small_phantom, tmp_path)
    rows = _edit(path, {(0, "ceus_roi_x1"): "", (1, "ceus_roi_y1"): "2",
                        (1, "ceus_roi_y0"): "40", (2, "ceus_roi_x1"): "640",
                        (3, "age"): "Jane\x00Doe", (4, "sex"): "Jane"})
    one_frame = tmp_path / "site_A" / rows[5]["ceus_cine"]
    ds = pydicom.dcmread(one_frame)
    ds.PixelData, ds.NumberOfFrames = ds.pixel_array[:1].tobytes(), 1
    one_frame.unlink()  # not through the hard link into the session's phantom
    ds.save_as(one_frame, enforce_file_format=False)
    with pytest.raises(DataError) as err:
        validate_manifest(path, KI67)
    text = _messages(err)
    m = str(path)
    assert f"{m}, line 2, column 'ceus_roi_x1': partial ROI" in " ".join(text)
    assert f"{m}, line 3, column 'ceus_roi_y1': the ROI is empty or inverted" in " ".join(text)
    assert f"{m}, line 4, column 'ceus_roi_x1': the ROI ends beyond the cine's width (64 " \
        "pixels)" in " ".join(text)
    assert f"{m}, line 5, column 'age': the cell holds a control character" in " ".join(text)
    assert f"{m}, line 6, column 'sex': expected one of M, F" in " ".join(text)
    assert f"{m}, line 7, column 'ceus_cine': the cine has 1 frame(s); task ki67_ceus needs at " \
        "least 8" in " ".join(text)
    assert not any("Jane" in t or "640" in t for t in text)


def test_duplicate_column_is_refused(tmp_path: Path, small_phantom: Path) -> None:
    path = _site(small_phantom, tmp_path)
    lines = path.read_text().splitlines()
    path.unlink()
    path.write_text("\n".join([lines[0] + ",age", *(x + ",99" for x in lines[1:])]) + "\n")
    with pytest.raises(DataError, match=r"line 1, column 'age': column appears 2 times"):
        validate_manifest(path, KI67)


def test_paths_stay_inside_the_export_unless_allowed(tmp_path: Path,
                                                     small_phantom: Path) -> None:
    path = _site(small_phantom, tmp_path)
    other = _site(small_phantom, tmp_path, "site_B").parent
    with path.open() as fh:
        first = next(csv.DictReader(fh))
    theirs = next((other / "patients").glob("*/ceus_cine.dcm"))
    link = tmp_path / "site_A" / "patients" / "borrowed.dcm"
    link.symlink_to(theirs)
    _edit(path, {(0, "ceus_cine"): "patients/borrowed.dcm",
                 (1, "ceus_cine"): f"../site_B/{theirs.relative_to(other)}",
                 (2, "ceus_cine"): str(theirs),
                 (3, "ceus_cine"): first["ceus_cine"]})  # a file of its own export: fine
    with pytest.raises(DataError) as err:
        validate_manifest(path, KI67)
    text = _messages(err)
    for line in (2, 3, 4):
        assert any(f"line {line}, column 'ceus_cine': the path leaves the site's export" in t
                   for t in text), text
    assert len(text) == 3 and not any("site_B" in t for t in text)
    validate_manifest(path, KI67, allowed_roots=(other.resolve(),))  # allowed explicitly


def test_external_test_split_needs_both_classes(tmp_path: Path, small_phantom: Path) -> None:
    path = _site(small_phantom, tmp_path, "site_EXT")
    with path.open() as fh:
        n = len(list(csv.DictReader(fh)))
    _edit(path, {(i, "ki67_high"): "0" for i in range(n)})
    validate_manifest(path, KI67, ("test",))  # allowed unless asked for
    with pytest.raises(DataError, match=r"split 'test' holds only one class of label "
                       "'ki67_high'"):
        validate_manifest(path, KI67, ("test",), both_classes=("test",))


def test_site_config_limit_and_roots(tmp_path: Path) -> None:
    base = ("site: site_A\nrole: train\ntask: ki67_ceus\nmanifest: m.csv\n"
            "coordinator: 127.0.0.1:9092\ninsecure: true\n")
    path = tmp_path / "site.yaml"
    path.write_text(base + "max_image_mb: 64\nallowed_roots: [../shared]\n")
    cfg = load_site_config(path)
    assert cfg.max_image_mb == 64 and cfg.allowed_roots == ((tmp_path / "../shared").resolve(),)
    for bad, key in (("max_image_mb: lots\n", "max_image_mb"), ("max_image_mb: -1\n",
                     "max_image_mb"), ("allowed_roots: /data\n", "allowed_roots")):
        path.write_text(base + bad)
        with pytest.raises(DataError, match=f"column '{key}'"):
            load_site_config(path)


def test_site_failure_reason_is_phi_free(tmp_path: Path, small_phantom: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A site whose data fails during a run: its log has file, line and column; its error reply
    and audit log only the count and the columns."""
    from hcc_fl.client import flower_app

    path = _site(small_phantom, tmp_path)
    rows = _edit(path, {})
    cine = tmp_path / "site_A" / rows[0]["ceus_cine"]
    data = cine.read_bytes()
    cine.unlink()
    cine.write_bytes(data[: len(data) // 2])
    audit = tmp_path / "audit.jsonl"
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 3, 1, 5
    msg = Message(RecordDict(), dst_node_id=5, message_type=f"query.{R.ACTION_SITE_INFO}")
    ctx = Context(3, 5, {"manifest": str(path), "site": "site_A", "role": "train",
                         "task": "ki67_ceus", "audit": str(audit), "max-image-mb": 64.0},
                  RecordDict(), {"task": "ki67_ceus", "profile": "tiny"})
    previous = active_limits()
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError) as err:
            flower_app.site_info(msg, ctx)
        assert active_limits().mb == 64
    finally:
        use_limits(previous)
    reason = str(err.value)
    assert "site data check failed: 1 data problem(s) in ceus_cine (1)" in reason
    assert str(tmp_path) not in reason and rows[0]["patient_id"] not in reason
    assert f"{path}, line 2, column 'ceus_cine'" in caplog.text
    logged = audit.read_text()
    assert "failed: site data check: 1 data problem(s) in ceus_cine (1)" in logged
    assert str(tmp_path) not in logged and rows[0]["patient_id"] not in logged
