"""The HTML report renders in headless Chromium (Debian's package, installed by `make test`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

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


# --- every received value is data, never markup (issue 15) ------------------------------------
PAYLOADS = [
    '<script>document.title="PWNED";document.body.setAttribute("data-pwned","s")</script>',
    "<img src=x onerror=\"document.title='PWNED';document.body.setAttribute('data-pwned','i')\">",
    "\"><svg onload=\"document.title='PWNED';document.body.setAttribute('data-pwned','v')\">",
]


def _poison(value: Any, counter: list[int], numbers: bool) -> Any:
    """Every string (and, with ``numbers``, every scalar number) with a payload appended
    (resp. replaced by one); lists of numbers (the curves) stay numbers."""
    def payload() -> str:
        counter[0] += 1
        return PAYLOADS[counter[0] % len(PAYLOADS)]

    if isinstance(value, dict):
        return {k: _poison(v, counter, numbers) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(x, (int, float)) for x in value):
            return value
        return [_poison(v, counter, numbers) for v in value]
    if isinstance(value, str):
        return value + payload()
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return payload()
    return value


def _hostile_run(run_dir: Path, out: Path) -> Path:
    out.mkdir()
    n = [0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    external = {a + PAYLOADS[i % 3]: _poison(e, n, numbers=True)
                for i, (a, e) in enumerate(metrics.pop("external").items())}
    metrics = _poison(metrics, n, numbers=False)
    metrics["external"] = external
    for arm, block in list(metrics.get("validation", {}).items()):
        block["per_site"] = {s + PAYLOADS[0]: v for s, v in block.get("per_site", {}).items()}
        block["excluded"] = [{"site": "site_X" + PAYLOADS[1], "step": PAYLOADS[2],
                              "reason": PAYLOADS[0]}]
        metrics["validation"][arm + PAYLOADS[1]] = metrics["validation"].pop(arm)
    (out / "metrics.json").write_text(json.dumps(metrics))
    cfg = _poison(json.loads((run_dir / "config.json").read_text()), n, numbers=False)
    cfg["seed"] = PAYLOADS[0]
    (out / "config.json").write_text(json.dumps(cfg))
    hist = [_poison(json.loads(x), n, numbers=False)
            for x in (run_dir / "history.jsonl").read_text().splitlines() if x.strip()]
    for h in hist:  # keep the curves' structure: the phase stays, names carry payloads
        h["phase"] = h["phase"].split("<")[0].split('"')[0]
    (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    return out


@pytest.mark.slow
def test_hostile_markup_in_every_received_value_never_runs(run_dir: Path, tmp_path: Path) -> None:
    from hcc_fl.server.report import write_report

    hostile = _hostile_run(run_dir, tmp_path / "hostile")
    page = write_report(hostile).read_text()
    assert page.count("<script") == 1  # ours: the image counter
    assert "<svg" not in page and not re.search(r"<img(?![^>]*src=\"data:image/png)", page)
    assert "&lt;script&gt;document.title=" in page and "onerror=" in page  # shown as text
    dom = subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", (hostile / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None and "data-pwned" not in body.group(0)
    title = re.search(r"<title>(.*?)</title>", dom.stdout, re.S)
    assert title is not None and title.group(1).startswith("hcc-fl report ")
    assert title.group(1) != "PWNED"
    assert len(re.findall(r"<script", dom.stdout)) == 1 and "<svg" not in dom.stdout
    images = int(re.search(r'data-images="(\d+)"', dom.stdout).group(1))  # type: ignore[union-attr]
    rendered = int(re.search(r'data-rendered-images="(\d+)"', dom.stdout).group(1))  # type: ignore[union-attr]
    assert images >= 3 and rendered == images  # the page still renders its plots


def test_numbers_are_formatted_and_anything_else_escaped() -> None:
    from hcc_fl.server.report import _ci, _f, _table

    assert _f(0.12345) == "0.123" and _f(7) == "7" and _f(None) == "n/a"
    assert _f("<b>1</b>") == "&lt;b&gt;1&lt;/b&gt;"
    assert _ci(0.5, "<i>") == "0.500"
    assert _table(["<th>"], [["<td>", _f(1.0)]]) == (
        "<table><thead><tr><th>&lt;th&gt;</th></tr></thead><tbody><tr><td>&lt;td&gt;</td>"
        "<td>1.000</td></tr></tbody></table>")
