"""Drive Flower's own CLIs as subprocesses: a private SuperLink and ``flwr run`` per arm.

Every process gets a private ``FLWR_HOME`` and an environment that stops Flower and Ray from
contacting outside servers (telemetry, update check, per-run dependency install, Ray usage stats).
The app bundle handed to ``flwr run`` carries configuration only: its components resolve to the
installed, version-pinned ``hcc_fl`` package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hcc_fl.shared.audit import AuditLog
from hcc_fl.shared.offline import OFFLINE_ENV
from hcc_fl.shared.procs import die_with_parent
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


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, verify: bool | str,
                  startup_s: float, log_file: Path) -> None:
    """Poll the SuperLink's health endpoint until it answers, it exits, or time runs out."""
    deadline = time.monotonic() + startup_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; "
                               f"see {log_file}")
        try:
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"flower-superlink did not start within {startup_s:.0f} s")
        time.sleep(0.3)


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
                                start_new_session=True, preexec_fn=die_with_parent)
    link = SuperLink(proc, port, home, env)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", True, startup_s, log_file)
        yield link
    finally:
        link.stop()


ROUND_RE = re.compile(r"\[ROUND (\d+)/(\d+)\]")
REFUSED_MARK = "refused node "  # server/identity.py logs "refused node <id> (<site>): why"


def flwr_run(
    link: SuperLink,
    app_dir: Path,
    federation_config: dict[str, Any] | None,
    log_file: Path,
    on_round: Callable[[int, int], None] | None = None,
    timeout_s: float = 3600.0,
) -> int:
    """Submit the app to the SuperLink with ``flwr run --stream`` and wait for it to end.

    ``federation_config`` is the simulation's (number of virtual nodes, resources); ``None``
    submits to the deployment SuperLink, whose nodes are the connected sites.

    The streamed log goes to ``log_file``; ``on_round(current, total)`` is called at each
    ``[ROUND i/n]`` line (for a progress bar). Returns the CLI's exit code.
    """
    target = "hccsim" if federation_config is not None else "hccdeploy"
    cmd = [flower_executable("flwr"), "run", str(app_dir), target, "--stream"]
    if federation_config is not None:
        fed = " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())
        cmd += ["--federation-config", fed]
    deadline = time.monotonic() + timeout_s
    with log_file.open("a") as out:
        proc = subprocess.Popen(cmd, env=link.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if REFUSED_MARK in line:  # a node refused by the identity gate: on the console
                log.warning("%s", line.rstrip())
            m = ROUND_RE.search(line)
            if m and on_round:
                on_round(int(m.group(1)), int(m.group(2)))
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                break
        return proc.wait()


@dataclass(frozen=True)
class Deployment:
    """How the coordinator's SuperLink is exposed in deployment mode."""

    pki: Path | None
    host: str = "127.0.0.1"
    port: int = 9092
    insecure: bool = False


REGISTRY = "registered-keys.json"  # in the SuperLink's FLWR_HOME, next to its database


def _key_id(pub: Path) -> str:
    """A registered key's identifier: SHA-256 of its DER form."""
    from hcc_fl.server.certs import public_key_der

    return hashlib.sha256(public_key_der(pub.read_bytes())).hexdigest()


def _flwr_cli(link: SuperLink, args: list[str], log_file: Path) -> tuple[int, str]:
    out = subprocess.run([flower_executable("flwr"), *args], env=link.env,
                         capture_output=True, text=True, timeout=120)
    with log_file.open("a") as fh:
        fh.write(out.stdout + out.stderr)
    return out.returncode, out.stdout + out.stderr


def sync_registrations(link: SuperLink, pki: Path, log_file: Path,
                       audit: AuditLog | None = None) -> list[str]:
    """Make the SuperLink's registered site keys exactly the allow-list (Flower's control
    API, through the ``flwr`` CLI): register every key in ``authorized/`` not registered yet,
    and unregister every key registered earlier that is no longer there (revoked while the
    coordinator ran, or before a ``--resume`` on the old database). An unregistered node's
    requests are refused by the SuperLink from then on.

    The node id of each key we registered is kept in ``<FLWR_HOME>/registered-keys.json``
    beside the SuperLink's database (``flwr supernode ls`` does not show keys). Returns the
    allow-listed site names."""
    from hcc_fl.server.certs import allowed_sites

    path = link.home / REGISTRY
    registry: dict[str, dict[str, Any]] = (json.loads(path.read_text()) if path.is_file()
                                           else {})
    allowed = {}
    for name, pub in allowed_sites(pki).items():
        try:
            allowed[_key_id(pub)] = (name, pub)
        except (OSError, ValueError):  # revoked meanwhile, or not a key
            log.warning("allow-list: %s skipped", pub)
    for kid, entry in sorted(registry.items()):
        if kid in allowed:
            continue
        rc, text = _flwr_cli(link, ["supernode", "unregister", str(entry["node_id"]),
                                    "hccdeploy"], log_file)
        if rc != 0 and "not found" not in text:
            log.error("could not unregister site '%s' (node %s); see %s", entry["site"],
                      entry["node_id"], log_file)
            continue
        del registry[kid]
        log.warning("site '%s': key no longer on the allow-list, node %s unregistered",
                    entry["site"], entry["node_id"])
        if audit is not None:
            audit.record("key-unregistered", peer=str(entry["site"]),
                         decision="unregistered: key not on the allow-list")
    for kid, (name, pub) in allowed.items():
        if kid in registry:
            continue
        rc, text = _flwr_cli(link, ["supernode", "register", str(pub), "hccdeploy", "--name",
                                    name, "--format", "json"], log_file)
        found = re.search(r'"node-id":\s*(\d+)', text)
        if found:
            registry[kid] = {"site": name, "node_id": int(found.group(1))}
            if audit is not None:
                audit.record("key-registered", peer=name, decision="registered")
        elif "already in use" not in text:
            raise RuntimeError(f"registering site '{name}' ({pub}) failed; see {log_file}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(registry, indent=1))
    tmp.replace(path)
    return sorted(name for name, _ in allowed.values())


def _allow_list_state(pki: Path) -> list[tuple[str, int, int]]:
    """What changes when a key is added to or revoked from ``authorized/`` (cheap to poll)."""
    out = []
    for p in sorted((pki / "authorized").glob("*.pub")):
        with contextlib.suppress(OSError):
            st = p.stat()
            out.append((p.name, st.st_mtime_ns, st.st_size))
    return out


@contextlib.contextmanager
def allow_list_watcher(link: SuperLink, pki: Path, log_file: Path, audit: AuditLog | None,
                       every_s: float = 2.0) -> Iterator[None]:
    """While the context is open, re-sync the SuperLink's registrations whenever
    ``authorized/`` changes (polled every ``every_s`` seconds; the ``flwr`` CLI runs only on a
    change), so that ``hcc-fl certs revoke-site`` takes effect during a run."""
    stop = threading.Event()

    def watch() -> None:
        last = _allow_list_state(pki)
        while not stop.wait(every_s):
            now = _allow_list_state(pki)
            if now == last:
                continue
            last = now
            try:
                sync_registrations(link, pki, log_file, audit)
            except Exception:  # keep watching; the ServerApp refuses revoked keys anyway
                log.exception("re-reading the allow-list failed")

    thread = threading.Thread(target=watch, name="allow-list-watcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


@contextlib.contextmanager
def deployment_superlink(
    home: Path, deploy: Deployment, database: Path, log_file: Path, startup_s: float = 60.0,
    proxy_dir: Path | None = None, audit_path: Path | None = None,
) -> Iterator[SuperLink]:
    """Start the coordinator's SuperLink (TLS + SuperNode authentication unless insecure),
    register the allow-listed site keys, and stop everything on exit.

    With TLS the SuperLink listens on a free loopback port only, and an nginx front
    (:mod:`hcc_fl.server.proxy`) on ``deploy.host:deploy.port`` passes the fleet API (the
    sites) and nothing else: the control and runtime APIs answer on loopback only.
    ``--insecure`` (local tests) binds the SuperLink itself to ``deploy.host:deploy.port``.
    ``proxy_dir`` (default ``home/proxy``) holds nginx's configuration, logs and pids; keep it
    the same for the same port, so that a restart after a crash can clear what nginx left.
    The registered keys follow ``<pki>/authorized`` at start and while the SuperLink runs
    (:func:`sync_registrations`, :func:`allow_list_watcher`); changes go to ``audit_path``.
    """
    from hcc_fl.server.proxy import fleet_proxy

    home.mkdir(parents=True, exist_ok=True)
    env = flower_env(home)
    port = deploy.port if deploy.insecure else free_port()
    host = deploy.host if deploy.insecure else "127.0.0.1"
    cmd = [flower_executable("flower-superlink"), "--isolation", "subprocess",
           "--host", host, "--port", str(port), "--database", str(database),
           "--disable-runtime-dependency-installation"]
    conn = f'[superlink.hccdeploy]\naddress = "127.0.0.1:{port}"\n'
    pki = deploy.pki.resolve() if deploy.pki is not None else None
    if deploy.insecure:
        cmd.append("--insecure")
        conn += "insecure = true\n"
    else:
        assert pki is not None
        for f in ("ca/ca.crt", "server/server.crt", "server/server.key"):
            if not (pki / f).is_file():
                raise RuntimeError(f"{pki / f} not found: create the PKI with "
                                   "`hcc-fl certs init --dir ...` (or run with --insecure)")
        cmd += ["--ssl-ca-certfile", str(pki / "ca/ca.crt"),
                "--ssl-certfile", str(pki / "server/server.crt"),
                "--ssl-keyfile", str(pki / "server/server.key"), "--enable-supernode-auth"]
        conn += f'root-certificates = "{pki / "ca/ca.crt"}"\n'
    (home / "config.toml").write_text('[superlink]\ndefault = "hccdeploy"\n\n' + conn)
    with log_file.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
    link = SuperLink(proc, port, home, env)
    try:
        scheme = "http" if deploy.insecure else "https"
        verify: bool | str = True if pki is None else str(pki / "ca/ca.crt")
        _wait_healthy(proc, f"{scheme}://127.0.0.1:{port}/health", verify, startup_s, log_file)
        with contextlib.ExitStack() as stack:
            if pki is not None:
                audit = AuditLog(audit_path, "coordinator") if audit_path else None
                names = sync_registrations(link, pki, log_file, audit)
                log.info("registered site keys: %s", ", ".join(names) or "none")
                stack.enter_context(allow_list_watcher(link, pki, log_file, audit))
                stack.enter_context(fleet_proxy(
                    deploy.host, deploy.port, port, pki / "server/server.crt",
                    pki / "server/server.key", pki / "ca/ca.crt", proxy_dir or home / "proxy",
                ))
                log.info("fleet API exposed on %s:%d (nginx); control and runtime APIs on "
                         "127.0.0.1:%d only", deploy.host, deploy.port, port)
            yield link
    finally:
        link.stop()
