"""End to end for seed 002 (pHCC-SSL): phantom DCE-MRI series -> `hcc-fl simulate` (real
Flower simulation): federated Barlow Twins pretraining, fine-tuning, the no-SSL ablation arm
with a paired DeLong test, and Grad-CAM localisation on the external site."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import script


@pytest.fixture(scope="module")
def phcc_run(demo_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    out = subprocess.run(
        [script("hcc-fl"), "simulate", "task=phcc_mri", f"data_root={demo_phantom}",
         f"runs_dir={runs}", "run_name=phcc", "strategy=fedavg", "baselines.local=false",
         "federation.rounds=1", "task.ssl.rounds=1", "--quiet"],
        capture_output=True, text=True, timeout=1500,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / "phcc"


@pytest.mark.slow
def test_ssl_stage_ablation_and_cam(phcc_run: Path) -> None:
    m = json.loads((phcc_run / "metrics.json").read_text())
    assert m["task"] == "phcc_mri"
    assert list(m["external"]) == ["fedavg", "fedavg_nossl", "centralized"]
    history = [json.loads(x) for x in (phcc_run / "history.jsonl").read_text().splitlines()]
    ssl_rows = [h for h in history if h["arm"] == "fedavg:ssl" and h["phase"] == "train"]
    assert {h["site"] for h in ssl_rows} == {"site_A", "site_B", "site_C"}
    assert not [h for h in history if h["arm"] == "fedavg_nossl:ssl"]  # the ablation skips it
    assert [h for h in history if h["arm"] == "centralized:ssl"]
    pair = next(c for c in m["comparisons"] if {c["a"], c["b"]} == {"fedavg", "fedavg_nossl"})
    assert 0 <= pair["p_value"] <= 1
    for arm in ("fedavg", "fedavg_nossl", "centralized"):
        e = m["external"][arm]
        lo, hi = e["auc_ci"]
        assert 0 <= lo <= e["auc"] <= hi <= 1 and e["n"] == 40
        cam = e["cam"]
        assert cam["n"] == 40 and 0 <= cam["in_mask_fraction"] <= 1 and 0 < cam["chance"] < 1
        assert 0 <= cam["p_value"] <= 1
        assert len(cam["mean_cam"]) == len(cam["mean_image"]) == 64
    html = (phcc_run / "report.html").read_text()
    assert "Self-supervised pretraining ablation" in html and "Grad-CAM" in html


@pytest.mark.slow
def test_grad_cam_falls_on_the_lesion_on_the_phantom(demo_phantom: Path) -> None:
    """A tiny pHCC classifier trained for 3 epochs on the phantom's training sites looks at
    the lesion on the external site: the share of its top Grad-CAM mass inside the lesion mask
    is significantly above the share expected by chance (one-sided test over 40 patients)."""
    import torch

    from hcc_fl.client.components import cam_report
    from hcc_fl.client.data import SiteData, load_site
    from hcc_fl.client.train import TrainConfig, train_one_round
    from hcc_fl.shared.models import build_model

    def site(name: str, splits: tuple[str, ...]) -> SiteData:
        return load_site(demo_phantom / name / "manifest.csv", "phcc_mri", "tiny", splits)

    train = SiteData.concat([site(s, ("train", "val")) for s in ("site_A", "site_B", "site_C")])
    ext = site("site_EXT", ("test",))
    torch.manual_seed(0)
    model = build_model("phcc_mri", "tiny")
    before = cam_report(model, ext)
    for epoch in range(3):
        train_one_round(model, train, TrainConfig(batch_size=8, lr=1e-3, seed=epoch))
    after = cam_report(model, ext)
    assert after["n"] == 40 and 0 < after["chance"] < 0.5
    assert after["in_mask_fraction"] > 1.5 * after["chance"]
    assert after["p_value"] < 0.01
    assert before["p_value"] > 0.05  # the untrained network does not (the test can fail)
