"""Scale: many simulated sites of the tiny task in Flower's simulation engine, on one machine.

Usage: python bench/scale.py [--sites 10 100] [--rounds 3] [--per-site 8] [--phantom data/phantom]

For every N in ``--sites`` a data root ``bench/data/scale-<N>/`` is built from the phantom
without generating images: N training sites ``site_000..`` whose ``manifest.csv`` lists
``--per-site`` patients drawn (seeded) from the phantom's training sites A/B/C (train and val
rows of both classes; file paths point at the phantom's own files), plus the phantom's external
site. Sites may share patients: this measures cost, not accuracy. Then ``hcc-fl simulate`` runs
``ki67_ceus`` (tiny profile, FedAvg only, no baselines, no report) with every site in the
federation, while a sampler reads the RSS and PSS (``/proc/<pid>/smaps_rollup``) of the simulate
process and all its descendants (SuperLink, ServerApp, simulation runtime, Ray's GCS, raylet and
workers) every 0.5 s. Round times come from the coordinator's audit log of the run.

The N runs happen one after another in one invocation, so the per-site ratios (memory and round
time per extra site) are measured side by side. Results: ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

BENCH = Path(__file__).resolve().parent
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20
OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def hcc_fl() -> str:
    exe = Path(sys.executable).parent / "hcc-fl"
    return str(exe) if exe.exists() else "hcc-fl"


# --- data root ------------------------------------------------------------------------------

def _absolute(row: dict[str, str], site_dir: Path) -> dict[str, str]:
    """The row with every relative file path made absolute against the phantom site folder."""
    out = dict(row)
    for k, v in row.items():
        if v.startswith("patients/"):
            out[k] = str((site_dir / v).resolve())
    return out


def build_root(phantom: Path, n_sites: int, per_site: int, seed: int, out: Path) -> Path:
    """Write ``out`` with ``n_sites`` training sites drawn from the phantom and its external
    site; returns ``out``. Each training site gets ``per_site`` patients: a quarter (at least
    2) in ``val``, the rest in ``train``, each split with both classes of ``ki67_high``."""
    index = json.loads((phantom / "manifest_index.json").read_text())
    pool: dict[tuple[str, str], list[dict[str, str]]] = {}
    header: list[str] = []
    external = None
    for name, entry in index["sites"].items():
        path = phantom / entry["manifest"]
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = [_absolute(r, path.parent) for r in reader]
        if entry["role"] != "train":
            external = (name, rows)
            continue
        for r in rows:
            pool.setdefault((r["split"], r["ki67_high"]), []).append(r)
    if external is None or not pool:
        raise SystemExit(f"{phantom}: needs training sites and an external site")
    n_val = max(2, per_site // 4)
    n_train = per_site - n_val
    if n_train < 2:
        raise SystemExit("--per-site must be at least 4")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = random.Random(seed)
    sites: dict[str, Any] = {}

    def draw(split: str, n: int) -> list[dict[str, str]]:
        pos = rng.sample(pool[(split, "1")], n // 2)
        neg = rng.sample(pool[(split, "0")], n - n // 2)
        return pos + neg

    def write(name: str, rows: list[dict[str, str]], role: str) -> None:
        (out / name).mkdir()
        with (out / name / "manifest.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=header)
            w.writeheader()
            for r in rows:
                w.writerow({**r, "site": name})
        sites[name] = {"role": role, "manifest": f"{name}/manifest.csv", "n": len(rows)}

    width = max(3, len(str(n_sites - 1)))
    for i in range(n_sites):
        write(f"site_{i:0{width}d}", draw("train", n_train) + draw("val", n_val), "train")
    ext_name, ext_rows = external
    write(ext_name, ext_rows, "external")
    (out / "manifest_index.json").write_text(json.dumps({
        "phantom_version": index.get("phantom_version"), "seed": index.get("seed"),
        "derived_from": str(phantom.resolve()), "draw_seed": seed, "per_site": per_site,
        "note": "bench/scale.py: sites drawn with replacement across sites from the phantom's "
                "training sites; sites share patients and image files",
        "sites": sites}, indent=2) + "\n")
    return out


# --- process-tree memory sampler ------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (by parent id)."""
    kids = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def kind_of(cmd: str) -> str:
    """A short name for what a process of the run is (from its command line; Ray workers
    retitle themselves ``ray::<actor>`` once started)."""
    exe = cmd.split(" ", 1)[0].rsplit("/", 1)[-1]
    rules = [("ray::ClientAppActor", "ray worker (ClientApp actor)"),
             ("ray::IDLE", "ray worker (idle)"), ("ray::DashboardAgent", "ray dashboard agent"),
             ("ray::", "ray worker (other)"),
             ("default_worker.py", "ray worker (starting)"),
             ("hcc-fl simulate", "hcc-fl simulate (driver)"),
             ("flower-superlink", "flower-superlink"),
             ("flwr-serverapp", "flwr-serverapp (ServerApp)"),
             ("flwr-simulation", "flwr-simulation (ServerApp + simulation engine, Ray driver)"),
             ("flower-superexec", "flower-superexec"), ("/bin/flwr run", "flwr run (CLI)"),
             ("gcs_server", "ray gcs_server"), ("runtime_env/agent", "ray runtime_env agent"),
             ("dashboard/agent", "ray dashboard agent"), ("dashboard", "ray dashboard"),
             ("log_monitor", "ray log_monitor"), ("monitor.py", "ray monitor")]
    if exe == "raylet":
        return "ray raylet"
    for needle, name in rules:
        if needle in cmd:
            return name
    return "other"


def proc_mem(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in bytes; PSS from smaps_rollup (RSS if that is unreadable)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            rss = int(fh.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None
    pss = rss
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return rss, pss


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Samples the memory of a process tree every ``interval`` seconds until stopped."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop_flag = threading.Event()
        self.samples: list[dict[str, Any]] = []
        self.examples: dict[str, str] = {}
        self.peak_proc: dict[str, dict[str, Any]] = {}
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            t = time.monotonic() - self.t0
            rss_tot = pss_tot = 0
            by_kind: dict[str, list[int]] = {}
            for pid in descendants(self.root):
                cmd = cmdline(pid)
                mem = proc_mem(pid) if cmd else None
                if mem is None:
                    continue
                kind = kind_of(cmd)
                if kind not in self.examples:
                    self.examples[kind] = cmd.replace(str(Path(sys.prefix)), "<venv>")[:160]
                rss_tot += mem[0]
                pss_tot += mem[1]
                agg = by_kind.setdefault(kind, [0, 0, 0])
                agg[0] += 1
                agg[1] += mem[0]
                agg[2] += mem[1]
                peak = self.peak_proc.setdefault(kind, {"pss": 0, "rss": 0})
                if mem[1] > peak["pss"]:
                    peak["pss"] = mem[1]
                if mem[0] > peak["rss"]:
                    peak["rss"] = mem[0]
            self.samples.append({"t": t, "rss": rss_tot, "pss": pss_tot, "kinds": by_kind})
            self.stop_flag.wait(self.interval)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        top = max(self.samples, key=lambda s: s["pss"])
        top_rss = max(self.samples, key=lambda s: s["rss"])
        kinds_peak: dict[str, dict[str, Any]] = {}
        for s in self.samples:
            for kind, (n, rss, pss) in s["kinds"].items():
                k = kinds_peak.setdefault(kind, {"max_processes": 0, "peak_pss_mib": 0.0,
                                                 "peak_rss_mib": 0.0})
                k["max_processes"] = max(k["max_processes"], n)
                k["peak_pss_mib"] = max(k["peak_pss_mib"], round(pss / MIB, 1))
                k["peak_rss_mib"] = max(k["peak_rss_mib"], round(rss / MIB, 1))
        for kind, p in self.peak_proc.items():
            kinds_peak[kind]["largest_process_pss_mib"] = round(p["pss"] / MIB, 1)
            kinds_peak[kind]["largest_process_rss_mib"] = round(p["rss"] / MIB, 1)
        return {
            "samples": len(self.samples),
            "peak_pss_mib": round(top["pss"] / MIB, 1),
            "peak_pss_at_s": round(top["t"], 1),
            "peak_rss_sum_mib": round(top_rss["rss"] / MIB, 1),
            "at_peak_pss_by_kind_mib": {k: {"processes": v[0], "pss": round(v[2] / MIB, 1),
                                            "rss": round(v[1] / MIB, 1)}
                                        for k, v in sorted(top["kinds"].items())},
            "peak_by_kind": dict(sorted(kinds_peak.items())),
            "command_by_kind": dict(sorted(self.examples.items())),
        }


# --- one run ------------------------------------------------------------------------------

def _ts(s: str) -> float:
    return dt.datetime.fromisoformat(s).timestamp()


def round_times(audit: Path, t_launch: float) -> dict[str, Any]:
    """Start-up and per-round wall times from the coordinator's audit log: round r runs from
    its first training message (round 1) or the previous checkpoint to its checkpoint."""
    rows = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()]
    start = next((_ts(r["time"]) for r in rows if r["event"] == "run-start"), None)
    first_train = next((_ts(r["time"]) for r in rows
                        if r["event"] == "sent" and r.get("type") == "train"), None)
    ckpts = [(int(r["round"]), _ts(r["time"])) for r in rows if r["event"] == "checkpoint"]
    ends = dict(ckpts)
    per_round = []
    prev = first_train
    for rnd in sorted(ends):
        if prev is not None:
            per_round.append(round(ends[rnd] - prev, 1))
        prev = ends[rnd]
    timeouts = sum(1 for r in rows if r["event"] == "timeout")
    return {
        "serverapp_start_s": None if start is None else round(start - t_launch, 1),
        "first_round_start_s": None if first_train is None else round(first_train - t_launch, 1),
        "discovery_s": (None if start is None or first_train is None
                        else round(first_train - start, 1)),
        "round_s": per_round,
        "first_round_done_s": None if not ckpts else round(min(ends.items())[1] - t_launch, 1),
        "after_rounds_s": (None if not ckpts else
                           round(max(_ts(r["time"]) for r in rows) - max(ends.values()), 1)),
        "timeouts": timeouts,
    }


def run_one(n_sites: int, root: Path, runs: Path, rounds: int, extra: list[str],
            interval: float) -> dict[str, Any]:
    index = json.loads((root / "manifest_index.json").read_text())
    training = [s for s, e in index["sites"].items() if e["role"] == "train"]
    external = next(s for s, e in index["sites"].items() if e["role"] != "train")
    name = f"scale-{n_sites}"
    cmd = [hcc_fl(), "simulate", f"data_root={root}", f"runs_dir={runs}", f"run_name={name}",
           "overwrite=true", "task=ki67_ceus", "model=tiny", "strategy=fedavg",
           f"federation.rounds={rounds}", "baselines.centralized=false",
           "baselines.local=false", "report=false",
           f"federation.training_sites=[{','.join(training)}]",
           f"federation.external_site={external}", *extra, "--quiet"]
    log = runs / f"{name}.out"
    runs.mkdir(parents=True, exist_ok=True)
    t_launch = time.time()
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **OFFLINE})
        sampler = Sampler(proc.pid, interval)
        sampler.start()
        rc = proc.wait()
        wall = time.monotonic() - t0
        sampler.stop_flag.set()
        sampler.join()
    row: dict[str, Any] = {"sites": n_sites, "nodes": n_sites + 1, "rounds": rounds,
                           "exit_code": rc, "wall_s": round(wall, 1)}
    mem = sampler.summary()
    if rc != 0:
        row["error_tail"] = log.read_text()[-3000:]
        return {**row, **mem}
    run_dir = runs / name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    times = round_times(run_dir / "logs" / "audit-coordinator.jsonl", t_launch)
    history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    replies = {}
    for h in history:
        if h.get("arm") == "fedavg" and h.get("train_loss") is not None:
            replies[h["round"]] = replies.get(h["round"], 0) + 1
    fed = metrics.get("federated", {}).get("fedavg", {})
    row.update({
        "patients_per_site": index.get("per_site"),
        "aggregated_rounds": fed.get("aggregated_rounds"),
        "train_replies_per_round": [replies.get(r, 0) for r in range(1, rounds + 1)],
        "rejected_replies": len(metrics.get("rejected_replies", [])),
        "external_auc": metrics["external"]["fedavg"].get("auc"),
        "simulate_timing_s": metrics.get("timing_s"),
        **times,
    })
    return {**row, **mem}


def _fmt(row: dict[str, Any]) -> str:
    if row.get("exit_code") != 0:
        return f"N={row['sites']}: FAILED (exit {row['exit_code']}), see the JSON"
    return (f"N={row['sites']:>4}: wall {row['wall_s']:7.1f} s, first round starts at "
            f"{row['first_round_start_s']} s, rounds {row['round_s']} s, peak PSS "
            f"{row['peak_pss_mib']:.0f} MiB (RSS sum {row['peak_rss_sum_mib']:.0f} MiB)")


def scaling(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per extra site, between the smallest and the largest successful N."""
    ok = [r for r in rows if r.get("exit_code") == 0]
    if len(ok) < 2:
        return {}
    a, b = min(ok, key=lambda r: r["sites"]), max(ok, key=lambda r: r["sites"])
    dn = b["sites"] - a["sites"]
    mean = [sum(r["round_s"]) / len(r["round_s"]) for r in (a, b)]
    later = [sum(r["round_s"][1:]) / max(1, len(r["round_s"]) - 1) for r in (a, b)]
    return {
        "between": [a["sites"], b["sites"]],
        "pss_mib_per_extra_site": round((b["peak_pss_mib"] - a["peak_pss_mib"]) / dn, 2),
        "peak_pss_ratio": round(b["peak_pss_mib"] / a["peak_pss_mib"], 2),
        "mean_round_s_per_extra_site": round((mean[1] - mean[0]) / dn, 3),
        "mean_round_ratio": round(mean[1] / mean[0], 2),
        "later_round_s_per_site": [round(later[0] / a["sites"], 3),
                                   round(later[1] / b["sites"], 3)],
        "first_round_start_ratio": round(b["first_round_start_s"] / a["first_round_start_s"], 2),
        "wall_ratio": round(b["wall_s"] / a["wall_s"], 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-site", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phantom", default="data/phantom")
    p.add_argument("--interval", type=float, default=0.5, help="memory sampling period (s)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("overrides", nargs="*", help="extra KEY=VALUE for hcc-fl simulate")
    args = p.parse_args()
    phantom = Path(args.phantom).resolve()
    if not (phantom / "manifest_index.json").exists():
        subprocess.run([hcc_fl(), "synth", "--out", str(phantom), "--seed", "0"], check=True)
    rows = []
    for n in args.sites:
        root = build_root(phantom, n, args.per_site, args.seed, BENCH / "data" / f"scale-{n}")
        row = run_one(n, root, BENCH / "runs", args.rounds, args.overrides, args.interval)
        rows.append(row)
        print(_fmt(row), flush=True)
    path = write_result(
        "scale", rows, Path(args.out) if args.out else None,
        scaling=scaling(rows),
        goals={"issue": "100 simulated sites of the tiny task in simulation on 24 GB: peak "
                        "memory and round time"},
        notes=[
            f"Each training site lists {args.per_site} patients drawn (seeded) from the phantom's "
            "training sites, both classes in train and val; sites share patients and image "
            "files, so the external AUC says nothing about accuracy at scale.",
            "Memory: the simulate process and all its descendants (SuperLink, ServerApp, "
            "simulation runtime with the Ray driver, Ray GCS/raylet/workers) sampled every "
            f"{args.interval} s; PSS from /proc/<pid>/smaps_rollup (shared libraries counted "
            "once in total), RSS summed over processes counts them once per process.",
            "Round times from the coordinator's audit log: round 1 from its first training "
            "message to its checkpoint, later rounds checkpoint to checkpoint (training of all "
            "sites plus per-round validation). first_round_start_s is from the launch of "
            "hcc-fl simulate (manifest checks, SuperLink, flwr run, Ray start, discovery).",
        ],
    )
    print(f"wrote {path}")
    return 0 if all(r.get("exit_code") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
