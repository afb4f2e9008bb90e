"""SecAgg+ on Flower's primitives, run in-process: the unmasked sum equals the weighted mean
within the quantisation error, survives a site dropping after sharing its keys, and a masked
vector on its own tells nothing about the site's update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hcc_fl.client.secagg import (
    SecAggConfig,
    SiteState,
    site_masked,
    site_setup,
    site_share,
    site_unmask,
    unmask_sum,
)

SHAPES = [(3, 4), (5,), ()]


def _updates(n: int, shapes: list[tuple[int, ...]] = SHAPES
             ) -> tuple[dict[int, list[np.ndarray]], dict[int, float]]:
    rng = np.random.default_rng(0)
    params = {10 + i: [rng.normal(0, 0.5, s) for s in shapes] for i in range(n)}
    weights = {10 + i: float(w) for i, w in enumerate(rng.integers(5, 60, n))}
    return params, weights


def _run(n: int, drop_after_share: set[int], tmp_path: Path,  # type: ignore[no-untyped-def]
         shapes: list[tuple[int, ...]] = SHAPES):
    cfg = SecAggConfig.for_sites(n)
    cfg.check()
    params, weights = _updates(n, shapes)
    states, public = {}, {}
    for node in params:  # 1: keys
        st, pk = site_setup(node)
        st.save(tmp_path / f"{node}.json")
        public[node] = (pk["c_pk"], pk["s_pk"])
    inbox: dict[int, dict[int, bytes]] = {node: {} for node in params}
    for node in params:  # 2: encrypted shares, routed by the coordinator
        st = SiteState.load(tmp_path / f"{node}.json")
        for dst, ct in site_share(st, cfg, public).items():
            inbox[dst][node] = ct
        st.save(tmp_path / f"{node}.json")
    masked = {}
    for node in params:  # 3: masked updates (a dropped site never sends one)
        if node in drop_after_share:
            continue
        st = SiteState.load(tmp_path / f"{node}.json")
        masked[node] = site_masked(st, cfg, inbox[node], params[node], weights[node])
        st.save(tmp_path / f"{node}.json")
        states[node] = st
    survivors = sorted(masked)
    dropped = sorted(set(params) - set(masked))
    shares = [site_unmask(states[node], survivors, dropped) for node in survivors]  # 4
    return cfg, params, weights, masked, unmask_sum(cfg, public, masked, shares)


def _expected(params, weights, nodes):  # type: ignore[no-untyped-def]
    total = sum(weights[n] for n in nodes)
    return [sum(weights[n] * params[n][i] for n in nodes) / total for i in range(len(SHAPES))]


@pytest.mark.parametrize("n", [3, 5])
def test_sum_equals_weighted_mean_within_quantisation(n: int, tmp_path: Path) -> None:
    cfg, params, weights, _, (wsum, mean) = _run(n, set(), tmp_path)
    assert wsum == pytest.approx(sum(weights.values()) / cfg.max_weight, abs=1e-4)
    step = 2 * cfg.clipping_range / cfg.quantization_range  # one quantisation level
    for got, want in zip(mean, _expected(params, weights, params), strict=True):
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) < n * step * cfg.max_weight / min(weights.values())


def test_a_site_dropping_after_sharing_keys_still_gives_the_right_sum(tmp_path: Path) -> None:
    cfg, params, weights, masked, (_, mean) = _run(5, {12}, tmp_path)
    assert sorted(masked) == [10, 11, 13, 14]
    want = _expected(params, weights, [10, 11, 13, 14])
    step = 2 * cfg.clipping_range / cfg.quantization_range
    for got, w in zip(mean, want, strict=True):
        assert np.max(np.abs(got - w)) < 5 * step * cfg.max_weight / min(weights.values())


def test_too_many_dropouts_cannot_be_unmasked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be unmasked"):
        _run(3, {10, 11}, tmp_path)  # threshold 2 of 3: one survivor holds one share


def test_a_masked_vector_alone_reveals_nothing_of_the_update(tmp_path: Path) -> None:
    # 2,000 values: the masks' key material is fresh randomness (not seeded), so the bounds
    # below must hold with overwhelming probability (mean +-0.0065, correlation +-0.022, 1 SD)
    cfg, params, weights, masked, _ = _run(3, set(), tmp_path, [(40, 50)])
    vec = np.concatenate([a.ravel() for a in masked[10]]).astype(np.float64)
    # the plain quantised update sits near the middle of the range; masked values are uniform
    assert 0.3 < vec.mean() / cfg.modulus < 0.7 and vec.std() / cfg.modulus > 0.2
    plain = np.concatenate([np.asarray(p).ravel() for p in params[10]]) * weights[10] / 1000
    q = (plain + cfg.clipping_range) * cfg.quantization_range / (2 * cfg.clipping_range)
    assert abs(np.corrcoef(vec[1:], q)[0, 1]) < 0.6
    state = SiteState.load(tmp_path / "10.json")
    assert (tmp_path / "10.json").stat().st_mode & 0o077 == 0  # secrets readable by owner only
    assert state.b and state.s_sk
