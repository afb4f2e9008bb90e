"""SecAgg+ run in-process with the sites' real protocol functions: the unmasked sum equals the
weighted mean within the quantisation error (also when a site drops after set-up or after
sharing), a masked vector alone tells nothing, and a malicious coordinator's attacks are refused
without any individual update becoming computable from what the coordinator received."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hcc_fl.client.secagg import (
    Identity,
    ProtocolError,
    SecAggConfig,
    SiteState,
    StateStore,
    mask_stream,
    site_masked,
    site_setup,
    site_share,
    site_sign_survivors,
    site_unmask,
    unmask_sum,
    wipe_states,
    write_identity_keys,
)

SHAPES = [(3, 4), (5,), ()]
RUN = "0123456789abcdef0123456789abcdef"
Shares = dict[int, tuple[str, bytes]]


class Fed:
    """n sites with identity keys and the state files of one tag; the test plays the
    coordinator, honest or not."""

    def __init__(self, tmp: Path, n: int, cfg: SecAggConfig | None = None) -> None:
        self.keys = tmp / "keys"
        self.sites = {10 + i: f"site_{chr(65 + i)}" for i in range(n)}
        write_identity_keys(self.keys, list(self.sites.values()))
        self.ident = {node: Identity.load(s, self.keys / f"{s}.key", self.keys)
                      for node, s in self.sites.items()}
        self.cfg = cfg or SecAggConfig.for_sites(n)
        self.tmp = tmp
        rng = np.random.default_rng(0)
        self.params = {node: [rng.normal(0, 0.5, s) for s in SHAPES] for node in self.sites}
        self.weights = {node: float(w) for node, w in zip(self.sites, rng.integers(5, 60, n),
                                                          strict=True)}
        self.received: list[Shares] = []  # everything the sites revealed to the coordinator

    def path(self, node: int) -> Path:
        return self.tmp / "state" / str(node) / "train-1.json"

    def load(self, node: int) -> SiteState:
        return SiteState.load(self.path(node))

    def setup(self, nodes: Iterable[int] | None = None) -> dict[int, dict[str, str]]:
        out = {}
        for node in nodes or self.sites:
            st, pub = site_setup(self.ident[node], node, RUN, "train-1", 1, self.cfg)
            st.save(self.path(node))
            out[node] = pub
        return out

    def share(self, adverts: dict[int, dict[str, str]], nodes: Iterable[int] | None = None
              ) -> dict[int, dict[int, bytes]]:
        inbox: dict[int, dict[int, bytes]] = {node: {} for node in adverts}
        for node in nodes or adverts:
            st = self.load(node)
            for dst, ct in site_share(st, self.ident[node], adverts).items():
                inbox[dst][node] = ct
            st.save(self.path(node))
        return inbox

    def mask(self, inbox: dict[int, dict[int, bytes]], nodes: Iterable[int]
             ) -> dict[int, list[np.ndarray]]:
        out = {}
        for node in nodes:
            st = self.load(node)
            out[node] = site_masked(st, inbox[node], self.params[node], self.weights[node])
            st.save(self.path(node))
        return out

    def sign(self, survivors: list[int], nodes: Iterable[int] | None = None) -> dict[int, str]:
        out = {}
        for node in nodes or survivors:
            st = self.load(node)
            out[node] = site_sign_survivors(st, self.ident[node], survivors)
            st.save(self.path(node))
        return out

    def unmask(self, node: int, survivors: list[int], dropped: list[int],
               sigs: dict[int, str]) -> Shares:
        st = self.load(node)
        shares = site_unmask(st, self.ident[node], survivors, dropped, sigs)
        st.save(self.path(node))
        self.received.append(shares)
        return shares

    def honest(self, drop_before_share: set[int] = frozenset(),  # type: ignore[assignment]
               drop_after_share: set[int] = frozenset()  # type: ignore[assignment]
               ) -> tuple[dict[int, list[np.ndarray]], tuple[float, list[np.ndarray]]]:
        adverts = self.setup()
        sharing = [n for n in adverts if n not in drop_before_share]
        inbox = self.share(adverts, sharing)
        inbox = {n: inbox[n] for n in sharing}
        masked = self.mask(inbox, [n for n in sharing if n not in drop_after_share])
        survivors = sorted(masked)
        dropped = sorted(set(sharing) - set(masked))
        sigs = self.sign(survivors)
        shares = [self.unmask(n, survivors, dropped, sigs) for n in survivors]
        public = {n: (adverts[n]["c_pk"], adverts[n]["s_pk"]) for n in sharing}
        return masked, unmask_sum(self.cfg, public, masked, shares)

    def expected(self, nodes: Iterable[int]) -> list[np.ndarray]:
        nodes = list(nodes)
        total = sum(self.weights[n] for n in nodes)
        return [sum(self.weights[n] * self.params[n][i] for n in nodes) / total
                for i in range(len(SHAPES))]

    def tolerance(self) -> float:
        step = 2 * self.cfg.clipping_range / self.cfg.quantization_range
        return len(self.sites) * step * self.cfg.max_weight / min(self.weights.values())

    def leaked(self) -> set[int]:
        """Sites whose masked vector the coordinator could unmask alone from what the sites
        revealed: it needs the site's self-mask seed and, for every pairwise mask, one of the
        two mask keys."""
        t = self.cfg.threshold
        count: dict[tuple[int, str], int] = {}
        for shares in self.received:
            for node, (kind, _) in shares.items():
                count[node, kind] = count.get((node, kind), 0) + 1
        known = {key for key, c in count.items() if c >= t}
        return {a for a in self.sites if (a, "b") in known and all(
            (a, "sk") in known or (j, "sk") in known for j in self.sites if j != a)}


# --- the honest path -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 5])
def test_sum_equals_weighted_mean_within_quantisation(n: int, tmp_path: Path) -> None:
    fed = Fed(tmp_path, n)
    _, (wsum, mean) = fed.honest()
    assert wsum == pytest.approx(sum(fed.weights.values()) / fed.cfg.max_weight, abs=1e-4)
    for got, want in zip(mean, fed.expected(fed.sites), strict=True):
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) < fed.tolerance()
    assert fed.leaked() == set()
    assert not any(fed.path(node).exists() and fed.load(node).held for node in fed.sites)


def test_a_site_dropping_after_sharing_keys_still_gives_the_right_sum(tmp_path: Path) -> None:
    fed = Fed(tmp_path, 5)
    masked, (_, mean) = fed.honest(drop_after_share={12})
    assert sorted(masked) == [10, 11, 13, 14]
    for got, w in zip(mean, fed.expected([10, 11, 13, 14]), strict=True):
        assert np.max(np.abs(got - w)) < fed.tolerance()
    assert fed.leaked() == set()


def test_a_site_dropping_between_setup_and_share_leaves_the_sum_exact(tmp_path: Path) -> None:
    # the sites mask only with the peers whose shares reached them (U2), so the site that set
    # up keys and never shared them leaves no mask behind
    fed = Fed(tmp_path, 5)
    masked, (_, mean) = fed.honest(drop_before_share={11})
    assert sorted(masked) == [10, 12, 13, 14]
    for got, w in zip(mean, fed.expected([10, 12, 13, 14]), strict=True):
        assert np.max(np.abs(got - w)) < fed.tolerance()


def test_too_many_dropouts_cannot_be_unmasked(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        Fed(tmp_path, 3).honest(drop_after_share={10, 11})  # t = 2 of 3: one survivor


def test_a_corrupt_sum_is_detected_by_its_weight(tmp_path: Path) -> None:
    fed = Fed(tmp_path, 3)
    adverts = fed.setup()
    masked = fed.mask(fed.share(adverts), fed.sites)
    masked[10][0] = (masked[10][0] + fed.cfg.modulus // 2) % fed.cfg.modulus  # garbled weight
    survivors = sorted(masked)
    sigs = fed.sign(survivors)
    shares = [fed.unmask(n, survivors, [], sigs) for n in survivors]
    public = {n: (a["c_pk"], a["s_pk"]) for n, a in adverts.items()}
    with pytest.raises(ValueError, match="the sum is corrupt"):
        unmask_sum(fed.cfg, public, masked, shares)


def test_a_masked_vector_alone_reveals_nothing_of_the_update(tmp_path: Path) -> None:
    fed = Fed(tmp_path, 3)
    fed.params = {n: [np.random.default_rng(n).normal(0, 0.5, (40, 50))] for n in fed.sites}
    adverts = fed.setup()
    masked = fed.mask(fed.share(adverts), fed.sites)
    vec = np.concatenate([a.ravel() for a in masked[10]]).astype(np.float64)
    cfg = fed.cfg  # the plain quantised update sits near the middle; masked values are uniform
    assert 0.3 < vec.mean() / cfg.modulus < 0.7 and vec.std() / cfg.modulus > 0.2
    plain = fed.params[10][0].ravel() * fed.weights[10] / cfg.max_weight
    q = (plain + cfg.clipping_range) * cfg.quantization_range / (2 * cfg.clipping_range)
    assert abs(np.corrcoef(vec[1:], q)[0, 1]) < 0.6


# --- the mask generator ----------------------------------------------------------------------
def test_masks_depend_on_the_whole_256_bit_seed() -> None:
    seed = bytes(range(32))
    other = seed[:31] + bytes([seed[31] ^ 1])  # differs in one bit of the last byte
    high = bytes([seed[0] ^ 0x80]) + seed[1:]
    a, b, c = (mask_stream(s, 2**32, [(1000,)])[0] for s in (seed, other, high))
    assert np.array_equal(a, mask_stream(seed, 2**32, [(1000,)])[0])  # deterministic
    assert np.mean(a == b) < 0.01 and np.mean(a == c) < 0.01
    assert a.min() >= 0 and a.max() < 2**32 and abs(a.mean() / 2**32 - 0.5) < 0.05
    small = mask_stream(seed, 2**16, [(4, 5), ()])
    assert [m.shape for m in small] == [(4, 5), ()] and small[0].max() < 2**16


# --- a malicious coordinator -----------------------------------------------------------------
def _masked_round(fed: Fed) -> tuple[dict[int, dict[str, str]], dict[int, list[np.ndarray]]]:
    adverts = fed.setup()
    return adverts, fed.mask(fed.share(adverts), fed.sites)


def test_forged_survivor_lists_are_refused(tmp_path: Path) -> None:
    fed = Fed(tmp_path, 5)  # t = 4
    _masked_round(fed)
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        fed.sign([10], [10])  # "site_A is the only survivor"
    with pytest.raises(ProtocolError, match="not a survivor"):
        fed.sign([11, 12, 13, 14], [10])  # site_A listed as dropped although it sent its vector
    with pytest.raises(ProtocolError, match="never shared"):
        fed.sign([10, 11, 12, 99], [10])  # an invented node
    with pytest.raises(ProtocolError, match="listed twice"):
        fed.sign([10, 10, 11, 12], [10])
    sigs = fed.sign([10, 11, 12, 13, 14])  # the honest list, signed once per site ...
    with pytest.raises(ProtocolError, match="at stage 'signed'"):
        fed.sign([10, 11, 12, 13], [10])  # ... and only once
    with pytest.raises(ProtocolError, match="differ from those this site signed"):
        fed.unmask(10, [10, 11, 12, 13], [14], sigs)
    with pytest.raises(ProtocolError, match="dropped sites"):  # overlapping lists
        fed.unmask(11, [10, 11, 12, 13, 14], [10], sigs)
    assert fed.received == [] and fed.leaked() == set()


def test_a_split_view_of_the_survivors_reveals_no_update(tmp_path: Path) -> None:
    # the coordinator tells site_A that all 3 survived and the others that site_A dropped, to
    # collect site_A's self-mask seed *and* its mask key: the consistency round stops it
    fed = Fed(tmp_path, 3)  # t = 2
    _masked_round(fed)
    sig_a = fed.sign([10, 11, 12], [10])[10]
    sigs_bc = fed.sign([11, 12], [11, 12])
    with pytest.raises(ProtocolError, match="valid signatures"):
        fed.unmask(10, [10, 11, 12], [], {**sigs_bc, 10: sig_a})  # only A signed this list
    for node in (11, 12):  # the others reveal sk_A, but nobody reveals b_A
        fed.unmask(node, [11, 12], [10], sigs_bc)
    assert fed.leaked() == set()


def test_forged_signatures_are_refused(tmp_path: Path) -> None:
    fed = Fed(tmp_path, 3)
    _masked_round(fed)
    sigs = fed.sign([10, 11, 12])
    forged = {10: sigs[10], 11: sigs[10], 12: sigs[10]}  # site_A's signature thrice
    with pytest.raises(ProtocolError, match="1 valid signatures"):
        fed.unmask(10, [10, 11, 12], [], forged)
    assert fed.received == []


def test_a_replayed_masking_stage_is_refused(tmp_path: Path) -> None:
    fed = Fed(tmp_path, 3)
    adverts = fed.setup()
    inbox = fed.share(adverts)
    fed.mask(inbox, [10])
    state = fed.load(10)
    assert state.stage == "masked" and not (state.c_sk or state.s_sk or state.b)  # erased
    huge = {**state.config, "max_weight": 1e-6}
    state.config = huge  # even a state file edited to other settings would not help: ...
    with pytest.raises(ProtocolError, match="at stage 'masked'"):
        state.expect("shared", RUN, "train-1", 1)  # ... the stage runs once
    with pytest.raises(ProtocolError):
        fed.mask(inbox, [10])
    with pytest.raises(ProtocolError, match="another run or round"):
        fed.load(11).expect("shared", "f" * 32, "train-1", 1)


@pytest.mark.parametrize(("n", "t"), [(5, 1), (5, 2), (5, 3), (3, 1)])
def test_a_threshold_below_two_thirds_is_refused(n: int, t: int, tmp_path: Path) -> None:
    fed = Fed(tmp_path, 3)
    with pytest.raises(ProtocolError, match="threshold"):
        site_setup(fed.ident[10], 10, RUN, "train-1", 1, SecAggConfig(n=n, threshold=t))
    with pytest.raises(ProtocolError, match="fewer than this site's minimum"):
        site_setup(fed.ident[10], 10, RUN, "train-1", 1, SecAggConfig.for_sites(2), min_sites=3)
    for bad in ({"modulus": 3 * 2**20}, {"max_weight": math.inf}, {"modulus": 2**40}):
        with pytest.raises(ProtocolError):
            site_setup(fed.ident[10], 10, RUN, "train-1", 1, SecAggConfig.for_sites(3, **bad))


def test_a_substituted_key_or_an_invented_node_is_refused(tmp_path: Path) -> None:
    fed = Fed(tmp_path, 3)
    adverts = fed.setup()
    _, mine = site_setup(fed.ident[11], 11, RUN, "train-1", 1, fed.cfg)  # other keys "of" B
    stranger = tmp_path / "stranger"  # a key the consortium never distributed
    write_identity_keys(stranger, ["site_Z"])
    z = Identity.load("site_Z", stranger / "site_Z.key", stranger)
    z_ad = {**mine, "site": "site_Z", "sig": z.sign({
        "kind": "secagg-keys", "run": RUN, "tag": "train-1", "round": 1, "node": 99,
        "site": "site_Z", "c_pk": mine["c_pk"], "s_pk": mine["s_pk"]})}
    attacks: list[tuple[str, Any]] = [
        ("not signed by a known peer", {11: {**adverts[11], "c_pk": mine["c_pk"]}}),  # swapped
        ("not signed by a known peer", {11: {**adverts[11], "sig": adverts[12]["sig"]}}),
        ("not signed by a known peer", {99: z_ad}),  # an invented node with its own key
        ("not signed by a known peer", {99: {**adverts[12], "site": "site_Z"}}),
        ("not signed by a known peer", {99: adverts[12]}),  # C's advertisement as node 99
    ]
    for reason, change in attacks:
        own = fed.setup([10])[10]  # a fresh state: a refused stage is not retried
        forged = {10: own, 11: adverts[11], 12: adverts[12], **change}
        if 99 in change:
            del forged[12]
        with pytest.raises(ProtocolError, match=reason):
            fed.share(forged, [10])
    fed.setup([10])  # site_A's own entry is its earlier advertisement (keys it no longer has)
    with pytest.raises(ProtocolError, match="own keys were replaced"):
        fed.share(adverts, [10])


def test_keys_signed_for_another_round_are_refused(tmp_path: Path) -> None:
    fed = Fed(tmp_path, 3)
    old = fed.setup()
    fed.setup([11, 12])
    st, _ = site_setup(fed.ident[10], 10, RUN, "train-1", 2, fed.cfg)  # round 2
    st.save(fed.path(10))
    with pytest.raises(ProtocolError, match="not signed"):
        fed.share(old, [10])


# --- state hygiene ---------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["../../outside-1", "train-1/../../x", "/etc/passwd",
                                 "train-1.json", "", "a" * 60 + "-1"])
def test_path_like_tags_are_refused(tag: str, tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state", RUN)
    with pytest.raises(ProtocolError, match="malformed tag"):
        store.begin(tag)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_state_is_private_run_bound_and_wiped(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state", RUN)
    first = store.begin("train-1")
    first.write_text("{}")
    with pytest.raises(ProtocolError, match="a tag runs once"):
        store.begin("train-1")
    second = store.begin("train-2")  # a new tag wipes an aborted one's secrets
    assert not first.exists()
    fed = Fed(tmp_path, 3)
    st, _ = site_setup(fed.ident[10], 10, RUN, "train-2", 2, fed.cfg)
    st.save(second)
    for d in (tmp_path / "state" / "secagg", tmp_path / "state" / "secagg" / RUN):
        assert d.stat().st_mode & 0o777 == 0o700
    assert second.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ProtocolError, match="another run or round"):
        SiteState.load(second).expect("setup", RUN, "train-2", 3)
    assert wipe_states(tmp_path / "state") == 1 and not second.exists()
    with pytest.raises(ProtocolError, match="no set-up"):
        SiteState.load(second)


def test_deployment_keys_from_the_allow_list_sign_and_verify(tmp_path: Path) -> None:
    # the keys `hcc-fl certs add-site` makes (OpenSSH P-384), the peers folder a copy of the
    # coordinator's authorized/*.pub as the consortium distributes it
    import shutil

    from hcc_fl.server.certs import add_site, init_pki

    pki = tmp_path / "pki"
    init_pki(pki, ["127.0.0.1"])
    for site in ("site_A", "site_B"):
        add_site(pki, site)
    peers = tmp_path / "peers"
    peers.mkdir()
    for pub in (pki / "authorized").glob("*.pub"):
        shutil.copy(pub, peers / pub.name)
    a = Identity.load("site_A", pki / "sites" / "site_A" / "site_A.key", peers)
    b = Identity.load("site_B", pki / "sites" / "site_B" / "site_B.key", peers)
    sig = a.sign({"x": 1})
    assert b.verify("site_A", {"x": 1}, sig) and not b.verify("site_B", {"x": 1}, sig)
    assert not b.verify("site_A", {"x": 2}, sig) and not b.verify("site_Z", {"x": 1}, sig)
    with pytest.raises(ProtocolError, match="not this site's key"):  # a swapped peers entry
        shutil.copy(peers / "site_B.pub", peers / "site_A.pub")
        Identity.load("site_A", pki / "sites" / "site_A" / "site_A.key", peers)
