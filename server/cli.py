"""``hcc-fl-server``: the coordinator (Flower SuperLink + ServerApp) for a real deployment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hcc_fl.shared.errors import DataError
from hcc_fl.shared.logs import run_cli

EPILOG = """\
examples:
  hcc-fl certs init --dir pki --host coordinator.example.org --host 10.0.0.5
  hcc-fl certs add-site site_A --dir pki     # hand pki/sites/site_A/ to that hospital
  hcc-fl certs add-site site_EXT --role external --dir pki
  hcc-fl certs revoke-site site_A --dir pki  # also takes it out of a running run
  hcc-fl-server --pki pki --port 9092 run_name=study1 federation.rounds=20
  hcc-fl-server --pki pki --port 9092 --resume runs/study1   # after a crash

The coordinator holds no patient data: it runs the federated arms only (no baselines).
A site's name and role are those of the allow-listed key it connects with.
Sites connect with `hcc-fl-client --site-config SITE.yaml`.
"""


def _serve(args: argparse.Namespace) -> int:
    from hcc_fl.server.config import ConfigError
    from hcc_fl.server.flower_runtime import Deployment
    from hcc_fl.server.simulate import experiment_config, run_simulation, summarise_run

    if not args.insecure and not args.pki:
        print("error: TLS certificates are required: pass --pki DIR (created by "
              "`hcc-fl certs init`), or --insecure for a local test only", file=sys.stderr)
        return 2
    if args.insecure:
        print("WARNING: --insecure: no TLS and no site authentication; anyone who reaches "
              f"{args.host}:{args.port} can join or read updates. Use only for local tests.",
              file=sys.stderr)
    try:
        cfg = experiment_config(args.overrides, args.resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    deploy = Deployment(Path(args.pki).resolve() if args.pki else None, args.host, args.port,
                        args.insecure)
    try:
        run_dir = run_simulation(cfg, quiet=args.quiet, deployment=deploy)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summarise_run(run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hcc-fl-server`` argument parser."""
    p = argparse.ArgumentParser(
        prog="hcc-fl-server",
        description="hcc-fl coordinator: starts Flower's SuperLink with TLS and site-key "
        "authentication, registers the allow-listed site keys, runs the configured federated "
        "arms against the connected sites, and writes the run directory and report (as "
        "`hcc-fl simulate` does). Waits for the sites at most federation.discovery_timeout_s.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides, e.g. federation.rounds=5 strategy=fedprox")
    p.add_argument("--pki", help="PKI folder from `hcc-fl certs init` (CA, server cert, "
                   "authorized/ site keys)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the SuperLink listens on (default: %(default)s)")
    p.add_argument("--port", type=int, default=9092, help="port (default: %(default)s)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no site authentication (local tests only; warned every round)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run (runs/NAME) from its last checkpoint: "
                   "finished arms are kept, the running arm restarts after its last round")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hcc-fl-server``."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
