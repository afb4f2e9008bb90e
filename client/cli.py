"""``hcc-fl-client``: site-side commands (``check-data``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hcc_fl.shared.errors import DataError
from hcc_fl.shared.logs import run_cli
from hcc_fl.shared.tasks import TASKS, get_task


def _check_data(args: argparse.Namespace) -> int:
    from hcc_fl.client.manifest import validate_manifest

    task = get_task(args.task)
    splits = ("test",) if args.role == "external" else ("train",)
    try:
        manifest = validate_manifest(Path(args.manifest), task, splits,
                                     check_files=not args.no_files)
    except DataError as exc:
        print(f"{args.manifest}: {len(exc.issues)} problem(s) for task {task.name}:",
              file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    counts = {s: len(manifest.rows_in((s,))) for s in ("train", "val", "test")}
    label = [r[task.label] for r in manifest.rows]
    print(f"{manifest.path}: OK for task {task.name} ({len(manifest.rows)} rows; "
          f"train {counts['train']}, val {counts['val']}, test {counts['test']}; "
          f"label '{task.label}' positive {label.count('1')}, negative {label.count('0')})")
    print(f"manifest sha256 {manifest.sha256}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hcc-fl-client`` argument parser."""
    p = argparse.ArgumentParser(
        prog="hcc-fl-client",
        description="hcc-fl site client. Runs next to a hospital's image export; nothing but "
        "model updates and aggregate statistics ever leaves the site.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    c.set_defaults(func=_check_data)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hcc-fl-client``."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
