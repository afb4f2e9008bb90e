"""End to end under the cells release policy (issue 16): a real Flower simulation of the demo
phantom with every site on `disclosure.mode=cells`; everything in metrics.json and report.html
respects the minimum cell count."""

from __future__ import annotations

import json
import subprocess
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import script

K = 5


def _ok(c: float) -> bool:
    return abs(c) < 1e-9 or c >= K - 1e-9


@pytest.mark.slow
def test_every_release_respects_the_minimum_cell(demo_phantom: Path, tmp_path: Path) -> None:
    # the demo phantom's val splits (6-10 patients) are below min_split: thresholds and
    # validation use the training sites' train + val rows (30-50 patients each)
    out = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={demo_phantom}", f"runs_dir={tmp_path}",
         "run_name=cells", "federation.rounds=2", "disclosure.mode=cells",
         "evaluation.threshold_split=all", "baselines.centralized=false",
         "baselines.local=false", "--quiet"],
        capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "cells"
    m = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "config.json").read_text())["disclosure"]["mode"] == "cells"
    for arm in ("fedavg", "fedprox"):
        v = m["validation"][arm]
        assert set(v["disclosure"]) == {"site_A", "site_B", "site_C"}
        assert all(x.startswith("cells") for x in v["disclosure"].values()), v["disclosure"]
        lo, hi = v["pooled"]["auc_bounds"]
        assert lo <= v["pooled"]["auc"] <= hi
        for _, _, n in v["pooled"]["calibration_bins"]:
            assert n >= K
        e = m["external"][arm]
        _check_external(e)
    html = (run / "report.html").read_text()
    assert "release policy" in html and "AUC within [" in html


def _check_external(e: dict[str, Any]) -> None:
    n, n_pos = e["n"], e["n_pos"]
    if e["tp"] is None:
        assert any("confusion table" in w for w in e["withheld"])
        assert e["sensitivity"] is None and e["specificity"] is None
    else:
        assert all(_ok(c) for c in (e["tp"], e["fp"], e["tn"], e["fn"]))
    roc = e["roc"]
    for (f0, f1), (t0, t1) in zip(pairwise(roc["fpr"]), pairwise(roc["tpr"]), strict=True):
        assert _ok((f1 - f0) * (n - n_pos)) and _ok((t1 - t0) * n_pos)
    assert len(roc["fpr"]) <= n // K + 1
    for _, obs, count in e["calibration"]["bins"]:
        assert _ok(obs * count) and _ok(count - obs * count)
    for block in e["survival"].values():
        if "withheld" in block:
            continue
        assert _ok(block["n_high"]) and _ok(block["n_low"])
        for group in ("high", "low"):
            if block.get(group):
                risk = block[group]["n_at_risk"]
                assert all(a - b >= K for a, b in pairwise(risk)) and risk[-1] >= K
