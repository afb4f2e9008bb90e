"""Fuzzed site exports (issue 19): every mutant is either refused with located messages or
accepted and then loads (and, for a few, trains); no other exception, no allocation above the
declared limit, nothing outside the mutant's own folder changes.

The base export is written with the real DICOM writers (pydicom), a real mp4 (OpenCV) and real
PNG masks; images are thumbnails so 1,000 mutants run in 1.5-2.5 minutes on one core.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import shutil
import struct
import subprocess
import tracemalloc
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import RLELossless

from hcc_fl.client.data import _CACHE, load_site
from hcc_fl.client.decode_check import MIN_CINE_FRAMES, SizeLimits, active_limits, use_limits
from hcc_fl.client.manifest import _MANIFESTS, validate_manifest
from hcc_fl.client.train import TrainConfig, train_one_round
from hcc_fl.shared.dicom_write import StudyInfo, write_mr_series, write_us_cine, write_us_image
from hcc_fl.shared.errors import DataError
from hcc_fl.shared.models import build_model
from hcc_fl.shared.phantom import MANIFEST_COLUMNS
from hcc_fl.shared.tasks import TASKS
from tests.conftest import script

N_MUTANTS = 1000
SEED = 19
LIMIT = SizeLimits(8 << 20)  # the declared per-image limit of the fuzzed site: 8 MiB
SIDE, FRAMES, MR_SIDE = 32, MIN_CINE_FRAMES + 4, 16
TASK_NAMES = sorted(TASKS)
# Problems about the manifest as a whole (no line to name).
WHOLE_FILE = ("manifest has no rows", "no rows in split", "not a readable CSV",
              "stopped after", "holds only one class")


# ------------------------------------------------------------------------------- base export


def _write_site(site: Path, seed: int, n: int = 3) -> None:
    """A tiny site export with every column of the five tasks (real DICOM, PNG masks)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pid = f"Q{seed}{i:03d}"
        rel = Path("patients") / pid
        pdir = site / rel
        info = StudyInfo(pid, site.name, "Fuzz", seed)
        cine = rng.integers(0, 255, (FRAMES, SIDE, SIDE), dtype=np.uint8)
        write_us_cine(pdir / "ceus_cine.dcm", info, cine, fps=1.0, pixel_mm=0.5)
        for name in ("bmode", "ceus_ap", "ceus_pp", "us_t0", "us_t1"):
            write_us_image(pdir / f"{name}.dcm", info,
                           rng.integers(0, 255, (SIDE, SIDE), dtype=np.uint8), 0.5, name.upper())
        mask = np.zeros((SIDE, SIDE), np.uint8)
        mask[8:24, 8:24] = 255
        for name in ("ceus_lesion_mask", "liver_mask_t0", "liver_mask_t1"):
            cv2.imwrite(str(pdir / f"{name}.png"), mask)
        for j, phase in enumerate(("PRE", "ART", "PV", "DEL")):
            vol = rng.integers(100, 2000, (2, MR_SIDE, MR_SIDE)).astype(np.uint16)
            write_mr_series(pdir / "mr" / phase, info, vol, phase, j + 1, [0, 35, 70, 180][j],
                            1.5, 3.0)
        cv2.imwrite(str(pdir / "mr_lesion_mask.png"), mask[:MR_SIDE, :MR_SIDE])
        label = str(i % 2)
        row = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update({
            "patient_id": pid, "site": site.name, "split": "val" if i == n - 1 else "train",
            "ceus_cine": f"{rel}/ceus_cine.dcm", "ceus_roi_x0": "4", "ceus_roi_y0": "4",
            "ceus_roi_x1": "28", "ceus_roi_y1": "28",
            "ceus_lesion_mask": f"{rel}/ceus_lesion_mask.png", "bmode": f"{rel}/bmode.dcm",
            "ceus_ap": f"{rel}/ceus_ap.dcm", "ceus_pp": f"{rel}/ceus_pp.dcm",
            **{f"mr_{p.lower()}_dir": f"{rel}/mr/{p}" for p in ("PRE", "ART", "PV", "DEL")},
            "mr_lesion_mask": f"{rel}/mr_lesion_mask.png", "us_t0": f"{rel}/us_t0.dcm",
            "us_t1": f"{rel}/us_t1.dcm", "liver_mask_t0": f"{rel}/liver_mask_t0.png",
            "liver_mask_t1": f"{rel}/liver_mask_t1.png", "age": "60", "sex": "M",
            "afp": "12.5", "tumor_size_cm": "3.1", "hbv": "1", "cirrhosis": "0", "bclc": "A",
            "n_lesions": "1", "meld": "20", "tbil": "2", "inr": "1.2", "ki67_index": "10",
            "ki67_high": label, "prolif": label, "tace_or": label, "er_1y": label,
            "death_30d": label, "os_time": "40", "os_event": label, "fps": "1", "dr_db": "40",
            "gain_db": "0", "gamma": "1",
        })
        rows.append(row)
    with (site / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _restore(work: Path, base: Path, inodes: dict[str, int]) -> None:
    """Undo a mutation of ``work`` (a hard-linked copy of ``base``): mutations only ever create
    new files or unlink old ones, so every file whose inode is not the base's goes and every
    base file comes back as a hard link. Cheaper than a fresh copy per mutant."""
    for dirpath, _dirs, names in os.walk(work):
        for name in names:
            p = Path(dirpath) / name
            rel = str(p.relative_to(work))
            if inodes.get(rel) != os.lstat(p).st_ino:
                p.unlink()
    for rel in inodes:
        if not os.path.lexists(work / rel):
            os.link(base / rel, work / rel)


def _inodes(base: Path) -> dict[str, int]:
    return {str(p.relative_to(base)): p.stat().st_ino for p in base.rglob("*") if p.is_file()}


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- mutations


@dataclass
class Mutant:
    """What was done to one export and what must come of it."""

    kind: str
    task: str
    refuse: bool = False  # must be refused
    line: int | None = None  # the line a refusal must name
    column: str | None = None  # ... and the column
    secret: str | None = None  # a cell value that must never appear in a message
    limit_hit: bool = False  # must be refused by the size limit, before decoding
    notes: list[str] = field(default_factory=list)


def _rows(site: Path) -> tuple[list[str], list[list[str]]]:
    with (site / "manifest.csv").open(newline="") as fh:
        table = list(csv.reader(fh))
    return table[0], table[1:]


def _write_rows(site: Path, header: list[str], rows: list[list[str]]) -> None:
    (site / "manifest.csv").unlink()  # a new file: never write through a hard link
    with (site / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])


def _replace(path: Path, data: bytes) -> None:
    """Write a new file (never through a hard link into the base export)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _save(ds: pydicom.Dataset, path: Path) -> None:
    path.unlink()
    ds.save_as(path, enforce_file_format=False)


def _poke(path: Path, tag: int, raw: str) -> None:
    """Overwrite the value of an explicit-VR string element in place of its placeholder (for
    values pydicom refuses to write, such as NumberOfFrames 'abc')."""
    data = bytearray(path.read_bytes())
    group, elem = tag >> 16, tag & 0xFFFF
    key = struct.pack("<HH", group, elem)
    at = data.index(key)
    length = struct.unpack("<H", data[at + 6:at + 8])[0]
    data[at + 8:at + 8 + length] = raw.encode().ljust(length)[:length]
    _replace(path, bytes(data))


def _used(task: str, kinds: tuple[str, ...]) -> list[str]:
    return [c.name for c in TASKS[task].columns if c.kind in kinds]


def _file_of(site: Path, header: list[str], row: list[str], col: str) -> Path:
    value = row[header.index(col)]
    path = site / value
    if path.is_dir():
        path = sorted(path.iterdir())[rng_pick(len(list(path.iterdir())))]
    return path


_PICK = random.Random(0)


def rng_pick(n: int) -> int:
    return _PICK.randrange(n)


CELL_VALUES = ["abc", "nan", "inf", "-1", "1e400", "", "2", "0.5", " ", "TRAIN", "\x00",
               "a\tb", "é", "12345678901234567890", "0", "1", "-0", "M", "x\x7fy", "A"]


def mutate(site: Path, other: Path, task: str, r: random.Random) -> Mutant:
    """Apply one seeded mutation to the export in ``site`` for ``task``."""
    header, rows = _rows(site)
    i = r.randrange(len(rows))
    line = i + 2
    row = rows[i]
    files = _used(task, ("dicom", "cine", "mask"))
    dicoms = _used(task, ("dicom", "cine"))
    cine_task = task in ("ki67_ceus", "tace_ceus")
    op = r.choice(["cell", "cell", "cell", "path", "path", "header", "header", "header",
                   "pixels", "truncate_pixels", "truncate_file", "rle_bomb", "frames", "roi",
                   "roi", "dup_column", "extra_field", "drop_column", "nul_path", "video",
                   "mask", "mask", "mr", "manifest_bytes", "dup_id", "symlink_inside"])
    m = Mutant(op, task)
    if op == "cell":
        col = r.choice([c.name for c in TASKS[task].columns if c.kind not in (
            "dicom", "dicom_dir", "cine", "mask")])
        value = r.choice(CELL_VALUES)
        row[header.index(col)] = value
        _write_rows(site, header, rows)
        if any(ch in value for ch in "\x00\t\x7f"):
            m.refuse, m.line, m.column = True, line, col
        if len(value.strip()) >= 3 and not value.replace(".", "").replace("-", "").isdigit():
            m.secret = value
    elif op in ("path", "nul_path"):
        col = r.choice(files + _used(task, ("dicom_dir",)))
        target = other / row[header.index(col)]
        how = r.choice(["dotdot", "absolute", "symlink", "missing"]) if op == "path" else "nul"
        if how == "dotdot":
            value = os.path.relpath(target, site)
        elif how == "absolute":
            value = str(target)
        elif how == "symlink":
            link = site / "patients" / f"link_{col}{target.suffix}"
            link.symlink_to(target)
            value = str(link.relative_to(site))
        elif how == "missing":
            value = "patients/nobody/nothing.dcm"
        else:
            value = row[header.index(col)] + "\x00.dcm"
        row[header.index(col)] = value
        _write_rows(site, header, rows)
        m.refuse, m.line, m.column, m.secret = True, line, col, value
        m.kind = f"path-{how}"
    elif op in ("header", "pixels", "truncate_pixels", "rle_bomb", "frames"):
        col = r.choice(dicoms) if dicoms else None
        if col is None:  # phcc_mri: a slice of an MR series
            col = "mr_pre_dir"
        path = _file_of(site, header, row, col)
        ds = pydicom.dcmread(path)
        if op == "header":
            key, value = r.choice([
                ("Rows", 65535), ("Rows", 0), ("Rows", 1), ("Columns", 65535), ("Columns", 7),
                ("NumberOfFrames", "0"), ("NumberOfFrames", "100000"), ("NumberOfFrames", "1"),
                ("NumberOfFrames", "abc"), ("BitsAllocated", 16), ("BitsAllocated", 12),
                ("SamplesPerPixel", 3), ("SamplesPerPixel", 4),
                ("PhotometricInterpretation", "PALETTE COLOR"),
                ("PhotometricInterpretation", "MONOCHROME1"), ("PhotometricInterpretation", "RGB"),
                ("FrameTime", "-5"), ("FrameTime", "nan"), ("FrameTime", "0"),
                ("Modality", "CT"), ("PixelRepresentation", 1), ("BitsStored", 9),
                ("PixelSpacing", ["0", "0"]), ("ImagePositionPatient", ["0", "0", "0"]),
            ])
            raw, before = None, ds.get(key)
            if isinstance(value, str) and key in ("NumberOfFrames", "FrameTime"):
                raw, value = value, "9" * len(value)  # poked into the file after saving
            setattr(ds, key, value)
            m.kind = f"header-{key}={raw or value}"
            if key == "Modality" or (key == "Rows" and value in (0, 65535)) or (
                    key == "Columns" and value == 65535) or (
                    key == "NumberOfFrames" and value in ("0", "100000", "abc")) or (
                    key in ("BitsAllocated", "SamplesPerPixel") and value != before):
                m.refuse, m.line, m.column = True, line, col
            if key in ("Rows", "Columns") and value == 65535 or (
                    key == "NumberOfFrames" and value == "100000" and "NumberOfFrames" in ds):
                m.limit_hit = True
        elif op == "pixels":
            data = bytearray(ds.PixelData)
            for _ in range(r.randrange(1, 50)):
                data[r.randrange(len(data))] = r.randrange(256)
            ds.PixelData = bytes(data)
        elif op == "truncate_pixels":
            data = ds.PixelData
            ds.PixelData = data[: r.randrange(0, len(data) - 2)]
            m.refuse, m.line, m.column = True, line, col
        elif op == "rle_bomb":
            ds.compress(RLELossless)
            if "NumberOfFrames" in ds:
                ds.NumberOfFrames = 30000
            ds.Rows, ds.Columns = 65535, 65535
            m.refuse, m.line, m.column, m.limit_hit = True, line, col, True
        else:  # frames: keep 0 < k < MIN_CINE_FRAMES frames of a cine
            if col == "ceus_cine":
                k = r.randrange(1, MIN_CINE_FRAMES)
                arr = ds.pixel_array[:k]
                ds.NumberOfFrames = k
                ds.PixelData = np.ascontiguousarray(arr).tobytes()
                m.kind = f"frames-{k}"
                if cine_task:
                    m.refuse, m.line, m.column = True, line, col
        _save(ds, path)
        if op == "header" and raw is not None:
            _poke(path, ds.data_element(key).tag, raw)
    elif op == "truncate_file":
        col = r.choice(files + _used(task, ("dicom_dir",)))
        path = _file_of(site, header, row, col)
        data = path.read_bytes()
        _replace(path, data[: r.randrange(0, len(data))])
        m.refuse, m.line, m.column = True, line, col
        if col in ("mr_pre_dir", "mr_art_dir", "mr_pv_dir", "mr_del_dir"):
            m.column = None  # a series problem is reported on the row's first phase column
    elif op == "roi":
        how = r.choice(["partial", "inverted", "outside", "empty"])
        idx = {c: header.index(c) for c in ("ceus_roi_x0", "ceus_roi_y0", "ceus_roi_x1",
                                             "ceus_roi_y1")}
        if how == "partial":
            row[idx[r.choice(list(idx))]] = ""
        elif how == "inverted":
            row[idx["ceus_roi_x0"]], row[idx["ceus_roi_x1"]] = "28", "4"
        elif how == "outside":
            row[idx["ceus_roi_y1"]] = str(SIDE + r.randrange(1, 500))
        else:
            row[idx["ceus_roi_y1"]] = row[idx["ceus_roi_y0"]]
        _write_rows(site, header, rows)
        m.kind = f"roi-{how}"
        if cine_task:
            m.refuse, m.line = True, line
    elif op == "dup_column":
        col = r.choice(header)
        header = [*header, col]
        rows = [[*x, x[header.index(col)] if r.random() < 0.5 else "other"] for x in rows]
        _write_rows(site, header, rows)
        m.refuse, m.line, m.column = True, 1, col
    elif op == "extra_field":
        row.append("surplus")
        _write_rows(site, header, rows)
        m.refuse, m.line = True, line
    elif op == "drop_column":
        col = r.choice([c.name for c in TASKS[task].columns if c.required])
        k = header.index(col)
        header = header[:k] + header[k + 1:]
        rows = [x[:k] + x[k + 1:] for x in rows]
        _write_rows(site, header, rows)
        m.refuse, m.line = True, 1
    elif op == "video":
        how = r.choice(["ok", "few", "bomb", "truncated"])
        n, w, h = {"ok": (FRAMES, SIDE, SIDE), "few": (3, SIDE, SIDE),
                   "bomb": (40, 640, 480), "truncated": (FRAMES, SIDE, SIDE)}[how]
        path = site / "patients" / f"cine_{how}.avi"
        vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 1.0, (w, h), False)
        frame = np.full((h, w), 128, np.uint8)
        for t in range(n):
            frame[:8, :8] = t
            vw.write(frame)
        vw.release()
        if how == "truncated":
            data = path.read_bytes()
            _replace(path, data[: len(data) // 2])
        row[header.index("ceus_cine")] = str(path.relative_to(site))
        _write_rows(site, header, rows)
        m.kind = f"video-{how}"
        if cine_task and how in ("few", "bomb"):
            m.refuse, m.line, m.column = True, line, "ceus_cine"
            m.limit_hit = how == "bomb"
    elif op == "mask":
        masks = _used(task, ("mask",))
        col = r.choice(masks or ["ceus_lesion_mask"])  # unused by the task: may pass
        path = _file_of(site, header, row, col)
        how = r.choice(["empty", "size", "ihdr_bomb", "npy3d", "npy_ok"])
        if how == "empty":
            cv2.imwrite(str(path.with_name("empty.png")), np.zeros((SIDE, SIDE), np.uint8))
            path = path.with_name("empty.png")
        elif how == "size":
            cv2.imwrite(str(path.with_name("small.png")), np.full((SIDE - 4, SIDE), 255,
                                                                   np.uint8))
            path = path.with_name("small.png")
        elif how == "ihdr_bomb":  # a PNG header declaring 60000 x 60000 pixels
            data = bytearray(path.read_bytes())
            data[16:24] = struct.pack(">II", 60000, 60000)
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
            path = path.with_name("bomb.png")
            _replace(path, bytes(data))
            m.limit_hit = True
        else:
            base = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            arr = np.stack([base, base]) if how == "npy3d" else base
            path = path.with_name(f"{how}.npy")
            np.save(path, arr)
        row[header.index(col)] = str(path.relative_to(site))
        _write_rows(site, header, rows)
        m.kind = f"mask-{how}"
        if how != "npy_ok" and masks:
            m.refuse, m.line, m.column = True, line, col
        m.limit_hit = m.limit_hit and bool(masks)
    elif op == "mr":
        folder = site / row[header.index(r.choice(["mr_pre_dir", "mr_art_dir", "mr_pv_dir",
                                                  "mr_del_dir"]))]
        victim = sorted(folder.iterdir())[r.randrange(2)]
        how = r.choice(["delete", "rows", "junk"])
        if how == "delete":
            victim.unlink()
        elif how == "rows":
            ds = pydicom.dcmread(victim)
            ds.Rows = MR_SIDE // 2
            _save(ds, victim)
        else:
            _replace(folder / "junk.dcm", b"not dicom at all")
        m.kind = f"mr-{how}"
        if task == "phcc_mri":
            m.refuse, m.line = True, line
    elif op == "manifest_bytes":
        data = bytearray((site / "manifest.csv").read_bytes())
        for _ in range(r.randrange(1, 6)):
            data[r.randrange(len(data))] = r.randrange(256)
        _replace(site / "manifest.csv", bytes(data))
    elif op == "dup_id":
        j = (i + 1) % len(rows)
        rows[j][header.index("patient_id")] = row[header.index("patient_id")]
        _write_rows(site, header, rows)
        m.refuse, m.line, m.column = True, max(i, j) + 2, "patient_id"
    else:  # symlink_inside: a link to a file of the same export is fine
        col = r.choice(files) if files else None
        if col is not None:
            target = site / row[header.index(col)]
            link = site / "patients" / f"inside{target.suffix}"
            link.symlink_to(target)
            row[header.index(col)] = str(link.relative_to(site))
            _write_rows(site, header, rows)
    return m


# ------------------------------------------------------------------------------- the test


def _check(manifest: Path, task: str) -> tuple[DataError | None, int]:
    """check-data in-process; returns its error (or None) and the peak of what it allocated
    (Python and NumPy allocations traced by tracemalloc, above what was live before)."""
    tracemalloc.reset_peak()
    live = tracemalloc.get_traced_memory()[0]
    try:
        validate_manifest(manifest, TASKS[task], ("train",))
        err = None
    except DataError as exc:
        err = exc
    return err, tracemalloc.get_traced_memory()[1] - live


def _loads(manifest: Path, task: str) -> None:
    """An accepted export must load for training (every image of the train split decoded)."""
    _MANIFESTS.clear()
    _CACHE.clear()
    data = load_site(manifest, task, "tiny", ("train", "val"))  # every row check-data passed
    assert len(data) > 0
    assert torch.isfinite(data.video).all() and torch.isfinite(data.clinical).all()


def _train(manifest: Path, task: str) -> float:
    data = load_site(manifest, task, "tiny", ("train",))
    model = build_model(task, "tiny")
    objective = "siamese" if task == "aclf_us" else "bce"
    out = train_one_round(model, data, TrainConfig(epochs=1, batch_size=4, augment=False,
                                                   objective=objective))
    return out.loss


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    _write_site(root / "base" / "site", seed=1)
    _write_site(root / "base" / "other_site", seed=2)
    return root


def test_fuzzed_exports(fuzz_base: Path) -> None:
    before = _tree_digest(fuzz_base / "base")
    previous = active_limits()
    use_limits(LIMIT)
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    trained: list[str] = []
    max_peak = 0
    base = fuzz_base / "base" / "site"
    inodes = _inodes(base)
    site = fuzz_base / "mutant" / "site"
    shutil.copytree(base, site, copy_function=os.link)
    tracemalloc.start()
    try:
        for k in range(N_MUTANTS):
            r = random.Random(SEED * 100_000 + k)
            _PICK.seed(k)
            task = TASK_NAMES[k % len(TASK_NAMES)]
            _restore(site, base, inodes)
            m = mutate(site, fuzz_base / "base" / "other_site", task, r)
            manifest = site / "manifest.csv"
            where = f"mutant {k} ({m.kind}, {task})"
            try:
                err, peak = _check(manifest, task)
            except Exception as exc:  # noqa: BLE001 - a traceback would reach the user
                failures.append(f"{where}: {type(exc).__name__}: {exc}")
                continue
            max_peak = max(max_peak, peak)
            if peak > LIMIT.max_bytes:
                failures.append(f"{where}: peak {peak / 2**20:.1f} MiB above the limit")
            if err is None:
                outcomes["accepted"] += 1
                if m.refuse:
                    failures.append(f"{where}: accepted, must be refused")
                else:
                    tracemalloc.stop()
                    try:
                        _loads(manifest, task)
                        if m.kind not in ("cell", "manifest_bytes") and len(trained) < 4 and (
                                task not in {t.split(":")[0] for t in trained}):
                            loss = _train(manifest, task)
                            assert np.isfinite(loss), where
                            trained.append(f"{task}:{m.kind}")
                    except Exception as exc:  # noqa: BLE001
                        failures.append(f"{where}: accepted but unusable: "
                                        f"{type(exc).__name__}: {str(exc)[:300]}")
                    finally:
                        tracemalloc.start()
            else:
                outcomes["refused"] += 1
                texts = [str(i) for i in err.issues]
                if not all(t.startswith(str(manifest)) for t in texts):
                    failures.append(f"{where}: a message does not start with the manifest")
                unlocated = [t for t, i in zip(texts, err.issues, strict=True)
                             if i.row is None and not any(w in i.message for w in WHOLE_FILE)]
                if unlocated:
                    failures.append(f"{where}: no line in {unlocated[:2]}")
                if m.line is not None and not any(
                        i.row == m.line and (m.column is None or i.column == m.column)
                        for i in err.issues):
                    failures.append(f"{where}: expected line {m.line} column {m.column}, got "
                                    f"{texts[:3]}")
                if m.limit_hit and not any("limit" in t for t in texts):
                    failures.append(f"{where}: not refused by the size limit: {texts[:2]}")
                if m.secret and any(m.secret in t for t in texts):
                    failures.append(f"{where}: a message echoes the cell value")
            outcomes[m.kind.split("-")[0].split("=")[0]] += 1
    finally:
        tracemalloc.stop()
        use_limits(previous)
        _MANIFESTS.clear()
        _CACHE.clear()
    print(f"fuzz: {N_MUTANTS} mutants, {dict(outcomes)}; trained {trained}; largest check-data "
          f"peak {max_peak / 2**20:.2f} MiB (limit {LIMIT.mb:g} MiB)")
    assert not failures, f"{len(failures)} of {N_MUTANTS} mutants mishandled:\n" + "\n".join(
        failures[:40])
    assert outcomes["refused"] > N_MUTANTS // 3 and outcomes["accepted"] > N_MUTANTS // 10
    assert len(trained) >= 3
    assert _tree_digest(fuzz_base / "base") == before  # nothing outside the mutants changed


def test_check_data_cli_on_mutants(fuzz_base: Path, tmp_path: Path) -> None:
    """The console: exit 1 with located lines and no traceback; exit 0 on a clean export."""
    site = tmp_path / "site"
    shutil.copytree(fuzz_base / "base" / "site", site)
    cmd = [script("hcc-fl-client"), "check-data", "--manifest", str(site / "manifest.csv"),
           "--task", "ki67_ceus", "--max-image-mb", "8"]
    good = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "OK for task ki67_ceus" in good.stdout
    header, rows = _rows(site)
    ds = pydicom.dcmread(site / rows[1][header.index("ceus_cine")])
    ds.compress(RLELossless)
    ds.NumberOfFrames, ds.Rows, ds.Columns = 30000, 65535, 65535
    ds.save_as(site / rows[1][header.index("ceus_cine")], enforce_file_format=False)
    rows[0][header.index("age")] = "sixty\x00"
    rows[2][header.index("ceus_cine")] = "../../elsewhere/cine.dcm"
    _write_rows(site, header, [*rows, rows[0][:3] + ["x"] * (len(header) + 2)])
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    m = str(site / "manifest.csv")
    assert f"{m}, line 2, column 'age': the cell holds a control character" in bad.stderr
    assert f"{m}, line 3, column 'ceus_cine': the header declares 30000 frame(s)" in bad.stderr
    assert "above the site's limit of 8 MiB" in bad.stderr
    assert f"{m}, line 4, column 'ceus_cine': the path leaves the site's export" in bad.stderr
    assert f"{m}, line 5: row has more fields than the header" in bad.stderr
    assert "sixty" not in bad.stderr and "elsewhere" not in bad.stderr
