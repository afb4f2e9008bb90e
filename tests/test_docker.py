"""docker/ stays consistent with the package, checked statically on every `make test`: entry
points exist, images run as non-root, data and keys are read-only, nothing but the sources enters
a build. tests/test_containers.py (`make docker-test`) builds and runs the images."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import REPO


def _entry(dockerfile: str) -> list[str]:
    text = (REPO / "docker" / dockerfile).read_text()
    m = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert m, dockerfile
    return yaml.safe_load(m.group(1))  # type: ignore[no-any-return]


def test_images_run_installed_console_scripts_as_non_root() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name, script in (("Dockerfile.server", "hcc-fl-server"),
                         ("Dockerfile.client", "hcc-fl-client")):
        text = (REPO / "docker" / name).read_text()
        assert _entry(name)[0] == script and script in scripts
        assert re.search(r"^USER hccfl$", text, re.M), name
        assert "torch==2.13.0" in text and "/tmp/dist/*.whl" in text  # the built wheel, CPU torch
        assert re.search(r"^ARG BASE_IMAGE=python:3.11-slim$", text, re.M), name
        assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", text, re.M), name
        # only the sources are copied; the pip configuration is a build secret, not a file
        copies = re.findall(r"^COPY (?!--from=wheel )(\S+)", text, re.M)
        assert set(copies) == {"pyproject.toml", "server", "client", "shared", "configs"}, copies
        assert "/etc/pip.conf" not in text and "/opt/wheels" not in text
    assert "nginx-light" in (REPO / "docker" / "Dockerfile.server").read_text()
    assert _entry("Dockerfile.client")[1:3] == ["--site-config", "/site/site.yaml"]


def test_compose_mounts_keys_and_data_read_only() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    sites = {k for k in services if k != "coordinator"}
    assert sites == {"site_A", "site_B", "site_C", "site_EXT"}
    for name in sites:
        vols = services[name]["volumes"]
        assert any(v.endswith(":/site:ro") for v in vols), name
        assert any(v.endswith(":/data:ro") for v in vols), name
    assert "../pki:/pki:ro" in services["coordinator"]["volumes"]
    assert services["coordinator"]["ports"] == ["9092:9092"]
    script = (REPO / "docker" / "make-site-configs.sh").read_text()
    assert "coordinator: coordinator:9092" in script
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:][:1] == ["!pyproject.toml"]  # all else excluded
