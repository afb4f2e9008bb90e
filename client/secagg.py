"""SecAgg+ (Bell et al. 2020) for hcc-fl's Message-API strategies, on Flower's own primitives.

Flower 1.41 runs SecAgg+ only with its legacy strategy API; this module is the protocol for our
strategies, built from Flower's secure-aggregation primitives (``flwr.common.secure_aggregation``:
stochastic quantisation, Shamir secret sharing, the masks' pseudo-random generator; EC key pairs
from ``flwr.supercore.primitives``) and ``cryptography`` (ECDH + HKDF + Fernet via Flower's
``symmetric_encryption``). No cryptography of our own.

One round, four messages per site (``SiteState`` persists between them at the site, because Flower
starts a fresh process for every message):

1. ``setup``: each site makes two EC key pairs (``c`` for encrypting shares, ``s`` for masks)
   and sends the public halves.
2. ``share``: with everybody's public keys, each site draws a self-mask seed ``b``, splits ``b``
   and its mask secret key into Shamir shares (threshold ``t`` of ``n``), and sends each share
   pair encrypted for its recipient (the coordinator only routes ciphertexts).
3. ``masked``: each site trains, quantises ``[weight, weight * parameters]`` and adds its
   self-mask ``PRG(b)`` and, for every other site ``j``, ``+/- PRG(ECDH(s_i, s_j))``; only this
   masked vector leaves the site.
4. ``unmask``: the coordinator says who sent a masked vector (survivors) and who dropped after
   sharing its keys; each site returns its shares of the survivors' ``b`` and of the dropped
   sites' mask keys. With at least ``t`` shares the coordinator removes all masks from the
   *sum* and never sees an individual site's update.

Dropout tolerance: the sum is recovered while at least ``t`` sites answer the unmask message
(default ``t = max(2, ceil(2n/3))``); a site may drop at any point after sharing its keys.
"""

from __future__ import annotations

import base64
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
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


@dataclass(frozen=True)
class SecAggConfig:
    """Protocol parameters, the same at every site (sent by the coordinator)."""

    n: int  # sites taking part
    threshold: int  # shares needed to reconstruct (dropout tolerance n - threshold)
    clipping_range: float = 8.0  # parameters are clipped to [-c, c] before quantisation
    quantization_range: int = 2**22  # levels over [-c, c]
    modulus: int = 2**32  # arithmetic of the masked sums
    max_weight: float = 1000.0  # num-examples are divided by this (weights must stay <= c)

    @classmethod
    def for_sites(cls, n: int, **kw: Any) -> SecAggConfig:
        """Default threshold ``max(2, ceil(2n/3))`` for ``n`` sites."""
        return cls(n=n, threshold=max(2, math.ceil(2 * n / 3)), **kw)

    def check(self) -> None:
        """The modulus must hold the sum of n quantised values."""
        if self.n * self.quantization_range >= self.modulus:
            raise ValueError(f"secagg: modulus {self.modulus} is too small for {self.n} sites x "
                             f"quantization range {self.quantization_range}")
        if not 2 <= self.threshold <= self.n:
            raise ValueError(f"secagg: threshold {self.threshold} must be in [2, n={self.n}]")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


@dataclass
class SiteState:
    """A site's secrets for one round (private file at the site, deleted after unmasking)."""

    node: int
    c_sk: str = ""  # b64 PEM
    s_sk: str = ""
    b: str = ""  # b64 self-mask seed
    public: dict[str, list[str]] = field(default_factory=dict)  # node -> [c_pk, s_pk] b64
    held: dict[str, list[str]] = field(default_factory=dict)  # node -> [b share, sk share] b64

    def save(self, path: Path) -> None:
        """Write with mode 0600, atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> SiteState:
        """Read the round's state (raises FileNotFoundError if setup never ran here)."""
        return cls(**json.loads(path.read_text()))


# --- site side -------------------------------------------------------------------------------
def site_setup(node: int) -> tuple[SiteState, dict[str, str]]:
    """Stage 1: two key pairs; returns the state and the public keys to send."""
    c_sk, c_pk = generate_key_pairs()
    s_sk, s_pk = generate_key_pairs()
    state = SiteState(node, _b64(private_key_to_bytes(c_sk)), _b64(private_key_to_bytes(s_sk)))
    return state, {"c_pk": _b64(public_key_to_bytes(c_pk)),
                   "s_pk": _b64(public_key_to_bytes(s_pk))}


def site_share(state: SiteState, cfg: SecAggConfig, public: dict[int, tuple[str, str]]
               ) -> dict[int, bytes]:
    """Stage 2: Shamir-share ``b`` and the mask key; one ciphertext per other site."""
    if len(public) < cfg.threshold:
        raise ValueError(f"secagg: {len(public)} sites shared keys, fewer than the threshold "
                         f"{cfg.threshold}")
    state.public = {str(k): list(v) for k, v in public.items()}
    b = os.urandom(32)
    state.b = _b64(b)
    nodes = sorted(public)
    b_shares = create_shares(b, cfg.threshold, len(nodes))
    sk_shares = create_shares(_unb64(state.s_sk), cfg.threshold, len(nodes))
    c_sk = bytes_to_private_key(_unb64(state.c_sk))
    out: dict[int, bytes] = {}
    for idx, dst in enumerate(nodes):
        if dst == state.node:
            state.held[str(dst)] = [_b64(b_shares[idx]), _b64(sk_shares[idx])]
            continue
        key = generate_shared_key(c_sk, bytes_to_public_key(_unb64(public[dst][0])))
        plain = share_keys_plaintext_concat(state.node, dst, b_shares[idx], sk_shares[idx])
        out[dst] = encrypt(key, plain)
    return out


def _pair_seed(own_sk: str, other_pk: str) -> bytes:
    key = generate_shared_key(bytes_to_private_key(_unb64(own_sk)),
                              bytes_to_public_key(_unb64(other_pk)))
    return base64.urlsafe_b64decode(key)


def site_masked(state: SiteState, cfg: SecAggConfig, received: dict[int, bytes],
                params: Vector, weight: float) -> Vector:
    """Stage 3: store the shares sent to us, then quantise and mask ``[w, w * params]``."""
    c_sk = bytes_to_private_key(_unb64(state.c_sk))
    for src, ciphertext in received.items():
        key = generate_shared_key(c_sk, bytes_to_public_key(_unb64(state.public[str(src)][0])))
        s, d, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
        if s != src or d != state.node:
            raise ValueError("secagg: a share was addressed to another site")
        state.held[str(src)] = [_b64(b_share), _b64(sk_share)]
    ratio = weight / cfg.max_weight
    vec = [np.array([ratio], dtype=np.float64)] + [np.asarray(p, np.float64) * ratio
                                                     for p in params]
    q = [a.astype(np.int64) for a in quantize(vec, cfg.clipping_range, cfg.quantization_range)]
    shapes = [a.shape for a in q]
    masks = [pseudo_rand_gen(_unb64(state.b), cfg.modulus, shapes)]
    signs = [1]
    for other, (_, s_pk) in state.public.items():
        if int(other) == state.node:
            continue
        masks.append(pseudo_rand_gen(_pair_seed(state.s_sk, s_pk), cfg.modulus, shapes))
        signs.append(1 if state.node > int(other) else -1)
    out = q
    for sign, mask in zip(signs, masks, strict=True):
        out = [a + sign * m for a, m in zip(out, mask, strict=True)]
    return parameters_mod(out, cfg.modulus)


def site_unmask(state: SiteState, survivors: list[int], dropped: list[int]
                ) -> dict[int, tuple[str, bytes]]:
    """Stage 4: our shares of the survivors' ``b`` and of the dropped sites' mask keys."""
    out: dict[int, tuple[str, bytes]] = {}
    for node in survivors:
        if str(node) in state.held:
            out[node] = ("b", _unb64(state.held[str(node)][0]))
    for node in dropped:
        if str(node) in state.held:
            out[node] = ("sk", _unb64(state.held[str(node)][1]))
    return out


# --- coordinator side ------------------------------------------------------------------------
def unmask_sum(cfg: SecAggConfig, public: dict[int, tuple[str, str]],
               masked: dict[int, Vector], shares: list[dict[int, tuple[str, bytes]]]
               ) -> tuple[float, Vector]:
    """Remove every mask from the *sum* of the survivors' masked vectors.

    Returns ``(sum of weights, weighted mean of the parameters)``. Raises ValueError when fewer
    than ``threshold`` shares of a needed secret arrived."""
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
        mask = pseudo_rand_gen(secret(node, "b"), cfg.modulus, shapes)
        total = [a - m for a, m in zip(total, mask, strict=True)]
    for d in dropped:  # pairwise masks the survivors added for a site that then dropped
        d_sk = _b64(secret(d, "sk"))
        for s in survivors:
            mask = pseudo_rand_gen(_pair_seed(d_sk, public[s][1]), cfg.modulus, shapes)
            sign = 1 if s > d else -1  # what survivor s added for the pair (s, d)
            total = [a - sign * m for a, m in zip(total, mask, strict=True)]
    total = parameters_mod(total, cfg.modulus)
    k = len(survivors)
    step = 2 * cfg.clipping_range / cfg.quantization_range
    floats = [a.astype(np.float64) * step - k * cfg.clipping_range for a in total]
    weight_sum = float(floats[0][0])
    return weight_sum, [a / weight_sum for a in floats[1:]]
