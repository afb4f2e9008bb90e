"""T0/T1 ultrasound pairs with their liver masks for the Siamese U-Net of task ``aclf_us``.

Each manifest row gives two B-mode DICOMs (``us_t0``, ``us_t1``) and two liver masks
(``liver_mask_t0``, ``liver_mask_t1``). Images are resized (area interpolation) and the pair is
standardised jointly (one mean and SD over both images, so a global darkening from T0 to T1, such
as ascites, is kept); masks are resized with nearest neighbour. Pixel data never leaves the site.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from hcc_fl.client.io import crop_resize, read_image, read_mask, standardise
from hcc_fl.client.manifest import Manifest, validated_manifest
from hcc_fl.shared.errors import DataError, DataIssue
from hcc_fl.shared.tasks import get_task

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
TASK = "aclf_us"
PAIRS = (("us_t0", "liver_mask_t0"), ("us_t1", "liver_mask_t1"))
CLINICAL = ("age", "meld")


@dataclass(frozen=True)
class PairData:
    """One site's image pairs for some splits (N patients, side S).

    ``images`` (N, 2, S, S) float32, T0 then T1, standardised per pair; ``masks`` (N, 2, S, S)
    float32 in {0, 1}; ``label`` (N,) float32 (``death_30d``); ``clinical`` (N, 2) float32
    (``age``, ``meld``); ``os_time`` and ``os_event`` (N,) float64; ``split`` the manifest split
    of each row.
    """

    images: Tensor
    masks: Tensor
    label: Tensor
    clinical: Tensor
    os_time: F64
    os_event: F64
    split: tuple[str, ...]
    manifest_sha256: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _cell_issues(manifest: Manifest, line: int, column: str, exc: DataError) -> list[DataIssue]:
    return [DataIssue(str(manifest.path), i.message + " (the file in this cell)", line, column)
            for i in exc.issues]


def pair_row(
    manifest: Manifest, line: int, row: dict[str, str], size: int
) -> tuple[F32, F32] | list[DataIssue]:
    """The (2, S, S) images and masks of one row, or the problems found in its four cells."""
    issues: list[DataIssue] = []
    images: list[F32] = []
    masks: list[F32] = []
    for image_col, mask_col in PAIRS:
        try:
            image = read_image(manifest.resolve(row[image_col]))
        except DataError as exc:
            issues += _cell_issues(manifest, line, image_col, exc)
            continue
        try:
            mask = read_mask(manifest.resolve(row[mask_col]), image.shape)
        except DataError as exc:
            issues += _cell_issues(manifest, line, mask_col, exc)
            continue
        images.append(crop_resize(image, None, size))
        small = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        masks.append(small.astype(np.float32))
    if issues:
        return issues
    return standardise(np.stack(images)), np.stack(masks)


def load_pairs(manifest_path: str | Path, splits: tuple[str, ...], size: int) -> PairData:
    """Read the T0/T1 ultrasound pairs and liver masks of the rows in ``splits``.

    Parameters
    ----------
    manifest_path : str or Path
        The site's ``manifest.csv``, validated for task ``aclf_us`` (cached until it changes).
    splits : tuple of str
        Manifest splits to load, e.g. ``("train",)``.
    size : int
        Square side in pixels of the returned images and masks.

    Returns
    -------
    PairData

    Raises
    ------
    DataError
        Every problem found, each naming the manifest file, line and column: manifest problems,
        no rows in ``splits``, unreadable or missing images or masks, empty masks, or a mask whose
        size differs from its image's.
    ValueError
        ``size`` below 1.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    task = get_task(TASK)
    manifest = validated_manifest(Path(manifest_path), TASK)
    rows = [(i + 2, r) for i, r in enumerate(manifest.rows) if r["split"] in splits]
    if not rows:
        raise DataError.single(manifest.path, f"no rows in split(s) {', '.join(splits)}",
                               column="split")
    issues: list[DataIssue] = []
    images: list[F32] = []
    masks: list[F32] = []
    for line, row in rows:
        found = pair_row(manifest, line, row, size)
        if isinstance(found, list):
            issues += found
            continue
        images.append(found[0])
        masks.append(found[1])
    if issues:
        raise DataError(issues)
    out = PairData(
        images=torch.from_numpy(np.stack(images)),
        masks=torch.from_numpy(np.stack(masks)),
        label=torch.tensor([float(r[task.label]) for _, r in rows], dtype=torch.float32),
        clinical=torch.tensor([[float(r[c]) for c in CLINICAL] for _, r in rows],
                              dtype=torch.float32),
        os_time=np.array([float(r["os_time"]) for _, r in rows], dtype=np.float64),
        os_event=np.array([float(r["os_event"]) for _, r in rows], dtype=np.float64),
        split=tuple(r["split"] for _, r in rows),
        manifest_sha256=manifest.sha256,
    )
    log.debug("longitudinal pairs: %d patients at %dx%d", len(out), size, size)
    return out


__all__ = ["CLINICAL", "PAIRS", "PairData", "load_pairs", "pair_row"]
