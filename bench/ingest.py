"""Image ingest at a site: decoding, preparation and the preparation cache.

Usage: python bench/ingest.py SECTION [options]; sections (each writes its own result file):

``cache`` (bench/results/ingest_cache.json): one site of ``--patients`` patients (the rows of a
phantom site repeated under new IDs, every file copied, so that each patient has its own files),
task ``ki67_ceus``, measured side by side in one run:

- ``raw decode``: pydicom decoding alone (``dcmread(...).pixel_array``) of the same cine files
  as the preparation reads, in this process and over ``--workers`` processes (pool start
  included); the faster of the two is the bound;
- ``prepare``: the first ``hcc_fl.client.data.prepare_site`` of the site into an empty cache
  (decode, resample, crop, standardise, write; pool start included), per profile;
- ``fresh load``: a new Python process that loads the prepared site (``load_site`` of
  train+val through the cache), without (``import``) and with the imports, per profile; and the
  same process without a cache (every patient decoded serially, as before the cache);
- with ``--deployment``: a real deployment (``bench/overhead.py``'s coordinator and one
  ``hcc-fl-client`` per phantom site, ``--rounds`` rounds), the share of each ClientApp
  message's wall time spent in ``load_site`` (``HCC_FL_TIMINGS``' ``data_s``), for the first
  message of each site and for all later ones.

The page cache is warmed (every file read once) before the timings, so disk speed is out.
Goals (issue 18): first preparation >= 0.8 x the raw-decode throughput; a prepared 300-patient
site loads in a fresh process in <= 2 s (tiny) and <= 15 s (full); after the first message,
data loading <= 5 % of a deployment message's wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

TASK = "ki67_ceus"
SPLITS = ("train", "val")


# --- section: cache ---------------------------------------------------------------------------
def make_site(src: Path, dst: Path, patients: int) -> Path:
    """A ``patients``-row site from a phantom site: rows repeated under new IDs, each with its
    own copy of its files; every row in split train or val."""
    with (src / "manifest.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] in SPLITS]
    from hcc_fl.client.data import file_columns
    from hcc_fl.shared.tasks import get_task

    columns = list(file_columns(get_task(TASK)))
    others = [c for c in rows[0] if c not in columns and rows[0][c].startswith("patients/")]
    out = []
    for i in range(patients):
        r = dict(rows[i % len(rows)])
        pid = f"P{i:04d}"
        folder = dst / "patients" / pid
        for c in columns:
            if r[c]:
                target = folder / Path(r[c]).relative_to(Path(r[c]).parts[0],
                                                         Path(r[c]).parts[1])
                if (src / r[c]).is_dir():
                    shutil.copytree(src / r[c], target)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / r[c], target)
                r[c] = str(target.relative_to(dst))
        out.append({**r, **dict.fromkeys(others, ""), "patient_id": pid})
    with (dst / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    return dst / "manifest.csv"


def _decode(path: str) -> int:
    import pydicom

    return int(pydicom.dcmread(path).pixel_array.nbytes)


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def raw_decode(files: list[str], workers: int) -> float:
    """Seconds to decode ``files`` with pydicom alone over ``workers`` processes (pool start
    included, as for the preparation)."""
    t0 = time.perf_counter()
    if workers <= 1:
        for f in files:
            _decode(f)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                 initializer=_one_thread) as pool:
            list(pool.map(_decode, files, chunksize=max(1, len(files) // (8 * workers))))
    return time.perf_counter() - t0


FRESH = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from hcc_fl.client.data import load_site, use_prep_cache
t1 = time.perf_counter()
use_prep_cache(None if sys.argv[4] == "-" else Path(sys.argv[4]))
data = load_site(Path(sys.argv[1]), sys.argv[2], sys.argv[3], ("train", "val"))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "n": len(data),
                  "mb": data.video.numel() * 4 / 1e6}))
"""


def fresh_load(manifest: Path, profile: str, cache: Path | None) -> dict[str, Any]:
    """Load the site in a new process; its import and load seconds."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FRESH, str(manifest), TASK, profile,
                          str(cache) if cache else "-"], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def deployment_share(data: Path, rounds: int, work: Path) -> dict[str, Any]:
    """Run bench/overhead.py's deployment; the share of load_site in each message's wall time."""
    import overhead

    res = overhead.run_deployment(data, rounds, 1, 1, work, cold=False)
    first: dict[str, float] = {}
    shares: dict[str, list[float]] = {"first": [], "later": []}
    kinds: dict[str, list[float]] = {}
    for m in sorted(res["messages"], key=lambda m: m["phases"].get("handler-start", 0.0)):
        ph, site = m["phases"], str(m.get("site", "?"))
        if "exit" not in ph or "data_s" not in m:
            continue
        share = float(m["data_s"]) / ph["exit"]
        which = "later" if site in first else "first"
        first.setdefault(site, share)
        shares[which].append(share)
        if which == "later":
            kinds.setdefault(str(m.get("kind", "?")), []).append(share)
    return {"wall_s": res["wall_s"], "messages": len(res["messages"]),
            "first_median": statistics.median(shares["first"]) if shares["first"] else None,
            "later_median": statistics.median(shares["later"]) if shares["later"] else None,
            "later_max": max(shares["later"]) if shares["later"] else None,
            "later_by_kind": {k: round(statistics.median(v), 4) for k, v in kinds.items()}}


def cache_section(args: argparse.Namespace) -> None:
    from hcc_fl.client.data import prepare_site
    from hcc_fl.client.prepcache import PrepCache

    data = Path(args.data).resolve()
    work = Path(tempfile.mkdtemp(prefix="hcc-ingest-"))
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}
    try:
        manifest = make_site(data / args.site, work / "site", args.patients)
        with manifest.open(newline="") as fh:
            files = [str(manifest.parent / r["ceus_cine"]) for r in csv.DictReader(fh)]
        nbytes = sum(os.path.getsize(f) for f in files)
        for f in files:  # warm the page cache: disk speed is not measured
            Path(f).read_bytes()
        workers = args.workers or len(os.sched_getaffinity(0))
        # the bound: the faster of pydicom in this process and over a pool of `workers`
        t_serial = raw_decode(files, 1)
        t_pool = raw_decode(files, workers) if workers > 1 else t_serial
        t_raw = min(t_serial, t_pool)
        for label, t, w in (("raw decode (pydicom only), this process", t_serial, 1),
                            (f"raw decode (pydicom only), {workers} processes", t_pool,
                             workers)):
            rows.append({"step": label, "profile": "-", "patients": len(files), "workers": w,
                         "seconds": round(t, 2), "patients_per_s": round(len(files) / t, 2),
                         "vs_raw": round(t_raw / t, 3)})
        print(f"raw decode: {len(files)} cines ({nbytes / 1e6:.0f} MB) in {t_serial:.2f} s "
              f"(1 process), {t_pool:.2f} s ({workers})", flush=True)
        for profile in args.profile:
            cache = PrepCache(work / f"cache-{profile}")
            res = prepare_site(manifest, TASK, profile, SPLITS, cache, workers=workers)
            size = sum(p.stat().st_size for p in cache.folder.glob("*/*.prep"))
            rows.append({"step": "first prepare", "profile": profile, "patients": res.rows,
                         "workers": workers, "seconds": round(res.seconds, 2),
                         "patients_per_s": round(res.rows / res.seconds, 2),
                         "vs_raw": round(t_raw / res.seconds, 3),
                         "cache_mb": round(size / 1e6, 1)})
            print(rows[-1], flush=True)
            again = prepare_site(manifest, TASK, profile, SPLITS, cache, workers=workers)
            rows.append({"step": "prepare again (nothing changed)", "profile": profile,
                         "patients": again.rows, "workers": workers,
                         "seconds": round(again.seconds, 2)})
            for label, folder in (("fresh-process load, prepared", cache.folder),
                                  ("fresh-process load, no cache", None)):
                if folder is None and not args.uncached:
                    continue
                got = fresh_load(manifest, profile, folder)
                rows.append({"step": label, "profile": profile, "patients": got["n"],
                             "workers": 1, "seconds": round(got["load_s"], 2),
                             "import_s": round(got["import_s"], 2),
                             "process_s": round(got["process_s"], 2),
                             "tensor_mb": round(got["mb"], 1)})
                print(rows[-1], flush=True)
        if args.deployment:
            share = deployment_share(Path(args.deployment_data).resolve(), args.rounds, work)
            notes["deployment"] = share
            rows.append({"step": f"deployment, {args.rounds} round(s): load_site share of a "
                         "message after the site's first", "profile": "tiny",
                         "share_median": share["later_median"], "share_max": share["later_max"],
                         "first_message_share": share["first_median"],
                         "messages": share["messages"]})
            print(rows[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    path = write_result(
        "ingest_cache", rows, out=Path(args.out),
        goals={"prepare_vs_raw": ">= 0.8", "fresh_load_tiny_s": "<= 2",
               "fresh_load_full_s": "<= 15", "data_share_after_first": "<= 0.05"},
        notes={"site": f"{args.patients} patients from phantom {args.site} (cine files "
                       f"{nbytes / len(files) / 1e6:.2f} MB each)", **notes})
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="section", required=True)
    c = sub.add_parser("cache", help="preparation cache: throughput, fresh load, data share")
    c.add_argument("--data", default="data/phantom", help="phantom data root")
    c.add_argument("--site", default="site_A", help="the phantom site whose rows are repeated")
    c.add_argument("--patients", type=int, default=300)
    c.add_argument("--profile", nargs="+", default=["tiny", "full"])
    c.add_argument("--workers", type=int, default=None, help="default: the CPUs available")
    c.add_argument("--uncached", action="store_true",
                   help="also time a fresh process without the cache (decodes every patient)")
    c.add_argument("--deployment", action="store_true",
                   help="also run a deployment for the data share of its messages (minutes)")
    c.add_argument("--deployment-data", default="data/phantom")
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--out", default=str(Path(__file__).parent / "results"))
    c.add_argument("--keep", action="store_true", help="keep the work folder")
    c.set_defaults(func=cache_section)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
