"""Manifest validation: run before any training and as ``hcc-fl-client check-data``.

Every problem is reported with the file, the CSV line and the column. All problems are collected
(not just the first), so a site can fix its export in one pass. Values of identifying columns are
never echoed.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hcc_fl.client.io import VIDEO_SUFFIXES, read_dicom_header
from hcc_fl.shared.errors import DataError, DataIssue
from hcc_fl.shared.tasks import Column, TaskSpec, get_task

IDENTIFYING = {"patient_id"}
MAX_ISSUES = 200


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: rows as dicts of strings, with paths resolved against ``root``."""

    path: Path
    root: Path
    rows: tuple[dict[str, str], ...]
    sha256: str

    def resolve(self, value: str) -> Path:
        """Resolve a path column value relative to the manifest's folder."""
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    def rows_in(self, splits: tuple[str, ...]) -> list[dict[str, str]]:
        """Rows whose ``split`` is one of ``splits``."""
        return [r for r in self.rows if r["split"] in splits]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (used to key caches and, later, the privacy ledger)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_value(
    col: Column, raw: str, line: int, manifest: Path, root: Path, check_files: bool
) -> DataIssue | None:
    shown = "<hidden>" if col.name in IDENTIFYING else repr(raw)

    def issue(msg: str) -> DataIssue:
        return DataIssue(str(manifest), msg, line, col.name)

    if raw == "":
        return issue("value is missing") if col.required else None
    if col.kind in ("int", "float"):
        try:
            value = float(raw)
        except ValueError:
            return issue(f"expected a number, got {shown}")
        if not np.isfinite(value):
            return issue(f"expected a finite number, got {shown}")
        if col.kind == "int" and value != int(value):
            return issue(f"expected an integer, got {shown}")
        if col.lo is not None and value < col.lo:
            return issue(f"value {shown} is below the allowed minimum {col.lo:g}")
        if col.hi is not None and value > col.hi:
            return issue(f"value {shown} is above the allowed maximum {col.hi:g}")
    elif col.kind == "binary":
        if raw not in ("0", "1"):
            return issue(f"expected 0 or 1, got {shown}")
    elif col.kind == "choice":
        if raw not in col.choices:
            return issue(f"expected one of {', '.join(col.choices)}, got {shown}")
    elif col.kind in ("dicom", "dicom_dir", "cine", "mask") and check_files:
        path = Path(raw) if Path(raw).is_absolute() else root / raw
        if col.kind == "dicom_dir":
            if not path.is_dir():
                return issue("folder not found (the path in this cell)")
            files = sorted(p for p in path.iterdir() if p.is_file())
            if not files:
                return issue("folder has no files (the path in this cell)")
            path = files[0]
        elif not path.is_file():
            return issue("file not found (the path in this cell)")
        if col.kind == "cine" and path.suffix.lower() in VIDEO_SUFFIXES:
            return None
        if col.kind == "mask":
            return None
        try:
            ds = read_dicom_header(path)
        except DataError as exc:
            return issue(exc.issues[0].message + " (the file in this cell)")
        if col.modality and str(ds.get("Modality", "")) != col.modality:
            return issue(
                f"expected Modality {col.modality}, found {ds.get('Modality', 'none')!s} in the "
                "file in this cell"
            )
    return None


def validate_manifest(
    path: str | Path,
    task: TaskSpec,
    splits: tuple[str, ...] | None = None,
    check_files: bool = True,
) -> Manifest:
    """Validate a site manifest for ``task`` and return it.

    Parameters
    ----------
    path : str or Path
        The site's ``manifest.csv``; relative file paths in it are resolved against its folder.
    task : TaskSpec
        The task whose columns are checked (types, ranges, label values, files, DICOM Modality).
    splits : tuple of str, optional
        When given, at least one row must be in one of these splits.
    check_files : bool
        Also check that referenced files exist and carry the expected Modality tag.

    Raises
    ------
    DataError
        With one issue per problem: file, CSV line (header = line 1) and column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError.single(path, "manifest file not found")
    issues: list[DataIssue] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError.single(path, f"not a readable CSV file ({exc})") from exc
    missing = [c.name for c in task.columns if c.required and c.name not in header]
    if missing:
        raise DataError.single(
            path, f"missing required column(s) for task {task.name}: {', '.join(missing)}", row=1
        )
    present = [c for c in task.columns if c.name in header]
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        line = i + 2
        if None in row:
            issues.append(DataIssue(str(path), "row has more fields than the header", line))
            continue
        for col in present:
            raw = (row.get(col.name) or "").strip()
            found = _check_value(col, raw, line, path, path.parent, check_files)
            if found:
                issues.append(found)
        pid = (row.get("patient_id") or "").strip()
        if pid:
            if pid in seen:
                issues.append(DataIssue(
                    str(path), f"duplicate patient_id (first on line {seen[pid]})", line,
                    "patient_id",
                ))
            seen[pid] = line
        if len(issues) >= MAX_ISSUES:
            break
    if not rows:
        issues.append(DataIssue(str(path), "manifest has no rows"))
    if splits and not issues and not any(r["split"].strip() in splits for r in rows):
        issues.append(DataIssue(str(path), f"no rows in split(s) {', '.join(splits)}",
                                column="split"))
    if issues:
        raise DataError(issues)
    clean = tuple({k: (v or "").strip() for k, v in r.items()} for r in rows)
    return Manifest(path, path.parent, clean, file_sha256(path))


_MANIFESTS: dict[tuple[str, int, int, str], Manifest] = {}


def validated_manifest(path: Path, task_name: str) -> Manifest:
    """The validated manifest, re-validated only when the file changed (a federated fit asks
    for the same rows dozens of times)."""
    st = path.stat() if path.is_file() else None
    key = (str(path.resolve()), st.st_mtime_ns if st else 0, st.st_size if st else 0, task_name)
    if st is None or key not in _MANIFESTS:
        _MANIFESTS[key] = validate_manifest(path, get_task(task_name))
    return _MANIFESTS[key]
