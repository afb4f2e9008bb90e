"""An nginx front for the SuperLink that exposes the Fleet API and nothing else.

Why: in Flower 1.41 ``flower-superlink`` serves every API on one HTTPS port:

    /v1/fleet/*     the SuperNodes (the hospitals) - authenticated with signed request headers
    /v1/control/*   the ``flwr`` CLI (start/stop runs, register nodes, pull artifacts...)
    /v1/runtime/*   the ServerApp / SuperExec processes of the coordinator itself
    /health         liveness probe

The open-source build has no authentication on the Control API: whoever reaches the port can
start runs, register SuperNodes or pull results. The coordinator therefore binds the SuperLink
to loopback and puts this proxy on the public address. From outside:

* ``/v1/fleet/<route>`` is passed to the SuperLink unchanged (method, body and headers, including
  the SuperNode authentication headers ``flwr-public-key``, ``flwr-signature`` and
  ``flwr-timestamp``), streamed in both directions (no request or response buffering, so model
  updates of hundreds of MB neither fill a disk nor wait for the whole body), with long timeouts;
* ``GET/HEAD /health`` is passed through (read-only);
* everything else, notably ``/v1/control/`` and ``/v1/runtime/``, gets ``403`` with a short text.

Only request URIs that are literally ``/v1/fleet/<name>`` (letters, digits, ``-``, ``_``;
a query string is allowed) are proxied: nginx matches locations on the *normalised* path but
forwards the client's *raw* URI, so a raw URI such as ``/v1/control/../fleet/x``, one with
percent-escapes or doubled slashes is refused rather than handed to the SuperLink's router.

The upstream connection is TLS, verified against the coordinator's CA. nginx checks the upstream
certificate against ``proxy_ssl_name``, and (OpenSSL ``X509_check_host``) matches it against DNS
names only, never IP-address SANs; by default the name is taken from the DNS names of
``certfile`` (``localhost`` if present), which assumes the SuperLink serves the same certificate
as the proxy (the coordinator's ``server/server.crt``). Create the PKI with ``localhost`` among
the hosts (``hcc-fl certs init --host <public name> --host localhost``) or pass
``upstream_ssl_name`` explicitly.

nginx runs without root: ``daemon off``, pid, logs and all temp paths in ``workdir``; nothing in
``/etc`` or ``/var`` is read or written. When started as root, worker processes drop to
``nobody``; they never need the temp folders, because neither request nor response bodies are
buffered to disk (``proxy_max_temp_file_size 0``), and the master (root) opens certificates, keys
and logs before the workers start.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from hcc_fl.shared.procs import die_with_parent

CONFIG_NAME = "nginx.conf"
LOG_NAME = "nginx.log"
DEFAULT_TIMEOUT_S = 3600
FORBIDDEN_TEXT = "403 Forbidden: only the Flower Fleet API (/v1/fleet/) is exposed on this port.\n"
# TLS 1.2 suites (TLS 1.3 suites are always on): forward secrecy and AEAD only.
_TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-GCM-SHA256",
])
_SIZE = re.compile(r"^[0-9]+[kKmMgG]?$")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_UNSAFE_PATH_CHARS = set('"\\$;{}#\'') | {chr(c) for c in range(32)} | {"\x7f"}

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "FORBIDDEN_TEXT",
    "FleetProxy",
    "find_nginx",
    "fleet_proxy",
    "render_nginx_config",
    "upstream_name_from_cert",
]


@dataclass(frozen=True)
class FleetProxy:
    """A running nginx in front of a SuperLink (see :func:`fleet_proxy`)."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    workdir: Path
    config: Path
    log: Path

    @property
    def error_log(self) -> Path:
        """nginx's own error log (the process log ``log`` holds stdout/stderr)."""
        return self.workdir / "logs" / "error.log"

    @property
    def access_log(self) -> Path:
        """One JSON object per request (no bodies, no headers)."""
        return self.workdir / "logs" / "access.log"


def find_nginx() -> str:
    """The nginx executable: ``nginx`` on PATH, else ``/usr/sbin/nginx``."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("nginx not found (not on PATH, not /usr/sbin/nginx): install it, e.g. "
                       "`apt-get install nginx-light` (Debian/Ubuntu)")


def _path(value: str | os.PathLike[str]) -> str:
    """An absolute path, quoted for nginx.conf; refuses characters nginx would interpret."""
    text = str(Path(value).resolve())
    bad = sorted(set(text) & _UNSAFE_PATH_CHARS)
    if bad:
        raise ValueError(f"path {text!r} contains characters not allowed in nginx.conf: {bad}")
    return f'"{text}"'


def _listen_address(host: str, port: int) -> str:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if not _NAME.match(host):
            raise ValueError(
                f"listen host {host!r} is neither an IP address nor a host name") from None
        return f"{host}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def upstream_name_from_cert(certfile: str | os.PathLike[str]) -> str:
    """The name nginx should verify the SuperLink's certificate against: a DNS SAN of
    ``certfile`` (``localhost`` preferred). Raises ValueError when it has no DNS name, since
    nginx does not match IP-address SANs."""
    cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        raise ValueError(f"{certfile} has no DNS name in subjectAltName: nginx verifies upstream "
                         "certificates by DNS name only; issue it with 'localhost' among the "
                         "hosts or pass upstream_ssl_name")
    return "localhost" if "localhost" in names else names[0]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _worker_user() -> str | None:
    """``user`` directive value: unprivileged workers when the master runs as root."""
    if os.geteuid() != 0:
        return None  # nginx ignores (and warns about) `user` when not root
    for group in ("nogroup", "nobody"):
        try:
            grp.getgrnam(group)
        except KeyError:
            continue
        return f"nobody {group}"
    return "nobody"


def render_nginx_config(listen_host: str, listen_port: int, upstream_port: int,
                        certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str],
                        cafile: str | os.PathLike[str], workdir: str | os.PathLike[str],
                        max_body: str = "2g", *, timeout_s: int = DEFAULT_TIMEOUT_S,
                        upstream_ssl_name: str | None = None,
                        worker_processes: int | str = "auto") -> str:
    """A self-contained nginx.conf: TLS on ``listen_host:listen_port``, ``/v1/fleet/*`` (and
    ``GET /health``) proxied to ``https://127.0.0.1:upstream_port`` (verified against
    ``cafile`` with name ``upstream_ssl_name``, default :func:`upstream_name_from_cert`),
    403 for everything else. pid, logs and temp paths live under ``workdir``."""
    if not _SIZE.match(max_body):
        raise ValueError(f"max_body {max_body!r}: use a number with optional k/m/g suffix")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s}")
    if not (isinstance(worker_processes, int) and worker_processes > 0
            or worker_processes == "auto"):
        raise ValueError(f"worker_processes {worker_processes!r}: a positive int or 'auto'")
    listen = _listen_address(listen_host, listen_port)
    _listen_address("127.0.0.1", upstream_port)
    ssl_name = upstream_ssl_name or upstream_name_from_cert(certfile)
    if _is_ip(ssl_name):
        raise ValueError(f"upstream_ssl_name {ssl_name!r}: nginx verifies upstream certificates "
                         "by DNS name only (X509_check_host), never by IP address; use a DNS "
                         "name of the SuperLink's certificate, e.g. 'localhost'")
    if not _NAME.match(ssl_name):
        raise ValueError(f"upstream_ssl_name {ssl_name!r} is not a DNS name")
    work = Path(workdir).resolve()
    cert, key, ca = _path(certfile), _path(keyfile), _path(cafile)
    tmp, logs = work / "tmp", work / "logs"
    user = _worker_user()
    user_line = f"user {user};\n" if user else ""
    t = f"{timeout_s}s"
    forbidden = FORBIDDEN_TEXT.replace("\n", "\\n")
    return f"""\
# Generated by hcc_fl.server.proxy: only the Flower Fleet API is reachable through this server.
{user_line}daemon off;
master_process on;
worker_processes {worker_processes};
pid {_path(work / "nginx.pid")};
error_log {_path(logs / "error.log")} warn;

events {{
    worker_connections 1024;
}}

http {{
    default_type application/octet-stream;
    server_tokens off;
    charset off;
    gzip off;

    log_format fleet_json escape=json '{{"time":"$time_iso8601","client":"$remote_addr",'
        '"method":"$request_method","uri":"$request_uri","status":$status,'
        '"request_bytes":$request_length,"response_bytes":$bytes_sent,'
        '"duration_s":$request_time,"upstream_status":"$upstream_status",'
        '"upstream_s":"$upstream_response_time","tls":"$ssl_protocol"}}';
    access_log {_path(logs / "access.log")} fleet_json;

    client_body_temp_path {_path(tmp / "client_body")};
    proxy_temp_path {_path(tmp / "proxy")};
    fastcgi_temp_path {_path(tmp / "fastcgi")};
    uwsgi_temp_path {_path(tmp / "uwsgi")};
    scgi_temp_path {_path(tmp / "scgi")};

    client_header_timeout 60s;
    client_body_timeout {t};
    send_timeout {t};
    keepalive_timeout 75s;
    client_max_body_size {max_body};

    upstream superlink {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
        keepalive_timeout 60s;
    }}

    server {{
        listen {listen} ssl;
        server_name _;

        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {_TLS12_CIPHERS};
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:fleet_tls:10m;
        ssl_session_timeout 1h;

        # Shared by the proxied locations.
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto https;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_max_temp_file_size 0;
        proxy_connect_timeout 30s;
        proxy_send_timeout {t};
        proxy_read_timeout {t};
        proxy_next_upstream off;
        proxy_redirect off;
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 2;
        proxy_ssl_trusted_certificate {ca};
        proxy_ssl_name {ssl_name};
        proxy_ssl_server_name off;
        proxy_ssl_protocols TLSv1.2 TLSv1.3;
        proxy_ssl_session_reuse on;

        location /v1/fleet/ {{
            # The raw URI is what the SuperLink routes on: it must itself be a Fleet route.
            if ($request_uri !~ "^/v1/fleet/[A-Za-z0-9_-]+(\\?[^#]*)?$") {{
                return 403 "{forbidden}";
            }}
            proxy_pass https://superlink;
        }}

        location = /health {{
            if ($request_uri != "/health") {{
                return 403 "{forbidden}";
            }}
            limit_except GET {{
                deny all;
            }}
            proxy_pass https://superlink;
        }}

        location / {{
            default_type text/plain;
            return 403 "{forbidden}";
        }}
    }}
}}
"""


def _connect_host(listen_host: str) -> str:
    host = listen_host.strip("[]")
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Graceful (SIGQUIT), then fast (SIGTERM) shutdown of the master; SIGKILL to the whole
    process group (master and workers) as a last resort. Safe to call twice."""
    try:
        for sig, wait_s in ((signal.SIGQUIT, grace_s), (signal.SIGTERM, 5.0)):
            if process.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=wait_s)
    finally:
        # Also reached on KeyboardInterrupt during the waits above. The master is not reaped
        # yet (or is a zombie), so its pid is still the group's id and cannot have been reused.
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


PIDS_NAME = "nginx.pids"


def _nginx_pids(master: int) -> list[int]:
    """The master and its worker processes (children of the master)."""
    pids = [master]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                    pids.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
    return pids


def _record_pids(work: Path, master: int) -> None:
    """Remember master and worker pids: if the coordinator is killed with SIGKILL, the master
    dies with it (PR_SET_PDEATHSIG) but nginx workers would keep the port open."""
    deadline = time.monotonic() + 5
    pids = _nginx_pids(master)
    while len(pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = _nginx_pids(master)
    (work / PIDS_NAME).write_text(" ".join(map(str, pids)) + "\n")


def _kill_stale(work: Path) -> None:
    """Kill nginx processes left by an earlier instance in ``work`` (after a crash)."""
    path = work / PIDS_NAME
    if not path.is_file():
        return
    for text in path.read_text().split():
        pid = int(text)
        try:
            if (Path("/proc") / text / "cmdline").read_bytes().startswith(b"nginx:"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
        deadline = time.monotonic() + 5
        while (Path("/proc") / text).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def fleet_proxy(listen_host: str, listen_port: int, upstream_port: int,
                certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str],
                cafile: str | os.PathLike[str], workdir: str | os.PathLike[str],
                startup_s: float = 30, *, max_body: str = "2g",
                timeout_s: int = DEFAULT_TIMEOUT_S, upstream_ssl_name: str | None = None,
                worker_processes: int | str = "auto") -> Iterator[FleetProxy]:
    """Run nginx (see :func:`render_nginx_config`) for the duration of the ``with`` block.

    Writes ``workdir/nginx.conf``, checks it with ``nginx -t`` (RuntimeError with nginx's
    message), starts nginx in its own process group with output to ``workdir/nginx.log`` and
    waits until the port accepts connections (RuntimeError if nginx exits or ``startup_s``
    passes). On exit nginx is stopped, also when the block raises or is interrupted. nginx
    processes that an earlier, killed instance left in the same ``workdir`` are killed first.
    """
    nginx = find_nginx()
    work = Path(workdir).resolve()
    for sub in ("logs", "tmp"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    _kill_stale(work)
    config = work / CONFIG_NAME
    log = work / LOG_NAME
    config.write_text(render_nginx_config(
        listen_host, listen_port, upstream_port, certfile, keyfile, cafile, work, max_body,
        timeout_s=timeout_s, upstream_ssl_name=upstream_ssl_name,
        worker_processes=worker_processes))
    base = [nginx, "-e", "stderr", "-p", f"{work}/", "-c", str(config)]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, timeout=60,
                           check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejected {config} (exit {check.returncode}):\n"
                           f"{(check.stderr + check.stdout).strip()}")
    host = _connect_host(listen_host)
    if _accepts(host, listen_port):
        raise RuntimeError(f"{host}:{listen_port} already accepts connections: another "
                           "server is listening there")
    with open(log, "ab") as out:
        process = subprocess.Popen(base, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + startup_s
        while not _accepts(host, listen_port):
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited with code {process.returncode} during startup; "
                                   f"see {log} and {work / 'logs' / 'error.log'}:\n"
                                   f"{_tail(log)}{_tail(work / 'logs' / 'error.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not accept connections on {host}:{listen_port} "
                                   f"within {startup_s} s; see {log}")
            time.sleep(0.05)
        _record_pids(work, process.pid)
        yield FleetProxy(process=process, host=listen_host, port=listen_port, workdir=work,
                         config=config, log=log)
    finally:
        _stop(process)
        (work / PIDS_NAME).unlink(missing_ok=True)
