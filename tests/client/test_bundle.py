"""The site accepts only configuration-only app bundles of an allowed hcc-fl version."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from hcc_fl.client.bundle import EXPECTED_COMPONENTS, BundleRefused, check_bundle
from hcc_fl.server.flower_runtime import write_app_bundle
from hcc_fl.shared.version import code_version


def _zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


def _bundle(folder: Path, **config: object) -> dict[str, str]:
    """The files of the bundle the coordinator really writes (plus Flower's manifest)."""
    app = write_app_bundle(folder, {"arm": "fedavg", "code-version": code_version(), **config})
    files = {p.name: p.read_text() for p in app.iterdir()}
    files[".info/CONTENT"] = "pyproject.toml,x,1\nLICENSE,y,1"
    return files


def test_the_coordinators_bundle_is_accepted(tmp_path: Path) -> None:
    info = check_bundle(_zip(_bundle(tmp_path)), {code_version()})
    assert info.code_version == code_version() and len(info.sha256) == 64


def test_a_bundle_with_code_is_refused(tmp_path: Path) -> None:
    files = _bundle(tmp_path)
    files["hcc_fl/client/flower_app.py"] = "import os; os.system('id')\n"
    with pytest.raises(BundleRefused, match=r"files other than configuration \(hcc_fl/client"):
        check_bundle(_zip(files), {code_version()})


def test_other_components_are_refused(tmp_path: Path) -> None:
    files = _bundle(tmp_path)
    files["pyproject.toml"] = files["pyproject.toml"].replace(
        EXPECTED_COMPONENTS["clientapp"], "os:system")
    with pytest.raises(BundleRefused, match="names components"):
        check_bundle(_zip(files), {code_version()})


def test_another_code_version_needs_the_site_to_allow_it(tmp_path: Path) -> None:
    data = _zip(_bundle(tmp_path, **{"code-version": "0.0.9+deadbeef0000"}))
    with pytest.raises(BundleRefused, match="coordinator runs hcc-fl 0.0.9\\+deadbeef0000"):
        check_bundle(data, {code_version()})
    assert check_bundle(data, {code_version(), "0.0.9+deadbeef0000"}).code_version == \
        "0.0.9+deadbeef0000"


@pytest.mark.parametrize("data, message", [
    (b"not a zip", "not a valid archive"),
    (_zip({"LICENSE": "x"}), "no pyproject.toml"),
    (_zip({"pyproject.toml": "[tool.flwr.app\n"}), "does not parse"),
])
def test_broken_bundles_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(BundleRefused, match=message):
        check_bundle(data, {code_version()})


def test_missing_code_version_is_refused(tmp_path: Path) -> None:
    files = _bundle(tmp_path)
    files["pyproject.toml"] = "\n".join(
        x for x in files["pyproject.toml"].splitlines() if not x.startswith("code-version"))
    with pytest.raises(BundleRefused, match="does not state"):
        check_bundle(_zip(files), {code_version()})
