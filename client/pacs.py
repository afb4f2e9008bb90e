"""Build a site's export from the hospital's PACS: ``hcc-fl-client pull``.

From a cohort CSV (pseudonymous ``patient_id``, ``study_uid`` or ``accession_number``, the task's
clinical columns, label and split) and the ``pacs:`` section of SITE.yaml, find each study, pick
the series the task needs from their tags (:data:`DEFAULT_RULES`, the DCE-MRI phases by
:func:`hcc_fl.client.mri.group_phases`, with a per-task override table in SITE.yaml), retrieve
them, and write the export layout of ``docs/data-format.md`` with a manifest that
``check-data`` accepts.

Safety:

* resumable: every instance is written to a temporary file and renamed into place, then recorded
  in a journal (SOPInstanceUID, path, size) in the site's state folder; a new run keeps what the
  journal and the file agree on and fetches the rest;
* an existing export (a ``manifest.csv`` in the export folder, or files the journal does not
  know) is never overwritten without ``force``;
* the mapping from pseudonymous ID to accession number and UIDs stays in the state folder
  (mode 0600); logs at the default level, the per-patient table and the manifest carry only
  pseudonymous IDs, column names and counts.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from hcc_fl.client.manifest import _check_value, validate_manifest
from hcc_fl.client.pacs_config import PacsConfig
from hcc_fl.client.pacs_net import (
    Backend,
    PacsError,
    SeriesInfo,
    dataset_bytes,
    make_backend,
)
from hcc_fl.shared.errors import DataError, DataIssue
from hcc_fl.shared.tasks import Column, TaskSpec

log = logging.getLogger(__name__)

STUDY_COLUMNS = ("study_uid", "accession_number")
IMAGE_KINDS = ("cine", "dicom", "dicom_dir")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MR_PHASE_COLUMNS = {"mr_pre_dir": "pre", "mr_art_dir": "art", "mr_pv_dir": "pv",
                    "mr_del_dir": "del"}

# Built-in series rules: a regular expression searched (case-insensitive) in the
# SeriesDescription after every non-alphanumeric character is turned into a space. On top of
# it a 'cine' column needs a multi-frame instance, a 'dicom' column one single-frame instance,
# and both the column's Modality. The DCE-MRI phases use the MR reader's own rules.
DEFAULT_RULES: dict[str, str] = {
    "ceus_cine": r"\b(ceus|contrast|cine|cps|cadence|sonovue|cnti|loop)\b",
    "bmode": r"\b(b ?mode|2d|grey ?scale|gray ?scale|fundamental)\b",
    "ceus_ap": r"\b(ap|arterial|art)\b",
    "ceus_pp": r"\b(pp|pvp|portal|pv|venous)\b",
    "us_t0": r"\b(t0|baseline|admission)\b",
    "us_t1": r"\b(t1|follow ?up|day ?5)\b",
}


# --------------------------------------------------------------------------- cohort


@dataclass(frozen=True)
class CohortRow:
    line: int
    patient_id: str
    study_uid: str | None
    accession: str | None
    values: dict[str, str]


def read_cohort(path: Path, task: TaskSpec) -> list[CohortRow]:
    """Read and check the cohort CSV; every problem names the file, line and column (never an
    identifier's value)."""
    if not path.is_file():
        raise DataError.single(path, "cohort file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            raw_rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError.single(path, f"not a readable CSV file ({exc})") from exc
    needed = [c.name for c in task.columns
              if c.required and c.kind not in IMAGE_KINDS and c.kind != "mask"]
    missing = [c for c in needed if c not in header]
    if not any(c in header for c in STUDY_COLUMNS):
        missing.append(" or ".join(STUDY_COLUMNS))
    masks = [c.name for c in task.columns if c.kind == "mask" and c.required]
    missing += [c for c in masks if c not in header]
    if missing:
        raise DataError.single(path, f"missing column(s) for task {task.name}: "
                               f"{', '.join(missing)}", row=1)
    issues: list[DataIssue] = []
    rows: list[CohortRow] = []
    seen: dict[str, int] = {}
    checked = [c for c in task.columns if c.name in header and c.kind not in IMAGE_KINDS]
    for i, r in enumerate(raw_rows):
        line = i + 2
        if None in r:
            issues.append(DataIssue(str(path), "row has more fields than the header", line))
            continue
        values = {k: (v or "").strip() for k, v in r.items()}
        pid = values.get("patient_id", "")
        if not SAFE_ID.match(pid):
            issues.append(DataIssue(str(path), "must be a pseudonymous ID of letters, digits, "
                                    "'.', '_' or '-' (at most 64)", line, "patient_id"))
        elif pid in seen:
            issues.append(DataIssue(str(path), f"duplicate patient_id (first on line "
                                    f"{seen[pid]})", line, "patient_id"))
        seen.setdefault(pid, line)
        uid, acc = values.get("study_uid") or None, values.get("accession_number") or None
        if not uid and not acc:
            issues.append(DataIssue(str(path), "needs a study_uid or an accession_number",
                                    line, "study_uid"))
        if uid and not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid):
            issues.append(DataIssue(str(path), "not a DICOM UID (digits and dots)", line,
                                    "study_uid"))
        for col in checked:
            if col.kind == "mask":
                value = values.get(col.name, "")
                if value and not _resolve(path.parent, value).is_file():
                    issues.append(DataIssue(str(path), "mask file not found (the path in "
                                            "this cell)", line, col.name))
                elif not value and col.required:
                    issues.append(DataIssue(str(path), "value is missing", line, col.name))
                continue
            found = _check_value(col, values.get(col.name, ""), line, path, path.parent, False)
            if found:
                issues.append(found)
        rows.append(CohortRow(line, pid, uid, acc, values))
    if not raw_rows:
        issues.append(DataIssue(str(path), "cohort has no rows"))
    if issues:
        raise DataError(issues)
    return rows


def _resolve(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


# --------------------------------------------------------------------------- series selection


@dataclass
class Pick:
    """What a column gets: series and the instances (in file order) or why nothing."""

    column: str
    series: SeriesInfo | None = None
    sop_uids: list[str] = field(default_factory=list)
    reason: str = ""


def _words(description: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", description.lower()).strip()


def select_series(task: TaskSpec, series: Sequence[SeriesInfo],
                  overrides: dict[str, str] | None = None) -> dict[str, Pick]:
    """Pick, for every image column of ``task``, the series (and instances) it needs."""
    overrides = overrides or {}
    picks: dict[str, Pick] = {}
    phase_cols = [c for c in task.columns if c.name in MR_PHASE_COLUMNS]
    for col in task.columns:
        if col.kind not in IMAGE_KINDS or col.name in MR_PHASE_COLUMNS:
            continue
        picks[col.name] = _pick_one(col, series, overrides.get(col.name))
    if phase_cols:
        picks.update(_pick_phases(phase_cols, series, overrides))
    return picks


def _pick_one(col: Column, series: Sequence[SeriesInfo], override: str | None) -> Pick:
    rule = override or DEFAULT_RULES.get(col.name, re.escape(col.name))
    rx = re.compile(rule, re.IGNORECASE)
    shaped = [s for s in series if (not col.modality or s.modality == col.modality) and (
        (col.kind == "cine" and s.max_frames > 1)
        or (col.kind == "dicom" and s.max_frames <= 1 and len(s.instances) == 1))]
    named = [s for s in shaped if rx.search(_words(s.description))]
    if col.kind == "cine" and not named and len(shaped) == 1 and override is None:
        named = shaped  # the study's only multi-frame series of that modality
    what = "multi-frame" if col.kind == "cine" else "single-image"
    if not named:
        return Pick(col.name, reason=f"no {what} {col.modality or ''} series matches the rule "
                                     f"for {col.name} ({len(series)} series in the study)")
    if len(named) > 1:
        return Pick(col.name, reason=f"{len(named)} {what} series match the rule for "
                                     f"{col.name}: add a series_rules override")
    s = named[0]
    inst = max(s.instances, key=lambda i: i.frames) if col.kind == "cine" else s.instances[0]
    if col.kind == "cine" and len(s.instances) > 1:
        log.debug("%s: series has %d instances; taking the longest", col.name, len(s.instances))
    return Pick(col.name, s, [inst.sop_uid])


def _pick_phases(cols: Sequence[Column], series: Sequence[SeriesInfo],
                 overrides: dict[str, str]) -> dict[str, Pick]:
    from hcc_fl.client.mri import SeriesTags, group_phases

    mr = [s for s in series if s.modality == "MR" and s.instances]
    ordered = {s.uid: sorted(s.instances, key=lambda i: (i.number or 0, i.sop_uid)) for s in mr}
    out: dict[str, Pick] = {}
    if any(c.name in overrides for c in cols):
        for c in cols:
            rx = re.compile(overrides.get(c.name, r"(?!)"), re.IGNORECASE)
            hits = [s for s in mr if rx.search(_words(s.description))]
            out[c.name] = (Pick(c.name, hits[0], [i.sop_uid for i in ordered[hits[0].uid]])
                           if len(hits) == 1 else
                           Pick(c.name, reason=f"{len(hits)} MR series match the override for "
                                               f"{c.name}"))
        return out
    tags = []
    for s in mr:
        first = ordered[s.uid][0]
        tags.append(SeriesTags(s.uid, s.description, s.number, first.temporal_position,
                               first.trigger_time_ms, first.acquisition_time_s, None, ()))
    try:
        phases = group_phases(tags, source="study")
    except DataError as exc:
        log.debug("DCE-MRI phases: %s", exc)
        return {c.name: Pick(c.name, reason=f"the four DCE-MRI phases cannot be assigned from "
                                            f"the tags of {len(mr)} MR series")
                for c in cols}
    by_uid = {s.uid: s for s in mr}
    for c in cols:
        chosen = by_uid[phases[MR_PHASE_COLUMNS[c.name]].series_uid]
        out[c.name] = Pick(c.name, chosen, [i.sop_uid for i in ordered[chosen.uid]])
    return out


def destination(pid: str, column: Column, index: int) -> str:
    """Export path (relative to the export folder) of one instance; no UID in it."""
    if column.kind == "dicom_dir":
        return f"patients/{pid}/{column.name.removesuffix('_dir')}/{index + 1:04d}.dcm"
    return f"patients/{pid}/{column.name}.dcm"


# --------------------------------------------------------------------------- state


def _private_write(path: Path, text: str) -> None:
    """Write a file only the site's user can read, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class Journal:
    """Instances already in the export: ``rel path -> (SOPInstanceUID, size)``, appended line by
    line (fsync'd) in the state folder, mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                    self.entries[e["path"]] = (e["sop"], int(e["size"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill: its file is fetched again
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._fh = os.fdopen(fd, "a")

    def record(self, rel: str, sop: str, size: int) -> None:
        with self._lock:
            self.entries[rel] = (sop, size)
            self._fh.write(json.dumps({"path": rel, "sop": sop, "size": size}) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def verified(export: Path, rel: str, sop: str, journal: Journal) -> bool:
    """The file at ``rel`` is the instance ``sop`` as recorded (size and SOPInstanceUID)."""
    entry = journal.entries.get(rel)
    path = export / rel
    if entry is None or entry[0] != sop or not path.is_file():
        return False
    if path.stat().st_size != entry[1]:
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:  # noqa: BLE001 - any unreadable file is simply fetched again
        return False
    return str(ds.get("SOPInstanceUID", "")) == sop


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` next to ``path`` and rename it into place (a kill leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RateLimit:
    """Keep the average retrieval rate under ``mb_per_s`` (None: no cap)."""

    def __init__(self, mb_per_s: float | None) -> None:
        self.rate = None if mb_per_s is None else mb_per_s * 1e6
        self.start = time.monotonic()
        self.total = 0
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if self.rate is None:
            return
        with self.lock:
            self.total += nbytes
            wait = self.total / self.rate - (time.monotonic() - self.start)
        if wait > 0:
            time.sleep(wait)


# --------------------------------------------------------------------------- pull


@dataclass
class PatientResult:
    """The outcome for one patient (pseudonymous ID only)."""

    patient_id: str
    found: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    files: int = 0
    fetched: int = 0

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass
class PullResult:
    patients: list[PatientResult]
    manifest: Path | None
    studies: int
    fetched_files: int
    fetched_bytes: int
    seconds: float


class ExportExists(DataError):
    """The export folder holds an export this pull would overwrite."""


def _check_export(export: Path, manifest: Path, journal_path: Path, force: bool) -> None:
    """Refuse to write over an export unless ``force``: a folder with a manifest, or one with
    files while no pull of this state folder is in progress there (no journal)."""
    if force:
        return
    if manifest.exists():
        raise ExportExists.single(manifest, "an export already exists here: give --force to "
                                  "pull again over it (files the journal verifies are kept)")
    if journal_path.is_file():
        return  # an interrupted pull: its files are verified one by one, the rest refetched
    if export.is_dir():
        files = [p for p in export.rglob("*") if p.is_file()]
        if files:
            raise ExportExists.single(export, f"the export folder holds {len(files)} file(s) "
                                      "that no pull of this site wrote: give --force to pull "
                                      "into it anyway, or choose an empty folder")


def pull(
    cohort: Path,
    task: TaskSpec,
    cfg: PacsConfig,
    manifest: Path,
    state: Path,
    force: bool = False,
    progress: bool = True,
) -> PullResult:
    """Pull the cohort's studies into the export folder of ``manifest``.

    Returns the per-patient outcome; the manifest (rows of the complete patients, in cohort
    order) is written only when at least one patient is complete and it passes
    :func:`~hcc_fl.client.manifest.validate_manifest`.

    Raises
    ------
    DataError
        Bad cohort or an existing export (without ``force``); names file, line and column.
    PacsError
        The PACS cannot be reached, refuses us, or answers with an error.
    """
    from tqdm import tqdm

    t0 = time.monotonic()
    rows = read_cohort(cohort, task)
    export = manifest.parent
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    journal_path = state / "pull-journal.jsonl"
    _check_export(export, manifest, journal_path, force)
    export.mkdir(parents=True, exist_ok=True)
    for part in export.rglob("*.part"):
        part.unlink()  # left by a killed pull
    backend: Backend = make_backend(cfg)
    backend.check()
    log.info("pull: %d patient(s) for task %s from the PACS (%s)", len(rows), task.name,
             cfg.protocol)
    columns = {c.name: c for c in task.columns}
    overrides = cfg.series_rules.get(task.name, {})
    modalities = frozenset(c.modality for c in task.columns
                           if c.kind in IMAGE_KINDS and c.modality)
    results = {r.patient_id: PatientResult(r.patient_id) for r in rows}
    mapping: dict[str, Any] = {}
    plans: dict[str, list[tuple[str, SeriesInfo, str, str]]] = {}
    study_of: dict[str, str] = {}

    def search(row: CohortRow) -> None:
        res = results[row.patient_id]
        studies = backend.find_studies(row.study_uid, row.accession)
        by = "StudyInstanceUID" if row.study_uid else "accession number"
        if not studies:
            res.missing["study"] = f"no study with this {by} in the PACS"
            return
        if len(studies) > 1:
            res.missing["study"] = f"{len(studies)} studies match this {by}; give study_uid"
            return
        study_of[row.patient_id] = studies[0]
        picks = select_series(task, backend.series(studies[0], modalities), overrides)
        plan = []
        for name, pick in picks.items():
            if pick.series is None:
                res.missing[name] = pick.reason
                continue
            res.found.append(name)
            for k, sop in enumerate(pick.sop_uids):
                plan.append((name, pick.series, sop, destination(row.patient_id,
                                                                 columns[name], k)))
        plans[row.patient_id] = plan
        mapping[row.patient_id] = {
            "study_uid": studies[0], "cohort_study_uid": row.study_uid,
            "accession_number": row.accession,
            "series": {n: p.series.uid for n, p in picks.items() if p.series is not None}}

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        for fut in [pool.submit(search, r) for r in rows]:
            fut.result()
    log.info("pull: searched %d stud(ies) in %.1f s", len(study_of), time.monotonic() - t0)
    _private_write(state / "pull-map.json", json.dumps(mapping, indent=1, sort_keys=True))
    total = sum(len(p) for p in plans.values())
    journal = Journal(journal_path)
    limiter = RateLimit(cfg.max_mb_per_s)
    counters = {"files": 0, "bytes": 0}
    lock = threading.Lock()
    # a bar with ETA on a terminal (None: tqdm turns itself off when stderr is not one)
    bar = tqdm(total=total, unit="file", desc="pull", disable=True if not progress else None,
               dynamic_ncols=True)

    def fetch(pid: str) -> None:
        res = results[pid]
        plan = plans.get(pid, [])
        todo: dict[tuple[str, str], list[tuple[str, str]]] = {}
        planned = {rel for *_, rel in plan}
        for folder in {(export / rel).parent for *_, rel in plan if rel.count("/") > 2}:
            for stale in folder.glob("*.dcm") if folder.is_dir() else ():
                if stale.relative_to(export).as_posix() not in planned:
                    stale.unlink()  # a series folder holds exactly the series' instances
        for name, series, sop, rel in plan:
            res.files += 1
            if verified(export, rel, sop, journal):
                bar.update(1)
                continue
            todo.setdefault((name, series.uid), []).append((sop, rel))
        for (name, suid), items in todo.items():
            where = dict(items)

            def sink(sop: str, ds: Dataset, where: dict[str, str] = where) -> None:
                rel = where.get(sop)
                if rel is None:
                    return
                data = dataset_bytes(ds)
                atomic_write(export / rel, data)
                journal.record(rel, sop, len(data))
                with lock:
                    counters["files"] += 1
                    counters["bytes"] += len(data)
                res.fetched += 1
                bar.update(1)
                bar.set_postfix_str(f"{counters['bytes'] / 1e6:.1f} MB", refresh=False)
                limiter.add(len(data))

            backend.retrieve(study_of[pid], suid, [s for s, _ in items], sink)
            lost = [rel for sop, rel in items if not verified(export, rel, sop, journal)]
            if lost:
                res.missing[name] = (f"the PACS did not send {len(lost)} of {len(items)} "
                                     "instance(s)")
                if name in res.found:
                    res.found.remove(name)

    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            futures = [pool.submit(fetch, r.patient_id) for r in rows]
            for fut in futures:
                fut.result()
    finally:
        bar.close()
        journal.close()
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    for r in rows:
        _copy_masks(r, task, cohort.parent, export, results[r.patient_id])
    complete = [r for r in rows if results[r.patient_id].complete]
    written = _write_manifest(manifest, task, complete, columns) if complete else None
    out = PullResult([results[r.patient_id] for r in rows], written, len(study_of),
                     counters["files"], counters["bytes"], time.monotonic() - t0)
    log.info("pull: %d of %d patient(s) complete; %d file(s), %.1f MB fetched in %.1f s",
             len(complete), len(rows), out.fetched_files, out.fetched_bytes / 1e6, out.seconds)
    return out


def _copy_masks(row: CohortRow, task: TaskSpec, root: Path, export: Path,
                res: PatientResult) -> None:
    """Masks are drawn at the site, not stored in the PACS: the cohort CSV points at them and
    they are copied into the export next to the images."""
    for col in task.columns:
        value = row.values.get(col.name, "")
        if col.kind != "mask" or not value:
            continue
        src = _resolve(root, value)
        rel = f"patients/{row.patient_id}/{col.name}{src.suffix.lower()}"
        dst = export / rel
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            atomic_write(dst, src.read_bytes())
        res.found.append(col.name)
        row.values[f"__{col.name}"] = rel


def _write_manifest(path: Path, task: TaskSpec, rows: Sequence[CohortRow],
                    columns: dict[str, Column]) -> Path:
    """Write the manifest of the complete patients (atomically, after validating it)."""
    header = [c.name for c in task.columns if c.kind in IMAGE_KINDS or c.name in rows[0].values]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in rows:
            out = []
            for h in header:
                col = columns[h]
                if col.kind == "dicom_dir":
                    out.append(str(Path(destination(r.patient_id, col, 0)).parent))
                elif col.kind in IMAGE_KINDS:
                    out.append(destination(r.patient_id, col, 0))
                elif col.kind == "mask":
                    out.append(r.values.get(f"__{h}", ""))
                else:
                    out.append(r.values.get(h, ""))
            writer.writerow(out)
    try:
        validate_manifest(tmp, task)
    except DataError:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    return path


def format_table(result: PullResult) -> str:
    """The per-patient table: pseudonymous ID, status, found and missing columns."""
    lines = [f"{'patient_id':<16} {'status':<10} {'files':>5}  found / missing"]
    for p in result.patients:
        status = "complete" if p.complete else "MISSING"
        what = ", ".join(p.found) or "-"
        if p.missing:
            what += " | missing: " + "; ".join(f"{k}: {v}" for k, v in p.missing.items())
        lines.append(f"{p.patient_id:<16} {status:<10} {p.files:>5}  {what}")
    return "\n".join(lines)


__all__ = ["PacsError", "PullResult", "PatientResult", "pull", "select_series", "format_table",
           "read_cohort", "DEFAULT_RULES", "ExportExists"]
