"""Manifest validation: run before any training and as ``hcc-fl-client check-data``.

Every problem is reported with the file, the CSV line and the column. All problems are collected
(not just the first), so a site can fix its export in one pass. Cell values are never echoed (a
message says what is wrong with the cell, not what it holds); messages may name structural DICOM
header values (Modality, Rows, Columns, NumberOfFrames, SamplesPerPixel, BitsAllocated, the
transfer syntax) and image sizes.

With ``check_files`` every image a task uses is decoded once (after its declared size has been
checked against the site's limit, :mod:`hcc_fl.client.decode_check`) and the task's rules are
applied: a cine task's minimum frame count, the ROI inside the cine and non-empty, masks of their
image's size, and paths that stay inside the site's export folder (symlinks resolved) unless
another root is allowed.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hcc_fl.client.decode_check import MIN_CINE_FRAMES
from hcc_fl.client.io import VIDEO_SUFFIXES, read_cine, read_dicom_header, read_mask
from hcc_fl.shared.errors import DataError, DataIssue
from hcc_fl.shared.tasks import Column, TaskSpec, get_task

log = logging.getLogger(__name__)
IDENTIFYING = {"patient_id"}
MAX_ISSUES = 200
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ROI_COLUMNS = ("ceus_roi_x0", "ceus_roi_y0", "ceus_roi_x1", "ceus_roi_y1")
CINE_TASKS = ("ki67_ceus", "tace_ceus")  # tasks that use ``ceus_cine`` as a time series
#: Columns whose images (and masks) must share one height and width, per task.
SAME_SIZE: dict[str, tuple[tuple[str, ...], ...]] = {
    "tace_ceus": (("ceus_cine", "ceus_lesion_mask", "bmode"),),
    "er_ceus": (("bmode", "ceus_ap", "ceus_pp", "ceus_lesion_mask"),),
    "aclf_us": (("us_t0", "liver_mask_t0"), ("us_t1", "liver_mask_t1")),
}
_ALLOWED_ROOTS: tuple[Path, ...] = ()


def allow_roots(roots: tuple[Path, ...] | list[Path]) -> None:
    """Folders besides the manifest's own that this process's manifests may point into
    (``allowed_roots`` of SITE.yaml); symlinks are resolved before the comparison."""
    global _ALLOWED_ROOTS
    _ALLOWED_ROOTS = tuple(Path(r).resolve() for r in roots)


def allowed_roots() -> tuple[Path, ...]:
    """The folders set by :func:`allow_roots` in this process."""
    return _ALLOWED_ROOTS


def inside_roots(path: Path, root: Path, allowed: tuple[Path, ...] | None = None) -> bool:
    """Whether ``path`` (symlinks resolved) lies in ``root`` or one of the allowed roots."""
    real = path.resolve()
    return any(real.is_relative_to(r) for r in (root.resolve(), *(
        _ALLOWED_ROOTS if allowed is None else allowed)))


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
    col: Column, raw: str, line: int, manifest: Path, root: Path, check_files: bool,
    allowed: tuple[Path, ...] | None = None,
) -> DataIssue | None:
    """The cell-level rules (type, range, choice, path inside the export, file header)."""

    def issue(msg: str) -> DataIssue:
        return DataIssue(str(manifest), msg, line, col.name)

    if raw == "":
        return issue("value is missing") if col.required else None
    if CONTROL.search(raw):
        return issue("the cell holds a control character (NUL, tab, line break, ...)")
    if col.kind in ("int", "float"):
        try:
            value = float(raw)
        except ValueError:
            return issue("expected a number")
        if not np.isfinite(value):
            return issue("expected a finite number")
        if col.kind == "int" and value != int(value):
            return issue("expected an integer")
        if col.lo is not None and value < col.lo:
            return issue(f"value is below the allowed minimum {col.lo:g}")
        if col.hi is not None and value > col.hi:
            return issue(f"value is above the allowed maximum {col.hi:g}")
    elif col.kind == "binary":
        if raw not in ("0", "1"):
            return issue("expected 0 or 1")
    elif col.kind == "choice":
        if raw not in col.choices:
            return issue(f"expected one of {', '.join(col.choices)}")
    elif col.kind in ("dicom", "dicom_dir", "cine", "mask") and check_files:
        path = Path(raw) if Path(raw).is_absolute() else root / raw
        if not inside_roots(path, root, allowed):
            return issue("the path leaves the site's export folder (symlinks resolved); list "
                         "other folders under allowed_roots in SITE.yaml if this is intended")
        if col.kind == "dicom_dir":
            if not path.is_dir():
                return issue("folder not found (the path in this cell)")
            files = sorted(p for p in path.iterdir() if p.is_file())
            if not files:
                return issue("folder has no files (the path in this cell)")
            if not all(inside_roots(f, root, allowed) for f in files):
                return issue("a file in this folder links outside the site's export folder")
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


def _decode_row(manifest: Path, root: Path, line: int, row: dict[str, str], task: TaskSpec,
                columns: list[Column]) -> list[DataIssue]:
    """Decode every image of a row the task uses (size limit first) and apply the task's rules:
    minimum cine frames, the ROI inside the cine, masks and images of one size."""
    issues: list[DataIssue] = []
    sizes: dict[str, tuple[int, int]] = {}

    def issue(column: str, msg: str) -> None:
        issues.append(DataIssue(str(manifest), msg, line, column))

    def resolve(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else root / p

    for col in columns:
        raw = row[col.name]
        if not raw or col.kind == "dicom_dir" or (task.name == "phcc_mri" and col.kind == "mask"):
            continue  # phcc_mri: the series and its mask are read together below
        try:
            if col.kind == "mask":
                m = read_mask(resolve(raw))
                sizes[col.name] = (int(m.shape[0]), int(m.shape[1]))
                continue
            cine = read_cine(resolve(raw))
        except DataError as exc:
            for i in exc.issues:
                issue(col.name, i.message + " (the file in this cell)")
            continue
        t, h, w = cine.frames.shape
        sizes[col.name] = (h, w)
        if col.kind == "cine" and task.name in CINE_TASKS and t < MIN_CINE_FRAMES:
            issue(col.name, f"the cine has {t} frame(s); task {task.name} needs at least "
                            f"{MIN_CINE_FRAMES} (the file in this cell)")
        del cine
    if "ceus_cine" in sizes and all(c in row for c in ROI_COLUMNS):
        given = [c for c in ROI_COLUMNS if row[c] != ""]
        if given and len(given) == 4:
            x0, y0, x1, y1 = (int(float(row[c])) for c in ROI_COLUMNS)
            h, w = sizes["ceus_cine"]
            if x1 > w:
                issue("ceus_roi_x1", f"the ROI ends beyond the cine's width ({w} pixels)")
            if y1 > h:
                issue("ceus_roi_y1", f"the ROI ends beyond the cine's height ({h} pixels)")
    if task.name == "phcc_mri":
        from hcc_fl.client.mri import read_manifest_row

        mask = str(resolve(row["mr_lesion_mask"])) if row.get("mr_lesion_mask") else None
        try:
            read_manifest_row(root, row)
        except DataError as exc:
            for i in exc.issues:
                if i.file == mask:
                    issue("mr_lesion_mask", i.message + " (the file in this cell)")
                else:
                    issue("mr_pre_dir", i.message + " (the series in this row)")
        except ValueError:
            issue("mr_lesion_mask", "the lesion mask does not fit the series (the file in this "
                                    "cell)")
    for group in SAME_SIZE.get(task.name, ()):
        present = [c for c in group if c in sizes]
        for c in present[1:]:
            if sizes[c] != sizes[present[0]]:
                (h, w), (h0, w0) = sizes[c], sizes[present[0]]
                issue(c, f"the image is {w}x{h} but column '{present[0]}' is {w0}x{h0}; they "
                         "must be one size")
    return issues


def _roi_rules(manifest: Path, line: int, row: dict[str, str]) -> list[DataIssue]:
    """A ROI is all four corners or none, and is not empty or inverted."""
    if not all(c in row for c in ROI_COLUMNS):
        return []
    given = [c for c in ROI_COLUMNS if row[c] != ""]
    if not given:
        return []
    if len(given) < 4:
        missing = [c for c in ROI_COLUMNS if c not in given]
        return [DataIssue(str(manifest), "partial ROI: give all four of "
                          f"{', '.join(ROI_COLUMNS)} or none", line, missing[0])]
    try:
        x0, y0, x1, y1 = (float(row[c]) for c in ROI_COLUMNS)
    except ValueError:
        return []  # reported by the cell rules
    out = []
    if not x1 > x0:
        out.append(DataIssue(str(manifest), "the ROI is empty or inverted: ceus_roi_x1 must be "
                             "greater than ceus_roi_x0", line, "ceus_roi_x1"))
    if not y1 > y0:
        out.append(DataIssue(str(manifest), "the ROI is empty or inverted: ceus_roi_y1 must be "
                             "greater than ceus_roi_y0", line, "ceus_roi_y1"))
    return out


def _header_issues(path: Path, header: list[str]) -> list[DataIssue]:
    """Duplicate column names (the last would silently win) and control characters."""
    out = []
    for name, n in Counter(header).items():
        if n > 1:
            where = [str(i + 1) for i, h in enumerate(header) if h == name]
            out.append(DataIssue(str(path), f"column appears {n} times (fields "
                                 f"{', '.join(where)}); each column must appear once", 1,
                                 name if not CONTROL.search(name) else None))
    for i, name in enumerate(header):
        if CONTROL.search(name):
            out.append(DataIssue(str(path), f"header field {i + 1} holds a control character",
                                 1))
    return out


def class_issues(path: Path, task: TaskSpec, rows: list[dict[str, str]],
                 splits: tuple[str, ...]) -> list[DataIssue]:
    """Each of ``splits`` that has rows must hold both label classes."""
    out = []
    for split in splits:
        labels = {r.get(task.label, "") for r in rows if r.get("split") == split}
        if labels and not {"0", "1"} <= labels:
            out.append(DataIssue(str(path), f"split '{split}' holds only one class of label "
                                 f"'{task.label}'; AUC and the Youden threshold need both",
                                 column=task.label))
    return out


def validate_manifest(
    path: str | Path,
    task: TaskSpec,
    splits: tuple[str, ...] | None = None,
    check_files: bool = True,
    *,
    decode: bool = True,
    allowed_roots: tuple[Path, ...] | None = None,
    both_classes: tuple[str, ...] = (),
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
        Also check that referenced files exist inside the export folder (or an allowed root) and
        carry the expected Modality tag.
    decode : bool
        With ``check_files``: also decode every image (after the declared-size check) and apply
        the task's image rules (cine frames, ROI inside the cine, one size per row's images).
    allowed_roots : tuple of Path, optional
        Folders besides the manifest's own that paths may point into (default: those set by
        :func:`allow_roots`, i.e. SITE.yaml's ``allowed_roots``).
    both_classes : tuple of str
        Splits that must hold both label classes when they have rows.

    Raises
    ------
    DataError
        With one issue per problem: file, CSV line (header = line 1) and column; never a cell's
        value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError.single(path, "manifest file not found")
    issues: list[DataIssue] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            table = list(reader)
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise DataError.single(path, f"not a readable CSV file ({type(exc).__name__})") from exc
    header = [h.strip() for h in header]
    issues += _header_issues(path, header)
    missing = [c.name for c in task.columns if c.required and c.name not in header]
    if missing:
        issues.append(DataIssue(str(path), f"missing required column(s) for task {task.name}: "
                                f"{', '.join(missing)}", 1))
    if issues:
        raise DataError(issues)
    present = [c for c in task.columns if c.name in header]
    files = [c for c in present if c.kind in ("dicom", "dicom_dir", "cine", "mask")]
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for i, fields in enumerate(table):
        line = i + 2  # a quoted cell with a line break is caught as a control character
        if len(fields) > len(header):
            issues.append(DataIssue(str(path), "row has more fields than the header", line))
            continue
        row = {h: (fields[k].strip() if k < len(fields) else "") for k, h in enumerate(header)}
        rows.append(row)
        row_issues = []
        for col in present:
            found = _check_value(col, row[col.name], line, path, path.parent, check_files,
                                 allowed_roots)
            if found:
                row_issues.append(found)
        row_issues += _roi_rules(path, line, row)
        pid = row.get("patient_id", "")
        if pid and not CONTROL.search(pid):
            if pid in seen:
                row_issues.append(DataIssue(
                    str(path), f"duplicate patient_id (first on line {seen[pid]})", line,
                    "patient_id",
                ))
            seen[pid] = line
        bad = {x.column for x in row_issues}
        if check_files and decode and not (bad & {c.name for c in files} or bad & set(
                ROI_COLUMNS)):
            row_issues += _decode_row(path, path.parent, line, row, task, files)
        issues += row_issues
        if len(issues) >= MAX_ISSUES:
            issues.append(DataIssue(str(path), f"stopped after {MAX_ISSUES} problems"))
            break
    if not table:
        issues.append(DataIssue(str(path), "manifest has no rows"))
    if splits and not issues and not any(r["split"] in splits for r in rows):
        issues.append(DataIssue(str(path), f"no rows in split(s) {', '.join(splits)}",
                                column="split"))
    if not issues:
        issues += class_issues(path, task, rows, both_classes)
    if issues:
        raise DataError(issues)
    return Manifest(path, path.parent, tuple(rows), file_sha256(path))


_MANIFESTS: dict[tuple[str, int, int, str], Manifest] = {}


def validated_manifest(path: Path, task_name: str) -> Manifest:
    """The validated manifest, re-validated only when the file changed (a federated fit asks
    for the same rows dozens of times). Images are not decoded here: the readers that load them
    apply the same size limit and name the line and column of a failure."""
    st = path.stat() if path.is_file() else None
    key = (str(path.resolve()), st.st_mtime_ns if st else 0, st.st_size if st else 0, task_name)
    if st is None or key not in _MANIFESTS:
        _MANIFESTS[key] = validate_manifest(path, get_task(task_name), decode=False)
    return _MANIFESTS[key]
