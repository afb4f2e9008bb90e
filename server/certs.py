"""``hcc-fl certs``: the coordinator's CA, its TLS certificate and the sites' keys.

Layout of the PKI folder (what stays private to whom):

    ca/ca.crt                 public: every site gets a copy (it verifies the coordinator)
    ca/ca.key                 private to the coordinator (signs server certificates), mode 0600
    server/server.crt, .key   the coordinator's TLS certificate and key (key private, 0600)
    authorized/<site>.pub     the coordinator's allow-list of site public keys
    authorized/<site>.role    that site's role, declared here: ``train`` or ``external``
                              (no file: ``train``, for PKIs made before roles existed)
    revoked/<site>.pub, .role keys (and roles) taken off the allow-list
    sites/<site>/<site>.key   the site's private key: hand to that site only, then delete here
    sites/<site>/<site>.pub   its public key (also in authorized/)
    sites/<site>/ca.crt       copy of the CA certificate for the site

TLS authenticates the coordinator to the sites; sites authenticate with their EC keys (Flower's
SuperNode authentication), which is why site keys are OpenSSH-format NIST P-384 keys and not
client certificates. Adding a site creates only that site's key pair and allow-list entry;
nothing already issued changes.

A site's identity is its key: the coordinator names a node after the allow-list entry whose key
the node authenticated with, and takes its role from the ``.role`` file beside it; what the site
says about itself must agree (``hcc_fl.server.identity``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ROLES = ("train", "external")


class CertError(ValueError):
    """A PKI operation that cannot be done (the message names the file or site)."""


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def init_pki(folder: Path, hosts: list[str], days: int = 825, force: bool = False) -> Path:
    """Create the CA and the coordinator's certificate with SANs for ``hosts`` (names or IPs)."""
    ca_crt = folder / "ca" / "ca.crt"
    if ca_crt.exists() and not force:
        raise CertError(f"{ca_crt} exists: the PKI is already initialised (use --force to "
                        "replace it, which invalidates every site's copy of ca.crt)")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hcc-fl coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days * 2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(folder / "ca" / "ca.key", _pem_key(ca_key))
    _write_public(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM))
    issue_server_cert(folder, hosts, days)
    (folder / "authorized").mkdir(parents=True, exist_ok=True)
    return folder


def issue_server_cert(folder: Path, hosts: list[str], days: int = 825) -> Path:
    """(Re-)issue the coordinator's TLS certificate; site keys and the CA stay as they are."""
    try:
        ca_key = serialization.load_pem_private_key((folder / "ca" / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((folder / "ca" / "ca.crt").read_bytes())
    except FileNotFoundError as exc:
        raise CertError(f"{exc.filename} not found: run `hcc-fl certs init` first") from exc
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    # The SuperLink itself listens on loopback behind the nginx front, which verifies it by the
    # DNS name "localhost": both loopback names are always in the certificate.
    hosts = [*hosts, *(h for h in ("localhost", "127.0.0.1") if h not in hosts)]
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(folder / "server" / "server.key", _pem_key(key))
    _write_public(folder / "server" / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    return folder / "server" / "server.crt"


def add_site(folder: Path, name: str, role: str = "train") -> Path:
    """Create a site's EC P-384 key pair (OpenSSH format) and put its public key, with its
    ``role`` (``train`` or ``external``), on the coordinator's allow-list. Returns the folder
    to hand to the site."""
    if role not in ROLES:
        raise CertError(f"role '{role}': use one of {', '.join(ROLES)}")
    if not SITE_NAME.match(name):
        raise CertError(f"site name '{name}': use letters, digits, '.', '_' or '-' (max 63)")
    if not (folder / "ca" / "ca.crt").exists():
        raise CertError(f"{folder / 'ca' / 'ca.crt'} not found: run `hcc-fl certs init` first")
    allowed = folder / "authorized" / f"{name}.pub"
    if allowed.exists():
        raise CertError(f"site '{name}' is already registered ({allowed}); revoke it first")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    out = folder / "sites" / name
    _write_private(out / f"{name}.key", private)
    _write_public(out / f"{name}.pub", public + b"\n")
    _write_public(out / "ca.crt", (folder / "ca" / "ca.crt").read_bytes())
    _write_public(allowed.with_suffix(".role"), f"{role}\n".encode())
    _write_public(allowed, public + b"\n")
    return out


def revoke_site(folder: Path, name: str) -> None:
    """Remove a site's public key from the allow-list (the coordinator unregisters it)."""
    allowed = folder / "authorized" / f"{name}.pub"
    if not allowed.exists():
        raise CertError(f"site '{name}' is not on the allow-list ({allowed} not found)")
    revoked = folder / "revoked"
    revoked.mkdir(exist_ok=True)
    # the key first: a running coordinator re-reads the allow-list by key at every round
    allowed.replace(revoked / f"{name}.pub")
    role = allowed.with_suffix(".role")
    if role.exists():
        role.replace(revoked / f"{name}.role")


def allowed_sites(folder: Path) -> dict[str, Path]:
    """Site name -> public key file, from the allow-list."""
    return {p.stem: p for p in sorted((folder / "authorized").glob("*.pub"))}


def revoked_sites(folder: Path) -> dict[str, Path]:
    """Site name -> public key file of revoked sites."""
    return {p.stem: p for p in sorted((folder / "revoked").glob("*.pub"))}


def site_role(folder: Path, name: str) -> str:
    """The role the coordinator declared for an allow-listed site (``train`` without a role
    file)."""
    path = folder / "authorized" / f"{name}.role"
    if not path.exists():
        return "train"
    role = path.read_text().strip()
    if role not in ROLES:
        raise CertError(f"{path}: role '{role}' is not one of {', '.join(ROLES)}")
    return role


def public_key_der(data: bytes) -> bytes:
    """A public key (OpenSSH ``.pub`` line or PEM, as Flower stores it) as DER
    SubjectPublicKeyInfo bytes, the form in which two keys are compared."""
    text = data.strip()
    key = (serialization.load_pem_public_key(text) if text.startswith(b"-----BEGIN")
           else serialization.load_ssh_public_key(text))
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
