"""The `pacs:` section of SITE.yaml: every problem names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hcc_fl.client.pacs_config import load_pacs_config
from hcc_fl.shared.errors import DataError

BASE = "site: s\ntask: ki67_ceus\nmanifest: m.csv\ncoordinator: c:1\ninsecure: true\n"


def _load(tmp_path: Path, pacs: str) -> object:
    path = tmp_path / "SITE.yaml"
    path.write_text(BASE + "pacs:\n" + pacs)
    return load_pacs_config(path)


def _error(tmp_path: Path, pacs: str) -> str:
    with pytest.raises(DataError) as exc:
        _load(tmp_path, pacs)
    return str(exc.value)


def test_dicomweb_section_reads_secrets_from_files_and_env(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "ca.pem").write_text("x")
    monkeypatch.setenv("PACS_TOKEN", "tok")
    cfg = _load(tmp_path, "  protocol: dicomweb\n  url: https://p/dicom-web/\n  username: u\n"
                          "  password_file: pw\n  token_env: PACS_TOKEN\n  ca_file: ca.pem\n"
                          "  series_rules:\n    ki67_ceus:\n      ceus_cine: 'kontrast'\n")
    assert cfg.url == "https://p/dicom-web" and cfg.password == "s3cret"  # type: ignore[attr-defined]
    assert cfg.token == "tok" and cfg.ca_file == tmp_path / "ca.pem"  # type: ignore[attr-defined]
    assert cfg.series_rules == {"ki67_ceus": {"ceus_cine": "kontrast"}}  # type: ignore[attr-defined]
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize(("pacs", "message"), [
    ("  protocol: ftp\n", "column 'pacs.protocol': must be dicomweb or dimse"),
    ("  protocol: dicomweb\n", "column 'pacs.url': missing required key"),
    ("  protocol: dimse\n", "column 'pacs.host': missing required key"),
    ("  protocol: dicomweb\n  url: u\n  password: plain\n",
     "column 'pacs.password': do not write the password in SITE.yaml"),
    ("  protocol: dicomweb\n  url: u\n  password_file: nope\n",
     "column 'pacs.password_file': file not found"),
    ("  protocol: dicomweb\n  url: u\n  token_env: HCC_FL_NO_SUCH_VARIABLE\n",
     "column 'pacs.token_env': environment variable HCC_FL_NO_SUCH_VARIABLE is not set"),
    ("  protocol: dimse\n  host: h\n  retrieve: push\n", "column 'pacs.retrieve'"),
    ("  protocol: dimse\n  host: h\n  calling_ae: MUCH-TOO-LONG-AE-TITLE\n",
     "column 'pacs.calling_ae': an AE title is 1-16"),
    ("  protocol: dimse\n  host: h\n  port: zero\n", "column 'pacs.port': must be a number"),
    ("  protocol: dicomweb\n  url: u\n  series_rules:\n    ki67_ceus:\n      ceus_cine: '('\n",
     "column 'pacs.series_rules.ki67_ceus.ceus_cine': not a regular expression"),
    ("  protocol: dicomweb\n  url: u\n  series_rules:\n    ki67_ceus:\n      bmode: x\n",
     "task ki67_ceus has no column 'bmode'"),
])
def test_bad_pacs_section_names_the_key(tmp_path: Path, pacs: str, message: str) -> None:
    assert message in _error(tmp_path, pacs)


def test_missing_section(tmp_path: Path) -> None:
    path = tmp_path / "SITE.yaml"
    path.write_text(BASE)
    with pytest.raises(DataError, match="no 'pacs:' section"):
        load_pacs_config(path)


def test_pull_needs_no_coordinator_or_keys(tmp_path: Path) -> None:
    from hcc_fl.client.pacs_config import load_pull_target

    path = tmp_path / "SITE.yaml"
    path.write_text("site: s\ntask: phcc_mri\nmanifest: export/manifest.csv\n")
    target = load_pull_target(path)
    assert target.manifest == tmp_path / "export" / "manifest.csv" and target.task == "phcc_mri"
    path.write_text("site: s\ntask: nope\nmanifest: m.csv\n")
    with pytest.raises(DataError, match="column 'task': unknown task 'nope'"):
        load_pull_target(path)
