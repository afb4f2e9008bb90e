"""Site datasets: read the DICOM export listed in a validated manifest into cached tensors."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hcc_fl.client.io import crop_resize, read_cine, read_image, resample_cine, standardise
from hcc_fl.client.manifest import Manifest, validated_manifest
from hcc_fl.shared.errors import DataError, DataIssue
from hcc_fl.shared.models import input_shape
from hcc_fl.shared.models.er import IMAGES
from hcc_fl.shared.tasks import ClinicalFeature, TaskSpec, get_task

log = logging.getLogger(__name__)
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


def load_site(
    manifest_path: str | Path,
    task_name: str,
    profile: str,
    splits: tuple[str, ...],
    progress: Callable[[int], None] | None = None,
) -> SiteData:
    """Validate the manifest, read the listed cines and build tensors for ``splits``.

    Results are cached in memory per (manifest content, task, profile, splits), so a Flower client
    that handles several messages reads its DICOM files once.

    Raises
    ------
    DataError
        Manifest or image problems, naming file, row and column.
    """
    task = get_task(task_name)
    manifest = validated_manifest(Path(manifest_path), task_name)
    key = (manifest.sha256, task_name, profile, splits)
    if key in _CACHE:
        return _CACHE[key]
    data = _build(manifest, task, profile, splits, progress)
    _CACHE[key] = data
    return data


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


def _pairs(manifest: Manifest, splits: tuple[str, ...], size: int) -> SiteData:
    """The T0/T1 ultrasound pairs with their liver masks (aclf_us); ``clinical`` holds the raw
    age and MELD for the Cox models, ``survival["os"]`` the survival time (days) and event."""
    from hcc_fl.client.longitudinal import load_pairs

    pairs = load_pairs(manifest.path, splits, size)
    return SiteData(pairs.images, pairs.clinical, pairs.label, pairs.manifest_sha256,
                    {"os": (pairs.os_time, pairs.os_event)}, masks=pairs.masks)


def _build(
    manifest: Manifest,
    task: TaskSpec,
    profile: str,
    splits: tuple[str, ...],
    progress: Callable[[int], None] | None,
) -> SiteData:
    frames, size = input_shape(task.name, profile)
    if task.name == "aclf_us":
        return _pairs(manifest, splits, size)
    rows = [(i + 2, r) for i, r in enumerate(manifest.rows) if r["split"] in splits]
    videos, clin, labels = [], [], []
    masks: list[np.ndarray | None] = []
    for line, row in rows:
        if task.name == "phcc_mri":  # 4-phase DCE-MRI patch through the lesion centre
            patch, mask = _mri_patch(manifest, line, row, size)
            videos.append(patch)
            masks.append(mask)
        elif frames == 0:  # still images (er_ceus): one channel per image
            videos.append(_stills(manifest, line, row, size))
        else:
            videos.append(_clip(manifest, line, row, frames, size))
        clin.append(clinical_vector(row, task.clinical))
        labels.append(float(row[task.label]))
        if progress:
            progress(1)
    if not rows:
        raise DataError.single(manifest.path, f"no rows in split(s) {', '.join(splits)}",
                               column="split")
    survival: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for t_col, e_col in task.survival_endpoints:
        values = [(r.get(t_col, ""), r.get(e_col, "")) for _, r in rows]
        if all(t != "" and e != "" for t, e in values):  # an endpoint is used only when complete
            survival[t_col.removesuffix("_time")] = (
                np.array([float(t) for t, _ in values]), np.array([float(e) for _, e in values])
            )
    have_masks = bool(masks) and all(m is not None for m in masks)
    return SiteData(
        torch.from_numpy(np.stack(videos)),
        torch.tensor(clin, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.float32),
        manifest.sha256,
        survival,
        masks=torch.from_numpy(np.stack([m for m in masks if m is not None])) if have_masks
        else None,
    )
