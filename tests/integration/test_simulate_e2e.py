"""End to end: phantom DICOM -> `hcc-fl simulate` (real Flower simulation) -> run directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import script

ARMS = ["fedavg", "fedprox", "centralized", "local:site_A", "local:site_B", "local:site_C"]
KEYS = {"auc", "auc_ci", "threshold", "sensitivity", "specificity", "accuracy", "ppv", "npv", "n"}


@pytest.fixture(scope="module")
def demo_run(demo_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    out = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={demo_phantom}", f"runs_dir={runs}",
         "run_name=e2e", "federation.rounds=6", "--quiet"],
        capture_output=True, text=True, timeout=1500,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fedavg" in out.stdout and "local:site_C" in out.stdout  # the printed table
    return runs / "e2e"


@pytest.mark.slow
def test_run_directory(demo_run: Path) -> None:
    for name in ("config.yaml", "config.json", "history.jsonl", "metrics.json", "model.pt",
                 "report.html",
                 "logs/superlink.log", "logs/flower-fedavg.log", "models/fedprox.pt",
                 "models/centralized.pt"):
        assert (demo_run / name).is_file(), name
    assert not list(demo_run.parent.glob(".e2e*"))  # no partial folders left behind


@pytest.mark.slow
def test_metrics_schema_and_external_auc(demo_run: Path) -> None:
    m = json.loads((demo_run / "metrics.json").read_text())
    assert m["task"] == "ki67_ceus"
    assert list(m["external"]) == ARMS
    for arm in ARMS:
        e = m["external"][arm]
        assert set(e) >= KEYS, arm
        assert e["n"] == 40
        lo, hi = e["auc_ci"]
        assert 0 <= lo <= e["auc"] <= hi <= 1
        assert e["tp"] + e["fp"] + e["tn"] + e["fn"] == 40
    # The phantom's external oracle AUC is ~0.85; a trained model must clearly beat chance.
    for arm in ("fedavg", "fedprox"):
        assert m["external"][arm]["auc"] >= 0.65, (arm, m["external"][arm])
    # statistics issue: validation pooled from site sums, comparisons, detailed external blocks
    for arm in ARMS:
        v = m["validation"][arm]
        assert v["pooled"]["threshold"] == pytest.approx(m["external"][arm]["threshold"])
        lo, hi = v["pooled"]["auc_ci"]
        assert lo <= v["pooled"]["auc"] <= hi
        e = m["external"][arm]
        assert {"calibration", "net_benefit", "roc", "survival"} <= set(e)
        assert set(e["survival"]) == {"pfs", "ihr", "rfs"}
    assert set(m["validation"]["fedavg"]["per_site"]) == {"site_A", "site_B", "site_C"}
    assert len(m["comparisons"]) == len(ARMS) * (len(ARMS) - 1) // 2
    pair = next(c for c in m["comparisons"] if c["a"] == "fedavg" and c["b"] == "centralized")
    assert pair["auc_a"] == pytest.approx(m["external"]["fedavg"]["auc"], abs=1e-12)
    assert 0 <= pair["p_value"] <= 1
    roles = {s["site"]: s["role"] for s in m["sites"]}
    assert roles == {"site_A": "train", "site_B": "train", "site_C": "train",
                     "site_EXT": "external"}


@pytest.mark.slow
def test_cross_site_matrix(demo_run: Path) -> None:
    """Issue 21: every model (federated arms, centralized, each single-site model) on every
    training site's threshold split and on the external site, in metrics.json and the report."""
    m = json.loads((demo_run / "metrics.json").read_text())
    cross = m["cross_site"]
    assert cross["models"] == ARMS
    assert cross["sites"] == ["site_A", "site_B", "site_C", "site_EXT"]
    for i, arm in enumerate(ARMS):
        row = cross["auc"][i]
        assert row[-1] == m["external"][arm]["auc"] and cross["n"][i][-1] == 40
        own = m["validation"][arm]["per_site"]
        for j, site in enumerate(cross["sites"][:-1]):
            if site in own:  # the site's own pass-1 AUC, or the same model scored in-process
                assert row[j] == pytest.approx(own[site]["auc"], abs=1e-12), (arm, site)
            assert row[j] is None or 0 <= row[j] <= 1
            assert cross["n"][i][j] == m["validation"]["fedavg"]["per_site"][site]["n"]
    # a single-site model is scored on the other sites too (the off-diagonal of the matrix)
    local_a = cross["auc"][ARMS.index("local:site_A")]
    assert sum(v is not None for v in local_a) == 4
    html = (demo_run / "report.html").read_text()
    assert "Cross-site evaluation" in html and "Cross-site AUC matrix" in html


@pytest.mark.slow
def test_recalibration_and_internal_vs_external(demo_run: Path) -> None:
    """Issue 14: the federated recalibration ran as Newton messages to the training sites, the
    external site reported the recalibrated probabilities (same ranks), the unpaired DeLong test
    of internal against external AUC is in metrics.json, and the report shows both."""
    m = json.loads((demo_run / "metrics.json").read_text())
    audit = [json.loads(x) for x in
             (demo_run / "logs" / "audit-coordinator.jsonl").read_text().splitlines()]
    for arm in ("fedavg", "fedprox", "centralized"):
        fit = m["validation"][arm]["pooled"]["recalibration"]
        assert fit["method"] == "newton" and fit["converged"], (arm, fit)
        assert fit["score_norm"] <= 1e-9 * fit["n"]
        e = m["external"][arm]
        if fit["applied"]:
            rec = e["recalibrated"]
            assert rec["auc"] == pytest.approx(e["auc"], abs=1e-12)
            assert rec["recalibration"]["slope"] == pytest.approx(fit["slope"])
            assert set(rec["calibration"]) >= {"slope", "intercept_in_the_large", "brier"}
        else:
            assert "recalibrated" not in e and fit["reason"]
        t = m["internal_vs_external"][arm]
        assert t["auc_external"] == pytest.approx(e["auc"], abs=1e-12)
        assert 0 <= t["p_value"] <= 1 and t["df"] > 1
        assert set(e["partial_auc"]) == {"specificity_0.8_1", "sensitivity_0.8_1"}
    # every Newton evaluation is one message to each of the three training sites per arm
    sent = [a for a in audit if a["event"] == "sent" and a.get("type") == "recalibration_sums"]
    evaluations = sum(m["validation"][arm]["pooled"]["recalibration"]["iterations"]
                      for arm in ("fedavg", "fedprox"))
    assert len(sent) == 3 * evaluations
    assert {a["peer"] for a in sent} == {"site_A", "site_B", "site_C"}
    html_text = (demo_run / "report.html").read_text()
    assert "Recalibration (external site, before &rarr; after)" in html_text
    assert "Internal validation against the external site" in html_text


@pytest.mark.slow
def test_history_per_round_and_site(demo_run: Path) -> None:
    lines = [json.loads(x) for x in (demo_run / "history.jsonl").read_text().splitlines()]
    fed = [x for x in lines if x["arm"] == "fedavg"]
    train = {(x["round"], x["site"]) for x in fed if x["phase"] == "train"}
    val = {(x["round"], x["site"]) for x in fed if x["phase"] == "validate"}
    expected = {(r, s) for r in range(1, 7) for s in ("site_A", "site_B", "site_C")}
    assert train == expected and val == expected
    assert not any(x["site"] == "site_EXT" for x in lines)  # the external site never trains
    assert {x["arm"] for x in lines} == set(ARMS)


@pytest.mark.slow
def test_existing_run_is_kept(demo_run: Path, demo_phantom: Path) -> None:
    before = (demo_run / "metrics.json").read_bytes()
    out = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={demo_phantom}",
         f"runs_dir={demo_run.parent}", "run_name=e2e"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2 and "exists" in out.stderr
    assert (demo_run / "metrics.json").read_bytes() == before


def test_bad_site_data_stops_before_training(tmp_path: Path, small_phantom: Path) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(small_phantom, root)
    manifest = root / "site_B" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[2].split(",")
    row[header.index("age")] = "old"
    lines[2] = ",".join(row)
    manifest.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={root}", f"runs_dir={tmp_path / 'runs'}",
         "run_name=bad"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert f"{manifest}, line 3, column 'age': expected a number" in out.stderr
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.slow
def test_same_seed_same_federated_model(small_phantom: Path, tmp_path: Path) -> None:
    """Replies arrive in any order and sites run in any actor: the result must not change."""
    import torch

    models = []
    for name in ("r1", "r2"):
        out = subprocess.run(
            [script("hcc-fl"), "simulate", f"data_root={small_phantom}",
             f"runs_dir={tmp_path}", f"run_name={name}", "strategy=fedavg",
             "federation.rounds=2", "baselines.centralized=false", "baselines.local=false",
             "--quiet"],
            capture_output=True, text=True, timeout=900,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        models.append(torch.load(tmp_path / name / "model.pt"))
    assert models[0].keys() == models[1].keys()
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key
