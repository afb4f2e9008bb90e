"""Pooled validation with hostile sites: every site's sums are screened (server/screen.py)
and a site whose sums fail is excluded, named and audited; the pooled statistics then equal
those of the honest sites alone, and malformed input never crashes the ServerApp.

A fake grid answers with real Flower ``Message`` objects (``reply_to``, as a ClientApp does),
whose honest contents come from the sites' own code (``client.statistics``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hcc_fl.client.statistics import (
    recalibration_sums,
    validation_placements_prob,
    validation_sums_prob,
)
from hcc_fl.server import flower_app, screen
from hcc_fl.server.flower_app import FederationError, pooled_validation
from hcc_fl.shared import records as R
from hcc_fl.shared.audit import AuditLog, read_audit
from hcc_fl.shared.metrics.pooled import ScoreGrid

GRID = ScoreGrid(200)
NAMES = {11: "site_A", 12: "site_B", 13: "site_C"}
Tamper = Callable[[str, dict[str, Any]], dict[str, Any] | None]


@pytest.fixture(autouse=True)
def identity() -> Iterator[None]:
    TaskIdentity.run_id = 7
    TaskIdentity.task_id = 1
    yield


def _data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    out = {}
    for site, n in (("site_A", 40), ("site_B", 30), ("site_C", 50)):
        y = (rng.random(n) < 0.4).astype(np.float64)
        y[:2] = [0, 1]
        p = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.2, n), 0.001, 0.999)
        out[site] = (y, p)
    return out


DATA = _data()
DECLARED = {s: len(y) for s, (y, _) in DATA.items()}


def _honest(site: str, action: str, msg: Message) -> dict[str, Any]:
    y, p = DATA[site]
    if action == R.ACTION_VALIDATION:
        s = validation_sums_prob(y, p, GRID)
        lo, hi = s["auc_ci"]
        return {"pos": s["pos"].tolist(), "neg": s["neg"].tolist(),
                "calibration": s["calibration"].ravel().tolist(), "n": s["n"],
                "n-pos": s["n_pos"], "loss": s["loss"], "auc": s["auc"], "auc-lower": lo,
                "auc-upper": hi}
    if action == R.ACTION_PLACEMENTS:
        m = msg.content[R.METRICS]
        hist = (np.asarray(m["pos"], np.float64), np.asarray(m["neg"], np.float64))
        return {"sums": validation_placements_prob(y, p, hist, GRID).tolist()}
    cfg = msg.content[R.CONFIG]
    coef = (float(cfg[R.RECAL_INTERCEPT]), float(cfg[R.RECAL_SLOPE]))  # type: ignore[arg-type]
    return {"sums": list(recalibration_sums(y, p, coef))}


class SumsGrid:
    """Every node answers with its site's sums, passed through ``tamper(action, metrics)``
    for the hostile site (None: answer with a ConfigRecord instead of metrics)."""

    def __init__(self, hostile: str | None = None, tamper: Tamper | None = None) -> None:
        self.hostile, self.tamper = hostile, tamper
        self.asked: list[tuple[str, str]] = []

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            site = NAMES[node]
            action = m.metadata.message_type.split(".", 1)[1]
            self.asked.append((site, action))
            metrics: dict[str, Any] | None = _honest(site, action, m)
            if site == self.hostile and self.tamper is not None:
                metrics = self.tamper(action, copy.deepcopy(metrics))  # type: ignore[arg-type]
            TaskIdentity.node_id = node
            content = (RecordDict({R.METRICS: MetricRecord(metrics)}) if metrics is not None
                       else RecordDict({R.INFO: ConfigRecord({"x": "<script>"})}))
            out.append(Message(content, reply_to=m))
            TaskIdentity.node_id = 1
        return out


def _run(grid: SumsGrid, nodes: list[int], declared: dict[str, int] | None = DECLARED
         ) -> tuple[float, dict[str, Any]]:
    TaskIdentity.node_id = 1
    return pooled_validation(grid, nodes, NAMES, ArrayRecord(), GRID, 10.0,  # type: ignore[arg-type]
                             recalibrate=True, declared=declared)


def _forge_counts(action: str, m: dict[str, Any]) -> dict[str, Any]:
    """The issue's attack: every count x 10, consistently (only the declared size betrays it)."""
    if action == R.ACTION_VALIDATION:
        for k in ("pos", "neg", "calibration"):
            m[k] = [10 * x for x in m[k]]
        m["n"], m["n-pos"] = 10 * m["n"], 10 * m["n-pos"]
    elif action == R.ACTION_PLACEMENTS:
        m["sums"] = [10 * x for x in m["sums"]]
    return m


def _pass1(**changes: Any) -> Tamper:
    def tamper(action: str, m: dict[str, Any]) -> dict[str, Any]:
        if action == R.ACTION_VALIDATION:
            for k, f in changes.items():
                m[k] = f(m[k]) if callable(f) else f
        return m
    return tamper


def _pass2(f: Callable[[list[float]], Any]) -> Tamper:
    def tamper(action: str, m: dict[str, Any]) -> dict[str, Any]:
        if action == R.ACTION_PLACEMENTS:
            m["sums"] = f(m["sums"])
        return m
    return tamper


def _bump(i: int, by: float) -> Callable[[list[float]], list[float]]:
    return lambda v: [x + by if j == i else x for j, x in enumerate(v)]


CASES: dict[str, tuple[Tamper | None, str, str]] = {
    "forged counts": (_forge_counts, "validation sums", "the site declared 30"),
    "histogram too short": (_pass1(pos=lambda v: v[:-1]), "validation sums",
                            "has 199 values, expected 200"),
    "negative count": (_pass1(neg=_bump(3, -1.0), n=lambda n: n - 1), "validation sums",
                       "negative counts"),
    "non-integer count": (_pass1(pos=_bump(150, 0.5)), "validation sums", "non-integer"),
    "count above the declared size": (
        _pass1(neg=_bump(10, 4.0), n=lambda n: n + 4,
               calibration=lambda c: [x + 4 if j in (0, 30) else x for j, x in enumerate(c)]),
        "validation sums", "the site declared 30"),
    "n disagrees": (_pass1(n=lambda n: n + 1), "validation sums", "differs from"),
    "calibration sum of p above its count": (
        _pass1(calibration=_bump(4, 1e3)), "validation sums", "outside [0, its count]"),
    "calibration of the wrong shape": (_pass1(calibration=lambda c: c[:30]), "validation sums",
                                       "has 30 values, expected 33"),
    "no histograms": (_pass1(pos=[]), "validation sums", "has 0 values"),
    "auc out of range": (_pass1(auc=7.0), "validation sums", "auc = 7"),
    "no metrics at all": (lambda a, m: None, "validation sums", "metrics"),
    "pass-2 count disagrees with pass 1": (_pass2(_bump(0, 1.0)), "placement sums",
                                           "pass 1 counted"),
    "pass-2 wrong length": (_pass2(lambda v: v + [0.0]), "placement sums",
                            "has 13 values, expected 12"),
    "pass-2 sum above its count": (_pass2(_bump(1, 1e4)), "placement sums", "out of bounds"),
    "pass-2 negative": (_pass2(_bump(8, -50.0)), "placement sums", "out of bounds"),
    "pass-2 not numbers": (_pass2(lambda v: [float("nan")] * 12), "placement sums",
                           "non-finite"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_site_with_bad_sums_is_excluded_and_the_pooled_statistics_are_the_honest_ones(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tamper, step, reason = CASES[case]
    monkeypatch.setattr(flower_app, "AUDIT", AuditLog(tmp_path / "audit.jsonl", "coordinator"))
    threshold, validation = _run(SumsGrid("site_B", tamper), [11, 12, 13])
    ref_threshold, ref = _run(SumsGrid(), [11, 13])
    assert [(e["site"], e["step"]) for e in validation["excluded"]] == [("site_B", step)]
    assert reason in validation["excluded"][0]["reason"]
    assert set(validation["per_site"]) == {"site_A", "site_C"}
    assert threshold == ref_threshold
    pooled, expected = validation["pooled"], ref["pooled"]
    assert pooled["n"] == expected["n"] == 90 and pooled["n_pos"] == expected["n_pos"]
    for k in ("auc", "brier", "scaled_brier"):
        assert pooled[k] == pytest.approx(expected[k], rel=1e-12), k
    assert pooled["auc_ci"] == pytest.approx(expected["auc_ci"], rel=1e-12)
    assert pooled["recalibration"]["applied"] == expected["recalibration"]["applied"]
    assert pooled["recalibration"]["slope"] == pytest.approx(expected["recalibration"]["slope"])
    audit = read_audit(tmp_path / "audit.jsonl")
    assert any(e["event"] == "excluded" and e["peer"] == "site_B" for e in audit)


def test_forged_counts_move_the_threshold_without_the_declared_sizes() -> None:
    """The attack works when nothing bounds the counts (as before), and not with the bound."""
    honest, _ = _run(SumsGrid(), [11, 12, 13])
    forged_unbounded, v = _run(SumsGrid("site_B", _forge_counts), [11, 12, 13], declared=None)
    assert v["excluded"] == [] and v["pooled"]["n"] == 40 + 300 + 50
    forged, _ = _run(SumsGrid("site_B", _forge_counts), [11, 12, 13])
    ref, _ = _run(SumsGrid(), [11, 13])
    assert forged == ref and (forged_unbounded != honest or v["pooled"]["n"] != 120)


def test_every_site_bad_ends_the_arm_with_a_named_error() -> None:
    class AllBad(SumsGrid):
        def send_and_receive(self, messages: Iterable[Message], timeout: float
                             ) -> list[Message]:
            out = super().send_and_receive(messages, timeout)
            for m in out:
                m.content[R.METRICS]["n"] = 1e9
            return out

    with pytest.raises(FederationError, match="no training site returned valid validation "
                                              r"statistics \(site_A: n = 1e\+09 differs"):
        _run(AllBad(), [11, 12, 13])


def test_screen_rules_directly() -> None:
    y, p = DATA["site_A"]
    s = _honest("site_A", R.ACTION_VALIDATION, None)  # type: ignore[arg-type]
    entry = screen.check_pass1(s, GRID.n_bins, 40)
    assert entry["n"] == 40 and entry["n_pos"] == int(y.sum())
    with pytest.raises(ValueError, match="declared 41"):
        screen.check_pass1(s, GRID.n_bins, 41)
    with pytest.raises(ValueError, match="not a list of numbers"):
        screen.check_pass1({**s, "pos": "<script>"}, GRID.n_bins, 40)
    assert screen.declared_rows({"n-train": 5, "n-val": 3}, ("train", "val")) == 8
    with pytest.raises(ValueError, match="n-val"):
        screen.declared_rows({"n-train": 5}, ("val",))
    assert screen.capped_shares([10, 90, 20], 0.5) == pytest.approx([1 / 6, 0.5, 1 / 3])
    assert screen.capped_shares([1, 1, 98], 0.4) == pytest.approx([0.3, 0.3, 0.4])
    assert screen.capped_shares([1, 3], 0.5) == pytest.approx([0.5, 0.5])
    assert screen.capped_shares([1, 3], 1.0) == pytest.approx([0.25, 0.75])
    assert screen.lower_median([1.0, 1e6]) == 1.0
    b = screen.norm_bound([1.0, 1e6], [], 0.0, 10.0)
    assert b is not None and b.bound == 10.0 and b.source == "round"
    b = screen.norm_bound([0.0, 3.0], [2.0], 50.0, 10.0)
    assert b is not None and b.bound == 50.0 and b.source == "global"
    assert screen.norm_bound([1.0], [], 1.0, 0.0) is None
