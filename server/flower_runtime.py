"""Drive Flower's own CLIs as subprocesses: a private SuperLink and ``flwr run`` per arm.

Every process gets a private ``FLWR_HOME`` and an environment that stops Flower and Ray from
contacting outside servers (telemetry, update check, per-run dependency install, Ray usage stats).
The app bundle handed to ``flwr run`` carries configuration only: its components resolve to the
installed, version-pinned ``hcc_fl`` package.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hcc_fl.shared.offline import OFFLINE_ENV
from hcc_fl.shared.version import code_version

log = logging.getLogger("hcc_fl.coordinator")

def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower's processes: offline, private ``FLWR_HOME``, and this Python's
    ``bin`` folder first on PATH (the SuperLink starts ``flower-superexec`` and
    ``flwr-serverapp`` by name, so they must come from the same environment as hcc-fl)."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home),
            "PATH": bindir + (os.pathsep + path if path else "")}


def flower_executable(name: str) -> str:
    """Path of a Flower console script in this Python's environment (else from PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"'{name}' not found next to {sys.executable} or on PATH: "
                           "is flwr installed in this environment?")
    return found


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (chosen at run time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app_bundle(folder: Path, run_config: dict[str, Any]) -> Path:
    """Write a configuration-only Flower app (pyproject.toml + LICENSE) for ``flwr run``.

    The components name the installed ``hcc_fl`` modules; no Python code is in the bundle.
    """
    folder.mkdir(parents=True, exist_ok=True)
    version = code_version().split("+")[0]
    lines = [
        "[build-system]",
        'requires = ["setuptools"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        'name = "hccflrun"',
        f'version = "{version}"',
        'description = "hcc-fl run configuration (code comes from the installed hcc-fl)"',
        'license = {file = "LICENSE"}',
        'dependencies = ["flwr[simulation]>=1.41.0"]',
        "",
        "[tool.flwr.app]",
        'publisher = "hccfl"',
        "fab-format-version = 1",
        'flwr-version-target = "1.41.0"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "hcc_fl.server.flower_app:app"',
        'clientapp = "hcc_fl.client.flower_app:app"',
        "",
        "[tool.flwr.app.config]",
        *[f"{k} = {_toml_value(v)}" for k, v in run_config.items()],
        "",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines))
    (folder / "LICENSE").write_text("Apache-2.0 (hcc-fl run configuration)\n")
    return folder


@dataclass
class SuperLink:
    """A running ``flower-superlink`` in simulation mode on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    home: Path
    env: dict[str, str]

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the SuperLink and every process it started (its process group)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@contextlib.contextmanager
def simulation_superlink(
    home: Path, log_file: Path, startup_s: float = 60.0
) -> Iterator[SuperLink]:
    """Start a private simulation SuperLink and stop it (and its children) on exit."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = flower_env(home)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "hccsim"\n\n'
        f'[superlink.hccsim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    cmd = [
        flower_executable("flower-superlink"), "--insecure", "--simulation",
        "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    with log_file.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    link = SuperLink(proc, port, home, env)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; "
                                   f"see {log_file}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not start within {startup_s:.0f} s")
            time.sleep(0.3)
        yield link
    finally:
        link.stop()


ROUND_RE = re.compile(r"\[ROUND (\d+)/(\d+)\]")


def flwr_run(
    link: SuperLink,
    app_dir: Path,
    federation_config: dict[str, Any],
    log_file: Path,
    on_round: Callable[[int, int], None] | None = None,
    timeout_s: float = 3600.0,
) -> int:
    """Submit the app to the SuperLink with ``flwr run --stream`` and wait for it to end.

    The streamed log goes to ``log_file``; ``on_round(current, total)`` is called at each
    ``[ROUND i/n]`` line (for a progress bar). Returns the CLI's exit code.
    """
    fed = " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())
    cmd = [flower_executable("flwr"), "run", str(app_dir), "hccsim", "--stream",
           "--federation-config", fed]
    deadline = time.monotonic() + timeout_s
    with log_file.open("a") as out:
        proc = subprocess.Popen(cmd, env=link.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            m = ROUND_RE.search(line)
            if m and on_round:
                on_round(int(m.group(1)), int(m.group(2)))
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                break
        return proc.wait()
