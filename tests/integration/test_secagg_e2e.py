"""Secure aggregation end to end in the simulation: the SecAgg+ round gives plain FedAvg's
model within the quantisation error, and the run records it."""

from __future__ import annotations

import json
import os
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
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text())
               for name in ("plain", "secagg")}
    fed = metrics["secagg"]["federated"]["fedavg"]
    assert [(r["purpose"], r["survivors"], r["dropped"]) for r in fed["secure_aggregation"]] == [
        ("train", 3, []), ("validation_sums", 3, []), ("validation_placements", 3, [])]
    # the pooled validation sums travelled through SecAgg+ too: no per-site figures, and the
    # pooled threshold and AUC equal the plain run's within the quantisation error
    sec, pl = (metrics[k]["validation"]["fedavg"] for k in ("secagg", "plain"))
    assert list(sec["per_site"]) == ["all sites (secure sum)"]
    for key in ("n", "n_pos"):
        assert sec["pooled"][key] == pl["pooled"][key]
    assert abs(sec["pooled"]["threshold"] - pl["pooled"]["threshold"]) <= 1e-3
    assert sec["pooled"]["auc"] == pytest.approx(pl["pooled"]["auc"], abs=1e-3)
    # recalibration under SecAgg+: no per-site Newton sums (they would reach the coordinator one
    # site at a time); the fit uses the securely summed histograms ("binned")
    rs, rp = sec["pooled"]["recalibration"], pl["pooled"]["recalibration"]
    assert rs["method"] == "binned" and rp["method"] == "newton"
    assert rs["n"] == rp["n"] == pl["pooled"]["n"]
    if rs["converged"] and rp["converged"]:
        assert rs["slope"] == pytest.approx(rp["slope"], rel=0.05)
    audit = (tmp_path / "secagg" / "logs" / "audit-coordinator.jsonl").read_text()
    assert "recalibration_sums" not in audit
    assert "recalibration_sums" in (tmp_path / "plain" / "logs" /
                                    "audit-coordinator.jsonl").read_text()
    hist = [json.loads(x) for x in (tmp_path / "secagg" / "history.jsonl").read_text()
            .splitlines()]
    assert {h["site"] for h in hist if h.get("secure_aggregation")} == {"site_A", "site_B",
                                                                         "site_C"}


HOSTILE_DIR = Path(__file__).resolve().parent / "hostile_site"


@pytest.mark.slow
def test_a_site_dropping_between_setup_and_share_leaves_an_exact_sum(small_phantom: Path,
                                                                     tmp_path: Path) -> None:
    """site_C advertises its keys and fails before sharing them (test-only sitecustomize): the
    other sites mask only with the peers whose shares arrived, so the round's model is plain
    FedAvg over site_A and site_B (within the quantisation error; the plain run's weight cap is
    off, as a secure sum cannot cap), not a corrupt sum."""
    common = [f"data_root={small_phantom}", f"runs_dir={tmp_path}", "strategy=fedavg",
              "federation.rounds=1", "federation.min_sites=2", "baselines.centralized=false",
              "baselines.local=false", "report=false"]
    env = {**os.environ, "HCC_FL_TEST_SECAGG_DROP": "site_C",
           "PYTHONPATH": os.pathsep.join(
               [str(HOSTILE_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])}
    runs = (("two", ["federation.training_sites=[site_A,site_B]", "federation.max_site_weight=1",
                     "secure_aggregation.enabled=false"], None),
            ("drop", ["secure_aggregation.enabled=true"], env))
    for name, extra, environ in runs:
        out = subprocess.run([script("hcc-fl"), "simulate", *common, f"run_name={name}", *extra,
                              "--quiet"],
                             capture_output=True, text=True, timeout=900, env=environ)
        assert out.returncode == 0, out.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "models" / "fedavg.pt")
    drop = torch.load(tmp_path / "drop" / "models" / "fedavg.pt")
    diff = max(float((two[k].double() - drop[k].double()).abs().max()) for k in two)
    assert 0 < diff < 5e-5, diff
    fed = json.loads((tmp_path / "drop" / "metrics.json").read_text())["federated"]["fedavg"]
    assert (fed["secure_aggregation"][0]["purpose"], fed["secure_aggregation"][0]["survivors"],
            fed["secure_aggregation"][0]["dropped"]) == ("train", 2, ["site_C"])
    audit = [json.loads(x) for x in (tmp_path / "drop" / "logs" / "audit-coordinator.jsonl")
             .read_text().splitlines()]
    assert any(e.get("type") == "secagg_share" and e.get("peer") == "site_C"
               and "site error" in str(e.get("decision")) for e in audit)
