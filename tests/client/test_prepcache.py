"""The site's persistent preparation cache (client/prepcache.py, ``hcc-fl-client prepare``),
on real phantom files: identical tensors, a rebuild for exactly the patients whose key part
changed, nothing torn read after a SIGKILL, and two preparing processes at once."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from hcc_fl.client import data as D
from hcc_fl.client.cli import main as client_main
from hcc_fl.client.longitudinal import load_pairs
from hcc_fl.client.manifest import validated_manifest
from hcc_fl.client.prepcache import PrepCache
from hcc_fl.shared.version import code_version
from tests.conftest import script


@pytest.fixture(autouse=True)
def _no_cache_left() -> Iterator[None]:
    """Every test starts and ends without a process-wide cache or memoised tensors."""
    D.use_prep_cache(None)
    D._CACHE.clear()
    yield
    D.use_prep_cache(None)
    D._CACHE.clear()


def _site(src: Path, dst: Path, copies: int = 1) -> Path:
    """A copy of a phantom site; ``copies`` > 1 repeats every row under new patient IDs (same
    files), for a preparation long enough to be killed in the middle."""
    shutil.copytree(src, dst)
    manifest = dst / "manifest.csv"
    if copies > 1:
        with manifest.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        out = [{**r, "patient_id": f"{r['patient_id']}c{k}"} for k in range(copies) for r in rows]
        _write(manifest, out)
    (dst / "SITE.yaml").write_text("site: site_A\ntask: ki67_ceus\nmanifest: manifest.csv\n"
                                   "coordinator: 127.0.0.1:9092\ninsecure: true\n")
    return manifest


def _write(manifest: Path, rows: list[dict[str, str]]) -> None:
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _load(manifest: Path, task: str, profile: str, splits: tuple[str, ...],
          folder: Path | None) -> D.SiteData:
    """``load_site`` in a fresh state: through the cache in ``folder``, or uncached (None)."""
    D._CACHE.clear()
    D.use_prep_cache(folder)
    try:
        return D.load_site(manifest, task, profile, splits)
    finally:
        D.use_prep_cache(None)
        D._CACHE.clear()


def _same(a: D.SiteData, b: D.SiteData) -> None:
    assert a.video.dtype == b.video.dtype and torch.equal(a.video, b.video)
    assert torch.equal(a.clinical, b.clinical) and torch.equal(a.label, b.label)
    assert (a.masks is None) == (b.masks is None)
    if a.masks is not None and b.masks is not None:
        assert torch.equal(a.masks, b.masks)
    assert a.survival.keys() == b.survival.keys()
    for k in a.survival:
        for x, y in zip(a.survival[k], b.survival[k], strict=True):
            np.testing.assert_array_equal(x, y)
    assert a.manifest_sha256 == b.manifest_sha256


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.prep"))


def _prepare(manifest: Path, folder: Path, task: str = "ki67_ceus", profile: str = "tiny",
             code: str | None = None) -> D.PrepareResult:
    return D.prepare_site(manifest, task, profile, ("train", "val"), PrepCache(folder, code),
                          workers=1)


@pytest.mark.parametrize("task", ["ki67_ceus", "er_ceus", "phcc_mri", "aclf_us"])
def test_cached_tensors_equal_uncached(small_phantom: Path, tmp_path: Path, task: str) -> None:
    # Prepare
    manifest = small_phantom / "site_A" / "manifest.csv"
    folder = tmp_path / "prepcache"
    splits = ("train", "val")
    plain = _load(manifest, task, "tiny", splits, None)
    # Execute: the first load writes the entries, a fresh one reads them
    written = _load(manifest, task, "tiny", splits, folder)
    read = _load(manifest, task, "tiny", splits, folder)
    # Assert
    _same(plain, written)
    _same(plain, read)
    files = _entries(folder)
    assert len(files) == len(plain)
    again = D.prepare_site(manifest, task, "tiny", splits, PrepCache(folder), workers=1)
    assert (again.built, again.reused) == (0, len(plain))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    ids = [r["patient_id"].encode() for r in validated_manifest(manifest, task).rows]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert stat.S_IMODE(f.parent.stat().st_mode) == 0o700
        blob = f.read_bytes()
        assert not any(i in blob for i in ids) and b"patients/" not in blob
    if task == "aclf_us":  # the pairs equal the reader's own
        pairs = load_pairs(manifest, splits, plain.video.shape[-1])
        assert torch.equal(read.video, pairs.images) and read.masks is not None
        assert torch.equal(read.masks, pairs.masks)
        assert torch.equal(read.clinical, pairs.clinical)


def test_changed_file_rebuilds_that_patient(small_phantom: Path, tmp_path: Path) -> None:
    manifest = _site(small_phantom / "site_A", tmp_path / "site")
    folder = tmp_path / "prepcache"
    n = _prepare(manifest, folder).built
    first, second = validated_manifest(manifest, "ki67_ceus").rows_in(("train", "val"))[:2]
    before = _load(manifest, "ki67_ceus", "tiny", ("train", "val"), folder)
    # Execute: the first patient's cine is replaced by another (valid) one in place
    target = manifest.parent / first["ceus_cine"]
    time.sleep(0.01)
    target.write_bytes((manifest.parent / second["ceus_cine"]).read_bytes())
    redo = _prepare(manifest, folder)
    # Assert
    assert (redo.built, redo.reused) == (1, n - 1)
    after = _load(manifest, "ki67_ceus", "tiny", ("train", "val"), folder)
    _same(_load(manifest, "ki67_ceus", "tiny", ("train", "val"), None), after)
    assert not torch.equal(before.video, after.video)


def test_changed_manifest_row_rebuilds_that_patient(small_phantom: Path, tmp_path: Path) -> None:
    manifest = _site(small_phantom / "site_A", tmp_path / "site")
    folder = tmp_path / "prepcache"
    n = _prepare(manifest, folder).built
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    i = next(k for k, r in enumerate(rows) if r["split"] == "train")
    rows[i]["ceus_roi_x0"] = str(int(float(rows[i]["ceus_roi_x0"])) + 3)  # a smaller ROI
    _write(manifest, rows)
    redo = _prepare(manifest, folder)
    assert (redo.built, redo.reused) == (1, n - 1)
    _same(_load(manifest, "ki67_ceus", "tiny", ("train", "val"), None),
          _load(manifest, "ki67_ceus", "tiny", ("train", "val"), folder))


def test_changed_preprocessing_and_code_version_rebuild(small_phantom: Path,
                                                         tmp_path: Path) -> None:
    manifest = small_phantom / "site_A" / "manifest.csv"
    folder = tmp_path / "prepcache"
    n = _prepare(manifest, folder, code="v1").built
    assert _prepare(manifest, folder, code="v1").built == 0
    assert _prepare(manifest, folder, profile="full", code="v1").built == n  # frames, size
    assert _prepare(manifest, folder, code="v2").built == n  # a new code version
    assert len(_entries(folder)) == 3 * n
    assert PrepCache(folder).version == code_version()


def test_damaged_entry_is_never_used(small_phantom: Path, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    manifest = small_phantom / "site_A" / "manifest.csv"
    folder = tmp_path / "prepcache"
    plain = _load(manifest, "ki67_ceus", "tiny", ("train",), None)
    _load(manifest, "ki67_ceus", "tiny", ("train",), folder)
    a, b = _entries(folder)[:2]
    a.write_bytes(a.read_bytes()[:-100])  # torn
    blob = bytearray(b.read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit of pixel data
    b.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        PrepCache(folder).load(b.stem)
    _same(plain, _load(manifest, "ki67_ceus", "tiny", ("train",), folder))
    assert "unusable" in caplog.text and a.stem[:12] in caplog.text
    assert PrepCache(folder).load(a.stem) is not None  # rebuilt
    assert PrepCache(folder).load(b.stem) is not None


WRITER = """
import sys, numpy as np
from pathlib import Path
from hcc_fl.client.prepcache import PrepCache
PrepCache(Path(sys.argv[1]), "test").put(sys.argv[2], (np.ones((64, 1024, 1024), np.float32),))
"""


def test_killed_writer_leaves_nothing_that_is_read(tmp_path: Path) -> None:
    # Prepare: a writer of a 256 MiB entry, killed as soon as its temporary file has data
    folder = tmp_path / "prepcache"
    key = "ab" * 32
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), key])
    tmp: list[Path] = []
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        tmp = [p for p in folder.glob("*/.*.tmp") if p.stat().st_size > 0]
        if tmp:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.wait()
    # Assert: killed mid-write; the half-written file is never an entry
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert tmp and tmp[0].exists()
    cache = PrepCache(folder, "test")
    assert not cache.path(key).exists() and cache.load(key) is None and not cache.has(key)
    assert cache.remove_stale_tmp(older_than_s=3600) == 0  # a young one may still be written
    assert cache.remove_stale_tmp(older_than_s=0) == 1 and not tmp[0].exists()


def test_killed_prepare_keeps_finished_patients(small_phantom: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: 60 rows at the full profile, `hcc-fl-client prepare` killed in the middle
    manifest = _site(small_phantom / "site_A", tmp_path / "site", copies=6)
    folder = manifest.parent / ".hcc-fl-site_A" / "prepcache"
    n = len(validated_manifest(manifest, "ki67_ceus").rows_in(("train", "val")))
    proc = subprocess.Popen([script("hcc-fl-client"), "prepare", "--site-config",
                             str(manifest.parent / "SITE.yaml"), "--profile", "full",
                             "--workers", "1", "--no-progress"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(_entries(folder)) < 5:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _entries(folder)
    assert proc.returncode == -signal.SIGKILL and 5 <= len(kept) < n
    # Assert: every entry left is whole; a new prepare decodes exactly the rest
    cache = PrepCache(folder)
    assert all(cache.load(p.stem) is not None for p in kept)
    assert client_main(["prepare", "--site-config", str(manifest.parent / "SITE.yaml"),
                        "--profile", "full", "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{n - len(kept)} decoded, {len(kept)} unchanged" in out
    _same(_load(manifest, "ki67_ceus", "full", ("train", "val"), None),
          _load(manifest, "ki67_ceus", "full", ("train", "val"), folder))


def test_two_processes_prepare_at_once(small_phantom: Path, tmp_path: Path) -> None:
    # Prepare: `hcc-fl-client prepare` in a subprocess and prepare_site in this process, on
    # one site and one cache, in the same row order (both write the same keys), while a thread
    # reads every entry that appears
    manifest = _site(small_phantom / "site_A", tmp_path / "site", copies=6)
    folder = manifest.parent / ".hcc-fl-site_A" / "prepcache"
    n = len(validated_manifest(manifest, "ki67_ceus").rows_in(("train", "val")))
    proc = subprocess.Popen([script("hcc-fl-client"), "prepare", "--site-config",
                             str(manifest.parent / "SITE.yaml"), "--profile", "full",
                             "--workers", "1", "--no-progress"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, text=True)
    cache, reads, torn, stop = PrepCache(folder), [0], [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for f in _entries(folder):
                try:
                    if cache.load(f.stem) is None:
                        torn.append("an entry vanished")
                    reads[0] += 1
                except ValueError as exc:  # a torn entry
                    torn.append(str(exc))
            time.sleep(0.02)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not _entries(folder) and time.monotonic() < deadline:
            time.sleep(0.005)
        # Execute: this process prepares while the other one still does
        here = _prepare(manifest, folder, profile="full")
        out = proc.communicate(timeout=300)[0]
    finally:
        stop.set()
        thread.join()
    # Assert: both wrote, nothing torn was ever read, the result is whole and identical
    assert proc.returncode == 0, out
    assert f"{n} decoded, 0 unchanged" in out and 0 < here.built < n
    assert not torn and reads[0] > 0
    assert len(_entries(folder)) == n and not list(folder.glob("*/.*.tmp"))
    _same(_load(manifest, "ki67_ceus", "full", ("train", "val"), None),
          _load(manifest, "ki67_ceus", "full", ("train", "val"), folder))


def test_messages_read_the_site_state_cache(tmp_path: Path) -> None:
    """Deployment: ``<state>/prepcache`` from the node config; simulation: the run config's
    folder under the data root; neither: memory only."""
    from flwr.app import Context, RecordDict

    from hcc_fl.client.flower_app import prep_cache_folder
    from hcc_fl.server.simulate import PREP_CACHE, prep_cache_dir

    def ctx(nc: dict[str, str | int], rc: dict[str, str]) -> Context:
        return Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config=rc)

    folder = prep_cache_dir(tmp_path)
    assert folder == tmp_path / PREP_CACHE and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert prep_cache_folder(ctx({"state": str(tmp_path / "s")}, {})) == tmp_path / "s" / \
        "prepcache"
    assert prep_cache_folder(ctx({"partition-id": 0}, {"prep-cache": str(folder)})) == folder
    assert prep_cache_folder(ctx({"partition-id": 0}, {"prep-cache": ""})) is None
