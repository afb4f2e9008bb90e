#!/usr/bin/env python3
"""Build hcc-fl-server and hcc-fl-client with podman (or docker) and time the builds.

    docker/build-images.py [--base IMAGE] [--engine podman] [--host-pip-config]

--host-pip-config: for a machine whose Python packages come from a mirror or local folders.
This machine's pip configuration (``pip config list``: files and PIP_* variables) is written to
a temporary file passed as the build secret ``pip.conf``, the local folders it names are
bind-mounted read-only for the build only (podman ``--volume``), and torch comes from that
configuration (TORCH_INDEX empty). None of it is stored in the images.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_CERTS = "/run/hcc-fl-build-certs"
IMAGES = {"server": "docker/Dockerfile.server", "client": "docker/Dockerfile.client"}


def host_pip_config(python: str) -> tuple[str, list[str]]:
    """(pip.conf text, local folders it refers to) from ``pip config list`` of ``python``."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], check=True,
                         capture_output=True, text=True).stdout
    values: dict[str, str] = {}
    for line in out.splitlines():  # global.find-links='/opt/wheels' or :env:.cert='...'
        m = re.match(r"^(?:global|:env:|install)\.([\w-]+)='(.*)'$", line)
        if m and m.group(1) not in ("default-timeout", "disable-pip-version-check"):
            values[m.group(1)] = m.group(2)
    folders = []
    for key, value in values.items():
        items = []
        for item in value.split():
            path = item.removeprefix("file://")
            if not (path.startswith("/") and Path(path).exists()):
                items.append(item)
                continue
            if key == "cert":  # e.g. a proxy's CA in the host bundle: mounted beside the image's
                folders.append(f"{Path(path).parent}:{BUILD_CERTS}")
                items.append(f"{BUILD_CERTS}/{Path(path).name}")
                continue
            folder = Path(path) if Path(path).is_dir() else Path(path).parent
            # a file:// "simple" index refers to its files beside it (../files)
            folders.append(str(folder.parent if folder.name == "simple" else folder))
            items.append(item)
        values[key] = " ".join(dict.fromkeys(items))
    text = "[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(values.items()))
    return text, sorted(set(folders))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="python:3.11-slim", help="BASE_IMAGE (default: %(default)s)")
    p.add_argument("--engine", default=os.environ.get("CONTAINER_ENGINE", "podman"))
    p.add_argument("--tag", default="latest", help="image tag (default: %(default)s)")
    p.add_argument("--host-pip-config", action="store_true",
                   help="pass this machine's pip configuration at build time (see above)")
    p.add_argument("--python", default=sys.executable, help="whose pip configuration")
    p.add_argument("--only", choices=sorted(IMAGES), action="append", help="build only these")
    p.add_argument("--times", help="write build seconds and image sizes (JSON) here")
    a = p.parse_args()
    extra = ["--build-arg", f"BASE_IMAGE={a.base}"]
    with tempfile.TemporaryDirectory(prefix="hcc-fl-build-") as tmp:
        if a.host_pip_config:
            text, folders = host_pip_config(a.python)
            secret = Path(tmp) / "pip.conf"
            secret.write_text(text)
            extra += ["--secret", f"id=pip.conf,src={secret}", "--build-arg", "TORCH_INDEX="]
            for folder in folders:
                src, _, dst = folder.partition(":")
                extra += ["--volume", f"{src}:{dst or src}:ro"]
        report: dict[str, dict[str, float]] = {}
        for name in a.only or sorted(IMAGES):
            image = f"hcc-fl-{name}:{a.tag}"
            print(f"[build-images] {image} from {a.base}", flush=True)
            t0 = time.monotonic()
            rc = subprocess.run([a.engine, "build", "-f", IMAGES[name], "-t", image, *extra,
                                 str(REPO)]).returncode
            if rc != 0:
                print(f"[build-images] {image}: build failed (exit {rc})", file=sys.stderr)
                return rc
            seconds = time.monotonic() - t0
            size = json.loads(subprocess.run([a.engine, "image", "inspect", image], check=True,
                                             capture_output=True, text=True).stdout)[0]["Size"]
            report[name] = {"build_s": round(seconds, 1), "size_bytes": int(size)}
            print(f"[build-images] {image}: {seconds:.0f} s, {size / 1e6:.0f} MB", flush=True)
    if a.times:
        Path(a.times).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
