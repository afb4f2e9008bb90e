"""Layout guards: declared packages match the folders, Flower stays at the edge, CLIs answer."""

from __future__ import annotations

import ast
import subprocess
import tomllib

import pytest

from tests.conftest import REPO, script

MAPPING = {"server": "hcc_fl.server", "client": "hcc_fl.client", "shared": "hcc_fl.shared",
           "configs": "hcc_fl.configs"}
FLOWER_MODULES = {"client/flower_app.py", "client/guard.py", "client/secagg.py",
                  "server/flower_app.py",
                  "server/strategy.py"}


def test_declared_packages_match_folders() -> None:
    py = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = set(py["tool"]["setuptools"]["packages"])
    found = set()
    for folder, pkg in MAPPING.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([pkg, *rel.parts]))
    assert declared == found
    assert py["tool"]["setuptools"]["package-dir"] == {v: k for k, v in MAPPING.items()}


def test_every_package_ships_py_typed() -> None:
    for folder in ("server", "client", "shared", "shared/models", "shared/metrics"):
        assert (REPO / folder / "py.typed").is_file(), folder


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_flower_only_at_the_edge() -> None:
    offenders = []
    for folder in ("server", "client", "shared"):
        for path in (REPO / folder).rglob("*.py"):
            rel = str(path.relative_to(REPO))
            if rel in FLOWER_MODULES:
                continue
            if any(m == "flwr" or m.startswith("flwr.") for m in _imports(path)):
                offenders.append(rel)
    assert offenders == []


def test_client_and_shared_never_import_server() -> None:
    for folder in ("client", "shared"):
        for path in (REPO / folder).rglob("*.py"):
            assert not any(m.startswith("hcc_fl.server") for m in _imports(path)), path


@pytest.mark.parametrize(
    "argv",
    [["hcc-fl", "--help"], ["hcc-fl", "synth", "--help"], ["hcc-fl", "simulate", "--help"],
     ["hcc-fl", "report", "--help"], ["hcc-fl", "certs", "--help"],
     ["hcc-fl-client", "--help"], ["hcc-fl-client", "check-data", "--help"],
     ["hcc-fl-server", "--help"]],
    ids=lambda a: " ".join(a),
)
def test_help_answers(argv: list[str]) -> None:
    out = subprocess.run([script(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    assert len(out.stdout) > 200
