"""Readers for a site's image exports: DICOM cines and stills (pydicom), .mp4/.avi cines (OpenCV).

Every error names the file; pixel data never leaves these functions except as arrays.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from hcc_fl.client.decode_check import (
    SizeLimits,
    check_dicom_size,
    check_mask_size,
    check_video_size,
)
from hcc_fl.shared.errors import DataError

F32 = npt.NDArray[np.float32]
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv"}


@dataclass(frozen=True)
class Cine:
    """A cine loop: ``frames`` (T, H, W) float32 luminance and ``times`` (T,) in seconds."""

    frames: F32
    times: F32


# What pydicom raises on a damaged file varies with the damage (a struct.error from a truncated
# tag, a TypeError from a malformed value, ...); any of them means the file cannot be used.
READ_ERRORS = (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError,
               AttributeError, IndexError, OverflowError, struct.error)


def read_dicom_header(path: Path) -> Dataset:
    """Read a DICOM header only (no pixel data); errors name the file."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except READ_ERRORS as exc:
        raise DataError.single(path, f"not a readable DICOM file ({type(exc).__name__})") from exc


def _luminance(arr: npt.NDArray[np.generic], ds: Dataset, path: Path) -> F32:
    """Convert decoded pixels to luminance, shape (T, H, W) or (H, W)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        samples = 3
    if samples == 3:
        # pydicom 3 returns RGB for YBR_FULL / YBR_FULL_422 (compressed or not) by default.
        rgb = arr.astype(np.float32)
        lum = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        return np.asarray(lum, dtype=np.float32)
    if samples != 1:
        raise DataError.single(path, f"unsupported SamplesPerPixel={samples}")
    out = arr.astype(np.float32)
    if photometric == "MONOCHROME1":
        out = out.max() - out
    return np.asarray(out, dtype=np.float32)


def _decode(path: Path, limits: SizeLimits | None = None
            ) -> tuple[Dataset, npt.NDArray[np.generic]]:
    """Read the header, check its declared size against the site's limit, then decode."""
    try:
        # Large values (the pixel data) stay on disk until the size check passed.
        ds = pydicom.dcmread(path, defer_size=1024)
    except READ_ERRORS as exc:
        raise DataError.single(path, f"not a readable DICOM file ({type(exc).__name__})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DataError.single(path, "DICOM file has no pixel data")
    check_dicom_size(ds, path, limits)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure means an unusable file
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID", "unknown") if meta is not None else "unknown"
        first = (str(exc).splitlines() or [""])[0][:200]
        raise DataError.single(
            path, f"pixel data cannot be decoded (transfer syntax {ts}: "
                  f"{type(exc).__name__}: {first})") from None
    return ds, arr


def _frame_times(ds: Dataset, n_frames: int, path: Path) -> F32:
    """Frame times in seconds from FrameTime, FrameTimeVector or CineRate; they must be finite
    and increase from frame to frame."""
    try:
        times = _raw_frame_times(ds, n_frames, path)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError.single(path, "frame timing tags (FrameTime, FrameTimeVector, CineRate) "
                                     "are not numbers") from exc
    if not np.all(np.isfinite(times)) or (len(times) > 1 and not np.all(np.diff(times) > 0)):
        raise DataError.single(path, "frame times from FrameTime, FrameTimeVector or CineRate "
                                     "are not finite and increasing")
    return times


def _raw_frame_times(ds: Dataset, n_frames: int, path: Path) -> F32:
    if n_frames == 1:
        return np.zeros(1, dtype=np.float32)
    if "FrameTime" in ds and float(ds.FrameTime) > 0:
        return (np.arange(n_frames, dtype=np.float32) * float(ds.FrameTime) / 1000.0).astype(
            np.float32
        )
    if "FrameTimeVector" in ds:
        inc = np.asarray([float(v) for v in ds.FrameTimeVector], dtype=np.float64)
        if len(inc) == n_frames:
            return (np.cumsum(inc) / 1000.0 - inc[0] / 1000.0).astype(np.float32)
    for tag in ("CineRate", "RecommendedDisplayFrameRate"):
        if tag in ds and float(ds.get(tag)) > 0:
            return (np.arange(n_frames, dtype=np.float32) / float(ds.get(tag))).astype(np.float32)
    raise DataError.single(
        path, "multi-frame DICOM without frame timing (FrameTime, FrameTimeVector or CineRate)"
    )


def read_cine(path: str | Path, limits: SizeLimits | None = None) -> Cine:
    """Read a cine loop as luminance frames with their times.

    Parameters
    ----------
    path : str or Path
        A multi-frame DICOM (8- or 16-bit grey, RGB, YBR or palette colour; any transfer syntax
        pydicom can decode) or a video file (.mp4, .avi, .mov, .mkv) read with OpenCV.

    Returns
    -------
    Cine
        ``frames`` shape (T, H, W) float32 in the file's grey scale (colour converted to
        luminance, 0.299 R + 0.587 G + 0.114 B), ``times`` shape (T,) seconds from the first frame.
    limits : SizeLimits, optional
        The size limit checked on the header before decoding (default: the site's,
        :func:`hcc_fl.client.decode_check.active_limits`).

    Raises
    ------
    DataError
        The file is missing, declares a size above the limit, is not decodable, has non-finite
        pixels, or has no usable frame timing; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError.single(path, "file not found")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _read_video(path, limits)
    ds, arr = _decode(path, limits)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)  # a positive integer: check_dicom_size
    try:
        lum = _luminance(arr, ds, path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. PALETTE COLOR without its lookup tables
        raise DataError.single(path, f"pixel data cannot be converted to grey levels "
                                     f"(PhotometricInterpretation "
                                     f"{ds.get('PhotometricInterpretation', 'none')!s}: "
                                     f"{type(exc).__name__})") from None
    if n_frames == 1 and lum.ndim == 2:
        lum = lum[None]
    if lum.ndim != 3 or lum.shape[0] != n_frames:
        raise DataError.single(path, f"decoded pixel array has shape {tuple(arr.shape)}, which "
                                     f"does not match NumberOfFrames {n_frames}")
    if not np.all(np.isfinite(lum)):
        raise DataError.single(path, "decoded pixel data holds non-finite values")
    return Cine(np.ascontiguousarray(lum), _frame_times(ds, n_frames, path))


def _read_video(path: Path, limits: SizeLimits | None = None) -> Cine:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise DataError.single(path, "video cannot be opened by OpenCV")
        declared = check_video_size(cap, path, limits)
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        frames: list[F32] = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if frame.shape[:2] != (declared.rows, declared.columns):
                raise DataError.single(path, "a decoded frame's size differs from the size the "
                                             "video container declares")
            if len(frames) >= declared.frames:
                raise DataError.single(path, f"the video holds more frames than the "
                                             f"{declared.frames} its container declares")
            if frame.ndim == 3:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            frames.append(frame.astype(np.float32))
    finally:
        cap.release()
    if not frames:
        raise DataError.single(path, "video has no decodable frames")
    if not (math.isfinite(fps) and fps > 0):
        raise DataError.single(path, "video has no frame rate")
    times = (np.arange(len(frames), dtype=np.float32) / fps).astype(np.float32)
    return Cine(np.stack(frames).astype(np.float32), times)


def read_image(path: str | Path, limits: SizeLimits | None = None) -> F32:
    """Read a single-frame DICOM (or the first frame of a multi-frame one) as (H, W) luminance."""
    cine = read_cine(path, limits)
    return cine.frames[0]


def resample_cine(cine: Cine, n_frames: int, start_s: float = 0.0, end_s: float = 120.0) -> F32:
    """Linearly interpolate a cine onto ``n_frames`` equally spaced times in [start_s, end_s].

    Times outside the recorded range hold the first or last frame.
    """
    target = np.linspace(start_s, end_s, n_frames, dtype=np.float64)
    t = cine.times.astype(np.float64)
    if len(t) == 1:
        return np.repeat(cine.frames, n_frames, axis=0)
    idx = np.clip(np.searchsorted(t, target, side="right") - 1, 0, len(t) - 2)
    t0, t1 = t[idx], t[idx + 1]
    w = np.clip((target - t0) / np.maximum(t1 - t0, 1e-9), 0.0, 1.0)[:, None, None]
    out = (1.0 - w) * cine.frames[idx] + w * cine.frames[idx + 1]
    return np.asarray(out, dtype=np.float32)


def crop_resize(
    frames: F32, roi: tuple[int, int, int, int] | None, size: int
) -> F32:
    """Crop ``roi`` = (x0, y0, x1, y1) (pixels, end exclusive) and resize to ``size`` x ``size``.

    ``roi=None`` keeps the whole frame. Works on (H, W) and (T, H, W).
    """
    single = frames.ndim == 2
    arr = frames[None] if single else frames
    if roi is not None:
        x0, y0, x1, y1 = roi
        arr = arr[:, y0:y1, x0:x1]
    out = np.stack(
        [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in arr]
    ).astype(np.float32)
    return out[0] if single else out


def standardise(x: F32) -> F32:
    """Zero-mean, unit-variance scaling of one sample (per clip)."""
    return ((x - x.mean()) / (x.std() + 1e-6)).astype(np.float32)


MASK_SUFFIXES = {".png", ".tif", ".tiff", ".bmp", ".npy"}


def read_mask(path: str | Path, shape: tuple[int, int] | None = None,
              limits: SizeLimits | None = None) -> npt.NDArray[np.bool_]:
    """Read a binary ROI mask (PNG/TIFF/BMP image or ``.npy`` array; non-zero = inside).

    Raises
    ------
    DataError
        Missing or unreadable file, an empty mask, or (with ``shape``) a mask whose size differs
        from the image's; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError.single(path, "file not found")
    suffix = path.suffix.lower()
    if suffix not in MASK_SUFFIXES:
        raise DataError.single(path, f"unsupported mask format '{suffix}' (use "
                               f"{', '.join(sorted(MASK_SUFFIXES))})")
    check_mask_size(path, limits)
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError.single(path, f"not a readable .npy array ({type(exc).__name__})"
                                   ) from None
    else:
        arr = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if arr is None:
            raise DataError.single(path, "image cannot be decoded")
    if arr.ndim != 2:
        raise DataError.single(path, f"a mask must be 2-D, found shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise DataError.single(path, f"a mask must hold numbers, found dtype {arr.dtype.str}")
    mask = np.asarray(arr) > 0
    if not mask.any():
        raise DataError.single(path, "the mask is empty (no pixel inside the ROI)")
    if shape is not None and mask.shape != tuple(shape):
        raise DataError.single(path, f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                               f"{shape[1]}x{shape[0]}")
    return mask
