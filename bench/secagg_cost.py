"""What SecAgg+ costs per round, at 3 and 10 sites.

    .venv/bin/python bench/secagg_cost.py [--data data/phantom]

1. Protocol compute, in process (``hcc_fl.client.secagg``, the same functions the sites and the
   coordinator run): key set-up (with its signature), share (verifying n signatures), mask,
   the consistency signature and unmask (verifying t signatures) per site, and the
   coordinator's unmasking, for the CECMM tiny model's parameter shapes at n = 3 and 10 sites,
   against a plain weighted average of the same n updates, measured side by side.
2. End to end with ``--data``: ``hcc-fl simulate`` 3 rounds FedAvg at the phantom's 3 training
   sites, plain vs SecAgg+ (the extra messages per round are part of the cost).

Writes ``bench/results/secagg_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from hcc_fl.client.secagg import (
    Identity,
    SecAggConfig,
    site_masked,
    site_setup,
    site_share,
    site_sign_survivors,
    site_unmask,
    unmask_sum,
    write_identity_keys,
)
from hcc_fl.shared.models import build_model


@contextmanager
def _identities(n: int) -> Iterator[dict[int, Identity]]:
    with tempfile.TemporaryDirectory() as tmp:
        sites = {node: f"site{node}" for node in range(1, n + 1)}
        write_identity_keys(Path(tmp), list(sites.values()))
        yield {node: Identity.load(s, Path(tmp) / f"{s}.key", Path(tmp))
               for node, s in sites.items()}


def protocol_round(n: int, params: list[np.ndarray]) -> dict[str, float]:
    """Seconds per stage for one SecAgg+ round of n sites (site times are per site)."""
    cfg = SecAggConfig.for_sites(n, max_weight=50.0)
    with _identities(n) as ident:
        t = time.perf_counter()
        states, public = {}, {}
        for node in range(1, n + 1):
            states[node], public[node] = site_setup(ident[node], node, "r" * 32, "train-1", 1,
                                                    cfg)
        setup = (time.perf_counter() - t) / n
        t = time.perf_counter()
        inbox: dict[int, dict[int, bytes]] = {node: {} for node in states}
        for node, st in states.items():
            for dst, ct in site_share(st, ident[node], public).items():
                inbox[dst][node] = ct
        share = (time.perf_counter() - t) / n
        t = time.perf_counter()
        masked = {node: site_masked(st, inbox[node], params, 40.0)
                  for node, st in states.items()}
        mask = (time.perf_counter() - t) / n
        t = time.perf_counter()
        sigs = {node: site_sign_survivors(st, ident[node], sorted(masked))
                for node, st in states.items()}
        shares = [site_unmask(st, ident[node], sorted(masked), [], sigs)
                  for node, st in states.items()]
        sign_unmask = (time.perf_counter() - t) / n
        t = time.perf_counter()
        unmask_sum(cfg, {k: (v["c_pk"], v["s_pk"]) for k, v in public.items()}, masked, shares)
        unmask = time.perf_counter() - t
    t = time.perf_counter()
    updates = [[p + 0.01 * i for p in params] for i in range(n)]
    weights = np.arange(1, n + 1, dtype=np.float64)
    _ = [sum(w * u[k] for w, u in zip(weights, updates, strict=True)) / weights.sum()
         for k in range(len(params))]
    plain = time.perf_counter() - t
    return {"sites": n, "site_setup_s": setup, "site_share_s": share, "site_mask_s": mask,
            "site_consistency_and_unmask_s": sign_unmask, "coordinator_unmask_s": unmask,
            "plain_weighted_mean_s": plain, "coordinator_ratio": (unmask + plain) / plain,
            "site_total_s": setup + share + mask + sign_unmask}


def simulate(data: Path, tmp: Path, name: str, enabled: bool) -> float:
    """Seconds of the federated arm (3 rounds) from metrics.json."""
    exe = str(Path(sys.executable).parent / "hcc-fl")
    out = subprocess.run([exe, "simulate", f"data_root={data}", f"runs_dir={tmp}",
                          f"run_name={name}", "strategy=fedavg", "federation.rounds=3",
                          "baselines.centralized=false", "baselines.local=false", "report=false",
                          f"secure_aggregation.enabled={str(enabled).lower()}", "--quiet"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    m = json.loads((tmp / name / "metrics.json").read_text())
    return float(m["federated"]["fedavg"]["train_seconds"])


def main() -> int:
    """Run the measurements and write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="phantom for the end-to-end comparison (optional)")
    args = p.parse_args()
    model = build_model("ki67_ceus", "tiny")
    params = [v.detach().numpy().astype(np.float64) for v in model.state_dict().values()]
    rows = [protocol_round(n, params) for n in (3, 10)]
    for r in rows:
        print(json.dumps(r), flush=True)
    e2e = None
    if args.data:
        with tempfile.TemporaryDirectory() as tmp:
            plain = simulate(Path(args.data).resolve(), Path(tmp), "plain", False)
            secagg = simulate(Path(args.data).resolve(), Path(tmp), "secagg", True)
        e2e = {"sites": 3, "rounds": 3, "plain_s": plain, "secagg_s": secagg,
               "ratio": secagg / plain}
        print(json.dumps(e2e), flush=True)
    out = Path(__file__).parent / "results" / "secagg_cost.json"
    out.write_text(json.dumps({"benchmark": "secagg_cost", "params": int(
        sum(a.size for a in params)), "protocol": rows, "end_to_end": e2e}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
