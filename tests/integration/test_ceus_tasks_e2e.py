"""End to end for the TACE-response and early-recurrence tasks (seeds 001 and 003): phantom
DICOM -> `hcc-fl simulate` (real Flower simulation) -> every model of the task compared on the
external site."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import script


def _simulate(data: Path, runs: Path, task: str, *extra: str) -> Path:
    out = subprocess.run(
        [script("hcc-fl"), "simulate", f"task={task}", f"data_root={data}", f"runs_dir={runs}",
         f"run_name={task}", "strategy=fedavg", "baselines.local=false", "federation.rounds=1",
         "task.tabular_rounds=5", *extra, "--quiet"],
        capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / task


@pytest.fixture(scope="module")
def tace_run(demo_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _simulate(demo_phantom, tmp_path_factory.mktemp("runs"), "tace_ceus",
                     "task.resplits=2")


@pytest.fixture(scope="module")
def er_run(demo_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _simulate(demo_phantom, tmp_path_factory.mktemp("runs"), "er_ceus")


def _check_components(m: dict, arm: str, names: list[str]) -> None:
    ext = m["external"]
    block = m["components"]
    deep = block["deep"]
    assert block["names"] == names
    keys = {n: arm if n == deep else f"{arm}/{n}" for n in names}
    for n, k in keys.items():
        e = ext[k]
        assert e["n"] == 40 and e["tp"] + e["fp"] + e["tn"] + e["fn"] == 40
        lo, hi = e["auc_ci"]
        assert 0 <= lo <= e["auc"] <= hi <= 1
        assert {"calibration", "net_benefit", "roc"} <= set(e), k
        # each model has its own Youden threshold from the pooled validation sums
        assert e["threshold"] == pytest.approx(block["thresholds"][arm][n])
        if n != deep:
            assert block["validation"][arm][n]["pooled"]["threshold"] == pytest.approx(
                e["threshold"])
    pairs = block["comparisons"][arm]
    assert [(c["a"], c["b"]) for c in pairs] == [
        (a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    for c in pairs:  # paired DeLong on the same patients: the AUCs are the reported ones
        assert c["auc_a"] == pytest.approx(ext[keys[c["a"]]]["auc"], abs=1e-12)
        assert c["auc_b"] == pytest.approx(ext[keys[c["b"]]]["auc"], abs=1e-12)
        assert 0 <= c["p_value"] <= 1
        lo, hi = c["ci_diff"]
        assert lo <= c["auc_a"] - c["auc_b"] <= hi


@pytest.mark.slow
def test_tace_three_models_compared(tace_run: Path, demo_phantom: Path) -> None:
    m = json.loads((tace_run / "metrics.json").read_text())
    assert m["task"] == "tace_ceus"
    for arm in ("fedavg", "centralized"):
        _check_components(m, arm, ["r_dlceus", "r_tic", "r_bmode"])
    # robustness: both tabular models refitted on 2 seeded re-splits, external AUC of each
    rob = m["components"]["robustness"]["fedavg"]
    assert set(rob) == {"r_tic", "r_bmode"}
    for r in rob.values():
        assert r["n"] == 2 and r["min"] <= r["mean"] <= r["max"]
    # the selected features are named, with coefficients, from the B-mode radiomics
    sel = m["components"]["tabular"]["fedavg"]["r_bmode@0"]
    assert sel["n_features"] > 40
    assert all(s["feature"].startswith("bmode_") for s in sel["selected"])
    # issue 20: the exact Newton fit, all models and re-splits in each message, few messages
    for k in ("r_bmode@0", "r_tic@0"):
        fit = m["components"]["tabular"]["fedavg"][k]["fit"]
        assert fit["solver"] == "newton" and fit["converged"] and fit["messages"] <= 8
    messages = m["federated"]["fedavg"]["messages"]
    tabular = [v for k, v in messages.items() if k.endswith("tabular")]
    assert len(tabular) == 1 and tabular[0]["exchanges"] <= 8
    assert tabular[0]["messages"] == 3 * tabular[0]["exchanges"]  # 3 training sites
    train = [v for k, v in messages.items() if k.startswith("train")]
    assert train and train[0]["messages"] == 3  # one round, three sites
    total = messages["total"]
    assert total["messages"] == sum(v["messages"] for k, v in messages.items() if k != "total")
    assert total["wait_s"] > 0
    html = (tace_run / "report.html").read_text()
    assert "<h2>Messages</h2>" in html
    assert "The task&#x27;s models compared" in html or "The task's models compared" in html
    assert "Robustness" in html and "Selected features" in html
    # nothing patient-level in the results: no pseudonymous ID appears in them either
    ids = [r["patient_id"] for s in ("site_A", "site_EXT")
           for r in csv.DictReader((demo_phantom / s / "manifest.csv").open())]
    text = (tace_run / "metrics.json").read_text() + (tace_run / "history.jsonl").read_text()
    assert not [i for i in ids if f'"{i}"' in text]


@pytest.mark.slow
def test_er_deep_radiomics_and_stacked_model(er_run: Path) -> None:
    m = json.loads((er_run / "metrics.json").read_text())
    assert m["task"] == "er_ceus"
    for arm in ("fedavg", "centralized"):
        _check_components(m, arm, ["deep", "radiomics", "combined"])
    stack = m["components"]["tabular"]["fedavg"]["combined@0"]
    assert [s["feature"] for s in stack["selected"]] != []
    assert {s["feature"] for s in stack["selected"]} <= {"logit_deep", "logit_radiomics"}
    combined = m["external"]["fedavg/combined"]
    for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        assert k in combined
    assert "rfs" in combined["survival"]  # risk groups of the combined score, log-rank
    assert "decision" in (er_run / "report.html").read_text().lower()
