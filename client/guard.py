"""The site's ``flwr-clientapp``: Flower's ClientApp process with the bundle check in front.

Flower 1.41's SuperNode starts ``flwr-clientapp`` (by name, from PATH) for every message; that
process pulls the message and the coordinator's app bundle (FAB), installs the bundle and
imports the components it names. ``hcc-fl-client`` puts a ``flwr-clientapp`` first on the
SuperNode's PATH that runs this module instead: it is Flower's own ``flwr-clientapp`` with the
bundle installer wrapped by :func:`hcc_fl.client.bundle.check_bundle`, so a bundle that is not
configuration-only for this site's hcc-fl is refused (an audit entry, and an error reply to the
coordinator) before any of it is written to disk or imported.

Settings come from the environment set by ``hcc-fl-client``: ``HCC_FL_SITE``,
``HCC_FL_AUDIT`` (audit log path) and ``HCC_FL_ALLOWED_VERSIONS`` (comma-separated).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hcc_fl.client import timing
from hcc_fl.client.bundle import BundleRefused, check_bundle
from hcc_fl.shared.audit import AuditLog
from hcc_fl.shared.version import code_version


def allowed_versions() -> set[str]:
    """This site's own code version plus those its config allows."""
    extra = os.environ.get("HCC_FL_ALLOWED_VERSIONS", "")
    return {code_version(), *(v.strip() for v in extra.split(",") if v.strip())}


def checked_installer(install: Any, audit: AuditLog) -> Any:
    """Wrap Flower's ``install_from_fab`` so that the bundle is checked first."""

    def install_checked(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Any:
        data = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            info = check_bundle(data, allowed_versions())
        except BundleRefused as exc:
            audit.record("bundle", decision=f"refused: {exc}")
            print(f"hcc-fl: refused the coordinator's app bundle: {exc}", file=sys.stderr,
                  flush=True)
            raise
        audit.record("bundle", decision="accepted",
                     detail=f"sha256 {info.sha256[:16]}, coordinator hcc-fl {info.code_version}")
        out = install(fab_file, *args, **kwargs)
        timing.mark("bundle-installed")
        return out

    return install_checked


def preload() -> None:
    """Import what a ClientApp process needs (Flower's runtime, the ClientApp with torch) and
    pay torch's one-off costs, without touching site data or starting threads: the warm
    launcher (:mod:`hcc_fl.client.warm`) calls this once and forks a process per message."""
    import torch
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    import hcc_fl.client.flower_app  # noqa: F401  (the module the bundle's component names)

    rng = torch.get_rng_state()
    # an optimizer's first construction imports torch._dynamo (1.5-3 s on our machines)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    torch.set_rng_state(rng)  # a message's process starts from torch's default generator


def main() -> None:
    """Entry point used in place of ``flwr-clientapp`` at a site."""
    timing.mark("python-ready")
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    timing.mark("flwr-imported")
    audit = AuditLog(os.environ.get("HCC_FL_AUDIT") or None,
                     os.environ.get("HCC_FL_SITE", "site"))
    runtime.install_from_fab = checked_installer(  # type: ignore[attr-defined]
        runtime.install_from_fab, audit)
    if timing.enabled():
        pull = runtime.pull_task_input

        def timed_pull(*args: Any, **kwargs: Any) -> Any:
            out = pull(*args, **kwargs)
            timing.mark("task-pulled")
            return out

        runtime.pull_task_input = timed_pull
    try:
        flwr_clientapp()
    finally:
        timing.write()


if __name__ == "__main__":
    main()
