"""Cine and image readers on real DICOM files nobody here wrote, and on video files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hcc_fl.client.io import Cine, crop_resize, read_cine, read_image, resample_cine
from hcc_fl.shared.errors import DataError


def test_pydicom_ybr_ultrasound_cine() -> None:
    """pydicom's bundled US multi-frame: 30 frames, YBR_FULL_422, JPEG baseline."""
    cine = read_cine(get_testdata_file("examples_ybr_color.dcm"))
    assert cine.frames.shape == (30, 240, 320)
    assert cine.frames.dtype == np.float32
    assert np.allclose(np.diff(cine.times), 0.033333, atol=1e-5)  # FrameTime 33.333 ms
    assert cine.frames.min() >= 0 and cine.frames.max() <= 255


def test_pydicom_data_120_frame_cine() -> None:
    try:
        path = get_testdata_file("color3d_jpeg_baseline.dcm", download=False)
    except TypeError:  # older signature
        path = get_testdata_file("color3d_jpeg_baseline.dcm")
    if path is None:
        pytest.skip("optional test data package pydicom-data is not installed")
    cine = read_cine(path)
    assert cine.frames.shape == (120, 480, 640)
    assert cine.times[-1] == pytest.approx(119 * 0.033333, rel=1e-4)


def test_luminance_matches_rgb_formula() -> None:
    ds = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"))
    rgb = ds.pixel_array[3].astype(np.float64)
    lum = read_cine(get_testdata_file("examples_ybr_color.dcm")).frames[3]
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert np.allclose(lum, expected, atol=1e-3)


def _write_ybr(path: Path, rgb: np.ndarray, **timing: float) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = rgb.shape[1:3]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = rgb.shape[0]
    for k, v in timing.items():
        setattr(ds, k, v)
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_uncompressed_ybr_is_converted_to_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 50, 10
    _write_ybr(tmp_path / "c.dcm", rgb, FrameTime=250.0)
    cine = read_cine(tmp_path / "c.dcm")
    assert cine.frames.shape == (2, 4, 4)
    assert cine.frames[0, 0, 0] == pytest.approx(0.299 * 200 + 0.587 * 50 + 0.114 * 10, abs=1.5)
    assert cine.times.tolist() == pytest.approx([0.0, 0.25])


def test_cine_without_timing_names_the_file(tmp_path: Path) -> None:
    _write_ybr(tmp_path / "notime.dcm", np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="notime.dcm.*frame timing"):
        read_cine(tmp_path / "notime.dcm")


def test_cine_rate_fallback(tmp_path: Path) -> None:
    _write_ybr(tmp_path / "rate.dcm", np.zeros((3, 4, 4, 3), np.uint8), CineRate=4)
    assert read_cine(tmp_path / "rate.dcm").times.tolist() == pytest.approx([0, 0.25, 0.5])


def test_16bit_mr_single_frame() -> None:
    img = read_image(get_testdata_file("MR_small.dcm"))
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    assert img.shape == (64, 64)
    assert np.array_equal(img, ref.astype(np.float32))


def test_phantom_cine_reads_back_bit_exact(small_phantom: Path) -> None:
    path = next((small_phantom / "site_B" / "patients").glob("*/ceus_cine.dcm"))
    cine = read_cine(path)
    assert np.array_equal(cine.frames, pydicom.dcmread(path).pixel_array.astype(np.float32))
    assert cine.times[-1] == pytest.approx(120.0)


@pytest.mark.parametrize("suffix,fourcc", [(".avi", "MJPG"), (".mp4", "mp4v")])
def test_video_cine(tmp_path: Path, suffix: str, fourcc: str) -> None:
    path = tmp_path / f"clip{suffix}"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5.0, (32, 24))
    if not writer.isOpened():
        pytest.skip(f"OpenCV in this environment has no {fourcc} encoder")
    for i in range(10):
        writer.write(np.full((24, 32, 3), 20 * i, np.uint8))
    writer.release()
    cine = read_cine(path)
    assert cine.frames.shape == (10, 24, 32)
    assert cine.times[1] == pytest.approx(0.2)
    assert cine.frames[9].mean() > cine.frames[0].mean() + 100


@pytest.mark.parametrize("content", [b"", b"not a dicom file at all" * 10, b"DICM" * 40])
def test_corrupt_dicom_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken_cine.dcm"
    path.write_bytes(content)
    with pytest.raises(DataError, match="broken_cine.dcm"):
        read_cine(path)


def test_truncated_pixel_data_names_the_file(tmp_path: Path, small_phantom: Path) -> None:
    src = next((small_phantom / "site_A" / "patients").glob("*/ceus_cine.dcm"))
    data = src.read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.dcm"):
        read_cine(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.dcm: file not found"):
        read_cine(tmp_path / "nope.dcm")


def test_resample_is_linear_in_time() -> None:
    frames = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 2, 2), np.float32)
    cine = Cine(frames, np.array([0, 30, 60, 90, 120], np.float32))
    out = resample_cine(cine, 9)
    assert out[:, 0, 0] == pytest.approx(np.arange(9) / 2.0)
    short = Cine(frames[:2], np.array([0, 10], np.float32))
    assert resample_cine(short, 3)[-1, 0, 0] == pytest.approx(1.0)  # holds the last frame


def test_crop_resize() -> None:
    frames = np.zeros((2, 20, 30), np.float32)
    frames[:, 5:15, 10:20] = 1.0
    out = crop_resize(frames, (10, 5, 20, 15), 8)
    assert out.shape == (2, 8, 8) and out.min() == 1.0
    assert crop_resize(frames[0], None, 8).shape == (8, 8)
