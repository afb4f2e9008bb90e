"""Shared fixtures: phantoms generated once per test session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from hcc_fl.shared.phantom import generate

REPO = Path(__file__).resolve().parent.parent
# Real public reference data (../shared/reference-data beside the clone, as in CI).
REFERENCE = Path(os.environ.get("HCC_FL_REFERENCE_DATA", REPO.parent / "shared" / "reference-data"))
BIN = Path(sys.executable).parent


def script(name: str) -> str:
    """Path of an installed console script of this environment."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom (10/8/12 training + 10 external patients) for reader and manifest tests."""
    root = tmp_path_factory.mktemp("phantom_small")
    generate(root, seed=3, scale=0.25)
    return root


@pytest.fixture(scope="session")
def demo_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default-size phantom (40/30/50 training + 40 external) for end-to-end tests."""
    root = tmp_path_factory.mktemp("phantom_demo")
    generate(root, seed=0, scale=1.0)
    return root


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                       "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch.setenv(key, value)
    os.environ.setdefault("TQDM_DISABLE", "1")
