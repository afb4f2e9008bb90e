"""``hcc-fl simulate``: federated arms in Flower's simulation engine plus the baselines.

Reads: check every site's data -> start a private SuperLink -> one ``flwr run`` per federated
arm (sites as virtual SuperNodes; the external site evaluates only) -> centralized and local
baselines without Flower -> assemble the run directory. The run is built in a hidden folder
beside its destination and moved into place only when complete, so an existing run directory is
never left half-overwritten.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hcc_fl.server.config import NO_SSL, ConfigError, to_yaml
from hcc_fl.server.flower_runtime import (
    Deployment,
    deployment_superlink,
    flwr_run,
    simulation_superlink,
    write_app_bundle,
)
from hcc_fl.shared import records as R
from hcc_fl.shared.disclosure import ReleasePolicy
from hcc_fl.shared.errors import DataError
from hcc_fl.shared.evaluation import cross_site_matrix, internal_vs_external
from hcc_fl.shared.jsonio import clean, write_json
from hcc_fl.shared.tasks import get_task
from hcc_fl.shared.version import code_version

log = logging.getLogger("hcc_fl.simulate")
SUMMARY_KEYS = ("auc", "auc_ci", "threshold", "sensitivity", "specificity", "accuracy", "ppv",
                "npv", "n", "n_pos", "tp", "fp", "tn", "fn")


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    """Headline keys first, then the detailed blocks (calibration, curves, survival)."""
    head = {k: stats.get(k) for k in SUMMARY_KEYS}
    return clean({**head, **{k: v for k, v in stats.items() if k not in head}})  # type: ignore[no-any-return]


def _components_block(cfg: dict[str, Any]) -> dict[str, Any]:
    from hcc_fl.shared.components import TaskComponents

    comps = TaskComponents.from_task_config(cfg["task"])
    return {"deep": comps.deep, "names": comps.names, "resplits": comps.resplits,
            "thresholds": {}, "comparisons": {}, "robustness": {}, "tabular": {},
            "validation": {}}


def _spread(values: list[float | None]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not v.size:
        return {"auc": values, "n": 0}
    return {"auc": values, "n": int(v.size), "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max())}


SITE_STATS = R.SITE_STATS


def _add_arm(external: dict[str, Any], block: dict[str, Any], arm: str, stats: dict[str, Any],
             thresholds: dict[str, float] | None, validation: dict[str, Any] | None,
             tabular: dict[str, Any] | None) -> None:
    """One arm's external results: the deep model under the arm's name, every other component
    as ``<arm>/<component>``; the DeLong comparisons between components, re-split spreads,
    thresholds and selected features go to the ``components`` block of metrics.json."""
    stats = dict(stats)
    per_component = stats.pop("components", None)
    comparisons = stats.pop("comparisons", None)
    resplit = stats.pop("resplit_auc", None)
    external[arm] = _summary(stats)
    if per_component:
        for name, rep in per_component.items():
            if name != block["deep"]:
                external[f"{arm}/{name}"] = _summary(rep)
        block["comparisons"][arm] = clean(comparisons or [])
        block["thresholds"][arm] = thresholds or {}
        block["validation"][arm] = clean(validation or {})
        block["tabular"][arm] = clean(tabular or {})
    if resplit:
        block["robustness"][arm] = {name: _spread(v) for name, v in resplit.items()}


def load_index(data_root: Path) -> dict[str, Any]:
    """Read ``manifest_index.json`` (written by ``hcc-fl synth``) with a clear error."""
    path = data_root / "manifest_index.json"
    if not path.is_file():
        raise DataError.single(path, "not found: generate data with `hcc-fl synth --out "
                               f"{data_root}` or point data_root at a folder that has one")
    try:
        index = json.loads(path.read_text())
        _ = index["sites"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError.single(path, f"not a valid manifest index ({exc})") from exc
    return index  # type: ignore[no-any-return]


def check_sites(cfg: dict[str, Any], data_root: Path, index: dict[str, Any]) -> None:
    """Validate every participating site's manifest before any training."""
    from hcc_fl.client.manifest import validate_manifest
    from hcc_fl.shared.errors import DataIssue
    from hcc_fl.shared.evaluation import threshold_splits

    task = get_task(cfg["task"]["name"])
    fed = cfg["federation"]
    wanted = [*fed["training_sites"], fed["external_site"]]
    issues = []
    labels: dict[str, dict[str, set[str]]] = {}
    for site in wanted:
        if site not in index["sites"]:
            raise ConfigError(f"federation: site '{site}' is not in {data_root}/manifest_index.json"
                              f" (has: {', '.join(index['sites'])})")
        external = site == fed["external_site"]
        splits = ("test",) if external else ("train",)
        try:
            m = validate_manifest(data_root / index["sites"][site]["manifest"], task, splits,
                                  both_classes=splits if external else ())
        except DataError as exc:
            issues.extend(exc.issues)
            continue
        labels[site] = {s: {r[task.label] for r in m.rows_in((s,))} for s in ("train", "val")}
    if issues:
        raise DataError(issues)
    # Pooled over the training sites, before any training: the loss needs both classes in
    # 'train', the Youden threshold and the recalibration in the threshold split.
    training = list(fed["training_sites"])
    threshold = str(cfg["evaluation"]["threshold_split"])
    needed = {"train": ("train",), threshold: threshold_splits(threshold)}
    for split, parts in needed.items():
        pooled = set().union(*(labels[s].get(p, set()) for s in training for p in parts))
        if not {"0", "1"} <= pooled:
            issues.append(DataIssue(
                "federation.training_sites", f"split '{split}' of the training sites "
                f"{', '.join(training)} holds {'no rows' if not pooled else 'one class'} of "
                f"label '{task.label}' (pooled); training and the Youden threshold need both "
                "classes: add cases or controls, or choose evaluation.threshold_split"))
    if issues:
        raise DataError(issues)


def _run_config(cfg: dict[str, Any], arm: str, run_dir: Path, data_root: Path) -> dict[str, Any]:
    fed = cfg["federation"]
    return {
        "insecure": bool(cfg.get("insecure", False)),
        "arm": arm,
        "arm-dir": str(run_dir / "arms" / arm),
        "config-path": str(run_dir / "config.json"),
        "task": cfg["task"]["name"],
        "profile": cfg["model"]["profile"],
        "data-root": str(data_root),
        "training-sites": ",".join(fed["training_sites"]),
        "external-site": fed["external_site"],
        "client-threads": int(max(1, fed["client_cpus"])),
        "device": cfg["device"],
        "histogram-bins": int(cfg["evaluation"]["histogram_bins"]),
        "threshold-split": cfg["evaluation"]["threshold_split"],
        "seed": int(cfg["seed"]),
        "code-version": code_version(),
        "audit-path": str(run_dir / "logs" / "audit-coordinator.jsonl"),
        "rounds": int(fed["rounds"]),
        "local-epochs": int(fed["local_epochs"]),
        "batch-size": int(cfg["model"]["batch_size"]),
        "run-key": f"{cfg.get('run_name')}-{cfg.get('run_uid', 'x')}/{arm}",
        "privacy-dir": str(run_dir / "privacy"),
        "prep-cache": str(cfg.get("_prep_cache") or ""),
        **_privacy_run_config(cfg.get("privacy") or {"mode": "none"}),
        # every simulated site's release policy (a deployed site's comes from its SITE.yaml)
        **ReleasePolicy.from_mapping(cfg.get("disclosure") or {}).as_config(),
        "resume": bool(cfg.get("_resume", False)),
        R.RC_FEDBN: int(arm.removesuffix(NO_SSL) == "fedbn"),
    }


PREP_CACHE = ".hcc-fl-prepcache"


def prep_cache_dir(data_root: Path) -> Path | None:
    """The simulated sites' preparation cache (:mod:`hcc_fl.client.prepcache`):
    ``<data_root>/.hcc-fl-prepcache``, one folder for all sites of the data root (entries are
    keyed by content, so sites, arms and runs share them safely, and a new run of the same data
    decodes nothing); None when the data root is read-only (then each process keeps its tensors
    in memory only)."""
    folder = data_root / PREP_CACHE
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK | os.X_OK) else None


def prepare_sites(cfg: dict[str, Any], data_root: Path, index: dict[str, Any], folder: Path,
                  quiet: bool = False) -> None:
    """Decode every simulated site's patients into the preparation cache before the arms
    (in parallel over the CPUs, with a progress bar); the ClientApps then only read it."""
    from hcc_fl.client.data import prepare_site
    from hcc_fl.client.prepcache import PrepCache

    fed = cfg["federation"]
    sites: list[tuple[str, tuple[str, ...]]] = [(s, ("train", "val"))
                                                for s in fed["training_sites"]]
    if fed.get("external_site"):
        sites.append((fed["external_site"], ("test",)))
    cache = PrepCache(folder)
    with tqdm(desc="     prepare", unit="patient", disable=None if not quiet else True) as bar:
        for site, splits in sites:
            done = prepare_site(data_root / index["sites"][site]["manifest"],
                                cfg["task"]["name"], cfg["model"]["profile"], splits, cache,
                                progress=bar.update)
            log.debug("prepared site %s: %d decoded, %d unchanged (%.1f s)", site, done.built,
                      done.reused, done.seconds)


def _reading(prep: Path | None) -> contextlib.AbstractContextManager[None]:
    """Read site tensors through the preparation cache ``prep`` in this process (baselines,
    comparisons); nothing without one (the coordinator of a deployment has no site readers)."""
    if prep is None:
        return contextlib.nullcontext()
    from hcc_fl.client.data import using_prep_cache

    return using_prep_cache(prep)


def _secagg_run_config(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Simulation with SecAgg+: the harness plays the consortium and makes one identity key per
    training site (``<run>/secagg-keys``), as ``hcc-fl certs add-site`` does for a deployment;
    each simulated site signs with its own key and verifies its peers' public keys there."""
    if not (cfg.get("secure_aggregation") or {}).get("enabled"):
        return {}
    from hcc_fl.client.secagg import write_identity_keys

    fed = cfg["federation"]
    folder = work / "secagg-keys"
    if not folder.is_dir():  # a resumed run keeps its keys
        write_identity_keys(folder, [str(s) for s in fed["training_sites"]])
    return {R.RC_SECAGG_KEYS: str(folder), R.RC_SECAGG_MIN_SITES: int(fed["min_sites"])}


def _privacy_run_config(privacy: dict[str, Any]) -> dict[str, Any]:
    """The privacy block as flat run-config keys (-1 stands for "not set")."""

    def num(key: str) -> float:
        value = privacy.get(key)
        return -1.0 if value is None else float(value)

    return {"privacy-mode": str(privacy.get("mode", "none")),
            "privacy-target-epsilon": num("target_epsilon"),
            "privacy-noise-multiplier": num("noise_multiplier"),
            "privacy-delta": num("delta"), "privacy-max-grad-norm": num("max_grad_norm"),
            "privacy-sample-rate": num("sample_rate"),
            "privacy-site-budget": num("site_budget"),
            "privacy-grad-sample-mode": str(privacy.get("grad_sample_mode") or "hooks")}


def _privacy_summary(cfg: dict[str, Any], history: list[dict[str, Any]],
                     arm_results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mode, settings and the epsilon each site spent per federated arm (last round seen)."""
    privacy = dict(cfg.get("privacy") or {"mode": "none"})
    spent: dict[str, dict[str, dict[str, float]]] = {}
    for h in history:
        if "dp_epsilon" in h:
            spent.setdefault(h["arm"], {})[h["site"]] = {
                "epsilon": h["dp_epsilon"], "delta": h["dp_delta"], "round": h["round"]}
    return {"mode": privacy.get("mode", "none"), "config": privacy, "epsilon": spent,
            "central": {arm: res["central_dp"] for arm, res in arm_results.items()
                        if res.get("central_dp")}}


def _compare_arms(
    cfg: dict[str, Any], data_root: Path, index: dict[str, Any], models: Path, arms: list[str]
) -> list[dict[str, Any]]:
    """Paired DeLong tests between all arms on the external patients.

    Runs the external site's own comparison code (``client.statistics.external_comparisons``)
    on the external cohort. In simulation the external data are on this machine, so it runs
    in-process; only the resulting statistics enter ``metrics.json``.
    """
    from hcc_fl.client.data import load_site
    from hcc_fl.client.statistics import compare_models
    from hcc_fl.shared.models import build_model

    task, profile = cfg["task"]["name"], cfg["model"]["profile"]
    ext = cfg["federation"]["external_site"]
    data = load_site(data_root / index["sites"][ext]["manifest"], task, profile, ("test",))
    from hcc_fl.shared.normstate import recompute_statistics

    loaded = {}
    for arm in arms:
        model = build_model(task, profile)
        base = arm.removesuffix(SITE_STATS)
        model.load_state_dict(torch.load(models / f"{base.replace(':', '-')}.pt"))
        if arm != base:  # the external site's test-time statistics, as it computes them
            recompute_statistics(model, ((data.video[i:i + 16], data.clinical[i:i + 16])
                                         for i in range(0, len(data), 16)))
        loaded[arm] = model
    return compare_models(loaded, data, cfg["device"],
                          ReleasePolicy.from_mapping(cfg.get("disclosure") or {}))


def _allow_list(deployment: Deployment | None) -> str:
    """The run config's allow-list folder: the key decides who a node is
    (server/identity.py); none in simulation or with ``--insecure``."""
    if deployment is None or deployment.pki is None or deployment.insecure:
        return ""
    return str(deployment.pki.resolve() / "authorized")


def _compare_deployed(cfg: dict[str, Any], work: Path, data_root: Path, link: Any,
                      arms: list[str], deployment: Deployment, site_stats: Iterable[str] = ()
                      ) -> list[dict[str, Any]]:
    """In a deployment, the paired DeLong tests between the arms come from the external site:
    one more run whose one message carries every arm's final model (``run_compare`` in
    server/flower_app.py); each FedBN arm in ``site_stats`` also as ``<arm>+external-stats``,
    scored after the site's own test-time statistics. A failure is logged and leaves the
    comparisons out."""
    files: dict[str, str] = {}
    for a in arms:
        files[a] = str(work / "arms" / a / "model.pt")
        if a in set(site_stats):
            files[a + SITE_STATS] = files[a]
    stage = work / "arms" / ".compare"
    app_dir = write_app_bundle(work / "app" / ".compare", {
        **_run_config({**cfg, "insecure": deployment.insecure}, ".compare", work, data_root),
        R.RC_ALLOW_LIST: _allow_list(deployment),
        R.RC_STAGE: "compare",
        R.RC_COMPARE: json.dumps(files),
    })
    flwr_run(link, app_dir, None, work / "logs" / "flower-compare.log")
    out = stage / "comparisons.json"
    if not out.is_file():
        err = stage / "error.json"
        log.warning("no comparison of the arms: %s",
                    json.loads(err.read_text())["error"] if err.is_file() else "failed")
        return []
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def partial_dir(run_dir: Path) -> Path:
    """Where the run ``runs/NAME`` is built while in progress: ``runs/.NAME.partial``."""
    run_dir = Path(run_dir).resolve()
    if run_dir.name.startswith(".") and run_dir.name.endswith(".partial"):
        return run_dir
    return run_dir.parent / f".{run_dir.name}.partial"


def resume_config(run_dir: Path) -> dict[str, Any]:
    """The configuration of an interrupted run, for ``hcc-fl-server --resume RUN_DIR``."""
    work = partial_dir(run_dir)
    path = work / "config.json"
    if not path.is_file():
        done = work.parent / work.name[1:-len(".partial")]
        hint = (f"{done} is complete; nothing to resume" if (done / "metrics.json").is_file()
                else "no interrupted run there")
        raise ConfigError(f"cannot resume {run_dir}: {path} not found ({hint})")
    cfg: dict[str, Any] = json.loads(path.read_text())
    return {**cfg, "_resume": True}


def experiment_config(overrides: list[str], resume: str | None) -> dict[str, Any]:
    """The configuration to run: composed from ``overrides``, or an interrupted run's own
    (``--resume RUN_DIR``, which takes no overrides)."""
    from hcc_fl.server.config import compose_config

    if resume:
        if overrides:
            raise ConfigError("--resume continues the run with its own configuration: give no "
                              "KEY=VALUE overrides")
        return resume_config(Path(resume))
    return compose_config(overrides)


def run_simulation(
    cfg: dict[str, Any], quiet: bool = False, deployment: Deployment | None = None
) -> Path:
    """Run the experiment ``cfg`` and return its run directory.

    With ``deployment`` the arms run on the coordinator's real SuperLink against the sites'
    SuperNodes (TLS and site keys unless insecure); the coordinator holds no patient data, so
    the data check, the baselines and the cross-arm comparisons (which need the data) are left
    to the sites and not run here.

    Raises
    ------
    ConfigError, DataError
        Bad configuration or site data (nothing is written).
    RuntimeError
        A federated arm failed; its log is named in the message. No partial run replaces an
        existing run directory.
    """
    data_root = Path(cfg["data_root"]).resolve()
    index: dict[str, Any] = {}
    if deployment is None:
        index = load_index(data_root)
        check_sites(cfg, data_root, index)
    else:
        cfg = {**cfg, "baselines": {"centralized": False, "local": False}}
    task = cfg["task"]["name"]
    name = cfg.get("run_name") or f"{task}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    runs_dir = Path(cfg["runs_dir"]).resolve()
    final = runs_dir / name
    if final.exists() and not cfg.get("overwrite"):
        raise ConfigError(f"run directory {final} exists: choose another run_name or pass "
                          "overwrite=true")
    work = runs_dir / f".{name}.partial"
    resuming = bool(cfg.get("_resume", False))
    cfg = {k: v for k, v in cfg.items() if k != "_resume"}
    if resuming:
        log.info("resuming the run in %s", work)
    else:
        if work.exists():
            shutil.rmtree(work)
        (work / "logs").mkdir(parents=True)
        import uuid

        # run_uid keys the sites' privacy accountants and ledger entries; it survives --resume
        cfg = {**cfg, "data_root": str(data_root), "run_name": name,
               "run_uid": uuid.uuid4().hex[:12]}
        (work / "config.yaml").write_text(to_yaml(cfg))
        (work / "config.json").write_text(json.dumps(cfg, indent=2))
    timing: dict[str, float] = {}
    t_start = time.monotonic()
    prep = prep_cache_dir(data_root) if deployment is None else None
    if prep is not None:
        t0 = time.monotonic()
        prepare_sites(cfg, data_root, index, prep, quiet)
        timing["prepare_s"] = time.monotonic() - t0

    fed = cfg["federation"]
    n_nodes = len(fed["training_sites"]) + (1 if fed.get("external_site") else 0)
    arm_results: dict[str, dict[str, Any]] = {}
    from hcc_fl.server.config import arm_names

    arms = arm_names(cfg)
    deployed_comparisons: list[dict[str, Any]] = []
    if arms:
        t0 = time.monotonic()
        link_cm = (
            simulation_superlink(work / ".flwr", work / "logs" / "superlink.log")
            if deployment is None else
            deployment_superlink(work / ".flwr", deployment, work / ".flwr" / "link.db",
                                 work / "logs" / "superlink.log",
                                 proxy_dir=runs_dir / f".nginx-{deployment.port}",
                                 audit_path=work / "logs" / "audit-coordinator.jsonl")
        )
        with link_cm as link:
            if deployment is not None:
                print(f"coordinator ready on {deployment.host}:{deployment.port}", flush=True)
            for arm in arms:
                t_arm = time.monotonic()
                result_path = work / "arms" / arm / "result.json"
                if resuming and result_path.is_file():
                    log.info("arm %s finished before the interruption", arm)
                    arm_results[arm] = json.loads(result_path.read_text())
                    continue
                (work / "arms" / arm / "error.json").unlink(missing_ok=True)
                app_dir = write_app_bundle(
                    work / "app" / arm,
                    {**_run_config({**cfg, "insecure": bool(deployment and deployment.insecure),
                                    "_resume": resuming, "_prep_cache": prep}, arm, work,
                                   data_root),
                     # the key decides who a node is (server/identity.py); none in simulation
                     R.RC_ALLOW_LIST: _allow_list(deployment),
                     **(_secagg_run_config(cfg, work) if deployment is None else {})},
                )
                bar = tqdm(total=int(fed["rounds"]), desc=f"{arm:>12} rounds", unit="round",
                           disable=None if not quiet else True, leave=True)
                last = [0]

                def on_round(cur: int, total: int, bar: tqdm = bar, last: list[int] = last) -> None:
                    bar.update(cur - 1 - last[0])
                    last[0] = cur - 1

                logf = work / "logs" / f"flower-{arm}.log"
                sim_config = None if deployment is not None else {
                    "num-supernodes": n_nodes,
                    "client-resources-num-cpus": int(max(1, fed["client_cpus"])),
                    "init-args-num-cpus": max(1, int(torch.get_num_threads())),
                }
                flwr_run(link, app_dir, sim_config, logf, on_round=on_round)
                bar.update(int(fed["rounds"]) - last[0])
                bar.close()
                if not result_path.is_file():
                    err = work / "arms" / arm / "error.json"
                    why = json.loads(err.read_text())["error"] if err.is_file() else "failed"
                    raise RuntimeError(f"federated arm '{arm}': {why}; see its log {logf}. "
                                       f"The run so far is kept in {work}: fix the cause and "
                                       f"continue it with --resume {final}")
                arm_results[arm] = json.loads(result_path.read_text())
                timing[f"{arm}_s"] = time.monotonic() - t_arm
            if deployment is not None and len(arm_results) > 1:
                t_cmp = time.monotonic()
                deployed_comparisons = _compare_deployed(
                    cfg, work, data_root, link, list(arm_results), deployment,
                    [a for a, r in arm_results.items() if r.get("external_site_statistics")])
                timing["comparisons_s"] = time.monotonic() - t_cmp
        timing["federated_total_s"] = time.monotonic() - t0
        shutil.rmtree(work / ".flwr", ignore_errors=True)

    baselines = []
    if cfg["baselines"]["centralized"] or cfg["baselines"]["local"]:
        from hcc_fl.client.baselines import run_baselines

        t0 = time.monotonic()
        bars: dict[str, tqdm] = {}

        def progress(arm: str, epoch: int, total: int) -> None:
            if arm not in bars:
                bars[arm] = tqdm(total=total, desc=f"{arm:>12} epochs", unit="epoch",
                                 disable=None if not quiet else True)
            bars[arm].update(1)

        with _reading(prep):  # the baselines read the prepared tensors too
            baselines = run_baselines(cfg, data_root, index, progress)
        for bar_ in bars.values():
            bar_.close()
        timing["baselines_s"] = time.monotonic() - t0

    # --- assemble the run directory ---------------------------------------------------------
    models = work / "models"
    models.mkdir()
    external: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    sites: list[dict[str, Any]] = []
    validation: dict[str, Any] = {}
    federated: dict[str, Any] = {}
    components = _components_block(cfg)
    for arm, res in arm_results.items():
        federated[arm] = {k: res.get(k) for k in ("aggregated_rounds", "resumed_after_round",
                                                  "train_seconds", "secure_aggregation",
                                                  "messages")}
        _add_arm(external, components, arm, res["external"], res.get("component_thresholds"),
                 res.get("component_validation"), res.get("tabular"))
        validation[arm] = res["validation"]
        if res.get("external_site_statistics"):  # FedBN + external (test-time) statistics
            _add_arm(external, components, arm + SITE_STATS, res["external_site_statistics"],
                     res.get("component_thresholds"), res.get("component_validation"),
                     res.get("tabular"))
            validation[arm + SITE_STATS] = res["validation"]
        if res.get("fedbn"):
            federated[arm]["fedbn"] = res["fedbn"]
        history.extend(res["history"])
        rejections.extend(res["rejections"])
        sites = res["sites"]
        shutil.move(str(work / "arms" / arm / "model.pt"), models / f"{arm}.pt")
        ckpt = work / "arms" / arm / "checkpoint.pt"
        if ckpt.is_file():
            (work / "checkpoints").mkdir(exist_ok=True)
            shutil.move(str(ckpt), work / "checkpoints" / f"{arm}.pt")
    for b in baselines:
        _add_arm(external, components, b.name, b.external, b.component_thresholds,
                 b.component_validation, b.tabular)
        validation[b.name] = b.validation
        history.extend(b.history)
        torch.save(b.state_dict, models / f"{b.name.replace(':', '-')}.pt")
    deep_arms = [a for a in external if "/" not in a]
    with _reading(prep):
        comparisons = (_compare_arms(cfg, data_root, index, models, deep_arms)
                       if deployment is None else deployed_comparisons)
    shutil.rmtree(work / "arms", ignore_errors=True)
    primary = arms[0] if arms else (baselines[0].name if baselines else None)
    if primary:
        shutil.copyfile(models / f"{primary.replace(':', '-')}.pt", work / "model.pt")
    timing["total_s"] = time.monotonic() - t_start
    metrics = {
        "task": task,
        "run_name": name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "model": {"profile": cfg["model"]["profile"], "file": "model.pt", "arm": primary},
        "external_site": fed["external_site"],
        "threshold_rule": (
            "Youden (max sensitivity + specificity) on pooled training-site "
            f"'{cfg['evaluation']['threshold_split']}' predictions, from summed histograms on a "
            f"{cfg['evaluation']['histogram_bins']}-bin probability grid"
        ),
        "external": external,
        "comparisons": comparisons,
        "cross_site": cross_site_matrix(
            deep_arms, list(fed["training_sites"]), str(fed["external_site"]), validation,
            {b.name: b.cross_site for b in baselines}, external),
        "internal_vs_external": {arm: internal_vs_external(validation.get(arm), external[arm])
                                 for arm in deep_arms},
        "components": components,
        "validation": validation,
        "sites": sites,
        "rejected_replies": rejections,
        "federated": federated,
        "privacy": _privacy_summary(cfg, history, arm_results),
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
    }
    write_json(work / "metrics.json", metrics)
    with (work / "history.jsonl").open("w") as fh:
        for line in history:
            fh.write(json.dumps(clean(line), allow_nan=False) + "\n")
    if cfg.get("report", True):
        from hcc_fl.server.report import write_report

        write_report(work)
    shutil.rmtree(work / "app", ignore_errors=True)
    if final.exists():
        backup = runs_dir / f".{name}.old"
        shutil.rmtree(backup, ignore_errors=True)
        final.rename(backup)
        work.rename(final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        work.rename(final)
    return final


def format_table(metrics: dict[str, Any]) -> str:
    """The external-site table printed at the end of a run."""
    ext = metrics["external"]
    first: dict[str, Any] = next(iter(ext.values()), {}) if ext else {}
    lines = [
        f"External site {metrics['external_site']}: n={first.get('n')}, "
        f"cases={first.get('n_pos')}  (task {metrics['task']})",
        f"Threshold: {metrics['threshold_rule']}",
        "",
        f"{'arm':<22}{'AUC':>7}  {'95% CI (DeLong)':<16}{'thr':>7}{'sens':>7}{'spec':>7}"
        f"{'acc':>7}{'PPV':>7}{'NPV':>7}",
    ]

    def f(x: Any) -> str:
        return "   n/a" if x is None else f"{x:7.3f}"

    for arm, s in ext.items():
        ci = s.get("auc_ci")
        ci_s = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and None not in ci else "n/a"
        lines.append(
            f"{arm:<22}{f(s.get('auc'))}  {ci_s:<16}{f(s.get('threshold'))}"
            f"{f(s.get('sensitivity'))}{f(s.get('specificity'))}{f(s.get('accuracy'))}"
            f"{f(s.get('ppv'))}{f(s.get('npv'))}"
        )
    return "\n".join(lines)


def summarise_run(run_dir: Path) -> str:
    """The table and run-directory line printed by ``simulate`` and ``hcc-fl-server``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return f"\n{format_table(metrics)}\n\nrun directory: {run_dir}"
