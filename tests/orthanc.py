"""A real, throw-away Orthanc PACS on 127.0.0.1 for the pull tests and bench/pacs_pull.py.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``make system-deps`` installs them):
DICOMweb plugin on the HTTP port, DIMSE (C-FIND, C-GET, C-MOVE) on the DICOM port, HTTP basic
authentication, storage in a temporary folder. The system service the package may have started
is never used.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
USER, PASSWORD = "site", "pacs-secret"
AE_TITLE = "ORTHANC"


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None when the package is not installed."""
    return shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin of the ``orthanc-dicomweb`` package, or None."""
    found = [p for p in PLUGIN_CANDIDATES if p.exists()]
    if not found:
        found = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    return found[0] if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc: its HTTP and DICOM ports, process and folder."""

    http_port: int
    dicom_port: int
    proc: subprocess.Popen[bytes]
    folder: Path
    https_port: int | None = None  # the TLS front (nginx), when started
    ca_file: Path | None = None  # the CA that signed the front's certificate
    front: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}/dicom-web"

    def start_tls_front(self) -> None:
        """HTTPS in front of Orthanc's HTTP port, as a hospital's reverse proxy does: nginx
        with a certificate for 127.0.0.1 from a fresh CA (``ca_file``). Debian's Orthanc 1.10
        crashes on its own TLS (SslEnabled) with OpenSSL 3, so the front is nginx."""
        from hcc_fl.server.proxy import find_nginx

        work = self.folder / "front"
        pem, self.ca_file = tls_material(work / "pki")
        self.https_port = free_port()
        (work / "tmp").mkdir(parents=True, exist_ok=True)
        conf = work / "nginx.conf"
        conf.write_text(f"""daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    client_max_body_size 1g;
    server {{
        listen 127.0.0.1:{self.https_port} ssl;
        ssl_certificate {work}/pki/server/server.crt;
        ssl_certificate_key {work}/pki/server/server.key;
        location / {{ proxy_pass http://127.0.0.1:{self.http_port}; proxy_buffering off; }}
    }}
}}
""")
        log = (work / "nginx.out").open("wb")
        self.front = subprocess.Popen([find_nginx(), "-c", str(conf), "-p", str(work)],
                                      stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        while time.monotonic() < deadline:
            if self.front.poll() is not None:
                raise RuntimeError(f"nginx exited; see {work}/error.log")
            try:
                with socket.create_connection(("127.0.0.1", self.https_port), timeout=2) as raw, \
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"nginx did not answer within 20 s; see {work}/error.log")

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/dicom") -> bytes:
        """One authenticated REST call; returns the body."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def upload(self, files: Iterable[Path]) -> int:
        """POST each DICOM file to ``/instances``; returns the number stored."""
        n = 0
        for f in files:
            self.request("POST", "/instances", f.read_bytes())
            n += 1
        return n

    def stop(self) -> None:
        if self.front is not None:
            self.front.terminate()
            self.front.wait(timeout=15)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def tls_material(folder: Path) -> tuple[Path, Path]:
    """A CA and a certificate for 127.0.0.1 (the project's own PKI code): returns the
    certificate (its key is server/server.key beside it) and the CA file."""
    from hcc_fl.server.certs import init_pki

    init_pki(folder, ["127.0.0.1"])
    return folder / "server" / "server.crt", folder / "ca" / "ca.crt"


def start_orthanc(folder: Path, moves: dict[str, tuple[str, int]] | None = None) -> Orthanc:
    """Start Orthanc with its storage in ``folder``; ``moves`` registers C-MOVE destinations
    (AE title -> host, port). Raises RuntimeError when it does not come up."""
    exe, plugin = orthanc_binary(), dicomweb_plugin()
    if exe is None or plugin is None:
        raise RuntimeError("Orthanc or its DICOMweb plugin is not installed: run `make "
                           "system-deps` (Debian packages orthanc, orthanc-dicomweb)")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "hcc-fl-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {ae: [ae, host, port] for ae, (host, port) in (moves or {}).items()},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "StableAge": 1,
        "HttpServerEnabled": True,
        "ConcurrentJobs": 2,
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(http_port, dicom_port, proc, folder)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({proc.returncode}); see {folder}/orthanc.log")
        with contextlib.suppress(OSError, urllib.error.URLError):
            server.request("GET", "/system")
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer within 60 s; see {folder}/orthanc.log")


@contextlib.contextmanager
def running_orthanc(folder: Path, moves: dict[str, tuple[str, int]] | None = None
                    ) -> Iterator[Orthanc]:
    server = start_orthanc(folder, moves)
    try:
        yield server
    finally:
        server.stop()
