"""FedBN end to end (real Flower simulation of the small phantom): the normalisation layers
stay in each site's state folder, both FedBN entries reach metrics.json and the report, the
final model holds the sites' averaged normalisation state, and a coordinator killed after
its first checkpoint resumes to the uninterrupted run's model."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from hcc_fl.shared.models import build_model
from hcc_fl.shared.normstate import norm_keys
from tests.conftest import script
from tests.integration.test_faults import _checkpoint_round, _kill_tree, _wait

RUN = ["strategy=fedbn", "federation.rounds=2", "baselines.centralized=false",
       "baselines.local=false", "--quiet"]


def _simulate(phantom: Path, runs: Path, name: str) -> list[str]:
    return [script("hcc-fl"), "simulate", f"data_root={phantom}", f"runs_dir={runs}",
            f"run_name={name}", *RUN]


@pytest.fixture(scope="module")
def fedbn_run(small_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("fedbn_runs")
    out = subprocess.run(_simulate(small_phantom, runs, "ref"), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / "ref"


@pytest.mark.slow
def test_both_fedbn_entries_in_metrics_and_report(fedbn_run: Path) -> None:
    m = json.loads((fedbn_run / "metrics.json").read_text())
    assert list(m["external"]) == ["fedbn", "fedbn+external-stats"]
    avg, site = m["external"]["fedbn"], m["external"]["fedbn+external-stats"]
    for e in (avg, site):
        lo, hi = e["auc_ci"]
        assert 0 <= lo <= e["auc"] <= hi <= 1 and e["n"] == 10
    # CECMM normalises with GroupNorm (per sample, no running statistics): the external site
    # has nothing to recompute, so both entries are the same model (docs/architecture.md)
    assert site["test_time_statistics"] == {"layers": 0, "n_images": 10}
    assert site["auc"] == avg["auc"]
    fed = m["federated"]["fedbn"]["fedbn"]
    assert fed["sites"] == ["site_A", "site_B", "site_C"] and fed["refused"] == []
    html = (fedbn_run / "report.html").read_text()
    assert "FedBN + averaged statistics" in html and "FedBN + external statistics" in html
    assert "fedbn+external-stats" in html


@pytest.mark.slow
def test_sites_keep_their_state_and_the_final_model_averages_it(fedbn_run: Path) -> None:
    m = json.loads((fedbn_run / "metrics.json").read_text())
    keys = norm_keys(build_model("ki67_ceus", "tiny"))
    init = build_model("ki67_ceus", "tiny").state_dict()
    final = torch.load(fedbn_run / "models" / "fedbn.pt")
    states, weights = [], []
    for s in ("site_A", "site_B", "site_C"):
        files = sorted((fedbn_run / "privacy" / s / "fedbn").glob("*/supervised-round-*.pt"))
        assert [f.name for f in files] == ["supervised-round-1.pt", "supervised-round-2.pt"]
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
        state = torch.load(files[-1], weights_only=True)
        assert list(state) == keys
        states.append(state)
        weights.append(next(x["n_train"] for x in m["sites"] if x["site"] == s))
    assert not torch.equal(states[0][keys[0]], states[1][keys[0]])  # each site its own
    total = sum(weights)
    for k in keys:  # the "averaged statistics" model: the sites' states by training examples
        mean = sum(w / total * st[k].double() for w, st in zip(weights, states, strict=True))
        torch.testing.assert_close(final[k].double(), mean, atol=1e-6, rtol=0)
        assert not torch.equal(final[k], init[k]), k
    # during the rounds nothing of the normalisation layers went to the coordinator
    audit = [json.loads(x) for x in
             (fedbn_run / "logs" / "audit-coordinator.jsonl").read_text().splitlines()]
    norm_state = [e for e in audit if e.get("type") == "norm_state" and e["event"] == "received"]
    assert len(norm_state) == 3  # once per site, after the last round


@pytest.mark.slow
@pytest.mark.extended  # ~2.5 min on 2 busy cores: a second run, killed, then resumed
def test_fedbn_resumed_equals_uninterrupted(fedbn_run: Path, small_phantom: Path) -> None:
    runs = fedbn_run.parent
    cut = subprocess.Popen(_simulate(small_phantom, runs, "cut"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = runs / ".cut.partial" / "arms" / "fedbn" / "checkpoint.pt"
    try:
        _wait(lambda: _checkpoint_round(ckpt) >= 1, 600, "the first checkpoint")
    finally:
        _kill_tree(cut.pid)
        cut.wait()
    killed_after = _checkpoint_round(ckpt)
    res = subprocess.run([script("hcc-fl"), "simulate", "--resume", str(runs / "cut"),
                          "--quiet"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    fed = json.loads((runs / "cut" / "metrics.json").read_text())["federated"]["fedbn"]
    assert fed["resumed_after_round"] == killed_after
    a = torch.load(fedbn_run / "models" / "fedbn.pt")
    b = torch.load(runs / "cut" / "models" / "fedbn.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), atol=1e-6, rtol=0)
