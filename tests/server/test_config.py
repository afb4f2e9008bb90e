"""Hydra composition and configuration checks."""

from __future__ import annotations

import pytest

from hcc_fl.server.config import ConfigError, compose_config


def test_default_composition() -> None:
    cfg = compose_config([])
    assert cfg["task"]["name"] == "ki67_ceus"
    assert [a["name"] for a in cfg["strategy"]["arms"]] == ["fedavg", "fedprox"]
    assert cfg["federation"]["external_site"] not in cfg["federation"]["training_sites"]


def test_overrides() -> None:
    cfg = compose_config(["strategy=fedprox", "federation.rounds=3", "model=full"])
    assert cfg["strategy"]["arms"][0]["proximal_mu"] > 0
    assert cfg["federation"]["rounds"] == 3 and cfg["model"]["profile"] == "full"


@pytest.mark.parametrize(
    "override,message",
    [
        ("federation.rounds=0", "federation.rounds must be >= 1"),
        ("federation.min_sites=4", "min_sites=4 exceeds"),
        ("strategy=nosuch", "configuration"),
        ("evaluation.threshold_split=test", "threshold_split"),
        ("federation.external_site=site_A", "must not also be a training site"),
    ],
)
def test_bad_config_is_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config([override])
