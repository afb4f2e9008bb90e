"""PKI: CA and server certificate with SANs, site keys Flower accepts, add/revoke semantics."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hcc_fl.server.certs import CertError, add_site, allowed_sites, init_pki, revoke_site
from tests.conftest import script


def test_init_add_revoke(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["coordinator.example.org", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate((pki / "ca/ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((pki / "server/server.crt").read_bytes())
    assert srv.issuer == ca.subject
    ca.public_key().verify(srv.signature, srv.tbs_certificate_bytes,  # type: ignore[call-arg]
                           ec.ECDSA(srv.signature_hash_algorithm))  # type: ignore[arg-type]
    sans = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the loopback names are always added: the SuperLink sits on loopback behind nginx
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for private in ("ca/ca.key", "server/server.key"):
        assert stat.S_IMODE((pki / private).stat().st_mode) == 0o600

    before = {p: p.read_bytes() for p in pki.rglob("*") if p.is_file()}
    out = add_site(pki, "site_A")
    after = {p: p.read_bytes() for p in pki.rglob("*") if p.is_file()}
    assert all(after[p] == b for p, b in before.items())  # nothing already issued changed
    key = serialization.load_ssh_private_key((out / "site_A.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert stat.S_IMODE((out / "site_A.key").stat().st_mode) == 0o600
    pub = (pki / "authorized/site_A.pub").read_text()
    assert pub.startswith("ecdsa-sha2-nistp384 ")
    assert list(allowed_sites(pki)) == ["site_A"]

    with pytest.raises(CertError, match="already registered"):
        add_site(pki, "site_A")
    with pytest.raises(CertError, match="site name"):
        add_site(pki, "../evil")
    revoke_site(pki, "site_A")
    assert allowed_sites(pki) == {}
    with pytest.raises(CertError, match="not on the allow-list"):
        revoke_site(pki, "site_A")
    with pytest.raises(CertError, match="already initialised"):
        init_pki(pki, ["localhost"])


def test_cli_and_server_refuses_without_certificates(tmp_path: Path) -> None:
    out = subprocess.run([script("hcc-fl"), "certs", "add-site", "x", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "hcc-fl certs init" in out.stderr
    out = subprocess.run([script("hcc-fl-server"), "run_name=x"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "TLS certificates are required" in out.stderr
