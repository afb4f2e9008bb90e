"""End to end for seed 004 (HBV-ACLF): phantom T0/T1 ultrasound -> `hcc-fl simulate` (real
Flower simulation) -> Siamese U-Net (Dice, 30-day AUC) and the federated Cox models, checked
against lifelines' stratified Cox on the pooled training rows."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import script


@pytest.fixture(scope="module")
def aclf_run(demo_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    out = subprocess.run(
        [script("hcc-fl"), "simulate", "task=aclf_us", f"data_root={demo_phantom}",
         f"runs_dir={runs}", "run_name=aclf", "strategy=fedavg", "baselines.local=false",
         "federation.rounds=1", "--quiet"],
        capture_output=True, text=True, timeout=1500,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / "aclf"


@pytest.mark.slow
def test_segmentation_mortality_and_survival_models(aclf_run: Path) -> None:
    m = json.loads((aclf_run / "metrics.json").read_text())
    assert m["task"] == "aclf_us"
    assert m["components"]["names"] == ["siamese_unet", "combined_cox", "clinical_cox"]
    for arm in ("fedavg", "centralized"):
        e = m["external"][arm]
        lo, hi = e["auc_ci"]
        assert 0 <= lo <= e["auc"] <= hi <= 1 and e["n"] == 40
        seg = e["segmentation"]
        for tp in ("t0", "t1"):
            assert 0 <= seg[tp]["ci"][0] <= seg[tp]["mean"] <= seg[tp]["ci"][1] <= 1
        sm = e["survival_models"]
        assert set(sm["c_index"]) == {"siamese_unet", "combined_cox", "clinical_cox"}
        for c in sm["c_index"].values():
            assert 0 <= c["ci"][0] <= c["c"] <= c["ci"][1] <= 1
        pairs = {(d["a"], d["b"]) for d in sm["differences"]}
        assert ("combined_cox", "clinical_cox") in pairs
        for name in ("combined_cox", "clinical_cox"):
            rep = m["external"][f"{arm}/{name}"]  # the Cox model's 30-day risk as a classifier
            assert 0 <= rep["auc"] <= 1 and "net_benefit" in rep and "calibration" in rep
            assert len(sm["calibration"][name]["tertiles"]) == 3
    pair = next(c for c in m["components"]["comparisons"]["fedavg"]
                if c["a"] == "siamese_unet" and c["b"] == "combined_cox")
    assert 0 <= pair["p_value"] <= 1
    html = (aclf_run / "report.html").read_text()
    assert "Liver segmentation" in html and "Survival models" in html
    assert "Federated Cox coefficients" in html


@pytest.mark.slow
def test_federated_cox_equals_lifelines_stratified_cox(aclf_run: Path, demo_phantom: Path
                                                       ) -> None:
    """The combined Cox model (deep score, MELD, age), fitted by Newton steps on summed site
    sums, equals lifelines' site-stratified CoxPHFitter on the pooled training rows."""
    from lifelines import CoxPHFitter

    from hcc_fl.client.data import load_site
    from hcc_fl.client.train import predict
    from hcc_fl.shared.models import build_model

    m = json.loads((aclf_run / "metrics.json").read_text())
    cox = m["components"]["tabular"]["fedavg"]["combined_cox@0"]["cox"]
    model = build_model("aclf_us", "tiny")
    model.load_state_dict(torch.load(aclf_run / "models" / "fedavg.pt"))
    frames = []
    for site in ("site_A", "site_B", "site_C"):
        data = load_site(demo_phantom / site / "manifest.csv", "aclf_us", "tiny",
                         ("train", "val"))
        p = np.clip(predict(model, data), 1e-6, 1 - 1e-6)
        t, e = data.survival["os"]
        frames.append(pd.DataFrame({
            "siamese_unet": np.log(p) - np.log1p(-p), "meld": data.clinical[:, 1].numpy(),
            "age": data.clinical[:, 0].numpy(), "time": t, "event": e, "site": site}))
    df = pd.concat(frames, ignore_index=True)
    cph = CoxPHFitter().fit(df, "time", "event", strata=["site"],
                            fit_options={"precision": 1e-12, "r_precision": 1e-15})
    ref = cph.params_[["siamese_unet", "meld", "age"]].to_numpy()
    assert cox["features"] == ["siamese_unet", "meld", "age"]
    np.testing.assert_allclose(cox["coef"], ref, atol=1e-6)
    np.testing.assert_allclose(cox["se"], cph.standard_errors_[
        ["siamese_unet", "meld", "age"]].to_numpy(), rtol=1e-5)
