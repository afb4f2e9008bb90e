"""Site datasets: read the DICOM export listed in a validated manifest into cached tensors."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hcc_fl.client import timing
from hcc_fl.client.decode_check import SizeLimits, active_limits, use_limits
from hcc_fl.client.io import crop_resize, read_cine, read_image, resample_cine, standardise
from hcc_fl.client.manifest import Manifest, allow_roots, allowed_roots, validated_manifest
from hcc_fl.client.prepcache import FILE_KINDS, Arrays, PrepCache, cached, row_key
from hcc_fl.shared.errors import DataError, DataIssue
from hcc_fl.shared.models import input_shape
from hcc_fl.shared.models.er import IMAGES
from hcc_fl.shared.tasks import ClinicalFeature, TaskSpec, get_task

log = logging.getLogger(__name__)
SPAWN_S = 4.0  # seconds a preparation process takes to start (imports), on a loaded machine
BCLC_CODE = {"0": 0.0, "A": 1.0, "B": 2.0, "C": 3.0, "D": 4.0}


@dataclass
class SiteData:
    """Tensors of one site and split: ``video`` the deep model's image input ((N,1,T,H,W) for a
    cine, (N,3,H,W) for the three stills of er_ceus), ``clinical`` (N,C) (C may be 0),
    ``label`` (N,)."""

    video: torch.Tensor
    clinical: torch.Tensor
    label: torch.Tensor
    manifest_sha256: str
    survival: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    masks: torch.Tensor | None = None  # aclf_us: liver masks (N, 2, H, W) at T0 and T1

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @staticmethod
    def concat(parts: list[SiteData]) -> SiteData:
        """Pool several sites (used only by the centralized baseline)."""
        masks = [p.masks for p in parts if p.masks is not None]
        return SiteData(
            torch.cat([p.video for p in parts]),
            torch.cat([p.clinical for p in parts]),
            torch.cat([p.label for p in parts]),
            "+".join(p.manifest_sha256[:12] for p in parts),
            masks=torch.cat(masks) if len(masks) == len(parts) else None,
        )


def clinical_vector(row: dict[str, str], features: tuple[ClinicalFeature, ...]) -> list[float]:
    """Standardise a manifest row's clinical variables with the task's fixed reference values."""
    out = []
    for f in features:
        raw = row[f.column]
        if f.transform == "sex_male":
            x = 1.0 if raw == "M" else 0.0
        elif f.transform == "bclc":
            x = BCLC_CODE[raw]
        elif f.transform == "log10":
            x = math.log10(max(float(raw), 1e-3))
        else:
            x = float(raw)
        out.append((x - f.mean) / f.std)
    return out


def _roi(row: dict[str, str]) -> tuple[int, int, int, int] | None:
    keys = ("ceus_roi_x0", "ceus_roi_y0", "ceus_roi_x1", "ceus_roi_y1")
    if all(row.get(k) for k in keys):
        x0, y0, x1, y1 = (int(float(row[k])) for k in keys)
        return (x0, y0, x1, y1)
    return None


_CACHE: dict[tuple[str, str, str, tuple[str, ...]], SiteData] = {}
_PREP: PrepCache | None = None
_LOAD_S = [0.0]  # seconds this process spent in load_site


def use_prep_cache(folder: str | Path | None) -> None:
    """Read and write this process's site tensors through the persistent preparation cache in
    ``folder`` (:mod:`hcc_fl.client.prepcache`); None: memory only (the default)."""
    global _PREP
    _PREP = None if folder is None else PrepCache(Path(folder))


@contextlib.contextmanager
def using_prep_cache(folder: str | Path | None) -> Iterator[None]:
    """:func:`use_prep_cache` for a block; the previous setting is restored after it."""
    global _PREP
    before = _PREP
    use_prep_cache(folder)
    try:
        yield
    finally:
        _PREP = before


def active_prep_cache() -> PrepCache | None:
    """The preparation cache :func:`load_site` uses in this process, if any."""
    return _PREP


def load_site(
    manifest_path: str | Path,
    task_name: str,
    profile: str,
    splits: tuple[str, ...],
    progress: Callable[[int], None] | None = None,
) -> SiteData:
    """Validate the manifest, read the listed cines and build tensors for ``splits``.

    Results are cached in memory per (manifest content, task, profile, splits), so a Flower client
    that handles several messages reads its DICOM files once; with a preparation cache set by
    :func:`use_prep_cache` each patient's arrays are read from (or written to) it, so a fresh
    process decodes only the patients whose key changed (:func:`prepare_site` fills it ahead).

    Raises
    ------
    DataError
        Manifest or image problems, naming file, row and column.
    """
    t0 = time.perf_counter()
    try:
        task = get_task(task_name)
        manifest = validated_manifest(Path(manifest_path), task_name)
        key = (manifest.sha256, task_name, profile, splits)
        if key in _CACHE:
            return _CACHE[key]
        data = _build(manifest, task, profile, splits, progress)
        _CACHE[key] = data
        return data
    finally:
        _LOAD_S[0] += time.perf_counter() - t0
        timing.note(data_s=round(_LOAD_S[0], 4))  # a message's seconds in load_site (bench)


def _clip(manifest: Manifest, line: int, row: dict[str, str], frames: int, size: int
          ) -> np.ndarray:
    """The cine of a row, resampled to ``frames`` over 0-120 s, ROI-cropped, (1, T, H, W)."""
    try:
        cine = read_cine(manifest.resolve(row["ceus_cine"]))
    except DataError as exc:
        raise DataError(
            [DataIssue(str(manifest.path), i.message + " (the file in this cell)", line,
                       "ceus_cine")
             for i in exc.issues]
        ) from exc
    roi = _roi(row)
    if roi is not None:
        h, w = cine.frames.shape[1:]
        x0, y0, x1, y1 = roi
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise DataError.single(
                manifest.path, f"the ROI is empty, inverted or outside the {w}x{h} cine", line,
                "ceus_roi_x0"
            )
    clip = crop_resize(resample_cine(cine, frames), roi, size)
    return standardise(clip)[None]


def _stills(manifest: Manifest, line: int, row: dict[str, str], size: int) -> np.ndarray:
    """The B-mode, arterial- and portal-phase images of a row, each resized to ``size`` and
    standardised, stacked as channels (3, H, W)."""
    out = []
    for column in IMAGES:
        try:
            image = read_image(manifest.resolve(row[column]))
        except DataError as exc:
            raise DataError(
                [DataIssue(str(manifest.path), i.message + " (the file in this cell)", line,
                           column) for i in exc.issues]
            ) from exc
        out.append(standardise(crop_resize(image, None, size)))
    return np.stack(out)


def _mri_patch(manifest: Manifest, line: int, row: dict[str, str], size: int
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """The pre/arterial/portal/delayed slice through the lesion centre, (4, size, size), scaled
    by the pre-contrast statistics (absolute enhancement kept), and the lesion mask cut out the
    same way (1, size, size), or None without a mask."""
    from hcc_fl.client.mri import read_manifest_row, tumour_patch

    try:
        phases, mask = read_manifest_row(manifest.root, row)
        patch = tumour_patch(phases, mask, size, norm="pre")
        if mask is None:
            return patch, None
        m = np.asarray(mask) != 0
        ys, xs = np.nonzero(m)
        y0 = int(np.floor(ys.mean() + 0.5)) - size // 2  # tumour_patch's centring
        x0 = int(np.floor(xs.mean() + 0.5)) - size // 2
        out = np.zeros((1, size, size), dtype=np.float32)
        h, w = m.shape
        sy0, sy1, sx0, sx1 = max(y0, 0), min(y0 + size, h), max(x0, 0), min(x0 + size, w)
        if sy1 > sy0 and sx1 > sx0:
            out[0, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = m[sy0:sy1, sx0:sx1]
        return patch, out
    except DataError as exc:
        raise DataError([DataIssue(str(manifest.path), i.message + " (the series in this row)",
                                   line, "mr_pre_dir") for i in exc.issues]) from exc
    except ValueError as exc:
        raise DataError.single(manifest.path, str(exc), line, "mr_lesion_mask") from exc


def file_columns(task: TaskSpec) -> tuple[str, ...]:
    """The task's manifest columns that name image files or series folders."""
    return tuple(c.name for c in task.columns if c.kind in FILE_KINDS)


def _row_arrays(manifest: Manifest, task: TaskSpec, frames: int, size: int, line: int,
                row: dict[str, str]) -> Arrays:
    """The prepared arrays of one row: (clip,), (stills,), (patch,) or (patch, lesion mask),
    or (T0/T1 images, T0/T1 liver masks) for aclf_us."""
    if task.name == "aclf_us":
        from hcc_fl.client.longitudinal import pair_row

        found = pair_row(manifest, line, row, size)
        if isinstance(found, list):
            raise DataError(found)
        return found
    if task.name == "phcc_mri":  # 4-phase DCE-MRI patch through the lesion centre
        patch, mask = _mri_patch(manifest, line, row, size)
        return (patch,) if mask is None else (patch, mask)
    if frames == 0:  # still images (er_ceus): one channel per image
        return (_stills(manifest, line, row, size),)
    return (_clip(manifest, line, row, frames, size),)


def _rows(manifest: Manifest, splits: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    rows = [(i + 2, r) for i, r in enumerate(manifest.rows) if r["split"] in splits]
    if not rows:
        raise DataError.single(manifest.path, f"no rows in split(s) {', '.join(splits)}",
                               column="split")
    return rows


def _key(cache: PrepCache, manifest: Manifest, task: TaskSpec, frames: int, size: int,
         row: dict[str, str]) -> str:
    return row_key(manifest.root, row, file_columns(task), task.name,
                   {"frames": frames, "size": size}, cache.version)


def _build(
    manifest: Manifest,
    task: TaskSpec,
    profile: str,
    splits: tuple[str, ...],
    progress: Callable[[int], None] | None,
) -> SiteData:
    frames, size = input_shape(task.name, profile)
    rows = _rows(manifest, splits)
    prep = _PREP
    arrays: list[Arrays] = []
    issues: list[DataIssue] = []
    for line, row in rows:
        key = _key(prep, manifest, task, frames, size, row) if prep is not None else ""
        try:
            arrays.append(cached(prep, key, functools.partial(
                _row_arrays, manifest, task, frames, size, line, row)))
        except DataError as exc:
            if task.name != "aclf_us":
                raise
            issues += exc.issues  # the pairs report every problem of every row
        if progress:
            progress(1)
    if issues:
        raise DataError(issues)
    if task.name == "aclf_us":
        return _pairs(manifest, task, rows, arrays)
    survival: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for t_col, e_col in task.survival_endpoints:
        values = [(r.get(t_col, ""), r.get(e_col, "")) for _, r in rows]
        if all(t != "" and e != "" for t, e in values):  # an endpoint is used only when complete
            survival[t_col.removesuffix("_time")] = (
                np.array([float(t) for t, _ in values]), np.array([float(e) for _, e in values])
            )
    masks = [a[1] if len(a) > 1 else None for a in arrays]
    have_masks = bool(masks) and all(m is not None for m in masks)
    return SiteData(
        torch.from_numpy(np.stack([a[0] for a in arrays])),
        torch.tensor([clinical_vector(r, task.clinical) for _, r in rows], dtype=torch.float32),
        torch.tensor([float(r[task.label]) for _, r in rows], dtype=torch.float32),
        manifest.sha256,
        survival,
        masks=torch.from_numpy(np.stack([m for m in masks if m is not None])) if have_masks
        else None,
    )


def _pairs(manifest: Manifest, task: TaskSpec, rows: list[tuple[int, dict[str, str]]],
           arrays: list[Arrays]) -> SiteData:
    """The T0/T1 ultrasound pairs with their liver masks (aclf_us), as
    :func:`hcc_fl.client.longitudinal.load_pairs` builds them; ``clinical`` holds the raw age
    and MELD for the Cox models, ``survival["os"]`` the survival time (days) and event."""
    from hcc_fl.client.longitudinal import CLINICAL

    return SiteData(
        torch.from_numpy(np.stack([a[0] for a in arrays])),
        torch.tensor([[float(r[c]) for c in CLINICAL] for _, r in rows], dtype=torch.float32),
        torch.tensor([float(r[task.label]) for _, r in rows], dtype=torch.float32),
        manifest.sha256,
        {"os": (np.array([float(r["os_time"]) for _, r in rows], dtype=np.float64),
                np.array([float(r["os_event"]) for _, r in rows], dtype=np.float64))},
        masks=torch.from_numpy(np.stack([a[1] for a in arrays])),
    )


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_site` did: rows of the splits, entries built and reused, seconds."""

    rows: int
    built: int
    reused: int
    seconds: float


def prepare_site(
    manifest_path: str | Path,
    task_name: str,
    profile: str,
    splits: tuple[str, ...],
    cache: PrepCache,
    workers: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> PrepareResult:
    """Fill the preparation cache with the rows of ``splits`` whose entry is missing.

    Parameters
    ----------
    manifest_path : str or Path
        The site's manifest.
    task_name, profile : str
        The task and model profile (they fix the preprocessing parameters).
    splits : tuple of str
        Manifest splits to prepare.
    cache : PrepCache
        The site's preparation cache.
    workers : int, optional
        Processes decoding patients in parallel (default: the CPUs this process may use; 1:
        in this process).
    progress : callable, optional
        Called with 1 per row done (reused rows at once).

    Raises
    ------
    DataError
        Every problem of every row that failed (file, line, column); the rows that succeeded
        stay prepared.
    """
    t0 = time.monotonic()
    task = get_task(task_name)
    manifest = validated_manifest(Path(manifest_path), task_name)
    frames, size = input_shape(task.name, profile)
    rows = _rows(manifest, splits)
    cache.remove_stale_tmp()
    todo = []
    for line, row in rows:
        key = _key(cache, manifest, task, frames, size, row)
        if cache.has(key):
            if progress:
                progress(1)
        else:
            todo.append((line, row, key))
    n = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo)))
    _worker_init(manifest, task.name, frames, size, cache.folder, active_limits(),
                 allowed_roots(), threads=False)
    issues: list[DataIssue] = []
    done, fastest = 0, float("inf")
    # Rows in this process until the fastest so far (the first pays for lazy imports) says a
    # pool would save more than starting its processes costs (SPAWN_S: torch and the readers).
    while done < len(todo):
        t_row = time.monotonic()
        issues += _worker_row(*todo[done])
        fastest = min(fastest, time.monotonic() - t_row)
        done += 1
        if progress:
            progress(1)
        if n > 1 and done >= 2 and fastest * (len(todo) - done) * (1 - 1 / n) > SPAWN_S:
            break
    if done < len(todo):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        with ProcessPoolExecutor(min(n, len(todo) - done), mp_context=ctx,
                                 initializer=_worker_init, initargs=(
                manifest, task.name, frames, size, cache.folder, active_limits(),
                allowed_roots())) as pool:
            for fut in as_completed([pool.submit(_worker_row, *t) for t in todo[done:]]):
                issues += fut.result()
                if progress:
                    progress(1)
    if issues:
        raise DataError(sorted(issues, key=lambda i: (i.row or 0, i.column or "")))
    return PrepareResult(len(rows), len(todo), len(rows) - len(todo), time.monotonic() - t0)


@dataclass(frozen=True)
class _Job:
    """What a preparation process needs besides the row: set once by :func:`_worker_init`."""

    manifest: Manifest
    task: TaskSpec
    frames: int
    size: int
    cache: PrepCache


_JOB: list[_Job] = []


def _worker_init(manifest: Manifest, task_name: str, frames: int, size: int, folder: Path,
                 limits: SizeLimits, roots: tuple[Path, ...], threads: bool = True) -> None:
    """Set up a preparation process: the site's manifest, limits and roots; one thread."""
    if threads:
        import cv2

        torch.set_num_threads(1)
        cv2.setNumThreads(1)
    use_limits(limits)
    allow_roots(roots)
    _JOB[:] = [_Job(manifest, get_task(task_name), frames, size, PrepCache(folder))]


def _worker_row(line: int, row: dict[str, str], key: str) -> list[DataIssue]:
    """Prepare one row into the cache; its problems (none when it worked)."""
    job = _JOB[0]
    try:
        arrays = _row_arrays(job.manifest, job.task, job.frames, job.size, line, row)
    except DataError as exc:
        return list(exc.issues)
    job.cache.put(key, arrays)
    return []
