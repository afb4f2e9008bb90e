"""SITE.yaml: required keys, files and roles, each error naming the file and key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hcc_fl.client.site_config import load_site_config
from hcc_fl.shared.errors import DataError
from tests.conftest import script


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys" / "ca.crt").write_text("x")
    (tmp_path / "keys" / "a.key").write_text("x")
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


BASE = ("site: site_A\nrole: train\ntask: ki67_ceus\nmanifest: data/manifest.csv\n"
        "coordinator: 127.0.0.1:9092\nca_certificate: keys/ca.crt\nprivate_key: keys/a.key\n")


def test_valid_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_site_config(_write(tmp_path, BASE))
    assert cfg.manifest == (tmp_path / "data/manifest.csv").resolve()
    assert cfg.private_key == (tmp_path / "keys/a.key").resolve()
    assert load_site_config(tmp_path / "site.yaml", role="external").role == "external"
    assert cfg.secagg_peers is None and cfg.secagg_min_sites == 3
    (tmp_path / "peers").mkdir()
    cfg = load_site_config(_write(tmp_path, BASE + "secagg_peers: peers\nsecagg_min_sites: 4\n"))
    assert cfg.secagg_peers == (tmp_path / "peers").resolve() and cfg.secagg_min_sites == 4


@pytest.mark.parametrize("text,message", [
    (BASE.replace("task: ki67_ceus\n", ""), "column 'task': missing required key"),
    (BASE.replace("role: train", "role: boss"), "role must be train or external"),
    (BASE.replace("keys/a.key", "keys/missing.key"), "column 'private_key': file not found"),
    ("- a\n- b\n", "expected a mapping"),
    ("site: [unclosed\n", "not valid YAML"),
    (BASE + "secagg_peers: peers\n", "column 'secagg_peers': folder not found"),
    (BASE + "secagg_min_sites: 1\n", "column 'secagg_min_sites': must be an integer >= 2"),
])
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match=message) as err:
        load_site_config(path)
    assert str(path) in str(err.value)


def test_client_does_not_join_with_bad_data(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE)
    out = subprocess.run([script("hcc-fl-client"), "--site-config", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "manifest file not found" in out.stderr and "does not join" in out.stderr
