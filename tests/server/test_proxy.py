"""The nginx front of the SuperLink: a real TLS SuperLink on loopback, a real nginx in front.

Only the Fleet API must be reachable through the proxy; the Control API (unauthenticated in
open-source Flower) and the Runtime API must be refused by nginx itself.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.control_pb2 import ListNodesResponse  # pylint: disable=no-name-in-module
from flwr.proto.fleet_pb2 import (  # pylint: disable=no-name-in-module
    RegisterNodeFleetRequest,
    RegisterNodeFleetResponse,
)
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

from hcc_fl.server.certs import init_pki
from hcc_fl.server.proxy import (
    FORBIDDEN_TEXT,
    find_nginx,
    fleet_proxy,
    render_nginx_config,
)
from tests.conftest import BIN, script

pytestmark = pytest.mark.timeout(300)

PROTOBUF = {"content-type": "application/protobuf"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _require_nginx() -> str:
    try:
        return find_nginx()
    except RuntimeError as exc:  # a failure, not a skip: `make` installs nginx
        pytest.fail(f"{exc}. The fleet proxy tests need nginx.", pytrace=False)


@dataclass(frozen=True)
class SuperLink:
    port: int
    pki: Path
    log: Path

    @property
    def ca(self) -> Path:
        return self.pki / "ca" / "ca.crt"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuperLink]:
    _require_nginx()  # fail before the slow start when nginx is missing
    root = tmp_path_factory.mktemp("superlink")
    pki = init_pki(root / "pki", ["127.0.0.1", "localhost"])
    port = _free_port()
    log = root / "superlink.log"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_HOME": str(root / "flwr-home"),
           # the SuperLink starts `flower-superexec` from PATH
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [script("flower-superlink"), "--isolation", "subprocess",
           "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:",
           "--ssl-ca-certfile", str(pki / "ca" / "ca.crt"),
           "--ssl-certfile", str(pki / "server" / "server.crt"),
           "--ssl-keyfile", str(pki / "server" / "server.key"),
           "--disable-runtime-dependency-installation"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        link = SuperLink(port=port, pki=pki, log=log)
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"flower-superlink exited ({proc.returncode}):\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{link.url}/health", verify=str(link.ca), timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"SuperLink not healthy after 90 s:\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield link
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()


def _signed_headers(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    """SuperNode authentication headers, as Flower's NodeAuthHttpInterceptor builds them."""
    from flwr.supercore.date import now

    timestamp = now().isoformat()
    return {
        "flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode("ascii"),
        "flwr-timestamp": timestamp,
        "flwr-signature": b64encode(sign_message(key, timestamp.encode("ascii"))).decode("ascii"),
    }


def _raw_request(port: int, cafile: Path, target: str) -> str:
    """Send a request line exactly as written (httpx would normalise ``..`` away)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Content-Type: application/protobuf\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data.decode("latin-1")


def _worker_uids(master: int) -> list[int]:
    """Real uids of the processes in nginx's process group other than the master (Linux)."""
    uids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == master:
            continue
        try:
            if os.getpgid(int(entry.name)) != master:
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        uids.append(int(uid_line.split()[1]))
    return uids


def test_only_fleet_api_is_exposed(superlink: SuperLink, tmp_path: Path) -> None:
    ca = str(superlink.ca)
    port = _free_port()
    server = superlink.pki / "server"
    with fleet_proxy("127.0.0.1", port, superlink.port, server / "server.crt",
                     server / "server.key", superlink.ca, tmp_path / "nginx",
                     worker_processes=2) as proxy:
        assert proxy.port == port and proxy.process.poll() is None
        proxy_url = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=ca, timeout=60) as client:
            # 1. the unauthenticated Control API works directly but is refused by the proxy
            direct = client.post(f"{superlink.url}/v1/control/list-nodes", headers=PROTOBUF)
            assert direct.status_code == 200, direct.text
            refused = client.post(f"{proxy_url}/v1/control/list-nodes", headers=PROTOBUF)
            assert refused.status_code == 403
            assert refused.text == FORBIDDEN_TEXT
            assert "only the Flower Fleet API" in refused.text

            # 2. the Runtime API is refused too
            direct = client.post(f"{superlink.url}/v1/runtime/get-nodes", headers=PROTOBUF)
            assert direct.status_code != 403  # the SuperLink's own answer (401: no task token)
            refused = client.post(f"{proxy_url}/v1/runtime/get-nodes", headers=PROTOBUF)
            assert refused.status_code == 403 and refused.text == FORBIDDEN_TEXT

            # 3. Fleet routes reach the SuperLink and get its own answer
            for route in ("get-run", "pull-messages", "send-node-heartbeat"):
                direct = client.post(f"{superlink.url}/v1/fleet/{route}", headers=PROTOBUF)
                through = client.post(f"{proxy_url}/v1/fleet/{route}", headers=PROTOBUF)
                assert through.status_code == direct.status_code != 403, (route, through.text)
                assert through.content == direct.content
                assert through.headers["content-type"] == direct.headers["content-type"]

            # ... including a SuperNode's signed request: the authentication headers pass
            # through unchanged and the registration lands in the SuperLink's state
            key = ec.generate_private_key(ec.SECP384R1())
            body = RegisterNodeFleetRequest(
                public_key=public_key_to_bytes(key.public_key())).SerializeToString()
            registered = client.post(f"{proxy_url}/v1/fleet/register-node", content=body,
                                     headers={**PROTOBUF, **_signed_headers(key)})
            assert registered.status_code == 200, registered.text
            node_id = RegisterNodeFleetResponse.FromString(registered.content).node_id
            assert node_id != 0
            listed = client.post(f"{superlink.url}/v1/control/list-nodes", headers=PROTOBUF)
            nodes = ListNodesResponse.FromString(listed.content).nodes_info
            assert node_id in [n.node_id for n in nodes]

            # a large body is streamed to the SuperLink (no 413 from nginx): same answer
            big = b"\x00" * (48 << 20)
            direct = client.post(f"{superlink.url}/v1/fleet/push-object", content=big,
                                 headers=PROTOBUF)
            through = client.post(f"{proxy_url}/v1/fleet/push-object", content=big,
                                  headers=PROTOBUF)
            assert through.status_code == direct.status_code not in (403, 413, 502)
            assert through.content == direct.content

            # read-only health check is passed through
            assert client.get(f"{proxy_url}/health").status_code == 200

        # raw URIs that nginx would normalise into /v1/fleet/ are refused, not forwarded
        for target in ("/v1/control/../fleet/get-run", "/v1/fleet/../control/list-nodes",
                       "/v1/fleet/%2e%2e/control/list-nodes", "//v1/fleet/get-run"):
            answer = _raw_request(port, superlink.ca, target)
            assert answer.startswith("HTTP/1.1 403 "), (target, answer[:200])

        # 4. plaintext HTTP to the TLS port is not served
        try:
            plain = httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", headers=PROTOBUF,
                               timeout=10)
        except httpx.HTTPError:
            pass
        else:
            assert not plain.is_success
            assert plain.status_code == 400, plain.text

        access = proxy.access_log.read_text()
        assert "/v1/control/list-nodes" in access and '"status":403' in access
        if os.geteuid() == 0 and Path("/proc/self/status").exists():
            uids = _worker_uids(proxy.process.pid)
            assert uids and all(uid != 0 for uid in uids), uids  # workers dropped root

    # 5. stopped: the port is closed and nginx has exited
    assert proxy.process.returncode is not None
    assert not _accepts(port)


def test_config_is_self_contained(tmp_path: Path) -> None:
    _require_nginx()
    pki = init_pki(tmp_path / "pki", ["127.0.0.1", "localhost"])
    work = tmp_path / "work"
    conf = render_nginx_config("0.0.0.0", 9443, 9092, pki / "server/server.crt",
                               pki / "server/server.key", pki / "ca/ca.crt", work, "512m")
    assert "daemon off;" in conf and "client_max_body_size 512m;" in conf
    assert "proxy_ssl_verify on;" in conf and "proxy_ssl_name localhost;" in conf
    assert "/etc/" not in conf and "/var/" not in conf and "include" not in conf
    for directive in ("pid", "error_log", "access_log", "client_body_temp_path",
                      "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path",
                      "scgi_temp_path"):
        line = next(line for line in conf.splitlines() if line.strip().startswith(directive))
        assert f'"{work.resolve()}/' in line, line
    assert ("user nobody" in conf) == (os.geteuid() == 0)
    with pytest.raises(ValueError, match="DNS name only"):
        render_nginx_config("0.0.0.0", 9443, 9092, pki / "server/server.crt",
                            pki / "server/server.key", pki / "ca/ca.crt", work,
                            upstream_ssl_name="127.0.0.1")


def test_invalid_config_is_reported(tmp_path: Path) -> None:
    _require_nginx()
    pki = init_pki(tmp_path / "pki", ["127.0.0.1", "localhost"])
    port = _free_port()
    with pytest.raises(RuntimeError, match="nginx rejected .*nginx.conf") as info, \
            fleet_proxy("127.0.0.1", port, 9092, pki / "server/server.crt",
                        tmp_path / "missing.key", pki / "ca/ca.crt", tmp_path / "work"):
        pass
    assert "missing.key" in str(info.value)
    assert not _accepts(port)
