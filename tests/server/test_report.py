"""The HTML report renders in headless Chromium (Debian's package, installed by `make test`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import script

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is not installed (make test installs it with apt-get)"
    return path


@pytest.fixture(scope="module")
def run_dir(small_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("report_runs")
    out = subprocess.run(
        [script("hcc-fl"), "simulate", f"data_root={small_phantom}", f"runs_dir={runs}",
         "run_name=rep", "strategy=fedavg", "federation.rounds=2", "--quiet"],
        capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "rep"


@pytest.mark.slow
def test_report_is_self_contained(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text()
    assert "<h2>External site</h2>" in page and "Model card" in page
    assert "Baseline comparison (paired DeLong tests" in page
    assert "Kaplan-Meier" in page and "Training curves" in page
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(srcs) >= 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(src|href)=\"https?://", page)  # no network
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for site in metrics["sites"]:
        assert site["manifest_sha256"][:16] in page


@pytest.mark.slow
def test_report_renders_in_chromium(run_dir: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    url = (run_dir / "report.html").as_uri()
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = int(re.search(r'data-images="(\d+)"', dom.stdout).group(1))  # type: ignore[union-attr]
    rendered = int(re.search(r'data-rendered-images="(\d+)"', dom.stdout).group(1))  # type: ignore[union-attr]
    assert images >= 5 and rendered == images  # every embedded plot decoded and laid out
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
         "--window-size=1200,2400", f"--screenshot={shot}", url],
        capture_output=True, text=True, timeout=120, check=True,
    )
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[0] == 2400 and img.shape[1] == 1200
    dark = (img[..., :3].mean(axis=2) < 0.6).mean()
    colourful = (img[..., :3].std(axis=2) > 0.15).mean()
    assert dark > 0.005  # text and axes are drawn
    assert colourful > 0.001  # coloured plot lines are drawn


def test_report_cli_rejects_a_non_run_folder(tmp_path: Path) -> None:
    out = subprocess.run([script("hcc-fl"), "report", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "not a run directory" in out.stderr
