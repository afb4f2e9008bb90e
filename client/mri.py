"""DCE-MRI reader for the ``phcc_mri`` task: one DICOM series per phase in, co-registered phases
and tumour-centred patches out.

* :func:`read_series` reads one folder (or one file) holding one series: classic MR (one file
  per slice) or enhanced multi-frame MR (per-frame and shared functional groups). Slices are
  sorted along the slice normal, RescaleSlope/Intercept applied, and the volume returned as
  float32 (Z, H, W) with its spacing (dz, dy, dx) in mm, origin and orientation.
* :func:`group_phases` assigns pre-contrast, arterial, portal-venous and delayed phases from the
  tags: a keyword in SeriesDescription, otherwise the order of TemporalPositionIdentifier,
  TriggerTime or AcquisitionTime. :func:`read_export` does this for a whole export folder and
  :func:`read_phase_dirs` for one folder per phase (the manifest's ``mr_<phase>_dir`` columns).
* :func:`check_geometry` checks that the phases share shape, spacing, orientation and origin.
* :func:`tumour_patch` and :func:`with_kinetics` build the model input: the four phases (and
  wash-in / wash-out channels) on the slice through the lesion centre.

Every error is a :class:`~hcc_fl.shared.errors.DataError` naming the file (or series) and the
DICOM tag at fault. Pixel data never leaves these functions except as arrays.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from hcc_fl.client.decode_check import active_limits, check_dicom_size
from hcc_fl.client.io import READ_ERRORS, read_mask
from hcc_fl.shared.errors import DataError, DataIssue

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

PHASES = ("pre", "art", "pv", "del")
PHASE_NAMES = {"pre": "pre-contrast", "art": "arterial", "pv": "portal venous", "del": "delayed"}
MANIFEST_COLUMNS = {p: f"mr_{p}_dir" for p in PHASES}
MASK_COLUMN = "mr_lesion_mask"

SPACING_TOL_MM = 1e-3
ORIENTATION_TOL = 1e-4
ORIGIN_TOL_VOXELS = 0.5
# Slice gaps may differ by this fraction of the median gap (DS values carry rounding).
GAP_TOL_REL = 0.01
GAP_TOL_MM = 0.01

# SeriesDescription tokens (lower case; words split at non-letters and at letter/digit changes).
PHASE_KEYWORDS: dict[str, frozenset[str]] = {
    "pre": frozenset({"pre", "precontrast", "native", "nativ", "unenhanced", "noncontrast"}),
    "art": frozenset({"art", "arterial", "arteriell", "arteriale", "hap", "lap", "eap"}),
    "pv": frozenset({"pv", "pvp", "portal", "venous", "portalvenous", "portovenous", "ven"}),
    "del": frozenset({"del", "delay", "delayed", "equilibrium", "equil", "eq", "transitional",
                      "tp"}),
}
# Series that are never a phase: subtractions, projections, maps and localisers.
EXCLUDE_KEYWORDS = frozenset({"sub", "subtraction", "subtracted", "mip", "mpr", "map", "localizer",
                              "localiser", "loc", "scout", "survey"})
TIME_TAGS = ("TemporalPositionIdentifier", "TriggerTime", "AcquisitionTime")


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True, eq=False)
class SeriesTags:
    """Identifying and timing tags of one series (or one temporal position of a series)."""

    series_uid: str
    description: str
    series_number: int | None
    temporal_position: int | None
    trigger_time_ms: float | None
    acquisition_time_s: float | None
    acquisition_date: str | None
    files: tuple[str, ...]

    @property
    def label(self) -> str:
        """``'<SeriesDescription>' (SeriesInstanceUID <uid>[, TemporalPositionIdentifier <n>])``."""
        extra = (
            f", TemporalPositionIdentifier {self.temporal_position}"
            if self.temporal_position is not None
            else ""
        )
        return f"'{self.description}' (SeriesInstanceUID {self.series_uid}{extra})"


@dataclass(frozen=True, eq=False)
class MRSeries(SeriesTags):
    """One MR series as a volume.

    ``volume`` (Z, H, W) float32 after RescaleSlope/Intercept, slices in increasing position along
    the slice normal; ``spacing`` (dz, dy, dx) in mm (dy = between rows, dx = between columns);
    ``origin`` the ImagePositionPatient of the first voxel of slice 0 and ``orientation`` the six
    ImageOrientationPatient direction cosines (both None when the files carry no position).
    ``files`` lists the source files in slice order (one file for a multi-frame series).
    """

    volume: F32
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None

    @property
    def shape(self) -> tuple[int, int, int]:
        z, h, w = self.volume.shape
        return int(z), int(h), int(w)


@dataclass(frozen=True, eq=False)
class _Frame:
    """Geometry and rescale tags of one 2-D frame (a classic file or a frame of a multi-frame)."""

    path: Path
    index: int | None
    rows: int
    cols: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...]
    thickness: float | None
    between: float | None
    slope: float
    intercept: float
    order: int | None  # InstanceNumber, or InStackPositionNumber for a multi-frame

    @property
    def where(self) -> str:
        return self.path.name if self.index is None else f"{self.path.name} frame {self.index + 1}"


@dataclass(frozen=True, eq=False)
class _Header(SeriesTags):
    """A series found by scanning headers; pixels are decoded by :func:`_load`."""

    frames: tuple[_Frame, ...]


TagsT = TypeVar("TagsT", bound=SeriesTags)


# --------------------------------------------------------------------------- tag helpers


def _fail(path: Path | str, message: str) -> DataError:
    return DataError.single(path, message)


def _numbers(value: object, tag: str, n: int, path: Path, where: str) -> tuple[float, ...] | None:
    """Numeric tag value(s) as floats; None when absent or empty; an error when malformed."""
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        items: list[object] = list(text.split("\\"))
    elif isinstance(value, float | int):
        items = [value]
    else:
        try:
            items = list(value)  # type: ignore[call-overload]
        except TypeError:
            items = [value]
    try:
        out = tuple(float(v) for v in items)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _fail(path, f"{tag} is not numeric ({where}: {value!s})") from None
    if len(out) != n or not all(np.isfinite(out)):
        raise _fail(path, f"{tag} must hold {n} finite number(s) ({where}: {value!s})")
    return out


def _one(value: object, tag: str, path: Path, where: str) -> float | None:
    out = _numbers(value, tag, 1, path, where)
    return None if out is None else out[0]


def _integer(value: object, tag: str, path: Path, where: str) -> int | None:
    out = _one(value, tag, path, where)
    return None if out is None else int(round(out))


def _get(ds: Dataset, keyword: str) -> object:
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError):  # a malformed value that pydicom rejects
        return "?"


def _fg(ds: Dataset, frame: int | None, sequence: str, keyword: str) -> object:
    """A frame's tag: per-frame functional group, then shared group, then the top level."""
    if frame is not None:
        for groups, idx in (
            (ds.get("PerFrameFunctionalGroupsSequence"), frame),
            (ds.get("SharedFunctionalGroupsSequence"), 0),
        ):
            if groups is None or idx >= len(groups):
                continue
            seq = groups[idx].get(sequence)
            if seq and keyword in seq[0]:
                value = _get(seq[0], keyword)
                if value is not None and value != "":
                    return value
    return _get(ds, keyword)


_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d+))?")
_DT = re.compile(r"(\d{8})(\d{2})?(\d{2})?(\d{2})?(?:\.(\d+))?(?:[+-]\d{4})?")


def _time_of_day(value: object) -> float | None:
    """Seconds since midnight from a TM value (``HHMMSS.FFFFFF``, ``HH:MM:SS`` accepted)."""
    text = str(value or "").strip().replace(":", "")
    m = _TM.fullmatch(text)
    if not m:
        return None
    h, mi, s, frac = m.groups()
    return int(h) * 3600 + int(mi or 0) * 60 + int(s or 0) + float(f"0.{frac}" if frac else 0)


def _date_time(value: object) -> tuple[str | None, float | None]:
    """(YYYYMMDD, seconds since midnight) from a DT value."""
    text = str(value or "").strip()
    m = _DT.fullmatch(text)
    if not m:
        return None, None
    d, h, mi, s, frac = m.groups()
    if h is None:
        return d, None
    return d, int(h) * 3600 + int(mi or 0) * 60 + int(s or 0) + float(f"0.{frac}" if frac else 0)


def _acquisition(ds: Dataset, frame: int | None) -> tuple[str | None, float | None]:
    if frame is not None:
        d, t = _date_time(_fg(ds, frame, "FrameContentSequence", "FrameAcquisitionDateTime"))
        if t is not None:
            return d, t
    d, t = _date_time(_get(ds, "AcquisitionDateTime"))
    if t is not None:
        return d, t
    t = _time_of_day(_get(ds, "AcquisitionTime"))
    day = str(_get(ds, "AcquisitionDate") or "").strip() or None
    return (day if t is not None else None), t


# --------------------------------------------------------------------------- scanning


def _files(path: Path, recursive: bool) -> list[Path]:
    """Candidate files: every file except hidden ones and DICOMDIR indexes."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise _fail(path, "folder not found")
    found = path.rglob("*") if recursive else path.iterdir()
    out = [
        p
        for p in found
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.name.upper() != "DICOMDIR"
    ]
    if not out:
        raise _fail(path, "folder has no files (expected DICOM files of an MR series)")
    return sorted(out)


def _read_header(path: Path) -> Dataset:
    try:
        # Large values (the pixel data) stay on disk until decoded.
        return pydicom.dcmread(path, defer_size=1024)
    except READ_ERRORS as exc:
        raise _fail(path, f"not a readable DICOM file ({type(exc).__name__})") from None


def _frames_of(path: Path, ds: Dataset) -> list[_Frame]:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _fail(path, "DICOM file has no pixel data (PixelData missing; not an image)")
    check_dicom_size(ds, path)  # before anything is allocated per frame
    n = _integer(_get(ds, "NumberOfFrames"), "NumberOfFrames", path, "file") or 1
    multi = n > 1 or "PerFrameFunctionalGroupsSequence" in ds or (
        "SharedFunctionalGroupsSequence" in ds
    )
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n:
        raise _fail(path, f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items but "
                          f"NumberOfFrames is {n}")
    rows = _integer(_get(ds, "Rows"), "Rows", path, "file")
    cols = _integer(_get(ds, "Columns"), "Columns", path, "file")
    if not rows or not cols:
        raise _fail(path, "Rows/Columns missing")
    frames = []
    for i in range(n):
        idx = i if multi else None
        where = "file" if idx is None else f"frame {i + 1}"
        pos = _numbers(_fg(ds, idx, "PlanePositionSequence", "ImagePositionPatient"),
                       "ImagePositionPatient", 3, path, where)
        ori = _numbers(_fg(ds, idx, "PlaneOrientationSequence", "ImageOrientationPatient"),
                       "ImageOrientationPatient", 6, path, where)
        ps = _numbers(_fg(ds, idx, "PixelMeasuresSequence", "PixelSpacing"), "PixelSpacing", 2,
                      path, where)
        if ps is None:
            where_tag = (" (PixelMeasuresSequence in the per-frame or shared functional groups, "
                         "or the top level)") if multi else ""
            raise _fail(path, f"PixelSpacing missing{where_tag}")
        if min(ps) <= 0:
            raise _fail(path, f"PixelSpacing must be positive ({where}: {ps})")
        slope = _one(_fg(ds, idx, "PixelValueTransformationSequence", "RescaleSlope"),
                     "RescaleSlope", path, where)
        intercept = _one(_fg(ds, idx, "PixelValueTransformationSequence", "RescaleIntercept"),
                         "RescaleIntercept", path, where)
        if multi:
            order = _integer(_fg(ds, idx, "FrameContentSequence", "InStackPositionNumber"),
                             "InStackPositionNumber", path, where)
        else:
            order = _integer(_get(ds, "InstanceNumber"), "InstanceNumber", path, where)
        frames.append(
            _Frame(
                path=path, index=idx, rows=rows, cols=cols, position=pos, orientation=ori,
                pixel_spacing=ps,
                thickness=_one(_fg(ds, idx, "PixelMeasuresSequence", "SliceThickness"),
                               "SliceThickness", path, where),
                between=_one(_fg(ds, idx, "PixelMeasuresSequence", "SpacingBetweenSlices"),
                             "SpacingBetweenSlices", path, where),
                slope=1.0 if slope is None else slope,
                intercept=0.0 if intercept is None else intercept,
                order=order,
            )
        )
    return frames


def _scan(files: Sequence[Path]) -> list[_Header]:
    """Read every header and group frames by (SeriesInstanceUID, temporal position)."""
    issues: list[DataIssue] = []
    groups: dict[tuple[str, int | None], list[tuple[_Frame, Dataset]]] = {}
    for path in files:
        try:
            ds = _read_header(path)
            uid = str(_get(ds, "SeriesInstanceUID") or "").strip()
            if not uid:
                raise _fail(path, "SeriesInstanceUID missing")
            frames = _frames_of(path, ds)
            for fr in frames:
                where = "file" if fr.index is None else f"frame {fr.index + 1}"
                temporal = None
                if fr.index is not None:
                    temporal = _integer(
                        _fg(ds, fr.index, "FrameContentSequence", "TemporalPositionIndex"),
                        "TemporalPositionIndex", path, where)
                if temporal is None:
                    temporal = _integer(_get(ds, "TemporalPositionIdentifier"),
                                        "TemporalPositionIdentifier", path, where)
                groups.setdefault((uid, temporal), []).append((fr, ds))
        except DataError as exc:
            issues.extend(exc.issues)
    if issues:
        raise DataError(issues)
    headers = []
    for (uid, temporal), members in groups.items():
        members.sort(key=lambda m: (str(m[0].path), m[0].index or 0))
        first_ds = members[0][1]
        path0 = members[0][0].path
        descriptions = Counter(str(_get(ds, "SeriesDescription") or "").strip() for _, ds in
                               members)
        triggers = [
            t for fr, ds in members
            if (t := _one(_get(ds, "TriggerTime"), "TriggerTime", fr.path, fr.where)) is not None
        ]
        acq = [_acquisition(ds, fr.index) for fr, ds in members]
        times = [(d, t) for d, t in acq if t is not None]
        first_time = min(times, key=lambda dt: (dt[0] or "", dt[1])) if times else (None, None)
        headers.append(
            _Header(
                series_uid=uid,
                description=descriptions.most_common(1)[0][0],
                series_number=_integer(_get(first_ds, "SeriesNumber"), "SeriesNumber", path0,
                                       "file"),
                temporal_position=temporal,
                trigger_time_ms=min(triggers) if triggers else None,
                acquisition_time_s=first_time[1],
                acquisition_date=first_time[0],
                files=tuple(dict.fromkeys(str(fr.path) for fr, _ in members)),
                frames=tuple(fr for fr, _ in members),
            )
        )
    headers.sort(key=lambda h: (h.series_number or 0, h.series_uid, h.temporal_position or 0))
    return headers


# --------------------------------------------------------------------------- volumes


def _normal(orientation: Sequence[float], path: Path) -> F64:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    if norm < 0.5:
        raise _fail(path, f"ImageOrientationPatient {tuple(orientation)} is not a pair of "
                          "direction cosines")
    return np.asarray(n / norm, dtype=np.float64)


def _presence(tag: str, fr: _Frame, ref: _Frame, fr_missing: bool, label: str) -> DataIssue:
    """A tag present in one slice of a series and missing in another."""
    missing, present = (fr, ref) if fr_missing else (ref, fr)
    return DataIssue(str(missing.path), f"{tag} missing in {missing.where} but present in "
                                        f"{present.where} (series {label})")


def _check_same(frames: Sequence[_Frame], h: _Header) -> None:
    """Rows/Columns, PixelSpacing and ImageOrientationPatient agree between slices."""
    ref = frames[0]
    issues = []
    for fr in frames[1:]:
        def differs(tag: str, here: object, there: object, fr: _Frame = fr) -> DataIssue:
            return DataIssue(str(fr.path), f"{tag} differs between slices of series {h.label}: "
                                           f"{here} in {fr.where}, {there} in {ref.where}")
        if (fr.rows, fr.cols) != (ref.rows, ref.cols):
            issues.append(differs("Rows/Columns", (fr.rows, fr.cols), (ref.rows, ref.cols)))
        if np.max(np.abs(np.subtract(fr.pixel_spacing, ref.pixel_spacing))) > SPACING_TOL_MM:
            issues.append(differs("PixelSpacing", fr.pixel_spacing, ref.pixel_spacing))
        if (fr.orientation is None) != (ref.orientation is None):
            issues.append(_presence("ImageOrientationPatient", fr, ref, fr.orientation is None,
                                    h.label))
        elif fr.orientation is not None and ref.orientation is not None and np.max(
            np.abs(np.subtract(fr.orientation, ref.orientation))
        ) > ORIENTATION_TOL:
            issues.append(differs("ImageOrientationPatient", fr.orientation, ref.orientation))
        if (fr.position is None) != (ref.position is None):
            issues.append(_presence("ImagePositionPatient", fr, ref, fr.position is None,
                                    h.label))
        if len(issues) >= 20:
            break
    if issues:
        raise DataError(issues)


def _sort_frames(h: _Header) -> tuple[list[_Frame], float, F64 | None]:
    """Frames in slice order, the slice spacing dz and the slice normal (None without position)."""
    frames = list(h.frames)
    _check_same(frames, h)
    ref = frames[0]
    single_dz = ref.between if ref.between else ref.thickness
    if ref.position is not None:
        if ref.orientation is None:
            raise _fail(ref.path, f"ImageOrientationPatient missing ({ref.where}; needed to sort "
                                  f"the slices of series {h.label} by ImagePositionPatient)")
        normal = _normal(ref.orientation, ref.path)
        pos = np.asarray([fr.position for fr in frames], dtype=np.float64)
        proj = pos @ normal
        order = np.argsort(proj, kind="stable")
        frames = [frames[i] for i in order]
        proj, pos = proj[order], pos[order]
        if len(frames) == 1:
            dz = single_dz
        else:
            gaps = np.diff(proj)
            k = int(np.argmin(gaps))
            if gaps[k] < GAP_TOL_MM:
                raise _fail(frames[k + 1].path, f"ImagePositionPatient: {frames[k + 1].where} and "
                            f"{frames[k].where} lie at the same position along the slice normal "
                            f"({proj[k]:.3f} mm) in series {h.label} (duplicate slice?)")
            med = float(np.median(gaps))
            bad = np.abs(gaps - med) > max(GAP_TOL_MM, GAP_TOL_REL * med)
            if bad.any():
                j = int(np.argmax(bad))
                raise _fail(frames[j + 1].path, f"ImagePositionPatient: slice spacing is not "
                            f"uniform in series {h.label} (gaps from {gaps.min():.4g} to "
                            f"{gaps.max():.4g} mm, {gaps[j]:.4g} mm before {frames[j + 1].where}; "
                            "a slice may be missing)")
            offsets = pos - pos[0] - np.outer(proj - proj[0], normal)
            drift = np.linalg.norm(offsets, axis=1)
            if drift.max() > 0.5 * min(ref.pixel_spacing):
                j = int(np.argmax(drift))
                raise _fail(frames[j].path, f"ImagePositionPatient: {frames[j].where} is shifted "
                            f"{drift[j]:.3g} mm in-plane from the stack of series {h.label} "
                            "(slices not stacked along the ImageOrientationPatient normal)")
            dz = float((proj[-1] - proj[0]) / (len(frames) - 1))
        return frames, _require_dz(dz, ref, h), normal
    # No positions at all: fall back to InstanceNumber (classic) / InStackPositionNumber.
    if len(frames) > 1:
        tag = "InstanceNumber" if ref.index is None else "InStackPositionNumber"
        if ref.index is None or all(fr.order is not None for fr in frames):
            missing = [fr for fr in frames if fr.order is None]
            if missing:
                raise _fail(missing[0].path, f"ImagePositionPatient and {tag} missing "
                            f"({missing[0].where}); the slices of series {h.label} cannot be "
                            "ordered")
            counts = Counter(fr.order for fr in frames)
            dup = [o for o, c in counts.items() if c > 1]
            if dup:
                twice = [fr.where for fr in frames if fr.order == dup[0]]
                raise _fail(ref.path, f"ImagePositionPatient missing and {tag} {dup[0]} repeated "
                            f"({', '.join(twice)}) in series {h.label}")
            frames.sort(key=lambda fr: fr.order or 0)
        else:  # a multi-frame without positions or stack numbers keeps the frame order
            frames.sort(key=lambda fr: fr.index or 0)
    return frames, _require_dz(single_dz, ref, h), None


def _require_dz(dz: float | None, ref: _Frame, h: _Header) -> float:
    if dz is None or not np.isfinite(dz) or dz <= 0:
        raise _fail(ref.path, f"slice spacing unknown for series {h.label}: SpacingBetweenSlices "
                              "and SliceThickness missing (and no ImagePositionPatient pair)")
    return float(dz)


def _decode(path: Path) -> tuple[Dataset, npt.NDArray[np.generic]]:
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except READ_ERRORS as exc:
        raise _fail(path, f"not a readable DICOM file ({type(exc).__name__})") from None
    declared = check_dicom_size(ds, path)
    if declared.samples != 1:
        raise _fail(path, f"SamplesPerPixel is {declared.samples} (PhotometricInterpretation "
                          f"{ds.get('PhotometricInterpretation', '?')}): not a grey-scale MR image")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure means an unusable file
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        name = f"{ts} {getattr(ts, 'name', '')}".strip() if ts else "unknown"
        raise _fail(path, f"PixelData cannot be decoded (TransferSyntaxUID {name}: "
                          f"{str(exc).splitlines()[0]})") from None
    return ds, arr


def _load(h: _Header) -> MRSeries:
    frames, dz, normal = _sort_frames(h)
    ref = frames[0]
    limits = active_limits()
    need = len(frames) * ref.rows * ref.cols * 4
    if need > limits.max_bytes:
        raise _fail(ref.path, f"series {h.label} declares {len(frames)} slices of {ref.rows} x "
                              f"{ref.cols}: about {need / 2**20:,.0f} MiB as a float32 volume, "
                              f"above the site's limit of {limits.mb:,.0f} MiB (max_image_mb); "
                              "nothing was decoded")
    volume = np.empty((len(frames), ref.rows, ref.cols), dtype=np.float32)
    slots: dict[Path, list[tuple[int, _Frame]]] = {}
    for z, fr in enumerate(frames):
        slots.setdefault(fr.path, []).append((z, fr))
    for path, items in slots.items():
        ds, arr = _decode(path)
        n = _integer(ds.get("NumberOfFrames"), "NumberOfFrames", path, "file") or 1
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape != (n, ref.rows, ref.cols):
            raise _fail(path, f"decoded PixelData has shape {tuple(arr.shape)}, expected "
                              f"{(n, ref.rows, ref.cols)} from NumberOfFrames/Rows/Columns")
        for z, fr in items:
            pixels = arr[fr.index or 0].astype(np.float64)
            volume[z] = (pixels * fr.slope + fr.intercept).astype(np.float32)
    origin = None
    if ref.position is not None:
        origin = (float(ref.position[0]), float(ref.position[1]), float(ref.position[2]))
    orientation = None
    if ref.orientation is not None and normal is not None:
        o = [float(v) for v in ref.orientation]
        orientation = (o[0], o[1], o[2], o[3], o[4], o[5])
    return MRSeries(
        series_uid=h.series_uid,
        description=h.description,
        series_number=h.series_number,
        temporal_position=h.temporal_position,
        trigger_time_ms=h.trigger_time_ms,
        acquisition_time_s=h.acquisition_time_s,
        acquisition_date=h.acquisition_date,
        files=tuple(dict.fromkeys(str(fr.path) for fr in frames)),
        volume=volume,
        spacing=(dz, float(ref.pixel_spacing[0]), float(ref.pixel_spacing[1])),
        origin=origin,
        orientation=orientation,
    )


def read_series(folder: str | Path) -> MRSeries:
    """Read the one MR series in ``folder`` (every file in it; or a single DICOM file).

    Classic series (one file per slice) and enhanced multi-frame MR (per-frame functional
    groups PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence,
    PixelValueTransformationSequence, with the shared functional groups and then the top level
    as fallbacks) are both read. Slices are sorted by ImagePositionPatient projected on the
    slice normal (the cross product of the ImageOrientationPatient row and column cosines),
    or by InstanceNumber (InStackPositionNumber) when no file has a position. Hidden files and
    DICOMDIR indexes are ignored; every other file must be a DICOM image.

    Returns
    -------
    MRSeries
        float32 volume (Z, H, W), spacing (dz, dy, dx) mm, origin, orientation and the tags.

    Raises
    ------
    DataError
        A file that is not DICOM or cannot be decoded; a missing tag (PixelSpacing,
        SeriesInstanceUID, ...); slices that disagree (Rows/Columns, PixelSpacing,
        ImageOrientationPatient), share a position, or are unevenly spaced; more than one series
        (or temporal position) in the folder. Messages name the file and the tag.
    """
    path = Path(folder)
    headers = _scan(_files(path, recursive=False))
    if len(headers) != 1:
        found = "; ".join(h.label for h in headers)
        raise _fail(path, f"holds {len(headers)} series (by SeriesInstanceUID and "
                          f"TemporalPositionIdentifier), one expected: {found}")
    return _load(headers[0])


# --------------------------------------------------------------------------- phases


def _tokens(description: str) -> set[str]:
    return set(re.findall(r"[a-z]+|\d+", description.lower()))


def phase_keywords(description: str) -> set[str]:
    """The phases whose keywords occur in ``description`` (empty for excluded series)."""
    tokens = _tokens(description)
    if tokens & EXCLUDE_KEYWORDS:
        return set()
    return {p for p, words in PHASE_KEYWORDS.items() if tokens & words}


def _time_values(series: Sequence[SeriesTags], tag: str) -> tuple[list[float] | None, str]:
    """Values of one timing tag for each series, or None with the reason it cannot order them."""
    if tag == "TemporalPositionIdentifier":
        raw: list[float | None] = [
            None if s.temporal_position is None else float(s.temporal_position) for s in series
        ]
    elif tag == "TriggerTime":
        raw = [s.trigger_time_ms for s in series]
    else:
        with_date = all(s.acquisition_date for s in series)
        raw = []
        for s in series:
            if s.acquisition_time_s is None:
                raw.append(None)
            elif with_date and s.acquisition_date:
                try:
                    day = date(int(s.acquisition_date[:4]), int(s.acquisition_date[4:6]),
                               int(s.acquisition_date[6:8])).toordinal()
                except ValueError:
                    day = 0
                raw.append(day * 86400.0 + s.acquisition_time_s)
            else:
                raw.append(s.acquisition_time_s)
    missing = [s.label for s, v in zip(series, raw, strict=True) if v is None]
    if missing:
        return None, f"{tag} missing in {', '.join(missing)}"
    values = [float(v) for v in raw if v is not None]
    if len(set(values)) != len(values):
        return None, f"{tag} repeats a value ({', '.join(f'{v:g}' for v in values)})"
    return values, ""


def _order_by_time(series: Sequence[TagsT]) -> tuple[str, list[TagsT]]:
    """Sort series by the first of TIME_TAGS present and distinct on all of them."""
    reasons = []
    for tag in TIME_TAGS:
        values, why = _time_values(series, tag)
        if values is not None:
            order = np.argsort(values, kind="stable")
            return tag, [series[i] for i in order]
        reasons.append(why)
    raise DataError.single(
        _source(series), "cannot order the series by time: " + "; ".join(reasons)
    )


def _source(series: Sequence[SeriesTags]) -> str:
    parents = {str(Path(f).parent) for s in series for f in s.files[:1]}
    if not parents:
        return "<no series>"
    common = Path(parents.pop())
    for p in parents:
        while common != common.parent and not Path(p).is_relative_to(common):
            common = common.parent
    return str(common)


def _check_time_order(phases: Mapping[str, SeriesTags], source: str) -> None:
    """The phases follow each other in time, by the first timing tag usable on all of them."""
    keys = [p for p in PHASES if p in phases]
    series = [phases[p] for p in keys]
    if len(series) < 2:
        return
    for tag in TIME_TAGS:
        values, _ = _time_values(series, tag)
        if values is None:
            continue
        if any(b <= a for a, b in zip(values, values[1:], strict=False)):
            listing = ", ".join(
                f"{p}={v:g} {s.label}" for p, v, s in zip(keys, values, series, strict=True)
            )
            raise DataError.single(source, f"{tag} order contradicts the phase assignment "
                                           f"(pre < arterial < portal venous < delayed expected): "
                                           f"{listing}")
        return


def group_phases(
    series_list: Sequence[TagsT], source: str | Path | None = None
) -> dict[str, TagsT]:
    """Assign the pre-contrast, arterial, portal-venous and delayed phases.

    A series whose SeriesDescription holds keywords of exactly one phase (case-insensitive
    words: PRE/native/precontrast, ART/arterial, PV/portal/venous, DEL/delayed/equilibrium/
    transitional; see ``PHASE_KEYWORDS``) gets that phase. Phases left over are filled, in time
    order, with the series that have no phase keyword, ordered by TemporalPositionIdentifier,
    else TriggerTime, else AcquisitionTime (the first tag present and distinct on all of them).
    Subtractions, projections and localisers (``EXCLUDE_KEYWORDS``) are never assigned. Finally
    the assignment must agree with the first timing tag usable on all four phases.

    Parameters
    ----------
    series_list : sequence of MRSeries (or anything with the :class:`SeriesTags` fields)
    source : str or Path, optional
        Named in errors (default: the folder common to the series' files).

    Returns
    -------
    dict
        ``{"pre": ..., "art": ..., "pv": ..., "del": ...}`` in this order.

    Raises
    ------
    DataError
        A phase is missing or ambiguous, or the timing tags cannot order (or contradict) the
        assignment; the message names the series (SeriesDescription and SeriesInstanceUID) and
        the tag.
    """
    where = str(source) if source is not None else _source(series_list)
    candidates = [s for s in series_list if not (_tokens(s.description) & EXCLUDE_KEYWORDS)]
    by_keyword: dict[str, list[TagsT]] = {p: [] for p in PHASES}
    unlabelled: list[TagsT] = []
    for s in candidates:
        hits = phase_keywords(s.description)
        if len(hits) == 1:
            by_keyword[hits.pop()].append(s)
        else:
            unlabelled.append(s)
    issues = [
        DataIssue(where, f"phase '{p}' ({PHASE_NAMES[p]}) is ambiguous: the SeriesDescription of "
                         f"{len(found)} series matches it: {'; '.join(s.label for s in found)}")
        for p, found in by_keyword.items()
        if len(found) > 1
    ]
    if issues:
        raise DataError(issues)
    assigned = {p: found[0] for p, found in by_keyword.items() if found}
    missing = [p for p in PHASES if p not in assigned]
    if missing:
        listing = "; ".join(s.label for s in series_list) or "none"
        names = ", ".join(f"'{p}' ({PHASE_NAMES[p]})" for p in missing)
        if len(unlabelled) != len(missing):
            raise DataError.single(
                where,
                f"phase {names} missing: no SeriesDescription names it, and "
                f"{len(unlabelled)} series without a phase keyword cannot fill {len(missing)} "
                f"phase(s) by TemporalPositionIdentifier/TriggerTime/AcquisitionTime order; "
                f"series found: {listing}",
            )
        if len(unlabelled) == 1:
            ordered = unlabelled
        else:
            try:
                _, ordered = _order_by_time(unlabelled)
            except DataError as exc:
                raise DataError.single(
                    where, f"phase {names} cannot be assigned: {exc.issues[0].message}; series "
                           f"found: {listing}") from None
        assigned.update(zip(missing, ordered, strict=True))
    result = {p: assigned[p] for p in PHASES}
    _check_time_order(result, where)
    return result


def read_export(folder: str | Path) -> dict[str, MRSeries]:
    """Read a DCE-MRI export folder (all subfolders) and return its four phases.

    The series are found by SeriesInstanceUID (and temporal position, so one series or one
    multi-frame file holding all dynamics is split), assigned by :func:`group_phases` from the
    tags only (folder and file names play no part), read, and checked with
    :func:`check_geometry`. Series not chosen as a phase (localisers, other sequences) are not
    decoded.
    """
    path = Path(folder)
    headers = _scan(_files(path, recursive=True))
    chosen = group_phases(headers, source=path)
    phases = {p: _load(h) for p, h in chosen.items()}
    check_geometry(phases)
    return phases


def read_phase_dirs(dirs: Mapping[str, str | Path]) -> dict[str, MRSeries]:
    """Read one folder per phase (keys ``pre``, ``art``, ``pv``, ``del``) and check them.

    Besides :func:`read_series` on each folder: a folder whose SeriesDescription names another
    phase is an error (swapped columns), the timing tags must follow the phase order, and the
    geometry must agree (:func:`check_geometry`).
    """
    missing = [p for p in PHASES if p not in dirs]
    unknown = [k for k in dirs if k not in PHASES]
    if missing or unknown:
        raise DataError.single(
            "<phase folders>",
            f"expected one folder for each phase {', '.join(PHASES)}; missing: "
            f"{', '.join(missing) or 'none'}; unknown: {', '.join(unknown) or 'none'}",
        )
    phases = {p: read_series(dirs[p]) for p in PHASES}
    issues = []
    for p, s in phases.items():
        hits = phase_keywords(s.description)
        if len(hits) == 1 and p not in hits:
            other = hits.pop()
            issues.append(DataIssue(s.files[0], f"the folder given for phase '{p}' "
                                    f"({PHASE_NAMES[p]}) holds series {s.label}, whose "
                                    f"SeriesDescription names phase '{other}' "
                                    f"({PHASE_NAMES[other]})"))
    if issues:
        raise DataError(issues)
    _check_time_order(phases, str(Path(dirs["pre"]).parent))
    check_geometry(phases)
    return phases


def read_manifest_row(
    root: str | Path, row: Mapping[str, str]
) -> tuple[dict[str, MRSeries], npt.NDArray[np.bool_] | None]:
    """Read a ``phcc_mri`` manifest row: the phases of ``mr_<phase>_dir`` (relative to ``root``,
    the manifest's folder) and the optional 2-D ``mr_lesion_mask`` (None when empty)."""
    base = Path(root)

    def resolve(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else base / p

    phases = read_phase_dirs({p: resolve(row[col]) for p, col in MANIFEST_COLUMNS.items()})
    mask_value = (row.get(MASK_COLUMN) or "").strip()
    mask = None
    if mask_value:
        _, h, w = phases["pre"].shape
        mask = read_mask(resolve(mask_value), shape=(h, w))
    return phases, mask


# --------------------------------------------------------------------------- geometry


def check_geometry(phases: Mapping[str, MRSeries]) -> None:
    """Check that all phases share shape, spacing, orientation and origin.

    Tolerances: spacing 1e-3 mm, orientation cosines 1e-4, origin 0.5 voxel along each axis
    of the first phase. The first phase (pre-contrast, when present) is the reference.

    Raises
    ------
    DataError
        One issue per disagreement, naming the phase, its series (SeriesDescription and UID),
        its first file and the tag.
    """
    keys = [p for p in PHASES if p in phases] + [k for k in phases if k not in PHASES]
    if len(keys) < 2:
        return
    ref_key = keys[0]
    ref = phases[ref_key]
    issues = []
    for key in keys[1:]:
        s = phases[key]

        def issue(message: str, s: MRSeries = s, key: str = key) -> DataIssue:
            return DataIssue(s.files[0], f"phase '{key}' series {s.label}: {message} (reference: "
                                         f"phase '{ref_key}' series {ref.label})")

        if s.shape != ref.shape:
            tag = "Rows/Columns" if s.shape[1:] != ref.shape[1:] else "number of slices"
            issues.append(issue(f"volume shape {s.shape} differs from {ref.shape} ({tag})"))
        if max(abs(s.spacing[1] - ref.spacing[1]), abs(s.spacing[2] - ref.spacing[2])) > (
            SPACING_TOL_MM
        ):
            issues.append(issue(f"PixelSpacing {s.spacing[1:]} differs from {ref.spacing[1:]}"))
        if abs(s.spacing[0] - ref.spacing[0]) > SPACING_TOL_MM:
            issues.append(issue(f"slice spacing {s.spacing[0]:g} mm differs from "
                                f"{ref.spacing[0]:g} mm (ImagePositionPatient / "
                                "SpacingBetweenSlices / SliceThickness)"))
        if (s.orientation is None) != (ref.orientation is None):
            where = "this phase" if s.orientation is None else "the reference"
            issues.append(issue(f"ImageOrientationPatient/ImagePositionPatient missing in {where}"))
            continue
        if s.orientation is None or ref.orientation is None:
            continue
        if np.max(np.abs(np.subtract(s.orientation, ref.orientation))) > ORIENTATION_TOL:
            issues.append(issue(f"ImageOrientationPatient {s.orientation} differs from "
                                f"{ref.orientation}"))
        if s.origin is not None and ref.origin is not None:
            row = np.asarray(ref.orientation[:3])
            col = np.asarray(ref.orientation[3:])
            normal = np.cross(row, col)
            d = np.subtract(s.origin, ref.origin)
            voxels = np.abs([d @ normal / ref.spacing[0], d @ col / ref.spacing[1],
                             d @ row / ref.spacing[2]])
            if voxels.max() > ORIGIN_TOL_VOXELS:
                issues.append(issue(
                    f"ImagePositionPatient of the first slice {s.origin} differs from "
                    f"{ref.origin} by ({voxels[0]:.2f}, {voxels[1]:.2f}, {voxels[2]:.2f}) voxels "
                    f"(z, y, x; tolerance {ORIGIN_TOL_VOXELS})"))
    if issues:
        raise DataError(issues)


# --------------------------------------------------------------------------- model input


def tumour_patch(
    phases: Mapping[str, MRSeries],
    mask: npt.NDArray[np.generic] | None = None,
    size: int = 64,
    *,
    mask_slice: int | None = None,
    norm: str = "phase",
    pixel_mm: float | None = None,
) -> F32:
    """The four phases on the slice through the lesion centre, centred on the lesion.

    Parameters
    ----------
    phases : mapping
        ``pre``, ``art``, ``pv``, ``del`` volumes of one shape (run :func:`check_geometry`).
    mask : ndarray, optional
        Lesion mask, (Z, H, W) or (H, W); non-zero = lesion. A 3-D mask picks the slice nearest
        its centroid and centres on the mask's centroid on that slice. A 2-D mask lies on slice
        ``mask_slice`` (default: the central slice, as the phantom draws it). Without a mask:
        the central slice, centred on the image centre.
    size : int
        Patch side in pixels; the lesion centre lands on pixel (size // 2, size // 2).
    norm : {"phase", "pre"}
        ``phase``: each phase standardised on its own (zero mean, unit variance over the patch
        pixels inside the image); ``pre``: every phase scaled by the pre-contrast statistics,
        which keeps the absolute enhancement.
    pixel_mm : float, optional
        Resample the slice in-plane to this pixel size first (the same physical field of view
        at every site); default: native pixels.

    Returns
    -------
    ndarray, shape (4, size, size), float32
        Channels pre, arterial, portal venous, delayed. Pixels beyond the image edge are 0.
    """
    missing = [p for p in PHASES if p not in phases]
    if missing:
        raise ValueError(f"tumour_patch needs the phases {PHASES}; missing {missing}")
    if norm not in ("phase", "pre"):
        raise ValueError(f"norm must be 'phase' or 'pre', not {norm!r}")
    vols = [phases[p].volume for p in PHASES]
    shape = vols[0].shape
    if any(v.shape != shape for v in vols):
        raise ValueError(f"phase volumes differ in shape {[v.shape for v in vols]}; "
                         "run check_geometry first")
    nz, h, w = shape
    if mask is None:
        z, cy, cx = nz // 2, (h - 1) / 2.0, (w - 1) / 2.0
    else:
        m = np.asarray(mask) != 0
        if not m.any():
            raise ValueError("the lesion mask is empty")
        if m.ndim == 3:
            if m.shape != shape:
                raise ValueError(f"3-D mask shape {m.shape} differs from the volume {shape}")
            z = int(np.clip(np.floor(np.nonzero(m)[0].mean() + 0.5), 0, nz - 1))
            plane = m[z] if m[z].any() else m.any(axis=0)
        elif m.ndim == 2:
            if m.shape != (h, w):
                raise ValueError(f"2-D mask shape {m.shape} differs from the slices {(h, w)}")
            z = nz // 2 if mask_slice is None else int(mask_slice)
            if not 0 <= z < nz:
                raise ValueError(f"mask_slice {z} outside 0..{nz - 1}")
            plane = m
        else:
            raise ValueError(f"mask must be 2-D or 3-D, not {m.ndim}-D")
        ys, xs = np.nonzero(plane)
        cy, cx = float(ys.mean()), float(xs.mean())
    slices = [v[z].astype(np.float32) for v in vols]
    if pixel_mm is not None:
        _, dy, dx = phases["pre"].spacing
        fy, fx = dy / pixel_mm, dx / pixel_mm
        nh, nw = max(1, int(round(h * fy))), max(1, int(round(w * fx)))
        slices = [cv2.resize(s, (nw, nh), interpolation=cv2.INTER_LINEAR) for s in slices]
        cy, cx = (cy + 0.5) * nh / h - 0.5, (cx + 0.5) * nw / w - 0.5
        h, w = nh, nw
    y0 = int(np.floor(cy + 0.5)) - size // 2
    x0 = int(np.floor(cx + 0.5)) - size // 2
    sy0, sy1 = max(y0, 0), min(y0 + size, h)
    sx0, sx1 = max(x0, 0), min(x0 + size, w)
    out = np.zeros((4, size, size), dtype=np.float32)
    if sy1 <= sy0 or sx1 <= sx0:
        return out
    inside = (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))
    crops = [s[sy0:sy1, sx0:sx1].astype(np.float64) for s in slices]
    ref_stats = (crops[0].mean(), crops[0].std())
    for c, crop in enumerate(crops):
        mean, std = (crop.mean(), crop.std()) if norm == "phase" else ref_stats
        out[c][inside] = ((crop - mean) / (std + 1e-6)).astype(np.float32)
    return out


def with_kinetics(patch: F32) -> F32:
    """Add wash-in (arterial - pre) and wash-out (arterial - delayed) channels: (6, H, W)."""
    if patch.ndim != 3 or patch.shape[0] != 4:
        raise ValueError(f"expected a (4, H, W) patch (pre, art, pv, del), got {patch.shape}")
    pre, art, _, late = patch
    return np.concatenate([patch, (art - pre)[None], (art - late)[None]]).astype(np.float32)
