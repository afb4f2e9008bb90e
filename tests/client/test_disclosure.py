"""The site's release policy (client/disclosure.py): cell rules, refusals, and a reconstruction
attack on everything the coordinator receives from pooled validation and external evaluation."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from hcc_fl.client.disclosure import (
    DisclosureRefused,
    ReleasePolicy,
    km_steps,
    merge_calibration_sums,
    released_scores,
    score_cells,
)
from hcc_fl.client.statistics import (
    external_report_prob,
    pooled_validation_probs,
    recalibration_sums,
    validation_placements_prob,
    validation_sums_prob,
)
from hcc_fl.shared.metrics.pooled import ScoreGrid

CELLS = ReleasePolicy()
EXACT = ReleasePolicy(mode="exact")
GRID = ScoreGrid()


def _site(rng: np.random.Generator, n: int, shift: float = 1.6) -> tuple[np.ndarray, np.ndarray]:
    """Labels and 4-decimal scores of a model of AUC ~0.8 (the phantom's score precision)."""
    y = np.zeros(n)
    y[: n // 2] = 1
    rng.shuffle(y)
    s = 1 / (1 + np.exp(-(rng.normal(0, 1.3, n) + shift * y - 0.8)))
    return y, np.round(s, 4)


def _ok(c: float, k: int) -> bool:
    return c == 0 or c >= k


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 10_000)), min_size=10, max_size=80),
       st.integers(2, 8))
def test_every_released_cell_holds_zero_or_at_least_k(rows: list[tuple[bool, int]], k: int
                                                      ) -> None:
    y = np.array([float(a) for a, _ in rows])
    s = np.array([b / 10_000 for _, b in rows])
    policy = ReleasePolicy(min_cell=k, min_split=0)
    if not (_ok(y.sum(), k) and _ok(len(y) - y.sum(), k)):
        with pytest.raises(DisclosureRefused):
            score_cells(y, s, policy)
        return
    cells = score_cells(y, s, policy)
    assert cells.starts[0] == 0 and all(b > a for a, b in pairwise(cells.starts))
    assert all(_ok(p, k) and _ok(q, k) for p, q in zip(cells.pos, cells.neg, strict=True))
    assert sum(cells.pos) == y.sum() and sum(cells.neg) == len(y) - y.sum()
    # each patient's released cell contains its score
    released, _ = released_scores(y, s, policy)
    for (lo, hi), c in zip(cells.bounds(), range(len(cells.starts)), strict=True):
        members = cells.cell_of(s) == c
        assert np.all((s[members] >= lo) & (s[members] <= hi))
        assert np.all((released[members] >= lo) & (released[members] <= hi))
    if min(y.sum(), len(y) - y.sum()) < k:
        return
    # the histograms of pass 1 hold whole counts >= k (or 0) only
    out = validation_sums_prob(y, s, GRID, ReleasePolicy(min_cell=k, min_split=0))
    for h in (out["pos"], out["neg"]):
        assert all(_ok(c, k) for c in h)
    cal = out["calibration"][:-1]
    assert all(_ok(c[2], k) and _ok(c[0] - c[2], k) for c in cal)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(10, 40), min_size=2, max_size=4))
def test_the_auc_bounds_always_hold_the_central_auc(seed: int, sizes: list[int]) -> None:
    """Whatever the split into sites, the central AUC of all patients lies inside the bounds
    the coordinator computes from the released cells, and the pooled AUC too."""
    rng = np.random.default_rng(seed)
    parts = {f"s{i}": _site(rng, n) for i, n in enumerate(sizes)}
    y = np.concatenate([p[0] for p in parts.values()])
    s = np.concatenate([p[1] for p in parts.values()])
    central = roc_auc_score(y, s)
    _, block = pooled_validation_probs(parts, GRID, recalibrate=False, policy=CELLS)
    lo, hi = block["pooled"]["auc_bounds"]
    assert lo - 1e-12 <= central <= hi + 1e-12
    assert lo - 1e-12 <= block["pooled"]["auc"] <= hi + 1e-12
    _, exact = pooled_validation_probs(parts, GRID, recalibrate=False, policy=EXACT)
    assert exact["pooled"]["auc"] == pytest.approx(central, abs=1e-12)
    elo, ehi = exact["pooled"]["auc_bounds"]
    assert elo - 1e-12 <= central <= ehi + 1e-12 and ehi - elo <= hi - lo + 1e-12


def test_scores_on_candidate_edges_stay_in_the_cell_that_counted_them() -> None:
    """0.29 * 100 is 28.999... in floating point: a score on a candidate edge must be placed in
    the cell that starts there, as it was counted, or a released cell would hold 1 to k - 1."""
    y = np.array([1.0] * 5 + [0.0] * 5 + [1.0] * 5 + [0.0] * 5)
    s = np.array([0.1] * 5 + [0.2] * 5 + [0.28] * 5 + [0.29] * 5)
    policy = ReleasePolicy(min_split=0)
    cells = score_cells(y, s, policy)
    for label, counted in ((1, cells.pos), (0, cells.neg)):
        placed = np.bincount(cells.cell_of(s)[y == label], minlength=len(cells.starts))
        assert np.array_equal(placed, counted)
    out = validation_sums_prob(y, s, GRID, policy)
    assert all(_ok(c, 5) for h in (out["pos"], out["neg"]) for c in h)


def test_small_splits_are_refused_naming_the_rule() -> None:
    y, s = np.array([1.0, 0.0, 1.0]), np.array([0.91, 0.12, 0.55])  # a 3-patient site
    for call in (lambda: validation_sums_prob(y, s, GRID, CELLS),
                 lambda: validation_placements_prob(y, s, (np.ones(10_000), np.ones(10_000)),
                                                    GRID, CELLS),
                 lambda: recalibration_sums(y, s, (0.0, 1.0), CELLS),
                 lambda: external_report_prob(y, s, 0.5, n_boot=10, policy=CELLS)):
        with pytest.raises(DisclosureRefused, match="rule min_split"):
            call()
    y12 = np.array([1.0] * 3 + [0.0] * 9)
    with pytest.raises(DisclosureRefused, match="rule min_cell"):
        validation_sums_prob(y12, np.linspace(0.1, 0.9, 12), GRID, CELLS)
    # exact mode answers (the site's explicit choice)
    assert validation_sums_prob(y, s, GRID, EXACT)["n"] == 3


def test_later_replies_are_functions_of_the_released_cells() -> None:
    """Pass 2 and the recalibration sums, asked at any point with any broadcast, are the same
    for two cohorts whose released cells are the same: asking again teaches nothing new."""
    rng = np.random.default_rng(4)
    y, s = _site(rng, 30)
    cells = score_cells(y, s, CELLS)
    # move every patient elsewhere inside its own candidate cell (0.01 wide)
    lo = np.floor(s * 100) / 100
    s2 = np.round(lo + rng.uniform(0, CELLS.cell_width * 0.999, len(s)), 4)
    assert score_cells(y, s2, CELLS) == cells and not np.allclose(s, s2)
    a, b = (validation_sums_prob(y, x, GRID, CELLS) for x in (s, s2))
    assert np.array_equal(a["pos"], b["pos"]) and np.array_equal(a["neg"], b["neg"])
    hostile = (rng.integers(0, 3, 10_000).astype(float), rng.integers(0, 3, 10_000).astype(float))
    assert np.array_equal(validation_placements_prob(y, s, hostile, GRID, CELLS),
                          validation_placements_prob(y, s2, hostile, GRID, CELLS))
    for coef in ((0.0, 1.0), (3.0, -40.0), (-7.5, 120.0)):
        assert recalibration_sums(y, s, coef, CELLS) == recalibration_sums(y, s2, coef, CELLS)


def test_calibration_bins_merge_to_k() -> None:
    sums = np.zeros((11, 3))
    sums[0] = [6, 0.3, 0]
    sums[1] = [2, 0.3, 1]
    sums[5] = [10, 5.0, 5]
    sums[9] = [7, 6.5, 6]
    sums[10] = [25, 3.0, 12]
    out = merge_calibration_sums(sums, 5)
    assert out[:-1, 0].sum() == 25 and out[:-1, 2].sum() == 12
    assert all(_ok(r[2], 5) and _ok(r[0] - r[2], 5) for r in out[:-1])
    assert np.array_equal(out[-1], sums[-1])


def test_km_steps_cover_k_patients_and_stay_below_the_estimate() -> None:
    from hcc_fl.shared.metrics import kaplan_meier

    rng = np.random.default_rng(2)
    t = np.round(rng.exponential(300, 37), 1)
    e = (rng.random(37) < 0.7).astype(float)
    steps = km_steps(t, e, 5)
    assert steps is not None
    risk = steps["n_at_risk"]
    assert risk[0] == 37 and risk[-1] >= 5
    assert all(a - b >= 5 for a, b in pairwise(risk))
    km = kaplan_meier(t, e)
    for x, sv in zip(steps["t"], steps["s"], strict=True):  # drawn at or below the KM estimate
        j = int(np.searchsorted(km.times, x, side="right")) - 1
        assert sv <= (km.survival[j] if j >= 0 else 1.0) + 1e-12
    assert not set(steps["t"]) & set(t.tolist())  # no step at a patient's time
    assert km_steps(t[:4], e[:4], 5) is None


# ----------------------------------------------------------------------------- the attack
def _messages(policy: ReleasePolicy, seed: int = 0, sizes: tuple[int, ...] = (20, 15, 25)
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything the coordinator receives about the patients in a pooled validation (pass 1,
    pass 2, five recalibration points) and an external evaluation, as JSON, and the truth."""
    rng = np.random.default_rng(seed)
    parts = {f"site_{c}": _site(rng, n) for c, n in zip("ABC", sizes, strict=True)}
    y_ext, s_ext = _site(rng, 40)
    t_ext = np.round(rng.exponential(400, 40), 1)
    e_ext = (rng.random(40) < 0.6).astype(float)
    got: dict[str, Any] = {"pass1": {}, "pass2": {}, "recal": {}}
    for name, (y, s) in parts.items():
        p1 = validation_sums_prob(y, s, GRID, policy)
        got["pass1"][name] = {"pos": p1["pos"].tolist(), "neg": p1["neg"].tolist(),
                              "calibration": p1["calibration"].tolist()}
    pooled = (np.sum([got["pass1"][k]["pos"] for k in parts], axis=0),
              np.sum([got["pass1"][k]["neg"] for k in parts], axis=0))
    for name, (y, s) in parts.items():
        got["pass2"][name] = validation_placements_prob(y, s, pooled, GRID, policy).tolist()
        got["recal"][name] = [recalibration_sums(y, s, (a, b), policy)
                              for a, b in ((0, 1), (1, 1), (-1, 2), (0.5, 0.5), (2, -1))]
    got["external"] = json.loads(json.dumps(external_report_prob(
        y_ext, s_ext, 0.5, {"os": (t_ext, e_ext)}, n_boot=20, policy=policy), default=float))
    truth = {"sites": parts, "external": (y_ext, s_ext, t_ext, e_ext)}
    return got, truth


def _attack(got: dict[str, Any], truth: dict[str, Any]) -> int:
    """Patients whose (score to the grid's 1e-4, label) or (time, event) the attacker states
    correctly and singly: a histogram bin or calibration bin of one patient, a Kaplan-Meier
    step at a patient's time with one patient leaving the risk set."""
    found = 0
    for name, (y, s) in truth["sites"].items():
        idx = GRID.index(s)
        m = got["pass1"][name]
        for label, hist in ((1, m["pos"]), (0, m["neg"])):
            for b in np.nonzero(np.asarray(hist) == 1)[0]:
                found += int(np.sum((idx == b) & (y == label)) == 1)
        for n, sp, sy in m["calibration"][:-1]:
            if n == 1:  # one patient's score and label
                found += int(np.any((np.abs(s - sp) < 1e-12) & (y == sy)))
    y, s, t, e = truth["external"]
    for block in got["external"]["survival"].values():
        for group in ("high", "low"):
            steps = block.get(group)
            if not steps:
                continue
            risk = steps["n_at_risk"] + [0]
            for i, ti in enumerate(steps["t"]):
                if risk[i] - risk[i + 1] == 1 and np.any(np.abs(t - ti) < 1e-9):
                    found += 1
    roc = got["external"].get("roc")
    if roc and len(roc["fpr"]) == len(y) + 1:  # one patient per step: the label order
        found += len(y)
    return found


def test_reconstruction_default_policy_recovers_no_patient() -> None:
    for seed in range(5):
        got, truth = _messages(CELLS, seed)
        assert _attack(got, truth) == 0
    with pytest.raises(DisclosureRefused):  # a 3-patient site sends nothing at all
        _messages(CELLS, 0, sizes=(20, 15, 3))


def test_reconstruction_exact_mode_gives_patients_away() -> None:
    """Documents what the exact mode releases: nearly every training patient's score (to 1e-4)
    and label from the pass-1 histograms, the external patients' label order from the ROC
    curve, and their event times from the Kaplan-Meier curves."""
    got, truth = _messages(EXACT, 0)
    n_train = sum(len(y) for y, _ in truth["sites"].values())
    found = _attack(got, truth)
    assert found >= 0.8 * n_train + 40


def test_precision_of_the_pooled_auc_under_the_default_policy() -> None:
    """The loss of precision the default policy costs (docs/privacy.md quotes these): on three
    sites of 20/15/25 patients the pooled AUC moves by up to ~0.1 from the central one; with
    sites of 100-200 patients, by ~0.01. The bounds always hold the central value."""
    err = {}
    for sizes in ((20, 15, 25), (100, 150, 200)):
        diffs = []
        for seed in range(20):
            rng = np.random.default_rng(seed)
            parts = {f"s{i}": _site(rng, n) for i, n in enumerate(sizes)}
            y = np.concatenate([p[0] for p in parts.values()])
            s = np.concatenate([p[1] for p in parts.values()])
            _, block = pooled_validation_probs(parts, GRID, recalibrate=False, policy=CELLS)
            diffs.append(abs(block["pooled"]["auc"] - roc_auc_score(y, s)))
        err[sizes] = float(np.mean(diffs))
    assert err[(100, 150, 200)] < 0.02
    assert err[(100, 150, 200)] < err[(20, 15, 25)]
    assert not math.isnan(err[(20, 15, 25)])


def test_site_yaml_default_policy_is_cells(tmp_path: Any) -> None:
    from hcc_fl.client.site_config import load_site_config
    from hcc_fl.shared.errors import DataError

    (tmp_path / "m.csv").write_text("x\n")
    base = (f"site: site_A\nrole: train\ntask: ki67_ceus\nmanifest: {tmp_path / 'm.csv'}\n"
            "coordinator: 127.0.0.1:9\ninsecure: true\n")
    cfg = tmp_path / "SITE.yaml"
    cfg.write_text(base)
    assert load_site_config(cfg).disclosure == ReleasePolicy()
    cfg.write_text(base + "disclosure: {mode: exact}\n")
    assert load_site_config(cfg).disclosure.exact
    cfg.write_text(base + "disclosure: {mode: loose}\n")
    with pytest.raises(DataError, match="disclosure"):
        load_site_config(cfg)
    cfg.write_text(base + "disclosure: {min_cell: 0}\n")
    with pytest.raises(DataError, match="min_cell"):
        load_site_config(cfg)


def _pass1_reply(policy: ReleasePolicy) -> dict[str, Any]:
    from hcc_fl.shared import records as R

    rng = np.random.default_rng(5)
    y, s = _site(rng, 30)
    out = validation_sums_prob(y, s, GRID, policy)
    reply = {"pos": out["pos"].tolist(), "neg": out["neg"].tolist(),
             "calibration": out["calibration"].ravel().tolist(), "n": out["n"],
             "n-pos": out["n_pos"], "loss": out["loss"], "auc": out["auc"],
             "auc-lower": out["auc_ci"][0], "auc-upper": out["auc_ci"][1]}
    if out["cells"] is not None:
        reply[R.CELL_STARTS] = list(out["cells"].starts)
        reply[R.CELL_CANDIDATES] = out["cells"].n_candidates
    return reply


@pytest.mark.parametrize("starts, candidates, why", [
    ([3, 40], 100, "partition"), ([0, 40, 40], 100, "partition"), ([0, 120], 100, "partition"),
    ([0, 0.5], 100, "whole"), ([0, 40], 10_001, "not in"), ([0, 1], 3, "align"),
    ("0,40", 100, "list"), ([0, float("nan")], 100, "non-finite"),
])
def test_a_hostile_sites_cells_are_screened(starts: Any, candidates: Any, why: str) -> None:
    """The coordinator checks the cells a site declares in pass 1 (names the problem)."""
    from hcc_fl.server.screen import check_pass1
    from hcc_fl.shared import records as R

    reply = _pass1_reply(CELLS)
    assert check_pass1(reply, 10_000, 30)["cells"] is not None  # the honest reply passes
    reply[R.CELL_STARTS] = starts
    reply[R.CELL_CANDIDATES] = candidates
    with pytest.raises(ValueError, match=why):
        check_pass1(reply, 10_000, 30)


def test_the_coordinators_bounds_come_from_the_screened_cells() -> None:
    from hcc_fl.server.screen import check_pass1
    from hcc_fl.shared.evaluation import combine_pass1

    parsed = {"a": check_pass1(_pass1_reply(CELLS), 10_000, 30),
              "b": check_pass1(_pass1_reply(EXACT), 10_000, 30)}
    _, _, block = combine_pass1(parsed, GRID)
    lo, hi = block["pooled"]["auc_bounds"]
    assert 0 <= lo < hi <= 1
    assert block["disclosure"]["b"] == "exact" and block["disclosure"]["a"].startswith("cells")
