"""A site's persistent preparation cache: the per-patient tensors of a task, written once.

Flower starts a fresh ClientApp process for every message, so an in-memory cache alone makes a
deployed site decode every patient's images for every message. This module keeps each row's
prepared arrays (the cine clip, the three stills, the MRI patch and lesion mask, or the T0/T1
pair and liver masks) in the site's state folder (``<state>/prepcache``; simulation:
``<data_root>/.hcc-fl-prepcache``), never sent anywhere.

Key (:func:`row_key`): SHA-256 over the entry format, the code version
(:func:`hcc_fl.shared.version.code_version`, the package version plus a hash of all its source:
any change of a reader, of the preprocessing or of the task table invalidates everything, which
is safe and costs one ``prepare`` per upgrade; a narrower hash would silently miss a reader
module added later), the versions of the libraries that decode and resample (numpy, pydicom,
OpenCV, the pylibjpeg/Pillow codecs), the task, the preprocessing parameters (frames, size), the
whole manifest row (so a corrected cell rebuilds exactly that patient) and the identity of every
file the row's image columns name (a series folder: every file in it): resolved path, size,
inode, mtime and ctime in ns. ctime cannot be set back by tools (``touch``, ``cp -p``), so a file
rewritten in place gets a new key even with the same size and mtime. Rows whose key is unchanged
are read; the others are rebuilt.

Layout: ``<folder>/<key[:2]>/<key>.prep``, files 0600 in folders 0700. The entry holds the
arrays only (no patient ID, no path, no manifest cell). Format: an 8-byte magic, the key, the
payload length and the payload's SHA-256, then the payload (``.npy`` records of each array,
``allow_pickle=False`` on reading).

Atomicity and concurrency: an entry is written to a temporary file in the same folder
(``O_CREAT | O_EXCL``, mode 0600) and renamed onto its name with ``os.replace`` (atomic on
POSIX). There is no ``fsync``: it took a third of a preparation's time on our machines, and a
cache needs no durability; after a crash of the machine an entry renamed before its data
reached the disk fails its checksum and is rebuilt. A process killed mid-write leaves at most
a ``.tmp`` file, which no reader opens (and ``prepare`` removes once it is an hour old); two
processes preparing at once write their own temporary files and the last rename wins with the
same bytes. A reader checks the magic, key, length and checksum, so a torn or damaged file
(disk error, manual copy) is never used: it counts as a miss and is rebuilt.

Why not MONAI's :class:`monai.data.PersistentDataset` (checked in MONAI 1.6.1,
``PersistentDataset._cachecheck``): it keys entries by a hash of the data dict (our paths) only,
so a rewritten file or a code change would be served stale unless we hashed those into the dict
ourselves; it writes ``torch.save`` to a ``TemporaryDirectory`` (``/tmp``: another file system in
general, where ``shutil.move`` is a copy, not an atomic rename) without fsync; it reads with
``torch.load`` (pickle) and detects damage only when unpickling fails; the files get the umask's
mode (usually 0644); and our readers would have to be recast as MONAI transforms. The parts it
does well (temp file then rename, hash-named entries) are kept here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hcc_fl.shared.version import code_version

log = logging.getLogger(__name__)
FORMAT = 1
MAGIC = b"HCCPREP1"
_HEAD = struct.Struct(">8s32sQ32s")  # magic, key (raw sha256), payload length, payload sha256
FILE_KINDS = ("dicom", "dicom_dir", "cine", "mask")  # task columns that name files or folders
#: Distributions whose code decodes, resizes or resamples the images (a missing one is "-").
LIBRARIES = ("numpy", "pydicom", "opencv-python", "opencv-python-headless", "pylibjpeg",
             "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pillow",
             "python-gdcm", "scipy")
STALE_TMP_S = 3600.0
Arrays = tuple[npt.NDArray[Any], ...]


@functools.cache
def library_versions() -> tuple[tuple[str, str], ...]:
    """(distribution, version) of every library in :data:`LIBRARIES` ("-" when absent)."""
    out = []
    for name in LIBRARIES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "-"))
    return tuple(out)


def _identity(path: Path) -> list[object]:
    """Path, size, inode, mtime and ctime (ns) of a file, every file of a folder (sorted), or
    ``missing`` (the reader then fails and nothing is cached)."""
    try:
        st = path.stat()
    except OSError:
        return [str(path), "missing"]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path.resolve()), "dir", [_identity(p) for p in files]]
    return [str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def row_key(root: Path, row: dict[str, str], file_columns: Iterable[str], task: str,
            params: dict[str, int], code: str | None = None) -> str:
    """The hex SHA-256 that keys one row's prepared arrays.

    Parameters
    ----------
    root : Path
        The manifest's folder (relative paths in the row are resolved against it).
    row : dict of str to str
        The manifest row (every cell is part of the key).
    file_columns : iterable of str
        The row's columns that name image files or series folders (their identity is hashed).
    task : str
        The task name.
    params : dict of str to int
        Preprocessing parameters (e.g. ``frames``, ``size``).
    code : str, optional
        The code version (default: :func:`hcc_fl.shared.version.code_version`).
    """
    files = []
    for column in sorted(file_columns):
        value = row.get(column, "")
        if value:
            p = Path(value)
            files.append([column, _identity(p if p.is_absolute() else root / p)])
    doc = {"format": FORMAT, "code": code if code is not None else code_version(),
           "libraries": library_versions(), "task": task, "params": params,
           "row": sorted(row.items()), "files": files}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _encode(arrays: Arrays) -> bytes:
    buf = io.BytesIO()
    buf.write(struct.pack(">I", len(arrays)))
    for a in arrays:
        np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _decode(payload: bytes) -> Arrays:
    buf = io.BytesIO(payload)
    (n,) = struct.unpack(">I", buf.read(4))
    out = tuple(np.lib.format.read_array(buf, allow_pickle=False) for _ in range(n))
    if buf.tell() != len(payload):
        raise ValueError("trailing bytes")
    return out


@dataclass(frozen=True)
class PrepCache:
    """The preparation cache in ``folder`` (created 0700 on first write); ``code`` is the code
    version in its keys (default: :func:`hcc_fl.shared.version.code_version`)."""

    folder: Path
    code: str | None = None

    @property
    def version(self) -> str:
        """The code version this cache's keys are computed with."""
        return self.code if self.code is not None else code_version()

    def path(self, key: str) -> Path:
        """Where the entry ``key`` lives."""
        return self.folder / key[:2] / f"{key}.prep"

    def load(self, key: str) -> Arrays | None:
        """The arrays stored under ``key``, None when there is no entry.

        Raises
        ------
        ValueError
            The entry is torn or damaged (magic, key, length or checksum do not match).
        """
        try:
            blob = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        try:
            magic, raw_key, length, digest = _HEAD.unpack_from(blob)
        except struct.error as exc:
            raise ValueError(f"short header ({len(blob)} bytes)") from exc
        payload = memoryview(blob)[_HEAD.size:]
        if magic != MAGIC or raw_key != bytes.fromhex(key):
            raise ValueError("not an entry of this key")
        if len(payload) != length or hashlib.sha256(payload).digest() != digest:
            raise ValueError("length or checksum mismatch")
        try:
            return _decode(bytes(payload))
        except (struct.error, ValueError, OSError) as exc:
            raise ValueError(f"unreadable arrays ({exc})") from exc

    def get(self, key: str) -> Arrays | None:
        """The arrays stored under ``key``, or None when absent, torn or damaged (a damaged
        entry is logged by its key prefix and left to be overwritten)."""
        try:
            return self.load(key)
        except (ValueError, OSError) as exc:
            log.warning("preparation cache: entry %s… unusable (%s); it is rebuilt", key[:12],
                        exc)
            return None

    def has(self, key: str) -> bool:
        """Whether a complete-looking entry exists (magic, key and length; no checksum)."""
        path = self.path(key)
        try:
            with path.open("rb") as fh:
                head = fh.read(_HEAD.size)
                size = os.fstat(fh.fileno()).st_size
            magic, raw_key, length, _ = _HEAD.unpack(head)
        except (OSError, struct.error):
            return False
        return magic == MAGIC and raw_key == bytes.fromhex(key) and size == _HEAD.size + length

    def put(self, key: str, arrays: Arrays) -> None:
        """Store ``arrays`` under ``key`` atomically (a temporary file renamed into place)."""
        payload = _encode(arrays)
        head = _HEAD.pack(MAGIC, bytes.fromhex(key), len(payload),
                          hashlib.sha256(payload).digest())
        final = self.path(key)
        for d in (self.folder, final.parent):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = final.parent / f".{key}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(head)
                fh.write(payload)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def remove_stale_tmp(self, older_than_s: float = STALE_TMP_S) -> int:
        """Delete temporary files left by killed writers (older than ``older_than_s``)."""
        n = 0
        now = time.time()
        for tmp in self.folder.glob("*/.*.tmp") if self.folder.is_dir() else ():
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    n += 1
        return n


def cached(cache: PrepCache | None, key: str, build: Callable[[], Arrays]) -> Arrays:
    """``cache[key]``, or ``build()`` stored under ``key`` (just ``build()`` without a cache)."""
    if cache is None:
        return build()
    found = cache.get(key)
    if found is None:
        found = build()
        try:
            cache.put(key, found)
        except OSError as exc:  # a full or read-only disk costs speed, not the message
            log.warning("preparation cache %s: cannot write (%s); the tensors are used "
                        "without it", cache.folder, type(exc).__name__)
    return found


__all__ = ["PrepCache", "cached", "library_versions", "row_key"]
