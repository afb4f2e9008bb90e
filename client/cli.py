"""``hcc-fl-client``: run a site (``--site-config``), check its data (``check-data``), build
its export from the PACS (``pull``) or its preparation cache (``prepare``)."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

from hcc_fl.shared.errors import DataError
from hcc_fl.shared.logs import run_cli
from hcc_fl.shared.procs import stop_group
from hcc_fl.shared.tasks import TASKS, get_task


def _problems(title: str, exc: DataError) -> int:
    """Print a data error's issues (each names file, row and column) to stderr; exit code 1."""
    print(title, file=sys.stderr)
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)
    return 1


def _check_data(args: argparse.Namespace) -> int:
    from hcc_fl.client.decode_check import SizeLimits, use_limits
    from hcc_fl.client.manifest import validate_manifest

    task = get_task(args.task)
    splits = ("test",) if args.role == "external" else ("train",)
    try:
        limits = SizeLimits.from_mb(args.max_image_mb)
    except ValueError as exc:
        print(f"error: --max-image-mb: {exc}", file=sys.stderr)
        return 1
    use_limits(limits)
    try:
        manifest = validate_manifest(Path(args.manifest), task, splits,
                                     check_files=not args.no_files,
                                     allowed_roots=tuple(Path(r).resolve()
                                                         for r in args.allow_root),
                                     both_classes=splits if args.role == "external" else ())
    except DataError as exc:
        return _problems(f"{args.manifest}: {len(exc.issues)} problem(s) for task {task.name}:",
                         exc)
    counts = {s: len(manifest.rows_in((s,))) for s in ("train", "val", "test")}
    label = [r[task.label] for r in manifest.rows]
    print(f"{manifest.path}: OK for task {task.name} ({len(manifest.rows)} rows; "
          f"train {counts['train']}, val {counts['val']}, test {counts['test']}; "
          f"label '{task.label}' positive {label.count('1')}, negative {label.count('0')}; "
          f"images decoded within {limits.mb:g} MiB each)"
          if not args.no_files else f"{manifest.path}: OK for task {task.name} (table only; "
          f"{len(manifest.rows)} rows)")
    for split in ("train", "val"):
        got = {r[task.label] for r in manifest.rows_in((split,))}
        if len(got) == 1:
            print(f"note: split '{split}' holds one class of '{task.label}'; the coordinator "
                  f"refuses a run whose pooled '{split}' split lacks a class")
    print(f"manifest sha256 {manifest.sha256}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    """Build the site's export from the PACS (see :mod:`hcc_fl.client.pacs`)."""
    from hcc_fl.client.pacs import format_table, pull
    from hcc_fl.client.pacs_config import load_pacs_config, load_pull_target
    from hcc_fl.client.pacs_net import PacsError

    try:
        cfg = load_pull_target(args.site_config)
        pacs = load_pacs_config(args.site_config)
        task = get_task(cfg.task)
        state = _state_home(args, cfg.path, cfg.site)
        result = pull(Path(args.cohort), task, pacs, cfg.manifest, state, force=args.force,
                      progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {len(exc.issues)} problem(s); nothing was pulled:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    except PacsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    done = sum(p.complete for p in result.patients)
    mb = result.fetched_bytes / 1e6
    print(f"{done} of {len(result.patients)} patient(s) complete; {result.fetched_files} "
          f"file(s) ({mb:.1f} MB) fetched in {result.seconds:.1f} s")
    if result.manifest is None:
        print("error: no patient is complete; no manifest was written", file=sys.stderr)
        return 1
    print(f"{result.manifest}: written; check it with `hcc-fl-client check-data --manifest "
          f"{result.manifest} --task {task.name}`")
    return 0 if done == len(result.patients) else 2


def _state_home(args: argparse.Namespace, path: Path, site: str) -> Path:
    """The site's state folder: ``--state-dir``, else ``.hcc-fl-<site>`` beside SITE.yaml."""
    return Path(args.state_dir or (path.parent / f".hcc-fl-{site}")).resolve()


def _prepare(args: argparse.Namespace) -> int:
    """Decode the site's images into its preparation cache (see :mod:`hcc_fl.client.prepcache`)."""
    from tqdm import tqdm

    from hcc_fl.client.data import prepare_site
    from hcc_fl.client.decode_check import SizeLimits, use_limits
    from hcc_fl.client.manifest import allow_roots
    from hcc_fl.client.prepcache import PrepCache
    from hcc_fl.client.site_config import load_site_config

    try:
        cfg = load_site_config(args.site_config, args.role)
        use_limits(SizeLimits.from_mb(cfg.max_image_mb))
        allow_roots(cfg.allowed_roots)
        splits = ("test",) if cfg.role == "external" else ("train", "val")
        cache = PrepCache(_state_home(args, cfg.path, cfg.site) / "prepcache")
        for profile in args.profile or ["full"]:
            with tqdm(desc=f"{cfg.site} {profile}", unit="patient",
                      disable=True if args.no_progress else None) as bar:
                done = prepare_site(cfg.manifest, cfg.task, profile, splits, cache,
                                    workers=args.workers, progress=bar.update)
            print(f"{cfg.site}: {done.rows} patient(s) of split(s) {'+'.join(splits)} "
                  f"prepared for task {cfg.task}, profile {profile}: {done.built} decoded, "
                  f"{done.reused} unchanged, {done.seconds:.1f} s", flush=True)
    except DataError as exc:
        return _problems(f"error: {len(exc.issues)} problem(s); the patients listed are not "
                         "prepared:", exc)
    print(f"{cfg.site}: preparation cache {cache.folder}")
    return 0


def _run_site(args: argparse.Namespace) -> int:
    """Check the site's data, then run an authenticated SuperNode under supervision."""
    import os

    from hcc_fl.client.decode_check import SizeLimits, use_limits
    from hcc_fl.client.manifest import validate_manifest
    from hcc_fl.client.site_config import load_site_config
    from hcc_fl.shared.audit import AuditLog
    from hcc_fl.shared.offline import OFFLINE_ENV
    from hcc_fl.shared.version import code_version

    try:
        cfg = load_site_config(args.site_config, args.role)
        task = get_task(cfg.task)
        splits = ("test",) if cfg.role == "external" else ("train",)
        use_limits(SizeLimits.from_mb(cfg.max_image_mb))
        manifest = validate_manifest(cfg.manifest, task, splits, allowed_roots=cfg.allowed_roots,
                                     both_classes=splits if cfg.role == "external" else ())
    except DataError as exc:
        print(f"error: {len(exc.issues)} problem(s); the site does not join:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    print(f"{cfg.site}: data check passed ({len(manifest.rows)} rows, task {task.name}, "
          f"role {cfg.role}); connecting to {cfg.coordinator}", flush=True)
    print(f"{cfg.site}: release policy {cfg.disclosure.describe()}", flush=True)
    home = _state_home(args, cfg.path, cfg.site)
    home.mkdir(parents=True, exist_ok=True)
    audit = cfg.audit_log or home / "audit.jsonl"
    exe = str(Path(sys.executable).parent / "flower-supernode")
    node_config = (f'manifest="{cfg.manifest}" site="{cfg.site}" role="{cfg.role}" '
                   f'task="{cfg.task}" audit="{audit}" state="{home}" '
                   f'privacy-budget={-1.0 if cfg.privacy_budget is None else cfg.privacy_budget} '
                   f'max-image-mb={cfg.max_image_mb} '
                   f'allowed-roots="{os.pathsep.join(map(str, cfg.allowed_roots))}"')
    node_config += "".join(f' {k}="{v}"' if isinstance(v, str) else f" {k}={v}"
                           for k, v in cfg.disclosure.as_config().items())
    if cfg.secagg_peers is not None and cfg.private_key is not None:
        node_config += (f' secagg-key="{cfg.private_key}" secagg-peers="{cfg.secagg_peers}" '
                        f"secagg-min-sites={cfg.secagg_min_sites}")
    from hcc_fl.client.secagg import wipe_states

    if wipe_states(home):  # secrets of a secure aggregation interrupted by a restart
        print(f"{cfg.site}: removed the state of an interrupted secure aggregation", flush=True)
    argv = [exe, "--superlink", cfg.coordinator, "--port", str(cfg.runtime_port),
            "--node-config", node_config]
    if cfg.max_retries > 0:
        argv += ["--max-retries", str(cfg.max_retries)]
    if cfg.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(cfg.ca_certificate),
                 "--auth-supernode-private-key", str(cfg.private_key)]
    from hcc_fl.client.warm import socket_path

    sock = None if args.cold_clientapp else socket_path(home)
    shim = clientapp_shim(home / "bin", sock)
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home),
           "HCC_FL_SITE": cfg.site, "HCC_FL_AUDIT": str(audit),
           "HCC_FL_ALLOWED_VERSIONS": ",".join(cfg.allowed_code_versions),
           "PATH": os.pathsep.join([str(shim), str(Path(sys.executable).parent),
                                    os.environ.get("PATH", "")])}
    AuditLog(audit, cfg.site).record("site-start", detail=f"hcc-fl {code_version()}, role "
                                     f"{cfg.role}, task {cfg.task}")
    print(f"{cfg.site}: audit log {audit}", flush=True)
    sys.stdout.flush()
    launcher = _start_launcher(sock, env) if sock is not None else None
    try:
        return _supervise(argv, env, cfg.site)
    finally:
        if launcher is not None:
            stop_group(launcher)


def clientapp_shim(folder: Path, sock: Path | None = None) -> Path:
    """A ``flwr-clientapp`` for the SuperNode's PATH that runs :mod:`hcc_fl.client.guard`
    (Flower's ClientApp process with the bundle check in front): forked by the site's warm
    launcher listening on ``sock`` when given and ready, else started with this Python."""
    from hcc_fl.client.warm import write_shim

    return write_shim(folder, sock)


def _start_launcher(sock: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the site's warm ClientApp launcher (:mod:`hcc_fl.client.warm`); until it listens
    on ``sock`` (a few seconds of imports) the shim starts ClientApps cold."""
    from hcc_fl.shared.procs import die_with_parent

    return subprocess.Popen([sys.executable, "-m", "hcc_fl.client.warm", "--socket", str(sock)],
                            env=env, start_new_session=True, preexec_fn=die_with_parent)


# Flower prints these when the SuperLink refuses a SuperNode (its exit status is just 1).
KEY_REFUSED = ("[code: 2004]", "[code: 2001]")
CONNECT_FAILED = ("Exit Code: 305",)
KEY_HELP = ("the coordinator refused this site: is its key registered (`hcc-fl certs "
            "add-site`), and is private_key the key the coordinator has?")
CONNECT_HELP = ("could not connect to the coordinator: check its address and port, that it "
                "runs, and that TLS matches (a plaintext client cannot join a TLS coordinator)")


def _supervise(argv: list[str], env: dict[str, str], site: str) -> int:
    """Run the SuperNode in its own process group, pass its output through, forward
    SIGINT/SIGTERM, and on exit stop the whole group (Flower leaves its SuperExec running after
    the SuperNode exits)."""
    import os
    import signal
    import subprocess

    from hcc_fl.shared.procs import die_with_parent

    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=die_with_parent)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    key_refused = connect_failed = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            key_refused = key_refused or any(m in line for m in KEY_REFUSED)
            connect_failed = connect_failed or any(m in line for m in CONNECT_FAILED)
            if proc.poll() is not None:
                break  # the SuperNode is gone; its SuperExec may still hold the pipe
        rc = proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if key_refused or connect_failed:
        print(f"error: {site}: {KEY_HELP if key_refused else CONNECT_HELP}", file=sys.stderr)
        return 1
    if rc not in (0, -signal.SIGTERM, -signal.SIGINT):
        print(f"error: {site}: the SuperNode exited with code {rc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hcc-fl-client`` argument parser."""
    p = argparse.ArgumentParser(
        prog="hcc-fl-client",
        description="hcc-fl site client. Runs next to a hospital's image export; nothing but "
        "model updates and aggregate statistics ever leaves the site.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--site-config", metavar="SITE.yaml",
                   help="run this site: check its data, then join the coordinator as an "
                   "authenticated Flower SuperNode (see docs/deployment.md for the file)")
    p.add_argument("--role", choices=("train", "external"),
                   help="override the role in SITE.yaml; external = evaluation only, refuses "
                   "every training message")
    p.add_argument("--state-dir", help="folder for the SuperNode's state (default: next to "
                   "SITE.yaml)")
    p.add_argument("--cold-clientapp", action="store_true",
                   help="start every ClientApp process from scratch (Flower's default) instead "
                   "of forking it from the site's warm launcher")
    p.set_defaults(func=_run_site)
    sub = p.add_subparsers(dest="command", required=False, metavar="COMMAND")
    c = sub.add_parser(
        "check-data", help="validate a site manifest and its DICOM files for a task",
        description="Check a site's manifest.csv for a task: required columns, types, value "
        "ranges, label values, duplicate patient IDs, referenced files and folders, and the "
        "DICOM Modality tag of each image. Every problem is listed with file, CSV line and "
        "column; the exit code is 1 if there is any.",
    )
    c.add_argument("--manifest", required=True, help="path to the site's manifest.csv")
    c.add_argument("--task", required=True, choices=sorted(TASKS), help="seed task")
    c.add_argument("--role", choices=("train", "external"), default="train",
                   help="train: needs rows in split 'train'; external: in split 'test' "
                   "(default: %(default)s)")
    c.add_argument("--no-files", action="store_true",
                   help="check the table only, not the referenced files")
    c.add_argument("--max-image-mb", type=float, default=None, metavar="MIB",
                   help="per-image decode limit in MiB, checked on each header before decoding "
                   "(default: SITE.yaml's max_image_mb default, 2048)")
    c.add_argument("--allow-root", action="append", default=[], metavar="FOLDER",
                   help="a folder besides the manifest's own that paths may point into "
                   "(repeatable; SITE.yaml: allowed_roots)")
    c.set_defaults(func=_check_data)
    pl = sub.add_parser(
        "pull", help="build the site's export and manifest from the hospital's PACS",
        description="From a cohort CSV (patient_id, study_uid or accession_number, the task's "
        "clinical columns, label and split) find each study in the PACS of SITE.yaml's 'pacs:' "
        "section (DICOMweb or DIMSE), pick the series the task needs from their tags, retrieve "
        "them into the folder of SITE.yaml's manifest and write a manifest that check-data "
        "accepts. Interrupted pulls resume. Exit code 0: every patient complete; 2: the "
        "manifest lists the complete patients, some are missing (see the table); 1: error.",
    )
    pl.add_argument("--site-config", required=True, metavar="SITE.yaml",
                    help="the site's configuration with its 'pacs:' section")
    pl.add_argument("--cohort", required=True, metavar="COHORT.csv",
                    help="the study coordinator's cohort list (stays at the site)")
    pl.add_argument("--state-dir", help="site state folder for the ID-to-study mapping and the "
                    "pull journal (default: .hcc-fl-<site> next to SITE.yaml)")
    pl.add_argument("--force", action="store_true",
                    help="pull into a folder that already holds an export (verified files "
                    "are kept, the manifest is replaced)")
    pl.add_argument("--no-progress", action="store_true", help="no progress bar")
    pl.set_defaults(func=_pull)
    pr = sub.add_parser(
        "prepare", help="decode the site's images into its preparation cache, ahead of a run",
        description="Decode and preprocess every patient of the site's splits (train+val; "
        "external: test) once, in parallel over the CPUs, into the preparation cache in the "
        "site's state folder (<state>/prepcache: files 0600, no patient ID or path inside; "
        "never sent anywhere). Training, validation and evaluation messages then read it "
        "instead of the DICOM files. Patients whose files, manifest row, preprocessing or code "
        "version changed are decoded again; the others are kept.",
    )
    pr.add_argument("--site-config", required=True, metavar="SITE.yaml",
                    help="the site's configuration (task, role, manifest, decode limit)")
    pr.add_argument("--state-dir", help="the site's state folder (default: .hcc-fl-<site> "
                    "next to SITE.yaml, as when the site runs)")
    pr.add_argument("--role", choices=("train", "external"), help="override SITE.yaml's role")
    pr.add_argument("--profile", action="append", choices=("full", "tiny"),
                    help="model profile(s) the coordinator runs, which fix the frames and "
                    "image size (repeatable; default: full)")
    pr.add_argument("--workers", type=int, default=None, metavar="N",
                    help="processes decoding in parallel (default: the CPUs available)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hcc-fl-client``."""
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    known = {"check-data", "pull", "prepare", "-h", "--help"}
    if not any(a in known for a in args_list) and "--site-config" not in " ".join(args_list):
        parser.error("give --site-config SITE.yaml to run the site, or a COMMAND")
    return run_cli(parser, args_list)


if __name__ == "__main__":
    sys.exit(main())
