"""Declared-size limits checked before any image is decoded, shared by every reader.

A site export can declare sizes its bytes do not hold (a 5 kB RLE file whose header says
31 GiB, a short mp4 whose container says 12,000 frames at 640 x 480). Every reader
(:mod:`hcc_fl.client.io`, :mod:`hcc_fl.client.mri`) asks this module first: the size an image
will take in memory while it is decoded is computed from its header (DICOM: NumberOfFrames x
Rows x Columns x SamplesPerPixel x BitsAllocated from the pydicom header; video: the container's
frame count and frame size from OpenCV; masks: the PNG/TIFF/BMP header from Pillow, the ``.npy``
header from NumPy) and compared with the site's limit (``max_image_mb`` in SITE.yaml,
``--max-image-mb`` of ``check-data``; default :data:`DEFAULT_MAX_IMAGE_MB`). Nothing is
decoded when it is over.

The limit is per image file and bounds the reader's working memory: the file's bytes, the decoded
array, and the float32 copies the readers make (luminance, MONOCHROME1 inversion).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from hcc_fl.shared.errors import DataError

log = logging.getLogger(__name__)

#: Default per-image limit in MiB (decoded working memory of one file).
DEFAULT_MAX_IMAGE_MB = 2048
#: A cine used as a cine (ki67_ceus, tace_ceus) needs at least this many frames.
MIN_CINE_FRAMES = 8
MIB = 1 << 20
ALLOWED_BITS = (1, 8, 16, 32, 64)


@dataclass(frozen=True)
class SizeLimits:
    """The declared-size limit of one site: ``max_bytes`` of working memory per image file."""

    max_bytes: int = DEFAULT_MAX_IMAGE_MB * MIB

    @classmethod
    def from_mb(cls, mb: float | None) -> SizeLimits:
        """Limits from a size in MiB (None: the default)."""
        if mb is None:
            return cls()
        if isinstance(mb, bool) or not math.isfinite(float(mb)) or float(mb) <= 0:
            raise ValueError("max_image_mb must be a positive number of MiB")
        return cls(int(float(mb) * MIB))

    @property
    def mb(self) -> float:
        return self.max_bytes / MIB


_ACTIVE = SizeLimits()


def use_limits(limits: SizeLimits) -> None:
    """Set the limits the readers of this process apply (a site sets it once from SITE.yaml;
    simulation and tests keep the default)."""
    global _ACTIVE
    _ACTIVE = limits


def active_limits() -> SizeLimits:
    """The limits the readers of this process apply."""
    return _ACTIVE


def _over(path: Path, what: str, need: int, limits: SizeLimits) -> DataError:
    return DataError.single(
        path, f"{what} needs about {need / MIB:,.0f} MiB to decode, above the site's limit of "
        f"{limits.mb:,.0f} MiB per image (max_image_mb); nothing was decoded")


def _tag_int(ds: Dataset, keyword: str, path: Path, default: int | None = None) -> int:
    """A numeric header value as a positive integer; a clear error when it is not."""
    try:
        raw = ds.get(keyword, default)
        value = default if raw in (None, "") else raw
        if value is None:
            raise DataError.single(path, f"{keyword} missing in the DICOM header")
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError.single(path, f"{keyword} in the DICOM header is not a number") from exc
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise DataError.single(path, f"{keyword} in the DICOM header must be a positive integer, "
                                     f"found {number:g}")
    return int(number)


@dataclass(frozen=True)
class DeclaredSize:
    """What a header declares: ``frames`` x ``rows`` x ``columns`` x ``samples`` per pixel and
    ``work_bytes``, the reader's estimated peak working memory for the file."""

    frames: int
    rows: int
    columns: int
    samples: int
    work_bytes: int


def check_dicom_size(ds: Dataset, path: Path, limits: SizeLimits | None = None) -> DeclaredSize:
    """Check a DICOM header's declared pixel size against the limit, before decoding.

    Parameters
    ----------
    ds : Dataset
        The header (read with ``stop_before_pixels`` or ``defer_size``; pixel data not decoded).
    path : Path
        The file (for the message and its size on disk).
    limits : SizeLimits, optional
        Default: :func:`active_limits`.

    Raises
    ------
    DataError
        A missing or non-integer Rows/Columns/NumberOfFrames/SamplesPerPixel/BitsAllocated, or
        a declared size above the limit. Only structural header values appear in messages.
    """
    limits = limits or active_limits()
    frames = _tag_int(ds, "NumberOfFrames", path, default=1)
    rows = _tag_int(ds, "Rows", path)
    cols = _tag_int(ds, "Columns", path)
    samples = _tag_int(ds, "SamplesPerPixel", path, default=1)
    bits = _tag_int(ds, "BitsAllocated", path)
    if samples not in (1, 3):
        raise DataError.single(path, f"SamplesPerPixel must be 1 or 3, found {samples}")
    if bits not in ALLOWED_BITS:
        raise DataError.single(path, f"BitsAllocated must be one of "
                                     f"{', '.join(map(str, ALLOWED_BITS))}, found {bits}")
    pixels = frames * rows * cols
    out_samples = 3 if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR" \
        else samples
    # decoded array (pydicom may hold one extra copy while it converts colour or reshapes)
    decoded = 2 * pixels * samples * max(1, math.ceil(bits / 8))
    floats = pixels * (out_samples + 2) * 4  # float32 samples, luminance and one more copy
    on_disk = path.stat().st_size if path.is_file() else 0
    need = on_disk + decoded + floats
    declared = DeclaredSize(frames, rows, cols, samples, need)
    if need > limits.max_bytes:
        raise _over(path, f"the header declares {frames} frame(s) x {rows} rows x {cols} "
                          f"columns x {samples} sample(s) of {bits} bits, which", need, limits)
    return declared


def check_video_size(cap: object, path: Path, limits: SizeLimits | None = None
                     ) -> DeclaredSize:
    """Check an opened ``cv2.VideoCapture``'s container header (frame count, width, height)
    against the limit, before any frame is decoded.

    Raises
    ------
    DataError
        No frame count or frame size in the container, or a declared size above the limit.
    """
    import cv2

    limits = limits or active_limits()
    get = cap.get  # type: ignore[attr-defined]
    frames = float(get(cv2.CAP_PROP_FRAME_COUNT))
    width, height = float(get(cv2.CAP_PROP_FRAME_WIDTH)), float(get(cv2.CAP_PROP_FRAME_HEIGHT))
    if not all(math.isfinite(v) and v >= 1 for v in (frames, width, height)):
        raise DataError.single(path, "the video container declares no frame count or frame "
                                     "size; re-export it (e.g. as .mp4 or multi-frame DICOM)")
    n, w, h = int(frames), int(width), int(height)
    # BGR frame + grey frame while decoding, the float32 list and its stacked copy
    need = path.stat().st_size + n * w * h * 4 * 2 + w * h * 4
    declared = DeclaredSize(n, h, w, 3, need)
    if need > limits.max_bytes:
        raise _over(path, f"the video container declares {n} frames of {w} x {h}, which", need,
                    limits)
    return declared


def check_mask_size(path: Path, limits: SizeLimits | None = None) -> tuple[int, int]:
    """Check a mask file's declared size (image header via Pillow, ``.npy`` header via NumPy)
    against the limit before decoding; returns (rows, columns) when it is 2-D.

    Raises
    ------
    DataError
        An unreadable header, a mask that is not 2-D, or a declared size above the limit.
    """
    import numpy as np

    limits = limits or active_limits()
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError.single(path, f"not a readable .npy array ({type(exc).__name__})"
                                   ) from exc
        shape, itemsize = tuple(int(s) for s in arr.shape), int(arr.dtype.itemsize)
        del arr
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                shape, itemsize = (int(img.height), int(img.width)), 4
        except Image.DecompressionBombError:
            raise DataError.single(path, "the mask's header declares more pixels than Pillow "
                                         "opens, far above the site's limit per image "
                                         "(max_image_mb); nothing was decoded") from None
        except (OSError, ValueError, UnidentifiedImageError) as exc:
            raise DataError.single(path, f"image cannot be decoded ({type(exc).__name__})"
                                   ) from exc
    if len(shape) != 2:
        raise DataError.single(path, f"a mask must be 2-D, found {len(shape)} dimension(s)")
    need = path.stat().st_size + shape[0] * shape[1] * (itemsize + 2)
    if need > limits.max_bytes:
        raise _over(path, f"the mask declares {shape[1]} x {shape[0]} pixels, which", need,
                    limits)
    return shape[0], shape[1]


__all__ = [
    "DEFAULT_MAX_IMAGE_MB", "MIN_CINE_FRAMES", "DeclaredSize", "SizeLimits", "active_limits",
    "check_dicom_size", "check_mask_size", "check_video_size", "use_limits",
]
