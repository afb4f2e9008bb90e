"""Secure aggregation end to end in the simulation: the SecAgg+ round gives plain FedAvg's
model within the quantisation error, and the run records it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import script


@pytest.mark.slow
def test_secagg_round_equals_fedavg_within_quantisation(small_phantom: Path,
                                                        tmp_path: Path) -> None:
    for name, enabled in (("plain", "false"), ("secagg", "true")):
        out = subprocess.run(
            [script("hcc-fl"), "simulate", f"data_root={small_phantom}", f"runs_dir={tmp_path}",
             f"run_name={name}", "strategy=fedavg", "federation.rounds=1",
             "baselines.centralized=false", "baselines.local=false", "report=false",
             f"secure_aggregation.enabled={enabled}", "--quiet"],
            capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
    plain = torch.load(tmp_path / "plain" / "models" / "fedavg.pt")
    secagg = torch.load(tmp_path / "secagg" / "models" / "fedavg.pt")
    diff = max(float((plain[k].double() - secagg[k].double()).abs().max()) for k in plain)
    # one quantisation level is 2 * 8 / 2^22 = 3.8e-6 of (n_site / n_max) * w
    assert 0 < diff < 5e-5, diff
    fed = json.loads((tmp_path / "secagg" / "metrics.json").read_text())["federated"]["fedavg"]
    assert fed["secure_aggregation"] == [{"round": 1, "sites": 3, "survivors": 3, "dropped": []}]
    hist = [json.loads(x) for x in (tmp_path / "secagg" / "history.jsonl").read_text()
            .splitlines()]
    assert {h["site"] for h in hist if h.get("secure_aggregation")} == {"site_A", "site_B",
                                                                         "site_C"}
