"""SecAgg+ (Bell et al. 2020) for hcc-fl's Message-API strategies, hardened against a malicious
coordinator.

Flower 1.41 runs SecAgg+ only with its legacy strategy API; this module is the protocol for our
strategies. Primitives: Flower's Shamir secret sharing and stochastic quantisation
(``flwr.common.secure_aggregation``), its EC key pairs (``flwr.supercore.primitives``) and its
ECDH + HKDF + Fernet share encryption; ``cryptography`` for the mask generator (ChaCha20 keyed
by HKDF of the full 256-bit seed) and for the signatures (ECDSA P-384 / SHA-384 with the site's
identity key, the key of the coordinator's allow-list). No cryptography of our own.

One secure aggregation ("tag", e.g. ``train-3``), five messages per site. ``SiteState``
persists between them at the site (Flower starts a fresh process for every message); every
stage is allowed once, in order, and the protocol settings are fixed at set-up:

1. ``setup``: the site checks the settings (its own threshold ``t >= max(2, ceil(2n/3))``, its
   own minimum number of sites), makes two EC key pairs (``c``: share encryption, ``s``: masks)
   and sends the public halves *signed* with its identity key over (run, tag, round, node,
   site name, keys).
2. ``share``: the site verifies every advertisement against the peers' public keys it holds
   from outside the coordinator (``Identity.peers``), its own entry, unique sites and keys,
   ``t <= entries <= n``; then Shamir-shares its self-mask seed ``b`` and mask key (``t`` of
   the entries) and encrypts each share pair for its recipient.
3. ``masked``: the site decrypts the shares sent to it; the senders plus itself are ``U2`` (at
   least ``t``). It trains, quantises ``[w, w * parameters]`` and adds ``PRG(b)`` and
   ``+/- PRG(ECDH(s_i, s_j))`` for the peers ``j`` in ``U2`` only; then erases its private
   keys and ``b``.
4. ``consistency``: the coordinator names the survivors ``U3``; the site checks ``t <= |U3|``,
   itself in ``U3``, ``U3`` within its ``U2``, and signs ``U3`` (once per tag).
5. ``unmask``: the site checks that ``U3`` is the set it signed, that at least ``t`` survivors
   signed the same ``U3`` (their identity keys), and that the dropped list is exactly
   ``U2 - U3``; only then it returns its shares of the survivors' ``b`` and of the dropped
   sites' mask keys. With ``t`` shares the coordinator removes every mask from the *sum*.

Dropout tolerance: a site may drop after sharing its keys; the sum is recovered while at least
``t`` sites answer (and sign) the last two messages.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

Vector = list[np.ndarray]
TAG = re.compile(r"^[a-z][a-z0-9_]{0,40}-[0-9]{1,9}$")
STAGES = ("setup", "shared", "masked", "signed", "done")


class ProtocolError(ValueError):
    """A SecAgg+ message that the site refuses (a protocol violation by the coordinator)."""


def min_threshold(n: int) -> int:
    """The smallest threshold a site accepts for ``n`` sites: ``max(2, ceil(2n/3))``."""
    return max(2, math.ceil(2 * n / 3))


@dataclass(frozen=True)
class SecAggConfig:
    """Protocol parameters, the same at every site (proposed by the coordinator, checked by
    every site at set-up and then fixed for the tag)."""

    n: int  # sites taking part
    threshold: int  # shares needed to reconstruct (dropout tolerance n - threshold)
    clipping_range: float = 8.0  # parameters are clipped to [-c, c] before quantisation
    quantization_range: int = 2**22  # levels over [-c, c]
    modulus: int = 2**32  # arithmetic of the masked sums (a power of two, at most 2^32)
    max_weight: float = 1000.0  # num-examples are divided by this (weights must stay <= c)

    @classmethod
    def for_sites(cls, n: int, **kw: Any) -> SecAggConfig:
        """Default threshold ``max(2, ceil(2n/3))`` for ``n`` sites."""
        return cls(n=n, threshold=min_threshold(n), **kw)

    @classmethod
    def from_json(cls, text: str) -> SecAggConfig:
        """Parse the settings a message carries; anything malformed is a ProtocolError."""
        try:
            raw = json.loads(text)
            cfg = cls(n=int(raw["n"]), threshold=int(raw["threshold"]),
                      clipping_range=float(raw["clipping_range"]),
                      quantization_range=int(raw["quantization_range"]),
                      modulus=int(raw["modulus"]), max_weight=float(raw["max_weight"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"secagg: malformed settings ({exc})") from None
        return cfg

    def check(self) -> None:
        """Refuse settings that weaken the protocol or overflow its arithmetic."""
        if self.n < 2:
            raise ProtocolError(f"secagg: {self.n} sites: secure aggregation needs at least 2")
        if not min_threshold(self.n) <= self.threshold <= self.n:
            raise ProtocolError(f"secagg: threshold {self.threshold} must be in "
                                f"[{min_threshold(self.n)}, n={self.n}] (max(2, ceil(2n/3)))")
        if self.modulus < 2**16 or self.modulus > 2**32 or self.modulus & (self.modulus - 1):
            raise ProtocolError(f"secagg: modulus {self.modulus} must be a power of two in "
                                "[2^16, 2^32]")
        if self.n * self.quantization_range >= self.modulus or self.quantization_range < 2:
            raise ProtocolError(f"secagg: modulus {self.modulus} is too small for {self.n} "
                                f"sites x quantization range {self.quantization_range}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0
                and math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ProtocolError("secagg: max_weight and clipping_range must be positive")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


# --- identity: the signing keys the coordinator cannot forge ---------------------------------
class Identity:
    """This site's identity key (the private half of its allow-listed key) and its peers'
    public keys, from a source other than the coordinator (SITE.yaml ``secagg_peers``: a folder
    of ``<site>.pub`` the consortium distributes with the certificates)."""

    def __init__(self, site: str, key: ec.EllipticCurvePrivateKey,
                 peers: Mapping[str, ec.EllipticCurvePublicKey]) -> None:
        self.site, self.key, self.peers = site, key, dict(peers)
        if site not in self.peers:
            raise ProtocolError(f"secagg: this site's own key ({site}) is not among the peers")
        own = self.peers[site].public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        mine = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        if own != mine:
            raise ProtocolError(f"secagg: the peers' key of {site} is not this site's key")

    @classmethod
    def load(cls, site: str, key_file: Path, peers_dir: Path) -> Identity:
        """Read the private key (OpenSSH or PEM) and every ``<site>.pub`` of ``peers_dir``."""
        data = Path(key_file).read_bytes()
        key: Any
        try:
            key = serialization.load_ssh_private_key(data, None)
        except ValueError:
            key = serialization.load_pem_private_key(data, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProtocolError(f"secagg: {key_file} is not an EC private key")
        peers: dict[str, ec.EllipticCurvePublicKey] = {}
        for pub in sorted(Path(peers_dir).glob("*.pub")):
            raw = pub.read_bytes()
            pk: Any = (serialization.load_ssh_public_key(raw) if raw.startswith(b"ecdsa-")
                       else serialization.load_pem_public_key(raw))
            if isinstance(pk, ec.EllipticCurvePublicKey):
                peers[pub.stem] = pk
        return cls(site, key, peers)

    def sign(self, payload: Mapping[str, Any]) -> str:
        """ECDSA signature (SHA-384) of the canonical JSON of ``payload``."""
        return _b64(self.key.sign(_canonical(payload), ec.ECDSA(hashes.SHA384())))

    def verify(self, site: str, payload: Mapping[str, Any], signature: str) -> bool:
        """Whether ``signature`` is ``site``'s signature of ``payload`` (False for a stranger)."""
        pk = self.peers.get(site)
        if pk is None:
            return False
        try:
            pk.verify(_unb64(signature), _canonical(payload), ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            return False
        return True


def write_identity_keys(folder: Path, sites: list[str]) -> None:
    """Simulation only: one P-384 identity key per site in ``folder`` (``<site>.key`` 0600,
    ``<site>.pub``), as ``hcc-fl certs add-site`` makes them for a deployment."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        fd = os.open(folder / f"{site}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        (folder / f"{site}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


# --- the mask generator ----------------------------------------------------------------------
def mask_stream(seed: bytes, modulus: int, shapes: list[tuple[int, ...]]) -> Vector:
    """Uniform integers in ``[0, modulus)`` for ``shapes``: ChaCha20 keyed by HKDF-SHA256 of the
    whole seed (any length; 256 bits here). ``modulus`` is a power of two <= 2^32, so masking
    the 32-bit words keeps them uniform."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"hcc-fl secagg mask v1").derive(seed)
    sizes = [math.prod(s) for s in shapes]
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    words = np.frombuffer(enc.update(bytes(4 * sum(sizes))), dtype="<u4").astype(np.int64)
    words &= modulus - 1
    out, at = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(words[at: at + size].reshape(shape))
        at += size
    return out


def _pair_seed(own_sk: str, other_pk: str) -> bytes:
    key = generate_shared_key(bytes_to_private_key(_unb64(own_sk)),
                              bytes_to_public_key(_unb64(other_pk)))
    return base64.urlsafe_b64decode(key)


# --- the site's state ------------------------------------------------------------------------
@dataclass
class SiteState:
    """A site's secrets for one tag, bound to run, tag, round and stage (a private file at the
    site; secrets are erased once used and the file is deleted after unmasking)."""

    node: int
    site: str
    run: str  # hash of the run key
    tag: str
    round: int
    config: dict[str, Any]
    stage: str = "setup"
    c_sk: str = ""  # b64 PEM (erased after masking)
    s_sk: str = ""  # (erased after masking)
    b: str = ""  # b64 self-mask seed (erased after masking)
    public: dict[str, list[str]] = field(default_factory=dict)  # node -> [c_pk, s_pk, site]
    u2: list[int] = field(default_factory=list)  # nodes whose shares arrived, and this one
    survivors: list[int] = field(default_factory=list)  # the U3 this site signed
    held: dict[str, list[str]] = field(default_factory=dict)  # node -> [b share, sk share] b64

    @property
    def cfg(self) -> SecAggConfig:
        """The settings fixed at set-up."""
        return SecAggConfig(**self.config)

    def at(self, stage: str) -> None:
        """Refuse unless the tag is at ``stage`` (each stage runs once, in order)."""
        if self.stage != stage:
            raise ProtocolError(f"secagg: {self.tag} is at stage '{self.stage}', not '{stage}': "
                                "a stage runs once per round, in order")

    def expect(self, stage: str, run: str, tag: str, rnd: int) -> None:
        """Refuse a message of another run, tag, round or stage (each stage runs once)."""
        if (run, tag, rnd) != (self.run, self.tag, self.round):
            raise ProtocolError(f"secagg: the state of {self.tag} belongs to another run or "
                                "round")
        self.at(stage)

    def save(self, path: Path) -> None:
        """Write with mode 0600 in a 0700 folder, atomically."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.parent.chmod(0o700)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> SiteState:
        """Read the tag's state (ProtocolError if set-up never ran here for it)."""
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise ProtocolError("secagg: no set-up for this tag at this site") from None


def run_hash(run_key: str, run_id: int) -> str:
    """What binds a state and a signature to one run (the run key and Flower's run id)."""
    return hashlib.sha256(f"{run_key}\0{run_id}".encode()).hexdigest()[:32]


class StateStore:
    """The site's SecAgg+ state folder of one run (0700): one file per tag in progress and a
    ledger of the tags already set up (a tag never runs twice)."""

    def __init__(self, base: Path, run: str) -> None:
        self.base = Path(base) / "secagg"
        self.folder = self.base / run

    def path(self, tag: str) -> Path:
        """The state file of ``tag`` (a validated name: no path can come from the tag)."""
        if not TAG.match(tag):
            raise ProtocolError(f"secagg: malformed tag {tag[:80]!r}")
        return self.folder / f"{tag}.json"

    def begin(self, tag: str) -> Path:
        """Set-up of ``tag``: refuse a tag seen before; wipe the states of aborted tags."""
        path = self.path(tag)
        for d in (self.base, self.folder):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            d.chmod(0o700)
        ledger = self.folder / "tags-used"
        used = ledger.read_text().split() if ledger.exists() else []
        if tag in used or path.exists():
            raise ProtocolError(f"secagg: {tag} was set up before: a tag runs once")
        for stale in self.folder.glob("*.json*"):
            stale.unlink()  # an aborted tag's secrets (one tag is in progress at a time)
        fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(tag + "\n")
        return path


def wipe_states(base: Path) -> int:
    """Delete every SecAgg+ state under ``base`` (site start-up); the number of files."""
    count = 0
    root = Path(base) / "secagg"
    if root.is_dir():
        for f in root.rglob("*.json*"):
            f.unlink()
            count += 1
    return count


# --- site side -------------------------------------------------------------------------------
def _advert(state: SiteState, node: int, site: str, c_pk: str, s_pk: str) -> dict[str, Any]:
    return {"kind": "secagg-keys", "run": state.run, "tag": state.tag, "round": state.round,
            "node": node, "site": site, "c_pk": c_pk, "s_pk": s_pk}


def site_setup(ident: Identity, node: int, run: str, tag: str, rnd: int, cfg: SecAggConfig,
               min_sites: int = 2) -> tuple[SiteState, dict[str, str]]:
    """Stage 1: check the settings; two key pairs; the signed public keys to send."""
    cfg.check()
    if cfg.n < min_sites:
        raise ProtocolError(f"secagg: {cfg.n} sites, fewer than this site's minimum "
                            f"{min_sites}")
    if not TAG.match(tag):
        raise ProtocolError(f"secagg: malformed tag {tag[:80]!r}")
    c_sk, c_pk = generate_key_pairs()
    s_sk, s_pk = generate_key_pairs()
    state = SiteState(node, ident.site, run, tag, rnd, asdict(cfg),
                      c_sk=_b64(private_key_to_bytes(c_sk)), s_sk=_b64(private_key_to_bytes(s_sk)))
    pub = {"site": ident.site, "c_pk": _b64(public_key_to_bytes(c_pk)),
           "s_pk": _b64(public_key_to_bytes(s_pk))}
    pub["sig"] = ident.sign(_advert(state, node, ident.site, pub["c_pk"], pub["s_pk"]))
    return state, pub


def site_share(state: SiteState, ident: Identity, adverts: Mapping[int, Mapping[str, str]]
               ) -> dict[int, bytes]:
    """Stage 2: verify the signed key advertisements; Shamir-share ``b`` and the mask key;
    one ciphertext per other site."""
    state.at("setup")
    cfg = state.cfg
    if not cfg.threshold <= len(adverts) <= cfg.n:
        raise ProtocolError(f"secagg: {len(adverts)} sites advertised keys; the settings need "
                            f"{cfg.threshold}..{cfg.n}")
    sites: set[str] = set()
    keys: set[str] = set()
    for node, ad in adverts.items():
        site, c_pk, s_pk, sig = (str(ad.get(k, "")) for k in ("site", "c_pk", "s_pk", "sig"))
        if not ident.verify(site, _advert(state, int(node), site, c_pk, s_pk), sig):
            raise ProtocolError(f"secagg: the keys of node {node} are not signed by a known "
                                "peer for this run, tag and round")
        if site in sites or c_pk in keys or s_pk in keys or c_pk == s_pk:
            raise ProtocolError(f"secagg: a site or a key appears twice ({site})")
        sites.add(site)
        keys.update((c_pk, s_pk))
        state.public[str(node)] = [c_pk, s_pk, site]
    own = state.public.get(str(state.node))
    if own is None or own[2] != ident.site:
        raise ProtocolError("secagg: this site's own keys are missing from the advertisements")
    mine = [_b64(public_key_to_bytes(bytes_to_private_key(_unb64(sk)).public_key()))
            for sk in (state.c_sk, state.s_sk)]
    if own[:2] != mine:
        raise ProtocolError("secagg: this site's own keys were replaced")
    b = os.urandom(32)
    state.b = _b64(b)
    nodes = sorted(int(k) for k in state.public)
    b_shares = create_shares(b, cfg.threshold, len(nodes))
    sk_shares = create_shares(_unb64(state.s_sk), cfg.threshold, len(nodes))
    c_sk = bytes_to_private_key(_unb64(state.c_sk))
    out: dict[int, bytes] = {}
    for idx, dst in enumerate(nodes):
        if dst == state.node:
            state.held[str(dst)] = [_b64(b_shares[idx]), _b64(sk_shares[idx])]
            continue
        key = generate_shared_key(c_sk, bytes_to_public_key(_unb64(state.public[str(dst)][0])))
        plain = share_keys_plaintext_concat(state.node, dst, b_shares[idx], sk_shares[idx])
        out[dst] = encrypt(key, plain)
    state.stage = "shared"
    return out


def site_masked(state: SiteState, received: Mapping[int, bytes], params: Vector,
                weight: float) -> Vector:
    """Stage 3: store the shares sent to us (their senders and we are U2), then quantise
    ``[w, w * params]`` and mask it with ``b`` and the pairwise masks of U2; erase the keys."""
    state.at("shared")
    cfg = state.cfg
    c_sk = bytes_to_private_key(_unb64(state.c_sk))
    for src, ciphertext in received.items():
        if str(src) not in state.public or int(src) == state.node:
            raise ProtocolError(f"secagg: a share from node {src}, which advertised no keys")
        key = generate_shared_key(c_sk, bytes_to_public_key(_unb64(state.public[str(src)][0])))
        try:
            s, d, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
        except Exception as exc:  # noqa: BLE001 - Fernet's InvalidToken and parse errors
            raise ProtocolError(f"secagg: the share from node {src} does not decrypt") from exc
        if s != src or d != state.node:
            raise ProtocolError("secagg: a share was addressed to another site")
        state.held[str(src)] = [_b64(b_share), _b64(sk_share)]
    state.u2 = sorted({state.node, *(int(s) for s in received)})
    if len(state.u2) < cfg.threshold:
        raise ProtocolError(f"secagg: shares from {len(state.u2) - 1} peers; the threshold "
                            f"is {cfg.threshold}")
    if weight > cfg.max_weight or not weight >= 0:
        raise ProtocolError(f"secagg: weight {weight} outside [0, max_weight]")
    ratio = weight / cfg.max_weight
    vec = [np.array([ratio], dtype=np.float64)] + [np.asarray(p, np.float64) * ratio
                                                     for p in params]
    q = [a.astype(np.int64) for a in quantize(vec, cfg.clipping_range, cfg.quantization_range)]
    shapes = [a.shape for a in q]
    out = [a + m for a, m in zip(q, mask_stream(_unb64(state.b), cfg.modulus, shapes),
                                 strict=True)]
    for other in state.u2:
        if other == state.node:
            continue
        mask = mask_stream(_pair_seed(state.s_sk, state.public[str(other)][1]), cfg.modulus,
                           shapes)
        sign = 1 if state.node > other else -1
        out = [a + sign * m for a, m in zip(out, mask, strict=True)]
    state.c_sk = state.s_sk = state.b = ""  # used: the shares held are all that remains
    state.stage = "masked"
    return parameters_mod(out, cfg.modulus)


def _survivor_payload(state: SiteState, survivors: list[int]) -> dict[str, Any]:
    return {"kind": "secagg-survivors", "run": state.run, "tag": state.tag,
            "round": state.round, "survivors": sorted(survivors)}


def _check_survivors(state: SiteState, survivors: list[int]) -> None:
    cfg = state.cfg
    if len(set(survivors)) != len(survivors):
        raise ProtocolError("secagg: a survivor is listed twice")
    if len(survivors) < cfg.threshold:
        raise ProtocolError(f"secagg: {len(survivors)} survivors, fewer than the threshold "
                            f"{cfg.threshold}")
    if state.node not in survivors:
        raise ProtocolError("secagg: this site sent its masked vector but is not a survivor")
    if not set(survivors) <= set(state.u2):
        raise ProtocolError("secagg: a survivor that never shared its keys with this site")


def site_sign_survivors(state: SiteState, ident: Identity, survivors: list[int]) -> str:
    """Stage 4 (consistency): check U3 and sign it; a site signs one U3 per tag."""
    state.at("masked")
    survivors = [int(s) for s in survivors]
    _check_survivors(state, survivors)
    state.survivors = sorted(survivors)
    state.stage = "signed"
    return ident.sign(_survivor_payload(state, state.survivors))


def site_unmask(state: SiteState, ident: Identity, survivors: list[int], dropped: list[int],
                signatures: Mapping[int, str]) -> dict[int, tuple[str, bytes]]:
    """Stage 5: our shares of the survivors' ``b`` and of the dropped sites' mask keys, once
    ``t`` survivors signed the U3 we signed and the dropped list is U2 - U3."""
    state.at("signed")
    survivors, dropped = [int(s) for s in survivors], [int(d) for d in dropped]
    _check_survivors(state, survivors)
    if sorted(survivors) != state.survivors:
        raise ProtocolError("secagg: the survivors differ from those this site signed")
    if set(survivors) & set(dropped) or sorted(dropped) != sorted(set(state.u2) - set(survivors)):
        raise ProtocolError("secagg: the dropped sites are not the sharing sites that sent no "
                            "masked vector")
    payload = _survivor_payload(state, state.survivors)
    good = {int(n) for n, sig in signatures.items() if int(n) in state.survivors
            and ident.verify(state.public[str(n)][2], payload, sig)}
    if len(good) < state.cfg.threshold:
        raise ProtocolError(f"secagg: {len(good)} valid signatures of the survivor list, "
                            f"threshold {state.cfg.threshold}")
    out: dict[int, tuple[str, bytes]] = {}
    for node in survivors:
        if str(node) in state.held:
            out[node] = ("b", _unb64(state.held[str(node)][0]))
    for node in dropped:
        if str(node) in state.held:
            out[node] = ("sk", _unb64(state.held[str(node)][1]))
    state.held = {}
    state.stage = "done"
    return out


# --- coordinator side ------------------------------------------------------------------------
def unmask_sum(cfg: SecAggConfig, public: Mapping[int, tuple[str, str]],
               masked: Mapping[int, Vector], shares: list[dict[int, tuple[str, bytes]]]
               ) -> tuple[float, Vector]:
    """Remove every mask from the *sum* of the survivors' masked vectors.

    ``public``: node -> (c_pk, s_pk) of U2 (the sites whose shares were delivered). Returns
    ``(sum of weights, weighted mean of the parameters)``. Raises ValueError when fewer than
    ``threshold`` shares of a needed secret arrived, or the weight sum is not a possible one."""
    survivors = sorted(masked)
    dropped = sorted(set(public) - set(masked))
    shapes = [a.shape for a in next(iter(masked.values()))]
    total = [np.zeros(s, dtype=np.int64) for s in shapes]
    for vec in masked.values():
        total = parameters_mod([a + v.astype(np.int64) for a, v in zip(total, vec, strict=True)],
                               cfg.modulus)

    def secret(node: int, kind: str) -> bytes:
        parts = [s[node][1] for s in shares if node in s and s[node][0] == kind]
        if len(parts) < cfg.threshold:
            raise ValueError(f"secagg: {len(parts)} shares for node {node}, threshold "
                             f"{cfg.threshold}: the sum cannot be unmasked")
        return combine_shares(parts[: cfg.threshold])

    for node in survivors:  # self masks
        mask = mask_stream(secret(node, "b"), cfg.modulus, shapes)
        total = [a - m for a, m in zip(total, mask, strict=True)]
    for d in dropped:  # pairwise masks the survivors added for a site that then dropped
        d_sk = _b64(secret(d, "sk"))
        for s in survivors:
            mask = mask_stream(_pair_seed(d_sk, public[s][1]), cfg.modulus, shapes)
            sign = 1 if s > d else -1  # what survivor s added for the pair (s, d)
            total = [a - sign * m for a, m in zip(total, mask, strict=True)]
    total = parameters_mod(total, cfg.modulus)
    k = len(survivors)
    step = 2 * cfg.clipping_range / cfg.quantization_range
    floats = [a.astype(np.float64) * step - k * cfg.clipping_range for a in total]
    weight_sum = float(floats[0][0])
    if not 0 < weight_sum <= k * (1 + step):  # every site's weight ratio is in [0, 1]
        raise ValueError(f"secagg: the unmasked weight sum {weight_sum:.4g} is impossible for "
                         f"{k} sites: the sum is corrupt")
    return weight_sum, [a / weight_sum for a in floats[1:]]
