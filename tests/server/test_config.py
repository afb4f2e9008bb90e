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
        ("federation.max_site_weight=0", "max_site_weight must be in"),
        ("federation.max_site_weight=1.5", "max_site_weight must be in"),
        ("federation.aggregation=mode", "aggregation must be one of"),
        ("federation.aggregation=median", "needs at least 5 training sites, got 3"),
        ("federation.aggregation=trimmed_mean", "needs at least 5 training sites"),
        ("federation.trim_fraction=0.5", "trim_fraction must be in"),
    ],
)
def test_bad_config_is_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config([override])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["task=tace_ceus", "privacy=dp"], "DP does not cover"),
        (["task=er_ceus", "secure_aggregation.enabled=true"], "aggregated in the clear"),
        (["secure_aggregation.enabled=true", "secure_aggregation.modulus=1099511627776"],
         "must be a power of two in"),
        (["task=tace_ceus", "task.tabular_rounds=0"], "tabular_rounds"),
        (["task=er_ceus", "task.stack.inputs=[deep]"], "stack.inputs"),
        (["task.name=nosuch"], "unknown task .nosuch."),
    ],
)
def test_task_component_configs_are_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def test_tasks_compose_with_their_models() -> None:
    from hcc_fl.shared.components import TaskComponents

    names = {t: TaskComponents.from_task_config(compose_config([f"task={t}"])["task"]).names
             for t in ("ki67_ceus", "tace_ceus", "er_ceus")}
    assert names == {"ki67_ceus": ["cecmm"], "tace_ceus": ["r_dlceus", "r_tic", "r_bmode"],
                     "er_ceus": ["deep", "radiomics", "combined"]}


def test_aclf_components_and_dp_refusal() -> None:
    from hcc_fl.shared.components import TaskComponents

    cfg = compose_config(["task=aclf_us"])
    comps = TaskComponents.from_task_config(cfg["task"])
    assert comps.names == ["siamese_unet", "combined_cox", "clinical_cox"]
    assert [c.inputs for c in comps.cox] == [("siamese_unet", "meld", "age"), ("meld", "age")]
    with pytest.raises(ConfigError, match="siamese"):
        compose_config(["task=aclf_us", "privacy=dp"])


def test_phcc_arms_and_ssl_checks() -> None:
    from hcc_fl.server.config import arm_names, arm_strategy

    cfg = compose_config(["task=phcc_mri"])
    assert arm_names(cfg) == ["fedavg", "fedavg_nossl", "fedprox", "fedprox_nossl"]
    block, ssl = arm_strategy(cfg, "fedprox_nossl")
    assert block["name"] == "fedprox" and block["proximal_mu"] > 0 and not ssl
    assert arm_strategy(cfg, "fedavg")[1]
    assert arm_names(compose_config(["task=phcc_mri", "task.ablation_no_ssl=false"])) == [
        "fedavg", "fedprox"]
    assert arm_names(compose_config(["task=ki67_ceus"])) == ["fedavg", "fedprox"]
    for overrides, message in ((["privacy=dp"], "Barlow Twins"),
                               (["task.ssl.batch_size=1"], "batch_size"),
                               (["task.finetune=half"], "finetune")):
        with pytest.raises(ConfigError, match=message):
            compose_config(["task=phcc_mri", *overrides])


def test_ssl_projector_option_is_checked() -> None:
    assert compose_config(["task=phcc_mri", "task.ssl.projector=local"])["task"]["ssl"][
        "projector"] == "local"
    with pytest.raises(ConfigError, match="projector"):
        compose_config(["task=phcc_mri", "task.ssl.projector=shared"])


def test_robust_aggregation_with_five_sites() -> None:
    five = "federation.training_sites=[a,b,c,d,e]"
    cfg = compose_config([five, "federation.aggregation=trimmed_mean"])
    assert cfg["federation"]["trim_fraction"] == 0.2 and cfg["federation"]["max_site_weight"] == 0.5
    with pytest.raises(ConfigError, match="trims no site of 5"):
        compose_config([five, "federation.aggregation=trimmed_mean",
                        "federation.trim_fraction=0.1"])
    with pytest.raises(ConfigError, match="in the clear"):
        compose_config([five, "federation.aggregation=median", "privacy=central-dp"])


@pytest.mark.parametrize("override,message", [
    ("run_name=nan", r"run_name: must be a folder name .* got nan"),
    ("run_name=../elsewhere", r"run_name: must be a folder name"),
    ("federation.rounds=abc", r"federation.rounds: expected a number \(like the default"),
    ("federation.rounds=2.5", r"federation.rounds: expected a whole number"),
    ("seed=inf", r"seed: expected a finite number"),
    ("evaluation.recalibration=3", r"evaluation.recalibration: expected true or false"),
    ("evaluation={a:1}", r"evaluation.threshold_split|evaluation"),
])
def test_bad_values_name_the_key_path(override: str, message: str) -> None:
    """Issue 19: bad user input is a ConfigError naming the key, never a traceback."""
    with pytest.raises(ConfigError, match=message):
        compose_config([override])


def test_pooled_split_with_one_class_is_refused_before_training(tmp_path, small_phantom) -> None:
    """The refusal names the split and the sites (simulate's check before any training)."""
    import csv
    import json
    import os
    import shutil

    from hcc_fl.server.simulate import check_sites
    from hcc_fl.shared.errors import DataError

    shutil.copytree(small_phantom, tmp_path / "data", copy_function=os.link)
    for site in ("site_A", "site_B", "site_C"):
        path = tmp_path / "data" / site / "manifest.csv"
        with path.open() as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            if r["split"] == "val":
                r["ki67_high"] = "1"
        path.unlink()
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    cfg = compose_config([f"data_root={tmp_path / 'data'}"])
    index = json.loads((tmp_path / "data" / "manifest_index.json").read_text())
    with pytest.raises(DataError, match=r"split 'val' of the training sites site_A, site_B, "
                       r"site_C holds one class of label 'ki67_high'"):
        check_sites(cfg, tmp_path / "data", index)
    check_sites(compose_config([f"data_root={tmp_path / 'data'}",
                                "evaluation.threshold_split=all"]), tmp_path / "data", index)
