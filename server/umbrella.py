"""``hcc-fl``: the umbrella command (``synth``, ``simulate``, ``report``, ``certs``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hcc_fl.shared.errors import DataError
from hcc_fl.shared.logs import run_cli

EPILOG = """\
examples:
  hcc-fl synth --out data/phantom --seed 0
  hcc-fl simulate data_root=data/phantom run_name=demo
  hcc-fl simulate strategy=fedprox federation.rounds=5 baselines.local=false
  hcc-fl simulate --cfg            # print the composed configuration and exit
  hcc-fl report runs/demo-ki67_ceus

configuration groups (pick with group=option): task={ki67_ceus} model={tiny,full}
  strategy={fedavg_fedprox,fedavg,fedprox} federation={phantom}
"""


def _synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hcc_fl.shared.phantom import default_sites, generate

    out = Path(args.out)
    if (out / "manifest_index.json").exists() and not args.force:
        print(f"error: {out} already holds a phantom; pass --force to regenerate it",
              file=sys.stderr)
        return 2
    sites = default_sites(args.scale)
    with tqdm(total=sum(s.n for s in sites), desc="phantom patients", unit="patient",
              disable=None) as bar:

        def step(n: int) -> None:
            bar.update(n)

        index = generate(out, seed=args.seed, scale=args.scale, sites=sites, progress=step)
    for name, site in index["sites"].items():
        print(f"{name:<10} {site['role']:<9} {site['n']:>4} patients  {out / site['manifest']}")
    print(f"latent variables (never used for training): {out / 'truth.csv'}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from hcc_fl.server.config import ConfigError, to_yaml
    from hcc_fl.server.simulate import experiment_config, run_simulation, summarise_run

    try:
        cfg = experiment_config(args.overrides, args.resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.cfg:
        print(to_yaml(cfg))
        return 0
    try:
        run_dir = run_simulation(cfg, quiet=args.quiet)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, DataError):
            for issue in exc.issues[5:50]:
                print(f"  {issue}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summarise_run(run_dir))
    return 0


def _report(args: argparse.Namespace) -> int:
    from hcc_fl.server.report import write_report

    run_dir = Path(args.run_dir)
    missing = [n for n in ("metrics.json", "config.json") if not (run_dir / n).is_file()]
    if missing:
        print(f"error: {run_dir} is not a run directory (missing {', '.join(missing)})",
              file=sys.stderr)
        return 2
    try:
        path = write_report(run_dir, Path(args.out) if args.out else None)
    except (json.JSONDecodeError, KeyError) as exc:
        print(f"error: {run_dir / 'metrics.json'} cannot be read as a run's metrics ({exc})",
              file=sys.stderr)
        return 2
    print(path)
    return 0


def _certs(args: argparse.Namespace) -> int:
    from hcc_fl.server import certs

    folder = Path(args.dir)
    if args.action in ("add-site", "revoke-site") and not args.name:
        print(f"error: `hcc-fl certs {args.action}` needs a site NAME", file=sys.stderr)
        return 2
    try:
        if args.action == "init":
            certs.init_pki(folder, args.host or ["localhost", "127.0.0.1"], force=args.force)
            print(f"CA and coordinator certificate written under {folder}")
            print(f"  give every site: {folder / 'ca' / 'ca.crt'}")
            print(f"  keep private:    {folder / 'ca' / 'ca.key'}, "
                  f"{folder / 'server' / 'server.key'}")
        elif args.action == "add-site":
            out = certs.add_site(folder, args.name, args.role)
            print(f"site '{args.name}' registered, role {args.role} "
                  f"({folder / 'authorized' / (args.name + '.pub')})")
            print(f"  hand {out}/ to that site only (its private key {args.name}.key and ca.crt),"
                  " then delete the private key here")
        elif args.action == "revoke-site":
            certs.revoke_site(folder, args.name)
            print(f"site '{args.name}' revoked: a running coordinator takes it out of the run "
                  "within a round and unregisters its key; later starts do not register it")
        else:
            for name, path in certs.allowed_sites(folder).items():
                print(f"{name:<20} {certs.site_role(folder, name):<9} {path}")
    except certs.CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hcc-fl`` argument parser."""
    p = argparse.ArgumentParser(
        prog="hcc-fl",
        description="hcc-fl: federated HCC imaging models. Generate a synthetic multi-site DICOM "
        "cohort, or run a federated experiment with its baselines in Flower's simulation engine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "synth", help="write the synthetic multi-site DICOM phantom",
        description="Write a deterministic multi-site HCC cohort as real DICOM: per patient a "
        "CEUS cine, B-mode/arterial/portal stills, a 4-phase DCE-MRI and a T0/T1 ultrasound pair "
        "with liver masks; a manifest.csv per site; truth.csv with the latent variables.",
    )
    s.add_argument("--out", default="data/phantom", help="output folder (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="global seed (default: %(default)s)")
    s.add_argument("--scale", type=float, default=1.0,
                   help="multiply every site's size (A 40, B 30, C 50, EXT 40) (default: 1.0)")
    s.add_argument("--force", action="store_true", help="regenerate over an existing phantom")
    s.set_defaults(func=_synth)

    m = sub.add_parser(
        "simulate", help="run the federated experiment (Flower simulation) and its baselines",
        description="Run FedAvg/FedProx over the training sites in Flower's simulation engine "
        "(a private local SuperLink, one virtual SuperNode per site; the external site only "
        "evaluates), plus the centralized and local baselines without Flower. Writes "
        "runs/<run_name>/ with config.yaml, history.jsonl, metrics.json, model.pt and logs/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    m.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides, e.g. federation.rounds=5 model=tiny seed=1")
    m.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    m.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run (runs/NAME) after its last checkpointed "
                   "round; finished arms are kept")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=_simulate)

    r = sub.add_parser(
        "report", help="write the self-contained HTML study report of a run directory",
        description="Write report.html (plots embedded, no network access) from a run "
        "directory: external-site ROC, calibration and decision curves, comparison tables with "
        "DeLong p-values, Kaplan-Meier curves by risk group, per-site and pooled validation, "
        "training curves and a model card. `simulate` writes it automatically.",
    )
    r.add_argument("run_dir", help="a run directory written by `hcc-fl simulate`")
    r.add_argument("--out", help="output file (default: RUN_DIR/report.html)")
    r.set_defaults(func=_report)

    c = sub.add_parser(
        "certs", help="create the coordinator's CA/TLS certificate and the sites' keys",
        description="Manage the coordinator's PKI: `init` creates a CA and the coordinator's "
        "TLS certificate (SANs from --host); `add-site NAME [--role external]` creates that "
        "site's EC P-384 key pair and puts its public key and role on the allow-list without "
        "re-issuing anything else (a site's name and role are those of the key it connects "
        "with); `revoke-site NAME` removes it from the allow-list, also from a running "
        "coordinator's run; `list` shows the allowed sites and their roles.",
    )
    c.add_argument("action", choices=("init", "add-site", "revoke-site", "list"))
    c.add_argument("name", nargs="?", help="site name (add-site, revoke-site)")
    c.add_argument("--dir", default="pki", help="PKI folder (default: %(default)s)")
    c.add_argument("--host", action="append",
                   help="host name or IP for the certificate's SANs (repeat; default: "
                   "localhost and 127.0.0.1)")
    c.add_argument("--force", action="store_true", help="init: replace an existing PKI")
    c.add_argument("--role", choices=("train", "external"), default="train",
                   help="add-site: the site's role, declared here and not by the site "
                   "(default: %(default)s)")
    c.set_defaults(func=_certs)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hcc-fl``."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
