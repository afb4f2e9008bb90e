"""``hcc-fl deploy-demo``: a real deployment on 127.0.0.1 to watch (``make deploy-demo``).

Creates a PKI and one key per site, starts ``hcc-fl-server`` (TLS, site keys, nginx front) and
one ``hcc-fl-client`` per site of the phantom in the background, runs the configured rounds,
stops every process, copies the sites' audit logs into the run directory, and compares the
external-site results with ``hcc-fl simulate`` of the same configuration.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hcc_fl.server.flower_runtime import free_port
from hcc_fl.shared.procs import stop_group

TIMING_KEYS = ("seconds", "wait_s", "train_seconds")


def numeric_leaves(value: Any, path: str = "") -> dict[str, float]:
    """Every number in a JSON value by its path (``a.b[2].c``); timings left out."""
    out: dict[str, float] = {}
    if isinstance(value, bool):
        return out
    if isinstance(value, int | float):
        return {path: float(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            if not any(t in str(k) for t in TIMING_KEYS):
                out.update(numeric_leaves(v, f"{path}.{k}" if path else str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(numeric_leaves(v, f"{path}[{i}]"))
    return out


def compare_metrics(dep: dict[str, Any], ref: dict[str, Any], tol: float = 1e-6
                    ) -> tuple[int, list[str]]:
    """Compare the external results and the components block (tabular fits, comparisons) of a
    deployment's metrics.json with the simulation's: returns the number of values compared and
    the differences above ``tol`` (a value missing on one side counts as one)."""
    a = numeric_leaves({k: dep.get(k) for k in ("external", "components", "comparisons")})
    b = numeric_leaves({k: ref.get(k) for k in ("external", "components", "comparisons")})
    bad = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            bad.append(f"{key}: only in the {'simulation' if x is None else 'deployment'}")
        elif not (abs(x - y) <= tol or (x != x and y != y)):
            bad.append(f"{key}: {x!r} vs {y!r}")
    return len(set(a) & set(b)), bad


def _script(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def run_deploy_demo(data_root: Path, runs_dir: Path, name: str, rounds: int,
                    compare: bool = True, task: str = "ki67_ceus") -> int:
    """Run the demo; returns 0 when the deployment finished (and matched the simulation)."""
    index = json.loads((data_root / "manifest_index.json").read_text())
    sites: dict[str, Any] = index["sites"]
    work = runs_dir / f".{name}-sites"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    pki = work / "pki"
    hcc = _script("hcc-fl")
    subprocess.run([hcc, "certs", "init", "--dir", str(pki)], check=True,
                   stdout=subprocess.DEVNULL)
    for site, entry in sites.items():  # the coordinator declares each site's role
        subprocess.run([hcc, "certs", "add-site", site, "--dir", str(pki),
                        "--role", str(entry["role"])], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    overrides = [f"task={task}", f"data_root={data_root}", f"runs_dir={runs_dir}",
                 f"run_name={name}", f"federation.rounds={rounds}", "strategy=fedavg",
                 "overwrite=true"]
    print(f"[deploy-demo] coordinator on 127.0.0.1:{port} (TLS, site keys, nginx front); "
          f"logs in {work / 'logs'}", flush=True)
    server_log = (work / "logs" / "coordinator.log").open("wb")
    server = subprocess.Popen([_script("hcc-fl-server"), "--pki", str(pki), "--port", str(port),
                               "--quiet", *overrides], stdout=server_log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    clients: dict[str, subprocess.Popen[bytes]] = {}
    try:
        deadline = time.monotonic() + 120
        while b"coordinator ready" not in (work / "logs" / "coordinator.log").read_bytes():
            if server.poll() is not None or time.monotonic() > deadline:
                print((work / "logs" / "coordinator.log").read_text()[-3000:], file=sys.stderr)
                print("[deploy-demo] the coordinator did not start", file=sys.stderr)
                return 1
            time.sleep(0.5)
        for site, entry in sites.items():
            cfg = work / f"{site}.yaml"
            cfg.write_text(
                f"site: {site}\nrole: {entry['role']}\ntask: {task}\n"
                f"manifest: {data_root / entry['manifest']}\ncoordinator: 127.0.0.1:{port}\n"
                f"ca_certificate: {pki / 'sites' / site / 'ca.crt'}\n"
                f"private_key: {pki / 'sites' / site / (site + '.key')}\n"
                f"runtime_port: {free_port()}\n"
                # the phantom's splits are below the cells policy's minimums (docs/privacy.md)
                "disclosure: {mode: exact}\n"
            )
            log = (work / "logs" / f"{site}.log").open("wb")
            clients[site] = subprocess.Popen([_script("hcc-fl-client"), "--site-config",
                                              str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            print(f"[deploy-demo] started {site} ({entry['role']})", flush=True)
        print("[deploy-demo] running; follow with: tail -f "
              f"{work / 'logs' / 'coordinator.log'}", flush=True)
        rc = server.wait()
    finally:
        for proc in [*clients.values(), server]:
            stop_group(proc, 30.0)
        server_log.close()
    run = runs_dir / name
    if rc != 0 or not (run / "metrics.json").is_file():
        print((work / "logs" / "coordinator.log").read_text()[-3000:], file=sys.stderr)
        print(f"[deploy-demo] the deployment failed (exit {rc})", file=sys.stderr)
        return 1
    for site in sites:
        audit = work / f".hcc-fl-{site}" / "audit.jsonl"
        if audit.is_file():
            shutil.copyfile(audit, run / "logs" / f"audit-{site}.jsonl")
        shutil.copyfile(work / "logs" / f"{site}.log", run / "logs" / f"site-{site}.log")
    print(f"[deploy-demo] stopped every process; run directory {run}")
    if not compare:
        return 0
    sim_name = f"{name}-simulation"
    print(f"[deploy-demo] the same configuration in simulation -> {runs_dir / sim_name}",
          flush=True)
    sim = subprocess.run([hcc, "simulate", *overrides[:-2], "strategy=fedavg",
                          f"run_name={sim_name}", "overwrite=true", "baselines.centralized=false",
                          "baselines.local=false", "--quiet"], capture_output=True, text=True)
    if sim.returncode != 0:
        print(sim.stderr[-3000:], file=sys.stderr)
        return 1
    dep = json.loads((run / "metrics.json").read_text())
    ref = json.loads((runs_dir / sim_name / "metrics.json").read_text())
    print("[deploy-demo] external site, deployment vs simulation: " + ", ".join(
        f"{k} {dep['external']['fedavg'][k]:.4f} vs {ref['external']['fedavg'][k]:.4f}"
        for k in ("auc", "threshold", "sensitivity", "specificity")))
    compared, bad = compare_metrics(dep, ref)
    if bad:
        print(f"[deploy-demo] MISMATCH in {len(bad)} of {compared} values: " + "; ".join(bad[:20]),
              file=sys.stderr)
        return 1
    print(f"[deploy-demo] all {compared} numbers of the external results and the models' fits "
          "identical within 1e-6")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hcc_fl.server.deploy_demo`` (what ``make deploy-demo`` runs)."""
    import argparse

    from hcc_fl.shared.logs import run_cli

    p = argparse.ArgumentParser(
        prog="python -m hcc_fl.server.deploy_demo",
        description="A real hcc-fl deployment on 127.0.0.1 to watch: certificates, the "
        "coordinator (TLS, site keys, nginx front) and one site process per phantom site in the "
        "background; runs the rounds, stops everything, keeps the run directory with the "
        "coordinator's and every site's audit log, and checks the result against the simulation "
        "of the same configuration.")
    p.add_argument("--data", default="data/phantom", help="phantom folder (hcc-fl synth)")
    p.add_argument("--runs", default="runs", help="runs folder (default: %(default)s)")
    p.add_argument("--name", default="deploy-demo", help="run name (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds (default: 2)")
    p.add_argument("--task", default="ki67_ceus", help="seed task (default: %(default)s)")
    p.add_argument("--no-compare", action="store_true", help="skip the simulation check")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=lambda a: run_deploy_demo(
        Path(a.data).resolve(), Path(a.runs).resolve(), a.name, a.rounds, not a.no_compare,
        a.task))
    return run_cli(p, argv)


if __name__ == "__main__":
    sys.exit(main())
