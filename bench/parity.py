"""Parity: federated (FedAvg, FedProx) vs centralized vs the best single site, per task and seed.

Usage: python bench/parity.py [--tasks ki67_ceus ...] [--seeds 0 1 2] [--collect-only]

For every seed a phantom is generated with that seed (``bench/data/phantom-s<seed>``) and
``hcc-fl simulate`` runs the task with the same seed, the tiny profile and the task's default
recipe (both federated arms, centralized and local baselines). The external site's measure of
every arm and model is collected into ``bench/results/parity.json``: AUC for the classifiers;
for ``aclf_us`` also the Cox models' C-index and the segmentation Dice. ``--collect-only``
re-reads finished runs without training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

BENCH = Path(__file__).resolve().parent
TASKS = ["ki67_ceus", "tace_ceus", "er_ceus", "aclf_us", "phcc_mri"]
# The model whose external measure is the task's headline (the seed paper's main model).
HEADLINE = {"ki67_ceus": "", "tace_ceus": "", "er_ceus": "combined", "aclf_us": "",
            "phcc_mri": ""}
FED_ARMS = ("fedavg", "fedprox")


def hcc_fl() -> str:
    exe = Path(sys.executable).parent / "hcc-fl"
    return str(exe) if exe.exists() else "hcc-fl"


def ensure_phantom(seed: int, data: Path) -> Path:
    root = data / f"phantom-s{seed}"
    if not (root / "manifest_index.json").exists():
        subprocess.run([hcc_fl(), "synth", "--out", str(root), "--seed", str(seed)], check=True)
    return root


def run_one(task: str, seed: int, data_root: Path, runs: Path, extra: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run([hcc_fl(), "simulate", f"task={task}", f"data_root={data_root}",
                    f"runs_dir={runs}", f"run_name=parity-{task}-s{seed}", f"seed={seed}",
                    "overwrite=true", "report=false", *extra], check=True)
    return time.monotonic() - t0


def measures(metrics: dict[str, Any]) -> dict[str, float]:
    """``<arm>[/<model>] -> value`` for every external entry: ``auc`` always; ``c:<model>`` for
    survival C-indices and ``dice:<key>`` for segmentation means where the run has them."""
    out: dict[str, float] = {}
    for key, rep in metrics["external"].items():
        if not isinstance(rep, dict):
            continue
        if rep.get("auc") is not None:
            out[f"{key}|auc"] = float(rep["auc"])
        surv = rep.get("survival_models") or {}
        for model, c in (surv.get("c_index") or {}).items():
            if isinstance(c, dict) and c.get("c") is not None:
                out[f"{key}|c:{model}"] = float(c["c"])
        seg = rep.get("segmentation") or {}
        for name, v in seg.items():
            if isinstance(v, dict) and v.get("mean") is not None:
                out[f"{key}|dice:{name}"] = float(v["mean"])
    return out


def summarise(task: str, per_seed: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """Rows per (model, measure): mean and SD over seeds of each arm, the best local site per
    seed, and the two goals (federated within 0.01 of centralized, >= 0.05 above best local)."""
    keys: set[tuple[str, str]] = set()
    for vals in per_seed.values():
        for k in vals:
            arm_model, measure = k.split("|")
            model = arm_model.split("/", 1)[1] if "/" in arm_model else ""
            keys.add((model, measure))
    rows = []
    for model, measure in sorted(keys):
        suffix = f"/{model}" if model else ""

        def get(vals: dict[str, float], arm: str, sfx: str = suffix,
                m: str = measure) -> float | None:
            return vals.get(f"{arm}{sfx}|{m}")

        series: dict[str, list[float]] = {}
        for arm in (*FED_ARMS, "centralized", "best_local"):
            xs = []
            for vals in per_seed.values():
                if arm == "best_local":
                    locs = [v for k, v in vals.items() if k.startswith("local:") and
                            k.split("|")[1] == measure and
                            (k.split("|")[0].split("/", 1)[1:] or [""])[0] == model]
                    x = max(locs) if locs else None
                else:
                    x = get(vals, arm)
                if x is not None:
                    xs.append(x)
            series[arm] = xs
        if not series["centralized"] or not any(series[a] for a in FED_ARMS):
            continue
        row: dict[str, Any] = {"task": task, "model": model or "deep", "measure": measure,
                               "seeds": len(per_seed),
                               "headline": model == HEADLINE.get(task, "") and measure == "auc"}
        for arm, xs in series.items():
            row[f"{arm}_mean"] = float(np.mean(xs)) if xs else None
            row[f"{arm}_sd"] = float(np.std(xs, ddof=1)) if len(xs) > 1 else None
            row[f"{arm}_values"] = xs
        best_fed = max(row[f"{a}_mean"] for a in FED_ARMS if row[f"{a}_mean"] is not None)
        row["fed_minus_central"] = best_fed - row["centralized_mean"]
        row["fed_minus_best_local"] = (best_fed - row["best_local_mean"]
                                       if row["best_local_mean"] is not None else None)
        row["goal_within_0_01_of_central"] = row["fed_minus_central"] >= -0.01
        row["goal_0_05_above_best_local"] = (row["fed_minus_best_local"] is not None and
                                             row["fed_minus_best_local"] >= 0.05)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=BENCH / "data")
    p.add_argument("--runs", type=Path, default=BENCH / "runs")
    p.add_argument("--collect-only", action="store_true", help="only read finished runs")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="extra `hcc-fl simulate` overrides (a recipe under test)")
    a = p.parse_args()
    rows: list[dict[str, Any]] = []
    wall: dict[str, float] = {}
    for task in a.tasks:
        per_seed: dict[int, dict[str, float]] = {}
        for seed in a.seeds:
            run = a.runs / f"parity-{task}-s{seed}"
            if not a.collect_only:
                root = ensure_phantom(seed, a.data)
                wall[f"{task}-s{seed}"] = round(run_one(task, seed, root, a.runs, a.overrides), 1)
            mpath = run / "metrics.json"
            if mpath.exists():
                per_seed[seed] = measures(json.loads(mpath.read_text()))
        rows += summarise(task, per_seed)
    path = write_result("parity", rows, a.out, wall_s=wall, overrides=a.overrides,
                        goals={"fed_minus_central": ">= -0.01",
                               "fed_minus_best_local": ">= 0.05"})
    for r in rows:
        if r["measure"] == "auc" or r["measure"].startswith(("c:", "dice:")):
            print(f"{r['task']:10s} {r['model']:10s} {r['measure']:14s} "
                  f"fedavg {r['fedavg_mean']:.3f} fedprox {r['fedprox_mean']:.3f} "
                  f"central {r['centralized_mean']:.3f} best-local "
                  f"{(r['best_local_mean'] or float('nan')):.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
