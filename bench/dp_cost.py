"""What differential privacy costs: external AUC and wall time of FedAvg without DP, with local
DP-SGD at two budgets, and with central DP, on the same phantom, seed and schedule.

    .venv/bin/python bench/dp_cost.py --data data/phantom --rounds 10

Runs ``hcc-fl simulate`` once per setting (FedAvg only, no baselines) and writes
``bench/results/dp_cost.json``; the table in bench/README.md is copied from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "none": ["privacy=none"],
    "local DP, eps 8": ["privacy=dp", "privacy.target_epsilon=8"],
    "local DP, eps 3": ["privacy=dp", "privacy.target_epsilon=3"],
    "local DP, eps 1": ["privacy=dp", "privacy.target_epsilon=1"],
    "central DP, sigma 0.5": ["privacy=central-dp", "privacy.noise_multiplier=0.5"],
}


def main() -> int:
    """Run every setting and write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/phantom")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/dp_cost.json")
    args = p.parse_args()
    exe = str(Path(sys.executable).parent / "hcc-fl")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(SETTINGS.items()):
            t0 = time.monotonic()
            out = subprocess.run(
                [exe, "simulate", f"data_root={Path(args.data).resolve()}", f"runs_dir={tmp}",
                 f"run_name=r{i}", "strategy=fedavg", f"federation.rounds={args.rounds}",
                 f"seed={args.seed}", "baselines.centralized=false", "baselines.local=false",
                 "report=false", *extra, "--quiet"],
                capture_output=True, text=True)
            wall = time.monotonic() - t0
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            m = json.loads((Path(tmp) / f"r{i}" / "metrics.json").read_text())
            ext = m["external"]["fedavg"]
            privacy = m["privacy"]
            eps = {s: round(v["epsilon"], 3) for s, v in
                   privacy.get("epsilon", {}).get("fedavg", {}).items()}
            central = privacy.get("central", {}).get("fedavg")
            rows.append({"setting": name, "overrides": extra, "auc": ext["auc"],
                         "auc_ci": ext["auc_ci"], "wall_s": round(wall, 1),
                         "federated_s": m["timing_s"].get("fedavg_s"),
                         "site_epsilon": eps,
                         "central_epsilon": central and round(central["epsilon"], 3)})
            print(f"{name:<24} AUC {ext['auc']:.3f}  wall {wall:6.1f} s  eps {eps or central}",
                  flush=True)
    result = {"benchmark": "dp_cost", "rounds": args.rounds, "seed": args.seed,
              "data": args.data, "machine": f"{platform.node()} {platform.processor()}",
              "cpus": __import__("os").cpu_count(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
