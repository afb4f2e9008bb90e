"""Logging set-up for the command-line entry points (library code only logs)."""

from __future__ import annotations

import argparse
import logging
import sys


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr at INFO (DEBUG with ``verbose``); quiet chatty third-party loggers."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # pynetdicom logs DICOM identifiers at INFO: the PACS pull keeps them off the default log.
    for noisy in ("httpx", "httpcore", "urllib3", "matplotlib", "PIL", "pynetdicom",
                  "dicomweb_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Common entry: offline environment, parse, logging, dispatch to ``args.func``."""
    from hcc_fl.shared.offline import offline_environ

    offline_environ()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return int(args.func(args))
