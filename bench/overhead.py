"""Flower's overhead: the same local training in a plain loop, in simulation and in deployment.

Usage: python bench/overhead.py [--data data/phantom] [--rounds 1 3] [--local-epochs 20]
           [--modes plain simulation deployment deployment-cold] [--reps 1]

Task ``ki67_ceus``, tiny profile, the phantom's three training sites, FedAvg:
- ``plain``: a fresh Python process that loads the sites' data and, per round, trains each site
  with hcc-fl's ``train_one_round``, averages the weights and validates (no Flower);
- ``simulation``: ``hcc-fl simulate`` (one FedAvg arm, no baselines, no report);
- ``deployment``: ``hcc-fl-server --insecure`` and one ``hcc-fl-client`` per phantom site on
  127.0.0.1 (real SuperLink and SuperNodes; ClientApp processes forked by each site's warm
  launcher); ``deployment-cold``: the same with ``--cold-clientapp`` (Flower's own
  process-per-message start).
Every mode runs at each round count, interleaved (mode order rotates between repetitions);
wall time t(R) = start-up + R x per-round (fitted on the round counts). In deployment each
ClientApp process records its phase timestamps (``HCC_FL_TIMINGS``), summarised per message kind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

BIN = Path(sys.executable).parent
TASK, PROFILE = "ki67_ceus", "tiny"
PHASES = ("python-ready", "flwr-imported", "task-pulled", "bundle-installed", "handler-start",
          "model-built", "data-loaded", "first-step", "trained", "handler-end", "exit")


def _env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- plain loop (runs in its own process: python -c ... plain-worker) -----------------------
def plain_worker(data: Path, rounds: int, epochs: int, threads: int, seed: int) -> None:
    """The plain in-process loop; prints a JSON line with its internal timings."""
    t0 = time.perf_counter()
    import torch

    from hcc_fl.client.data import load_site
    from hcc_fl.client.evaluate import validation_metrics
    from hcc_fl.client.train import TrainConfig, predict, train_one_round
    from hcc_fl.shared.models import build_model

    torch.set_num_threads(threads)
    t_import = time.perf_counter() - t0
    index = json.loads((data / "manifest_index.json").read_text())
    sites = {k: v for k, v in index["sites"].items() if v["role"] == "train"}
    ext = next(k for k, v in index["sites"].items() if v["role"] != "train")
    train = {s: load_site(data / v["manifest"], TASK, PROFILE, ("train",))
             for s, v in sites.items()}
    val = {s: load_site(data / v["manifest"], TASK, PROFILE, ("val",))
           for s, v in sites.items()}
    test = load_site(data / index["sites"][ext]["manifest"], TASK, PROFILE, ("test",))
    torch.manual_seed(seed)
    glob = build_model(TASK, PROFILE).state_dict()
    t_ready = time.perf_counter() - t0
    round_s = []
    for rnd in range(1, rounds + 1):
        tr = time.perf_counter()
        states, weights = [], []
        for site, d in train.items():
            model = build_model(TASK, PROFILE)
            model.load_state_dict(glob)
            cfg = TrainConfig(epochs=epochs, batch_size=8, lr=1e-3, weight_decay=1e-4,
                              seed=seed * 100003 + rnd * 101 + zlib.crc32(site.encode()))
            out = train_one_round(model, d, cfg)
            states.append(model.state_dict())
            weights.append(out.n_examples)
        total = sum(weights)
        glob = {k: sum(w * s[k].float() for w, s in zip(weights, states, strict=True)) / total
                for k in glob}
        model = build_model(TASK, PROFILE)
        model.load_state_dict(glob)
        for site in train:
            validation_metrics(model, val[site], "cpu")
        round_s.append(time.perf_counter() - tr)
    predict(model, test)
    print(json.dumps({"import_s": t_import, "ready_s": t_ready, "round_s": round_s}))


# --- one measured run per mode ----------------------------------------------------------------
def run_plain(data: Path, rounds: int, epochs: int, threads: int, work: Path) -> dict[str, Any]:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import overhead; "
            f"overhead.plain_worker(__import__('pathlib').Path({str(data)!r}), {rounds}, "
            f"{epochs}, {threads}, 0)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), check=True)
    wall = time.perf_counter() - t0
    inner = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "plain": inner}


def _overrides(runs: Path, name: str, rounds: int, epochs: int, threads: int) -> list[str]:
    return [f"runs_dir={runs}", f"run_name={name}", "strategy=fedavg", f"task={TASK}",
            f"federation.rounds={rounds}", f"federation.local_epochs={epochs}",
            f"federation.client_cpus={threads}", "report=false", "overwrite=true"]


def run_simulation(data: Path, rounds: int, epochs: int, threads: int, work: Path
                   ) -> dict[str, Any]:
    name = f"sim-r{rounds}"
    t0 = time.perf_counter()
    out = subprocess.run([str(BIN / "hcc-fl"), "simulate", f"data_root={data}",
                          *_overrides(work / "runs", name, rounds, epochs, threads),
                          "baselines.centralized=false", "baselines.local=false", "--quiet"],
                         capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"simulate failed: {out.stderr[-2000:]}")
    timing = json.loads((work / "runs" / name / "metrics.json").read_text())["timing_s"]
    return {"wall_s": wall, "timing": timing}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_deployment(data: Path, rounds: int, epochs: int, threads: int, work: Path,
                   cold: bool) -> dict[str, Any]:
    name = f"dep{'-cold' if cold else ''}-r{rounds}"
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    timings = folder / "timings.jsonl"
    index = json.loads((data / "manifest_index.json").read_text())
    port = _free_port()
    log = (folder / "coordinator.log").open("wb")
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [str(BIN / "hcc-fl-server"), "--insecure", "--port", str(port), "--quiet",
         *_overrides(work / "runs", name, rounds, epochs, threads)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_env())
    clients: list[subprocess.Popen[bytes]] = []
    try:
        while b"coordinator ready" not in (folder / "coordinator.log").read_bytes():
            if server.poll() is not None:
                raise RuntimeError((folder / "coordinator.log").read_text()[-2000:])
            time.sleep(0.2)
        t_ready = time.perf_counter() - t0
        for site, entry in index["sites"].items():
            cfg = folder / f"{site}.yaml"
            cfg.write_text(f"site: {site}\nrole: {entry['role']}\ntask: {TASK}\n"
                           f"manifest: {data / entry['manifest']}\n"
                           f"coordinator: 127.0.0.1:{port}\ninsecure: true\n"
                           f"runtime_port: {_free_port()}\n"
                           "disclosure: {mode: exact}\n")  # phantom: below the cells minimums
            argv = [str(BIN / "hcc-fl-client"), "--site-config", str(cfg),
                    "--state-dir", str(folder / f"s-{site}")]
            clients.append(subprocess.Popen(
                argv + (["--cold-clientapp"] if cold else []),
                stdout=(folder / f"{site}.log").open("wb"), stderr=subprocess.STDOUT,
                start_new_session=True, env={**_env(), "HCC_FL_TIMINGS": str(timings)}))
        rc = server.wait(timeout=3600)
        wall = time.perf_counter() - t0
    finally:
        for proc in [*clients, server]:
            _stop(proc)
        log.close()
    if rc != 0 or not (work / "runs" / name / "metrics.json").is_file():
        raise RuntimeError(f"deployment failed (exit {rc}); see {folder}")
    records = [json.loads(x) for x in timings.read_text().splitlines()] if timings.is_file() else []
    return {"wall_s": wall, "coordinator_ready_s": t_ready, "messages": records}


# --- analysis ---------------------------------------------------------------------------------
def fit(points: dict[int, float]) -> tuple[float, float]:
    """(start-up, per round) of t = start + R x per_round, least squares over the round counts."""
    rs = sorted(points)
    if len(rs) < 2:
        return float("nan"), float("nan")
    mr = statistics.fmean(rs)
    mt = statistics.fmean(points[r] for r in rs)
    slope = (sum((r - mr) * (points[r] - mt) for r in rs) / sum((r - mr) ** 2 for r in rs))
    return mt - slope * mr, slope


def breakdown(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median seconds between consecutive phases, per message kind."""
    out: dict[str, dict[str, Any]] = {}
    kinds = sorted({str(m.get("kind", "?")) for m in messages})
    for kind in kinds:
        recs = [m["phases"] for m in messages if str(m.get("kind", "?")) == kind]
        steps: dict[str, list[float]] = {}
        for ph in recs:
            prev_name, prev_t = "launch", 0.0
            for name in PHASES:
                if name in ph:
                    steps.setdefault(f"{prev_name}->{name}", []).append(ph[name] - prev_t)
                    prev_name, prev_t = name, ph[name]
        out[kind] = {"n": len(recs),
                     "total_s": round(statistics.median(p["exit"] for p in recs if "exit" in p), 3)
                     if any("exit" in p for p in recs) else None,
                     **{k: round(statistics.median(v), 3) for k, v in steps.items()}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/phantom")
    p.add_argument("--rounds", type=int, nargs="+", default=[1, 3])
    p.add_argument("--local-epochs", type=int, default=20)
    p.add_argument("--client-cpus", type=int, default=1,
                   help="torch threads per site (the project default, 1)")
    p.add_argument("--modes", nargs="+", default=["plain", "simulation", "deployment",
                                                  "deployment-cold"])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()
    data = Path(args.data).resolve()
    work = Path(tempfile.mkdtemp(prefix="hcc-overhead-"))
    walls: dict[str, dict[int, list[float]]] = {m: {r: [] for r in args.rounds}
                                                for m in args.modes}
    runs: list[dict[str, Any]] = []
    messages: dict[str, list[dict[str, Any]]] = {}
    try:
        for rep in range(args.reps):
            for r in args.rounds:
                k = (rep * len(args.rounds) + args.rounds.index(r)) % len(args.modes)
                for mode in args.modes[k:] + args.modes[:k]:  # rotate the order
                    t = time.strftime("%H:%M:%S")
                    load = os.getloadavg()[0]
                    if mode == "plain":
                        res = run_plain(data, r, args.local_epochs, args.client_cpus, work)
                    elif mode == "simulation":
                        res = run_simulation(data, r, args.local_epochs, args.client_cpus, work)
                    else:
                        res = run_deployment(data, r, args.local_epochs, args.client_cpus, work,
                                             cold=mode == "deployment-cold")
                        messages.setdefault(mode, []).extend(res.pop("messages"))
                    walls[mode][r].append(res["wall_s"])
                    runs.append({"mode": mode, "rounds": r, "rep": rep, "at": t,
                                 "load_1min": round(load, 2), **res})
                    print(f"[{t}] {mode:>16} R={r}: {res['wall_s']:.1f} s (load {load:.1f})",
                          flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    fits = {m: fit({r: statistics.median(v) for r, v in walls[m].items()}) for m in args.modes}
    base_start, base_round = fits.get("plain", (float("nan"), float("nan")))
    for mode, (start, per_round) in fits.items():
        rows.append({
            "mode": mode, "local_epochs": args.local_epochs, "client_cpus": args.client_cpus,
            **{f"wall_R{r}_s": round(statistics.median(v), 2) for r, v in walls[mode].items()},
            "startup_s": round(start, 2), "per_round_s": round(per_round, 2),
            "extra_startup_s": round(start - base_start, 2),
            "extra_per_round_s": round(per_round - base_round, 2),
            "ratio_per_round": round(per_round / base_round, 3),
        })
    plain_rounds = [x for run in runs if run["mode"] == "plain"
                    for x in run["plain"]["round_s"]]
    for row in rows:
        print(json.dumps(row))
    path = write_result(
        "overhead", rows, Path(args.out),
        goals={"per_round_ratio": "<= 1.05 when a round's local work >= 10 s",
               "startup_s": "<= 15 s fixed start-up"},
        plain_round_local_work_s=round(statistics.median(plain_rounds), 2)
        if plain_rounds else None,
        deployment_breakdown={m: breakdown(v) for m, v in messages.items()},
        runs=runs,
        notes=("wall time of the whole command per mode and round count; start-up and "
               "per-round from t = start + R x per_round over the round counts; deployment "
               "insecure on 127.0.0.1 (no TLS/nginx), 3 training sites + the external site "
               "each as a SuperNode on this machine. Breakdown: median seconds between a "
               "ClientApp process's phases, from its launch by the SuperNode's SuperExec."),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
