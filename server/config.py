"""Compose and check the experiment configuration (Hydra groups in ``hcc_fl.configs``)."""

from __future__ import annotations

import math
import re
from typing import Any, cast

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hcc_fl.server import fedopt
from hcc_fl.shared.disclosure import ReleasePolicy
from hcc_fl.shared.tasks import TASKS


class ConfigError(ValueError):
    """An experiment configuration that cannot run; the message names the key."""


#: Keys whose default is a whole number but which take any number (seconds, ratios, days).
FRACTIONAL = {"federation.round_timeout_s", "federation.discovery_timeout_s",
              "federation.max_update_norm_ratio", "task.cox_horizon"}
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """Compose ``config.yaml`` with Hydra ``overrides`` (``key=value``, ``group=option``)."""
    try:
        with initialize_config_module(config_module="hcc_fl.configs", version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"configuration: {exc}") from exc
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    result = cast(dict[str, Any], out)
    if isinstance(result.get("run_name"), int) and not isinstance(result["run_name"], bool):
        result["run_name"] = str(result["run_name"])  # run_name=2024 is a name, not a number
    check_types(result, _defaults(overrides))
    try:
        check_config(result)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a value of a wrong kind
        raise ConfigError(f"configuration: a value has the wrong type or is missing "
                          f"({type(exc).__name__}: {exc})") from None
    return result


GROUPS = ("task", "model", "strategy", "federation", "privacy")


def _defaults(overrides: list[str]) -> dict[str, Any]:
    """The configuration the same group choices give without any value override: the
    reference for the type of every key."""
    groups = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS]
    with initialize_config_module(config_module="hcc_fl.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=groups)
    out = OmegaConf.to_container(cfg, resolve=True)
    return cast(dict[str, Any], out)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "a mapping"


def check_types(cfg: dict[str, Any], reference: dict[str, Any], where: str = "") -> None:
    """Every value must be of the kind its default has (a number where a number is expected,
    finite; a string where a string is expected, ...); the error names the key path.
    ``run_name`` must be a plain folder name."""
    for key, value in cfg.items():
        path = f"{where}{key}"
        if path == "run_name" and value is not None and (
                not isinstance(value, str) or not RUN_NAME.fullmatch(value)):
            raise ConfigError(f"run_name: must be a folder name of letters, digits, '.', '_' "
                              f"or '-' (not starting with '.'), got {value!r}")
        if key not in reference or reference[key] is None or value is None:
            continue
        ref = reference[key]
        if isinstance(ref, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping (a group of keys), got {value!r}")
            check_types(value, ref, f"{path}.")
            continue
        if isinstance(ref, bool) != isinstance(value, bool) or (
                _kind(ref) != _kind(value) and not isinstance(ref, bool)):
            raise ConfigError(f"{path}: expected {_kind(ref)} (like the default {ref!r}), got "
                              f"{value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        if isinstance(ref, int) and not isinstance(ref, bool) and isinstance(value, float) \
                and value != int(value) and path not in FRACTIONAL:
            raise ConfigError(f"{path}: expected a whole number (like the default {ref!r}), got "
                              f"{value!r}")


def to_yaml(cfg: dict[str, Any]) -> str:
    """The composed configuration as YAML (written to the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def check_config(cfg: dict[str, Any]) -> None:
    """Reject configurations that cannot run, naming the offending key."""
    task = cfg["task"]["name"]
    if task not in TASKS:
        raise ConfigError(f"task.name: unknown task '{task}'; known: {', '.join(sorted(TASKS))}")
    if not TASKS[task].trainable:
        trainable = ", ".join(sorted(t for t, spec in TASKS.items() if spec.trainable))
        raise ConfigError(f"task.name: task '{task}' has no training pipeline in this release "
                          f"(trainable: {trainable})")
    from hcc_fl.shared.components import TaskComponents

    try:
        comps = TaskComponents.from_task_config(cfg["task"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"task: {exc}") from exc
    ssl = cfg["task"].get("ssl") or {}
    if ssl.get("enabled"):
        if int(ssl.get("rounds", 0)) < 1 or int(ssl.get("local_epochs", 0)) < 1:
            raise ConfigError("task.ssl.rounds and task.ssl.local_epochs must be >= 1")
        if int(ssl.get("batch_size", 0)) < 2:
            raise ConfigError("task.ssl.batch_size must be >= 2 (Barlow Twins standardises "
                              "over the batch)")
        if ssl.get("projector", "average") not in ("average", "local"):
            raise ConfigError("task.ssl.projector must be 'average' or 'local'")
        if cfg["task"].get("finetune", "full") not in ("full", "linear"):
            raise ConfigError("task.finetune must be 'full' or 'linear'")
    if comps.tabular and (comps.rounds < 1 or comps.local_epochs < 1 or comps.resplits < 0):
        raise ConfigError("task.tabular_rounds and task.tabular_local_epochs must be >= 1 and "
                          "task.resplits >= 0")
    fed = cfg["federation"]
    from hcc_fl.shared.wire import TRANSFERS

    if fed.get("transfer", "fp32") not in TRANSFERS:
        raise ConfigError(f"federation.transfer must be one of {', '.join(TRANSFERS)}, got "
                          f"{fed.get('transfer')!r}")
    for key in ("rounds", "local_epochs", "min_sites"):
        if int(fed[key]) < 1:
            raise ConfigError(f"federation.{key} must be >= 1, got {fed[key]}")
    for key in ("round_timeout_s", "discovery_timeout_s"):
        if float(fed[key]) <= 0:
            raise ConfigError(f"federation.{key} must be > 0, got {fed[key]}")
    if float(fed.get("max_update_norm_ratio", 0)) < 0:
        raise ConfigError("federation.max_update_norm_ratio must be >= 0 (0 = off), got "
                          f"{fed['max_update_norm_ratio']}")
    weight = fed.get("max_site_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
        raise ConfigError(f"federation.max_site_weight must be in (0, 1] (1 = off), got {weight!r}")
    from hcc_fl.server.screen import check_aggregation

    try:
        check_aggregation(str(fed.get("aggregation", "mean")),
                          float(fed.get("trim_fraction", 0.0)), len(fed["training_sites"]))
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    if fed.get("aggregation", "mean") != "mean" and (
            (cfg.get("secure_aggregation") or {}).get("enabled")
            or (cfg.get("privacy") or {}).get("mode") == "central-dp"):
        raise ConfigError(f"federation.aggregation={fed['aggregation']} needs each site's "
                          "update in the clear, unclipped: use aggregation=mean with secure "
                          "aggregation or central DP")
    if int(fed["min_sites"]) > len(fed["training_sites"]):
        raise ConfigError(
            f"federation.min_sites={fed['min_sites']} exceeds the "
            f"{len(fed['training_sites'])} training sites"
        )
    if fed.get("external_site") in fed["training_sites"]:
        raise ConfigError("federation.external_site must not also be a training site")
    names = [a["name"] for a in cfg["strategy"]["arms"]]
    for i, arm in enumerate(cfg["strategy"]["arms"]):
        name = arm["name"]
        if name not in ("fedavg", "fedprox", "fedbn", *fedopt.KINDS):
            raise ConfigError(f"strategy.arms: unknown strategy '{name}' (fedavg, fedprox, "
                              f"fedbn, {', '.join(fedopt.KINDS)})")
        if name == "fedbn" and ((cfg.get("secure_aggregation") or {}).get("enabled")
                                or (cfg.get("privacy") or {}).get("mode") == "central-dp"):
            raise ConfigError("strategy fedbn: each site's normalisation state is averaged in "
                              "the clear once at the end (query.norm_state), which secure "
                              "aggregation and central DP would not cover; run fedbn without "
                              "them")
        try:
            fedopt.from_arm(arm)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"strategy.arms[{i}]: {exc}") from None
    if len(set(names)) != len(names):
        raise ConfigError("strategy.arms: each strategy may appear once")
    try:
        ReleasePolicy.from_mapping(cfg.get("disclosure") or {})
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if cfg["evaluation"]["threshold_split"] not in ("val", "train", "all"):
        raise ConfigError("evaluation.threshold_split must be val, train or all")
    if not isinstance(cfg["evaluation"].get("recalibration", True), bool):
        raise ConfigError("evaluation.recalibration must be true or false, got "
                          f"{cfg['evaluation']['recalibration']!r}")
    from hcc_fl.client.privacy import PrivacyConfig, PrivacyError, check_dp_loss

    try:
        privacy = PrivacyConfig.from_dict(cfg.get("privacy"))
        if privacy.mode == "dp":
            check_dp_loss(str(cfg["task"].get("loss", "bce")))
    except PrivacyError as exc:
        raise ConfigError(str(exc)) from exc
    sa = cfg.get("secure_aggregation") or {}
    if sa.get("enabled"):  # the settings every site checks at set-up (client/secagg.py)
        from hcc_fl.client.secagg import SecAggConfig

        try:
            SecAggConfig.for_sites(
                max(2, len(cfg["federation"]["training_sites"])),
                clipping_range=float(sa["clipping_range"]),
                quantization_range=int(sa["quantization_range"]), modulus=int(sa["modulus"]),
            ).check()
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"secure_aggregation: {exc}") from None
    if (cfg.get("secure_aggregation") or {}).get("enabled") and privacy.mode == "central-dp":
        raise ConfigError("secure_aggregation.enabled cannot be combined with privacy=central-dp "
                          "(the coordinator must see each update to clip it); use privacy=dp")
    if ssl.get("enabled") and privacy.mode != "none":
        raise ConfigError(f"privacy={privacy.mode}: task {task}'s self-supervised stage "
                          "(Barlow Twins) couples the samples of a batch, so DP-SGD gives no "
                          "per-patient guarantee; set task.ssl.enabled=false or privacy=none")
    if str(cfg["task"].get("objective", "bce")) != "bce" and privacy.mode == "dp":
        raise ConfigError(f"privacy=dp: task {task} trains with the "
                          f"'{cfg['task']['objective']}' objective, which the DP-SGD path does "
                          "not implement in this release (it trains BCE models only)")
    if (comps.tabular or comps.cox) and privacy.mode != "none":
        raise ConfigError(f"privacy={privacy.mode}: task {task} also fits tabular or Cox models "
                          f"({', '.join(comps.names[1:])}), which DP does not cover in this "
                          "release; use privacy=none or a task with the deep model only")
    if (comps.tabular or comps.cox) and (cfg.get("secure_aggregation") or {}).get("enabled"):
        raise ConfigError(f"secure_aggregation.enabled: task {task}'s tabular models are "
                          "aggregated in the clear in this release; disable it for this task")
    if cfg["model"]["profile"] not in ("tiny", "full"):
        raise ConfigError(f"model.profile: unknown profile '{cfg['model']['profile']}'")


NO_SSL = "_nossl"


def arm_names(cfg: dict[str, Any]) -> list[str]:
    """The federated arms of a run: each configured strategy, followed by its no-SSL ablation
    ``<strategy>_nossl`` when the task pretrains with SSL and asks for the ablation."""
    out = []
    task = cfg["task"]
    ablation = bool((task.get("ssl") or {}).get("enabled")) and bool(task.get("ablation_no_ssl"))
    for a in cfg["strategy"]["arms"]:
        out.append(str(a["name"]))
        if ablation:
            out.append(f"{a['name']}{NO_SSL}")
    return out


def arm_strategy(cfg: dict[str, Any], arm: str) -> tuple[dict[str, Any], bool]:
    """The strategy block of ``arm`` and whether the arm pretrains with SSL."""
    base = arm.removesuffix(NO_SSL)
    block = next(a for a in cfg["strategy"]["arms"] if a["name"] == base)
    ssl = bool((cfg["task"].get("ssl") or {}).get("enabled")) and not arm.endswith(NO_SSL)
    return block, ssl
