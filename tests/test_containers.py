"""The container deployment, built and run (``make docker-test``; marker ``containers``, which
``make test`` deselects: see README "Containers" for why and for the measured time).

Both images are built with podman from a Debian base image (``docker/make-debian-base.sh``),
with this machine's pip configuration passed at build time only; then the README's container
commands are run in a scratch copy of the repository, the services of ``docker/compose.yaml``
are started as podman containers (same images, commands, volumes, on a podman network where the
coordinator is reachable as ``coordinator``), and the run's ``metrics.json`` is compared with
``hcc-fl simulate`` of the same configuration on the host."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import BIN, REPO, script

pytestmark = pytest.mark.containers

BASE = os.environ.get("HCC_FL_BASE_IMAGE", "localhost/debian-base:bookworm")
ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get(
    "CONTAINERS_CONF", str(REPO / "docker" / "containers.conf"))}
COMPOSE = "docker compose -f docker/compose.yaml up --build"


def readme_commands() -> list[str]:
    """The README's container commands (between its ``container-commands`` markers)."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- container-commands -->\n```bash\n(.*?)```\n<!-- /container-commands -->",
                  text, re.S)
    assert m, "README.md: no container-commands block"
    lines = [re.sub(r"\s+#.*$", "", x).strip() for x in m.group(1).splitlines()]
    return [x for x in lines if x and not x.startswith("#")]


PACKAGES = ("server", "client", "shared", "configs")
CODE_HASH = """
import hashlib, importlib, pathlib
h = hashlib.sha256()
for sub in ("server", "client", "shared", "configs"):
    root = pathlib.Path(importlib.import_module("hcc_fl." + sub).__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(f"{sub}/{f.relative_to(root)}".encode() + f.read_bytes())
print(h.hexdigest())
"""


def _code_hash(repo: Path) -> str:
    """CODE_HASH of the source tree (the package's folders)."""
    h = hashlib.sha256()
    for sub in PACKAGES:
        for f in sorted((repo / sub).rglob("*.py")):
            h.update(f"{sub}/{f.relative_to(repo / sub)}".encode() + f.read_bytes())
    return h.hexdigest()


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                         env=ENV)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {out.stderr[-2000:]}")
    return out.stdout


def test_readme_commands_are_the_compose_demo() -> None:
    """What the README tells a user to run: the preparation the compose file expects, then
    compose itself (this module runs exactly these lines, the last one as podman containers)."""
    lines = readme_commands()
    assert lines[-1] == COMPOSE
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    text = "\n".join(lines)
    assert "docker/make-site-configs.sh" in text and "--host coordinator" in text
    for site in compose["services"]:
        if site != "coordinator":
            assert site in text, site  # every service's site gets a key


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both images built here (``docker/build-images.py``); build time and size per image."""
    assert shutil.which("podman") and shutil.which("runc"), "make system-deps installs podman"
    if subprocess.run(["podman", "image", "exists", BASE], env=ENV).returncode != 0:
        subprocess.run([str(REPO / "docker" / "make-debian-base.sh"), BASE], check=True,
                       env=ENV, timeout=1200)
    times = tmp_path_factory.mktemp("build") / "times.json"
    subprocess.run([str(BIN / "python"), str(REPO / "docker" / "build-images.py"), "--base", BASE,
                    "--host-pip-config", "--python", str(BIN / "python"), "--times", str(times)],
                   check=True, env=ENV, timeout=3600)
    return json.loads(times.read_text())  # type: ignore[no-any-return]


def _volume(spec: str, compose_dir: Path, prefix: str) -> str:
    """A compose volume as a podman --volume: paths relative to the compose file, named
    volumes prefixed with this run's id."""
    src, _, rest = spec.partition(":")
    if src.startswith((".", "/")):
        return f"{(compose_dir / src).resolve()}:{rest}"
    return f"{prefix}-{src}:{rest}"


@pytest.fixture(scope="module")
def compose_run(images: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("containers") / "repo"
    (work / "docker").mkdir(parents=True)
    for name in ("compose.yaml", "make-site-configs.sh"):
        shutil.copy2(REPO / "docker" / name, work / "docker" / name)
    (work / ".venv").symlink_to(BIN.parent)
    *prepare, _ = readme_commands()
    for line in prepare:  # as root here: no sudo needed
        subprocess.run(re.sub(r"(^|&& )sudo ", r"\1", line), shell=True, check=True, cwd=work,
                       executable="/bin/bash", timeout=600, capture_output=True)
    compose = yaml.safe_load((work / "docker" / "compose.yaml").read_text())
    prefix = f"hccfl-{uuid.uuid4().hex[:8]}"
    podman("network", "create", prefix)
    started: list[str] = []
    t0 = time.monotonic()
    try:
        for name, svc in compose["services"].items():  # coordinator first (depends_on)
            args = ["run", "-d", "--name", f"{prefix}-{name}", "--network", prefix,
                    "--network-alias", name]
            if svc.get("restart"):
                args += ["--restart", svc["restart"]]
            for spec in svc.get("volumes", []):
                args += ["--volume", _volume(spec, work / "docker", prefix)]
            # "ports" is not published: the sites reach the coordinator on the podman network
            podman(*args, svc["image"], *svc.get("command", []))
            started.append(f"{prefix}-{name}")
        rc = int(podman("wait", f"{prefix}-coordinator", timeout=1500).strip())
        seconds = time.monotonic() - t0
        logs = {c.removeprefix(prefix + "-"): podman("logs", c, check=False, timeout=60)
                for c in started}
        run = work / "runs" / "docker-demo"
        yield {"rc": rc, "seconds": seconds, "logs": logs, "run": run, "work": work,
               "compose": compose, "prefix": prefix}
    finally:
        for c in reversed(started):
            podman("rm", "-f", "-t", "20", c, check=False, timeout=120)
        podman("network", "rm", "-f", prefix, check=False)
        for name in compose.get("volumes", {}):
            podman("volume", "rm", "-f", f"{prefix}-{name}", check=False)


def test_images_run_as_non_root_without_keys_or_index_config(images: dict[str, Any]) -> None:
    for name in ("server", "client"):
        image = f"hcc-fl-{name}"
        info = json.loads(podman("image", "inspect", image))[0]
        assert info["Config"]["User"] == "hccfl"
        out = podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                     "id -u; python3 -c 'import hcc_fl.server, torch; print(torch.__version__)';"
                     # build-time mount points may stay behind as empty folders
                     " for p in /etc/pip.conf /etc/xdg/pip /opt/wheels /opt/pypi /opt/pypi-more"
                     " /run/secrets /root/.config/pip /home/hccfl/.config/pip /dist; do"
                     " find $p -type f -print 2>/dev/null; done; find / -xdev -path '*/site-"
                     "packages' -prune -o \\( -name '*.key' -o -name 'manifest*.csv' -o -name "
                     "'*.dcm' \\) -print 2>/dev/null; true")
        lines = out.splitlines()
        assert lines[0] == "10001" and lines[1] == "2.13.0+cpu", out
        # no pip index configuration, wheel folders, keys, manifests or DICOM files
        assert lines[2:] == [], out
        # the image holds this tree's code (a stale build cache would not)
        code = podman("run", "--rm", "--entrypoint", "python3", image, "-c", CODE_HASH)
        assert code.strip() == _code_hash(REPO), image
        history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
        assert "/opt/pypi" not in history and "find-links" not in history


def test_containers_run_two_rounds_like_the_simulation(compose_run: dict[str, Any],
                                                       tmp_path: Path) -> None:
    assert compose_run["rc"] == 0, compose_run["logs"]["coordinator"][-3000:]
    run = compose_run["run"]
    dep = json.loads((run / "metrics.json").read_text())
    assert {s["site"]: s["role"] for s in dep["sites"]} == {
        "site_A": "train", "site_B": "train", "site_C": "train", "site_EXT": "external"}
    lines = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert {(x["round"], x["site"]) for x in lines if x["phase"] == "train"} == {
        (r, s) for r in (1, 2) for s in ("site_A", "site_B", "site_C")}
    # the same configuration in simulation: the coordinator's command without where it writes
    command = compose_run["compose"]["services"]["coordinator"]["command"]
    same = [x for x in command if x.split("=")[0] not in ("runs_dir", "run_name", "overwrite")]
    sim = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={compose_run['work'] / 'data' / 'phantom'}",
         f"runs_dir={tmp_path}", "run_name=sim", *same, "baselines.centralized=false",
         "baselines.local=false", "--quiet"], capture_output=True, text=True, timeout=1500)
    assert sim.returncode == 0, sim.stderr[-3000:]
    ref = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert list(dep["external"]) == list(ref["external"]) == ["fedavg"]
    compared = 0
    for arm, values in ref["external"].items():
        for key, value in values.items():
            if isinstance(value, float):
                assert dep["external"][arm][key] == pytest.approx(value, abs=1e-6), (arm, key)
                compared += 1
    assert compared >= 4
    print(f"containers: {compose_run['seconds']:.0f} s for 2 rounds; "
          f"{compared} external metrics equal the simulation within 1e-6")


def test_site_state_on_volumes_and_audit_logs(compose_run: dict[str, Any]) -> None:
    """Each site's SuperNode state and audit log are on its named volume (not in the image)."""
    prefix = compose_run["prefix"]
    for site in ("site_A", "site_B", "site_C", "site_EXT"):
        mount = podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{prefix}-{site}")
        audit = Path(mount.strip()) / "audit.jsonl"
        assert audit.is_file(), site
        assert any(json.loads(x)["event"] == "sent" for x in audit.read_text().splitlines())
