"""Per-patient feature blocks for the tabular models, computed where the images are.

* ``tic``: the CEUS perfusion analysis (:func:`hcc_fl.shared.perfusion.tic_feature_vector`) of
  the lesion ROI (``ceus_lesion_mask``) and the liver reference ring, on intensities linearised
  with the site's compression law (``dr_db``, ``gain_db``, ``gamma``) - the R-TIC input.
* ``bmode``: radiomics (first-order, GLCM, GLRLM; :mod:`hcc_fl.shared.radiomics`) of the B-mode
  lesion ROI - the R-BMode input.
* ``radiomics``: the same features on the B-mode, arterial- and portal-phase images, prefixed
  by the image (seed 003's radiomics score).

Feature matrices never leave the site: the federated models exchange sums and coefficients only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from hcc_fl.client.io import read_cine, read_image, read_mask
from hcc_fl.client.manifest import Manifest, validated_manifest
from hcc_fl.shared.errors import DataError, DataIssue
from hcc_fl.shared.perfusion import tic_feature_names, tic_feature_vector
from hcc_fl.shared.radiomics import radiomics_features
from hcc_fl.shared.tasks import get_task

log = logging.getLogger(__name__)
F64 = npt.NDArray[np.float64]
BLOCKS = ("tic", "bmode", "radiomics")
RADIOMICS_IMAGES = ("bmode", "ceus_ap", "ceus_pp")


@dataclass(frozen=True)
class FeatureBlock:
    """One site's feature matrix for some splits: ``X`` (n, p) with NaN for missing values,
    the outcome ``y`` (n,), the manifest ``split`` of each row and the feature ``names``."""

    X: F64
    y: F64
    split: tuple[str, ...]
    names: tuple[str, ...]
    manifest_sha256: str


_CACHE: dict[tuple[str, str, str, tuple[str, ...]], FeatureBlock] = {}


def _cell_error(manifest: Manifest, line: int, column: str, exc: DataError) -> DataError:
    return DataError([DataIssue(str(manifest.path), i.message + " (the file in this cell)", line,
                                column) for i in exc.issues])


def _float(row: dict[str, str], key: str, default: float) -> float:
    raw = row.get(key, "")
    return float(raw) if raw not in ("", None) else default


def _tic_row(manifest: Manifest, line: int, row: dict[str, str]) -> dict[str, float]:
    try:
        cine = read_cine(manifest.resolve(row["ceus_cine"]))
    except DataError as exc:
        raise _cell_error(manifest, line, "ceus_cine", exc) from exc
    try:
        mask = read_mask(manifest.resolve(row["ceus_lesion_mask"]), cine.frames.shape[1:])
    except DataError as exc:
        raise _cell_error(manifest, line, "ceus_lesion_mask", exc) from exc
    return tic_feature_vector(cine.frames, cine.times, mask, None, _float(row, "dr_db", 40.0),
                              _float(row, "gain_db", 0.0), gamma=_float(row, "gamma", 1.0))


def _radiomics_row(manifest: Manifest, line: int, row: dict[str, str],
                   images: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for column in images:
        try:
            image = read_image(manifest.resolve(row[column]))
        except DataError as exc:
            raise _cell_error(manifest, line, column, exc) from exc
        try:
            mask = read_mask(manifest.resolve(row["ceus_lesion_mask"]), image.shape)
        except DataError as exc:
            raise _cell_error(manifest, line, "ceus_lesion_mask", exc) from exc
        feats = radiomics_features(image.astype(np.float64), mask)
        out.update({f"{column}_{k}": v for k, v in feats.items()})
    return out


def feature_block(
    manifest_path: str | Path, task_name: str, block: str, splits: tuple[str, ...],
    progress: Callable[[int], None] | None = None,
) -> FeatureBlock:
    """Compute (or fetch from the in-memory cache) feature block ``block`` of a site.

    Raises
    ------
    DataError
        Manifest, image or mask problems, naming the file, line and column.
    ValueError
        Unknown block.
    """
    if block not in BLOCKS:
        raise ValueError(f"unknown feature block '{block}'; known: {', '.join(BLOCKS)}")
    task = get_task(task_name)
    manifest = validated_manifest(Path(manifest_path), task_name)
    key = (manifest.sha256, task_name, block, splits)
    if key in _CACHE:
        return _CACHE[key]
    rows = [(i + 2, r) for i, r in enumerate(manifest.rows) if r["split"] in splits]
    if not rows:
        raise DataError.single(manifest.path, f"no rows in split(s) {', '.join(splits)}",
                               column="split")
    names: list[str] | None = tic_feature_names() if block == "tic" else None
    values = []
    for line, row in rows:
        if block == "tic":
            feats = _tic_row(manifest, line, row)
        else:
            feats = _radiomics_row(manifest, line, row,
                                   ("bmode",) if block == "bmode" else RADIOMICS_IMAGES)
        if names is None:
            names = sorted(feats)
        values.append([feats.get(n, np.nan) for n in names])
        if progress:
            progress(1)
    X = np.asarray(values, dtype=np.float64)
    X[~np.isfinite(X)] = np.nan
    out = FeatureBlock(X, np.array([float(r[task.label]) for _, r in rows]),
                       tuple(r["split"] for _, r in rows), tuple(names or ()), manifest.sha256)
    _CACHE[key] = out
    log.debug("feature block %s: %d patients x %d features (%d missing values)", block,
             X.shape[0], X.shape[1], int(np.isnan(X).sum()))
    return out
