"""Local DP end to end in the simulation: epsilon accumulates per site and round up to the
target, is reported in history, metrics and the report; a site budget below the target refuses
the run before any training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import script

COMMON = ["strategy=fedavg", "federation.rounds=2", "baselines.centralized=false",
          "baselines.local=false", "privacy=dp", "privacy.target_epsilon=4", "--quiet"]


@pytest.mark.slow
def test_dp_run_reports_epsilon_per_site_and_round(small_phantom: Path, tmp_path: Path) -> None:
    out = subprocess.run([script("hcc-fl"), "simulate", f"data_root={small_phantom}",
                          f"runs_dir={tmp_path}", "run_name=dp", *COMMON],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "dp"
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    train = [h for h in hist if h["phase"] == "train"]
    assert len(train) == 6 and all("dp_epsilon" in h for h in train)
    for site in ("site_A", "site_B", "site_C"):
        eps = [h["dp_epsilon"] for h in sorted(train, key=lambda h: h["round"])
               if h["site"] == site]
        assert 0 < eps[0] < eps[1] <= 4.0 + 1e-6 and eps[1] > 3.9, (site, eps)
    privacy = json.loads((run / "metrics.json").read_text())["privacy"]
    assert privacy["mode"] == "dp"
    assert set(privacy["epsilon"]["fedavg"]) == {"site_A", "site_B", "site_C"}
    assert privacy["epsilon"]["fedavg"]["site_A"]["delta"] == pytest.approx(1 / 80)  # 1/(10n)
    assert "local DP-SGD (Opacus, RDP accountant)" in (run / "report.html").read_text()
    ledger = json.loads((run / "privacy" / "site_A" / "ledger.json").read_text())
    (entry,) = next(iter(ledger.values())).values()
    assert entry["epsilon"] == pytest.approx(privacy["epsilon"]["fedavg"]["site_A"]["epsilon"])


@pytest.mark.slow
def test_site_budget_below_the_run_refuses_training(small_phantom: Path, tmp_path: Path) -> None:
    out = subprocess.run([script("hcc-fl"), "simulate", f"data_root={small_phantom}",
                          f"runs_dir={tmp_path}", "run_name=over", "privacy.site_budget=3",
                          *COMMON], capture_output=True, text=True, timeout=900)
    assert out.returncode == 1
    assert "privacy budget exceeded" in out.stderr and "total epsilon 3" in out.stderr
    assert not (tmp_path / "over").exists()


@pytest.mark.slow
def test_central_dp_stops_at_its_budget_and_keeps_the_rounds(small_phantom: Path,
                                                             tmp_path: Path) -> None:
    """sigma 1, 3 sites, delta 1/30: epsilon 2.24, 3.64, 4.86 after 1, 2, 3 noisy rounds, so a
    budget of 4 allows two of three rounds; the run ends with those two."""
    out = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={small_phantom}", f"runs_dir={tmp_path}",
         "run_name=cdp", "strategy=fedavg", "federation.rounds=3", "baselines.centralized=false",
         "baselines.local=false", "privacy=central-dp", "privacy.target_epsilon=4", "--quiet"],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "cdp" / "metrics.json").read_text())
    central = m["privacy"]["central"]["fedavg"]
    assert central["releases"] == 2 and central["stopped_before_round"] == 3
    assert central["epsilon"] == pytest.approx(3.643, abs=1e-3) and central["epsilon"] <= 4
    assert m["federated"]["fedavg"]["aggregated_rounds"] == [1, 2]
    assert m["external"]["fedavg"]["n"] == 10  # the kept model was evaluated
    assert "stopped before round 3 (budget)" in (tmp_path / "cdp" / "report.html").read_text()
