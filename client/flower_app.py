"""Flower ClientApp of a site: the only client module that imports ``flwr``.

Handlers unpack the message, call plain training/evaluation code and pack aggregate results.
A site resolves its data from its own node config (deployment: ``manifest``, ``site``, ``role``)
or, in simulation, from ``partition-id`` and the phantom's ``manifest_index.json``. Errors sent
back to the coordinator carry no file paths or values: details stay in the site's log.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from hcc_fl.client import timing
from hcc_fl.client.components import (
    SiteScorer,
    deep_model_extras,
    external_components,
    site_tabular,
)
from hcc_fl.client.data import SiteData, load_site, use_prep_cache
from hcc_fl.client.decode_check import SizeLimits, use_limits
from hcc_fl.client.disclosure import ReleasePolicy
from hcc_fl.client.evaluate import ssl_validation, validation_metrics
from hcc_fl.client.manifest import allow_roots
from hcc_fl.client.privacy import (
    PrivacyConfig,
    PrivacyLedger,
    RunAccountant,
    dp_train_round,
    noise_for_target,
    planned_steps,
)
from hcc_fl.client.secagg import (
    Identity,
    ProtocolError,
    SecAggConfig,
    SiteState,
    StateStore,
    run_hash,
    site_masked,
    site_setup,
    site_share,
    site_sign_survivors,
    site_unmask,
)
from hcc_fl.client.statistics import (
    compare_models,
    recalibration_sums,
    validation_placements_prob,
    validation_sums_prob,
)
from hcc_fl.client.train import TrainConfig, resolve_device, train_one_round
from hcc_fl.shared import records as R
from hcc_fl.shared.audit import AuditLog, metric_names, payload_bytes
from hcc_fl.shared.components import TabularState, TaskComponents
from hcc_fl.shared.errors import DataError
from hcc_fl.shared.evaluation import threshold_splits
from hcc_fl.shared.metrics.pooled import ScoreGrid
from hcc_fl.shared.metrics.recalibration import Recalibration
from hcc_fl.shared.models import build_model, build_ssl_model
from hcc_fl.shared.normstate import SiteNormStore, norm_keys, recompute_statistics
from hcc_fl.shared.version import code_version
from hcc_fl.shared.wire import (
    array_view,
    fingerprint,
    is_packed,
    layout_of,
    pack,
    unpack,
    wire_dtype,
)

log = logging.getLogger("hcc_fl.site")
app = ClientApp()


@dataclass(frozen=True)
class SiteContext:
    """Who this site is and where its manifest lies (resolved at the site)."""

    name: str
    role: str
    manifest: Path


def resolve_site(context: Context) -> SiteContext:
    """Resolve the site from the node config (deployment) or the partition id (simulation)."""
    nc = context.node_config
    if "manifest" in nc:
        return SiteContext(str(nc["site"]), str(nc.get("role", R.ROLE_TRAIN)),
                           Path(str(nc["manifest"])))
    rc = context.run_config
    order = [*str(rc["training-sites"]).split(","), str(rc["external-site"])]
    pid = int(nc["partition-id"])
    name = order[pid]
    root = Path(str(rc["data-root"]))
    index = json.loads((root / "manifest_index.json").read_text())
    entry = index["sites"][name]
    return SiteContext(name, str(entry["role"]), root / str(entry["manifest"]))


def _names(content: RecordDict) -> list[str]:
    return metric_names([*content.metric_records.values(), *content.config_records.values()])


def _audit(context: Context) -> AuditLog:
    """The site's audit log (deployment: node config ``audit``; simulation: none)."""
    nc = context.node_config
    return AuditLog(str(nc["audit"]) if nc.get("audit") else None, str(nc.get("site", "site")))


def _site_limits(context: Context) -> None:
    """Apply SITE.yaml's decode limit and allowed roots (node config; simulation: defaults),
    and read the site's images through its preparation cache (:func:`prep_cache_folder`)."""
    nc = context.node_config
    use_limits(SizeLimits.from_mb(float(cast(Any, nc["max-image-mb"]))
                                  if "max-image-mb" in nc else None))
    roots = str(nc.get("allowed-roots", "") or "")
    allow_roots([Path(r) for r in roots.split(os.pathsep) if r])
    use_prep_cache(prep_cache_folder(context))


def prep_cache_folder(context: Context) -> Path | None:
    """The site's preparation cache: ``<state>/prepcache`` in deployment (where
    ``hcc-fl-client prepare`` writes it), the run config's ``prep-cache`` in simulation (one
    folder under the data root, :func:`hcc_fl.server.simulate.prep_cache_dir`), else none."""
    nc, rc = context.node_config, context.run_config
    if nc.get("state"):
        return Path(str(nc["state"])) / "prepcache"
    folder = str(rc.get("prep-cache", "") or "")
    return Path(folder) if folder else None


def _guarded(kind: str) -> Callable[[Callable[[Message, Context], Message]],
                                    Callable[[Message, Context], Message]]:
    """Audit every message; log failures at the site; send the coordinator only a path-free
    summary of a failure."""

    def wrap(fn: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        @functools.wraps(fn)
        def inner(msg: Message, context: Context) -> Message:
            timing.note(kind=kind, site=str(context.node_config.get("site", "")))
            _site_limits(context)
            timing.mark("handler-start")
            torch.set_num_threads(max(1, int(_num(context.run_config, "client-threads", 1))))
            audit = _audit(context)
            cfg = msg.content.config_records.get(R.CONFIG)
            rnd = int(_num(cfg, "server-round", 0)) if cfg is not None else None
            run = int(context.run_id)
            audit.record("received", run=run, round=rnd or None, type=kind, peer="coordinator",
                         bytes=payload_bytes(msg.content), metrics=_names(msg.content))

            def refused(decision: str) -> None:
                audit.record("sent", run=run, round=rnd or None, type=kind,
                             peer="coordinator", bytes=0, decision=decision)

            try:
                reply = fn(msg, context)
            except DataError as exc:
                log.error("%s failed on site data (%d problem(s)):\n  %s", kind,
                          len(exc.issues), "\n  ".join(str(i) for i in exc.issues))
                refused(f"failed: site data check: {exc.summary()}")
                raise RuntimeError(
                    f"{kind}: site data check failed: {exc.summary()}; the site's log names "
                    "each file, line and column (`hcc-fl-client check-data` lists them too)"
                ) from None
            except PermissionError as exc:
                log.warning("%s refused: %s", kind, exc)
                refused(f"refused: {exc}")
                raise PermissionError(str(exc)) from None
            except Exception as exc:
                log.exception("%s failed at the site", kind)
                refused(f"failed: {type(exc).__name__}")
                raise RuntimeError(
                    f"{kind}: {type(exc).__name__} at the site; details are in the site's log"
                ) from None
            audit.record("sent", run=run, round=rnd or None, type=kind, peer="coordinator",
                         bytes=payload_bytes(reply.content), metrics=_names(reply.content),
                         decision="replied")
            timing.mark("handler-end")
            return reply

        return inner

    return wrap


def _num(record: Any, key: str, default: float | None = None) -> float:
    """A numeric value of a Flower record or config (they are loosely typed)."""
    value = record.get(key, default) if default is not None else record[key]
    return float(cast(Any, value))


def _stage(msg: Message) -> str:
    """``ssl`` during a task's self-supervised stage, else ``supervised``."""
    cfg = msg.content.config_records.get(R.CONFIG)
    return str(cfg.get("stage", "supervised")) if cfg is not None else "supervised"


def _fedbn_site(msg: Message, context: Context) -> bool:
    """Whether this message's model keeps this site's own normalisation state: a FedBN arm,
    its supervised stage (the self-supervised stage averages everything), a training site."""
    return (bool(int(_num(context.run_config, R.RC_FEDBN, 0))) and _stage(msg) != "ssl"
            and resolve_site(context).role == R.ROLE_TRAIN)


def _norm_store(context: Context, site: SiteContext) -> SiteNormStore:
    """FedBN: this site's normalisation state of this run (its state folder; simulation: the
    site's folder under the run directory)."""
    key = str(context.run_config["run-key"]).replace("/", "__")
    return SiteNormStore(_site_state(context, site) / "fedbn" / key)


def _received_keys(arrays: ArrayRecord, model: torch.nn.Module) -> list[str]:
    """The model entries a record carries: all of them, or (FedBN) all but the normalisation
    layers' (per tensor: by name; packed: by the layout fingerprint)."""
    full = model.state_dict()
    local = set(norm_keys(model))
    shared = [k for k in full if k not in local]
    if is_packed(arrays.keys()):
        theirs = {str(k).rsplit(".", 1)[-1] for k in arrays}
        if local and theirs == {fingerprint(layout_of({k: full[k] for k in shared}))}:
            return shared
        return list(full)  # unpack names both fingerprints if this one does not fit either
    return shared if local and set(arrays.keys()) == set(shared) else list(full)


def _own_norm_state(msg: Message, context: Context, model: torch.nn.Module,
                    received: dict[str, torch.Tensor], training: bool
                    ) -> dict[str, torch.Tensor]:
    """FedBN: the normalisation state this site uses: its own, saved after its last training
    round (before this round for a training message, so a round repeated after a resume
    starts where it started first); without one, the message's ``norm-init`` record (the
    arm's start), else the normalisation entries the message carries."""
    keys = norm_keys(model)
    cfg = msg.content.config_records.get(R.CONFIG)
    rnd = int(_num(cfg, "server-round", 0)) if cfg is not None else 0
    own = _norm_store(context, resolve_site(context)).latest(
        before=rnd if training and rnd > 0 else None)
    if own is None and R.NORM_INIT in msg.content.array_records:
        if training and rnd > 1:  # e.g. a site that missed round 1, or lost its state folder
            log.warning("FedBN: no normalisation state of this site before round %d; starting "
                        "from the arm's initial one", rnd)
        own = cast(ArrayRecord, msg.content[R.NORM_INIT]).to_torch_state_dict()
    if own is None and all(k in received for k in keys):
        own = {k: received[k] for k in keys}
    if own is None or set(own) != set(keys):
        raise ValueError("FedBN: no normalisation state of this model at this site or in the "
                         "message")
    return {k: own[k] for k in keys}


def _model(msg: Message, context: Context, name: str = R.ARRAYS, training: bool = False
           ) -> torch.nn.Module:
    """The model in the message's ArrayRecord ``name`` (packed or per tensor); at a FedBN
    training site with this site's own normalisation state in place of whatever the message
    holds for it."""
    rc = context.run_config
    build = build_ssl_model if _stage(msg) == "ssl" else build_model
    model = build(str(rc["task"]), str(rc["profile"]))
    arrays = cast(ArrayRecord, msg.content[name])
    state: dict[str, torch.Tensor]
    if is_packed(arrays.keys()):  # one array per dtype (shared/wire.py)
        template = model.state_dict()
        layout = layout_of({k: template[k] for k in _received_keys(arrays, model)})
        unpacked = unpack({k: array_view(v) for k, v in arrays.items()}, layout)
        state = {k: torch.from_numpy(np.array(v)) for k, v in unpacked.items()}
    else:
        state = dict(arrays.to_torch_state_dict())
    if _fedbn_site(msg, context):
        state.update(_own_norm_state(msg, context, model, state, training))
    model.load_state_dict(state)  # strict: a record without the normalisation entries needs them
    return model


def _save_norm_state(msg: Message, context: Context, model: torch.nn.Module) -> None:
    """FedBN: keep the trained normalisation state at this site (atomic, 0600), per round."""
    if not _fedbn_site(msg, context):
        return
    cfg = msg.content[R.CONFIG]
    state = model.state_dict()
    _norm_store(context, resolve_site(context)).save(
        int(_num(cfg, "server-round", 0)), {k: state[k] for k in norm_keys(model)})


def _reply_state(msg: Message, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained entries that go back: those the coordinator sent (FedBN: without the
    normalisation layers, which stay here)."""
    state = model.state_dict()
    return {k: state[k] for k in _received_keys(cast(ArrayRecord, msg.content[R.ARRAYS]), model)}


def _reply_arrays(msg: Message, model: torch.nn.Module) -> ArrayRecord:
    """The trained model in the encoding the coordinator sent (packed fp32/fp16 or per tensor)."""
    received = cast(ArrayRecord, msg.content[R.ARRAYS])
    state = _reply_state(msg, model)
    if not is_packed(received.keys()):
        return ArrayRecord(state)
    transfer = wire_dtype(received.keys(), {k: array_view(v) for k, v in received.items()})
    packed = pack({k: v.detach().cpu().numpy() for k, v in state.items()}, transfer)
    return ArrayRecord({k: Array(v) for k, v in packed.items()})


def _load(site: SiteContext, context: Context, splits: tuple[str, ...]) -> SiteData:
    rc = context.run_config
    approved = context.node_config.get("task")
    if approved and str(approved) != str(rc["task"]):
        raise PermissionError(f"site {site.name} is approved for task {approved}; the "
                              f"coordinator asked for {rc['task']}")
    return load_site(site.manifest, str(rc["task"]), str(rc["profile"]), splits)


@app.query(R.ACTION_SITE_INFO)
@_guarded("site-info")
def site_info(msg: Message, context: Context) -> Message:
    """Report the site's name, role, cohort sizes and code version (no patient data)."""
    site = resolve_site(context)
    n_train = n_val = n_test = 0
    if site.role == R.ROLE_TRAIN:
        n_train = len(_load(site, context, ("train",)))
        n_val = len(_load(site, context, ("val",)))
    else:
        n_test = len(_load(site, context, ("test",)))
    info = ConfigRecord({"site": site.name, "role": site.role, "code-version": code_version(),
                         "manifest-sha256": _load(site, context, ("train",) if site.role ==
                                                  R.ROLE_TRAIN else ("test",)).manifest_sha256})
    counts = MetricRecord({"n-train": n_train, "n-val": n_val, "n-test": n_test})
    return Message(RecordDict({R.INFO: info, R.METRICS: counts}), reply_to=msg)


def _privacy(context: Context, site: SiteContext) -> tuple[PrivacyConfig, Path, float | None]:
    """The run's privacy settings, this site's privacy folder and its total budget."""
    rc, nc = context.run_config, context.node_config

    def opt(key: str) -> float | None:
        value = float(cast(Any, rc.get(key, -1.0)))
        return None if value < 0 else value

    cfg = PrivacyConfig.from_dict({
        "mode": str(rc.get("privacy-mode", "none")),
        "target_epsilon": opt("privacy-target-epsilon"),
        "noise_multiplier": opt("privacy-noise-multiplier"), "delta": opt("privacy-delta"),
        "max_grad_norm": opt("privacy-max-grad-norm") or 1.0,
        "sample_rate": opt("privacy-sample-rate"),
        "grad_sample_mode": str(rc.get("privacy-grad-sample-mode", "hooks")),
    })
    deployed = bool(nc.get("state"))
    budget = float(cast(Any, nc.get("privacy-budget", -1.0) if deployed
                        else rc.get("privacy-site-budget", -1.0)))
    folder = _site_state(context, site)  # simulation: already the site's privacy folder
    return cfg, folder / "privacy" if deployed else folder, (None if budget < 0 else budget)


def _site_state(context: Context, site: SiteContext) -> Path:
    """The site's own state folder (deployment: ``hcc-fl-client``'s; simulation: a folder per
    site inside the run directory)."""
    nc = context.node_config
    if nc.get("state"):
        return Path(str(nc["state"]))
    return Path(str(context.run_config["privacy-dir"])) / site.name


def _train_dp(model: torch.nn.Module, data: SiteData, site: SiteContext, context: Context,
              tc: TrainConfig, server_round: int) -> tuple[float, int, float, float]:
    """One DP-SGD round; returns (loss, n, epsilon spent by this run so far, delta)."""
    cfg, folder, budget = _privacy(context, site)
    rc = context.run_config
    n = len(data)
    q = cfg.rate_for(n, tc.batch_size)
    delta = cfg.delta_for(n)
    steps = planned_steps(n, q, tc.epochs, int(_num(rc, "rounds")))
    sigma = (cfg.noise_multiplier if cfg.noise_multiplier is not None
             else noise_for_target(float(cfg.target_epsilon or 0), delta, q, steps))
    run = str(rc["run-key"])
    planned = RunAccountant(folder / "unused")
    planned.add(sigma, q, steps)
    ledger = PrivacyLedger(folder / "ledger.json", budget)
    ledger.reserve(data.manifest_sha256, run, planned.epsilon(delta), delta)  # or refuse
    acc_path = folder / "runs" / (run.replace("/", "__") + ".json")
    acc = RunAccountant.load(acc_path)
    n_pos = float(data.label.sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor([(n - n_pos) / max(n_pos, 1.0)]))
    gen = torch.Generator().manual_seed(tc.seed + 7)

    def batch(idx: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        video = data.video[idx]
        if tc.augment:
            flip = (torch.rand(len(idx), generator=gen) < 0.5).view(
                -1, *([1] * (video.dim() - 1)))
            video = torch.where(flip, video.flip(-1), video)
            video = video + torch.randn(video.shape, generator=gen) * 0.05
        return (video, data.clinical[idx]), data.label[idx]

    out = dp_train_round(model, n, batch, loss_fn, epochs=tc.epochs, lr=tc.lr,
                         weight_decay=tc.weight_decay, noise_multiplier=sigma,
                         max_grad_norm=cfg.max_grad_norm, sample_rate=q, seed=tc.seed,
                         proximal_mu=tc.proximal_mu, device=resolve_device(tc.device),
                         grad_sample_mode=cfg.grad_sample_mode)
    acc.add(out.noise_multiplier, out.sample_rate, out.steps)
    acc.rounds_done.append(server_round)
    acc.save()
    eps = acc.epsilon(delta)
    ledger.record(data.manifest_sha256, run, eps)
    log.info("site %s round %d: DP-SGD sigma %.3f, q %.3f, %d steps; epsilon so far %.3f "
             "(delta %.2g)", site.name, server_round, sigma, q, out.steps, eps, delta)
    return out.loss, out.n_examples, eps, delta


Metrics = dict[str, int | float | list[int] | list[float]]


def _local_projector(model: torch.nn.Module, context: Context, site: SiteContext
                     ) -> Callable[[torch.nn.Module], None]:
    """``task.ssl.projector: local``: this site's own projector head replaces the one the
    coordinator sent (from the site's state folder, once it exists); returns the function that
    saves it again after training. The coordinator still averages what comes back, but no site
    uses that average."""
    path = (_site_state(context, site) / "ssl" /
            (str(context.run_config["run-key"]).replace("/", "__") + "-projector.pt"))
    projector = cast(torch.nn.Module, model.projector)
    if path.is_file():
        projector.load_state_dict(torch.load(path))

    def save(trained: torch.nn.Module) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(cast(torch.nn.Module, trained.projector).state_dict(), tmp)
        tmp.replace(path)

    return save


def _train_local(msg: Message, context: Context) -> tuple[torch.nn.Module, Metrics]:
    """Train the received global model at this site; returns the model and the metrics."""
    site = resolve_site(context)
    if site.role != R.ROLE_TRAIN:
        log.warning("site %s is evaluation-only: training message refused", site.name)
        raise PermissionError(f"site {site.name} is evaluation-only: training refused")
    rc = context.run_config
    cfg = msg.content[R.CONFIG]
    model = _model(msg, context, training=True)
    timing.mark("model-built")
    ssl = _stage(msg) == "ssl"  # self-supervised: the unlabelled train and val patches
    data = _load(site, context, ("train", "val") if ssl else ("train",))
    timing.mark("data-loaded")
    server_round = int(_num(cfg, "server-round", 0))
    tc = TrainConfig(
        epochs=int(_num(cfg, "local-epochs")),
        batch_size=int(_num(cfg, "batch-size")),
        lr=_num(cfg, "lr"),
        weight_decay=_num(cfg, "weight-decay"),
        proximal_mu=_num(cfg, "proximal-mu", 0.0),
        seed=int(_num(rc, "seed")) * 100003 + server_round * 101
        + zlib.crc32(site.name.encode()),
        device=str(rc.get("device", "cpu")),
        objective=str(cfg.get("objective", "bce")),
        freeze_encoder=bool(int(_num(cfg, "freeze-encoder", 0))),
    )
    values: Metrics
    if str(rc.get("privacy-mode", "none")) == "dp":
        loss, n, eps, delta = _train_dp(model, data, site, context, tc, server_round)
        values = {"train-loss": loss, R.NUM_EXAMPLES: n, "dp-epsilon": eps, "dp-delta": delta}
    else:
        keep = _local_projector(model, context, site) if ssl and int(
            _num(cfg, "projector-local", 0)) else None
        first = [True]

        def on_step(_loss: float) -> None:
            if first[0]:
                timing.mark("first-step")
                first[0] = False

        outcome = train_one_round(model, data, tc, on_step=on_step)
        timing.mark("trained")
        if keep is not None:
            keep(model)
        values = {"train-loss": outcome.loss, R.NUM_EXAMPLES: outcome.n_examples}
        if str(rc.get("privacy-mode", "none")) == "central-dp":
            values["unit-weight"] = 1.0  # central DP averages the sites with equal weights
    _save_norm_state(msg, context, model)
    return model, values


@app.train()
@_guarded("train")
def train(msg: Message, context: Context) -> Message:
    """Train the received global model for the configured local epochs on the train split
    (with DP-SGD when the run's privacy mode is ``dp``)."""
    model, values = _train_local(msg, context)
    return Message(
        RecordDict({R.ARRAYS: _reply_arrays(msg, model), R.METRICS: MetricRecord(values)}),
        reply_to=msg,
    )


# --- secure aggregation (SecAgg+, see client/secagg.py) ---------------------------------------
SECAGG_PURPOSES = ("train", "validation_sums", "validation_placements")


def _secagg_where(context: Context, msg: Message) -> tuple[StateStore, str, str, int]:
    """The site's state store of this run, the run binding, the tag and the round."""
    cfg = msg.content[R.CONFIG]
    run = run_hash(str(context.run_config["run-key"]), int(context.run_id))
    store = StateStore(_site_state(context, resolve_site(context)), run)
    return store, run, str(cfg.get(R.SA_TAG, "")), int(_num(cfg, "server-round", 0))


def _secagg_load(context: Context, msg: Message, stage: str) -> tuple[SiteState, Path]:
    store, run, tag, rnd = _secagg_where(context, msg)
    path = store.path(tag)
    state = SiteState.load(path)
    try:
        state.expect(stage, run, tag, rnd)
    except ProtocolError:
        path.unlink(missing_ok=True)  # a protocol violation aborts the tag at this site
        raise
    return state, path


def _secagg_identity(context: Context, site: SiteContext) -> tuple[Identity, int]:
    """This site's identity key and its peers' public keys, and its minimum number of sites:
    deployment: node config (SITE.yaml ``secagg_peers``, the site's ``private_key``);
    simulation: the harness's key folder (run config), one key per simulated site."""
    nc, rc = context.node_config, context.run_config
    if nc.get(R.NC_SECAGG_PEERS) and nc.get(R.NC_SECAGG_KEY):
        return (Identity.load(site.name, Path(str(nc[R.NC_SECAGG_KEY])),
                              Path(str(nc[R.NC_SECAGG_PEERS]))),
                int(_num(nc, R.NC_SECAGG_MIN_SITES, 2)))
    if "manifest" not in nc and rc.get(R.RC_SECAGG_KEYS):  # simulation only
        folder = Path(str(rc[R.RC_SECAGG_KEYS]))
        return (Identity.load(site.name, folder / f"{site.name}.key", folder),
                int(_num(rc, R.RC_SECAGG_MIN_SITES, 2)))
    raise PermissionError("secure aggregation needs this site's signing key and its peers' "
                          "public keys (SITE.yaml secagg_peers)")


def _refuse_on_violation(fn: Callable[[Message, Context], Message]
                         ) -> Callable[[Message, Context], Message]:
    """A protocol violation by the coordinator is a refusal (audited and logged at the site by
    ``_guarded``; the reply names the check that failed, nothing secret)."""

    @functools.wraps(fn)
    def inner(msg: Message, context: Context) -> Message:
        try:
            return fn(msg, context)
        except ProtocolError as exc:
            raise PermissionError(str(exc)) from None
    return inner


@app.query(R.ACTION_SECAGG_SETUP)
@_guarded("secagg-setup")
@_refuse_on_violation
def secagg_setup(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 1: check and fix the settings; this tag's key pairs; the public halves
    go back signed with the site's identity key."""
    site = resolve_site(context)
    if site.role != R.ROLE_TRAIN:
        raise PermissionError("secure aggregation is for training sites")
    ident, min_sites = _secagg_identity(context, site)
    store, run, tag, rnd = _secagg_where(context, msg)
    if tag not in {f"{p}-{rnd}" for p in SECAGG_PURPOSES}:  # one sum per purpose and round
        raise ProtocolError(f"secagg: malformed tag {tag[:80]!r} for round {rnd}")
    path = store.begin(tag)
    cfg = SecAggConfig.from_json(str(msg.content[R.CONFIG][R.SA_CONFIG]))
    state, public = site_setup(ident, int(context.node_id), run, tag, rnd, cfg, min_sites)
    state.save(path)
    return Message(RecordDict({R.INFO: ConfigRecord(dict(public.items()))}), reply_to=msg)


@app.query(R.ACTION_SECAGG_SHARE)
@_guarded("secagg-share")
@_refuse_on_violation
def secagg_share(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 2: verify the peers' signed keys; encrypted Shamir shares of the
    self-mask seed and the mask key."""
    state, path = _secagg_load(context, msg, "setup")
    ident, _ = _secagg_identity(context, resolve_site(context))
    adverts = {int(k): v for k, v in
               json.loads(str(msg.content[R.CONFIG][R.SA_PUBLIC])).items()}
    try:
        out = site_share(state, ident, adverts)
    except ProtocolError:
        path.unlink(missing_ok=True)
        raise
    state.save(path)
    cts = {str(k): base64.b64encode(v).decode() for k, v in out.items()}
    return Message(RecordDict({R.INFO: ConfigRecord({R.SA_CIPHERTEXTS: json.dumps(cts)})}),
                   reply_to=msg)


@app.query(R.ACTION_SECAGG_MASKED)
@_guarded("secagg-masked")
@_refuse_on_violation
def secagg_masked(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 3: compute this site's contribution (``secagg-purpose``: ``train`` = the
    trained weights, weighted by the site's patients; ``validation_sums`` /
    ``validation_placements`` = the pooled-validation sums, scaled by ``secagg-bound``), and
    send only its masked, quantised form. The settings are those fixed at set-up."""
    state, path = _secagg_load(context, msg, "shared")
    cfg = msg.content[R.CONFIG]
    sa = state.cfg
    purpose = str(cfg.get(R.SA_PURPOSE, "train"))
    if state.tag != f"{purpose}-{state.round}":
        path.unlink(missing_ok=True)
        raise ProtocolError(f"secagg: purpose {purpose[:40]!r} is not that of {state.tag}")
    values: Metrics
    if purpose == "train":
        model, values = _train_local(msg, context)
        params = [v.detach().cpu().numpy() for v in _reply_state(msg, model).values()]
        weight = float(cast(Any, values[R.NUM_EXAMPLES]))
    else:
        params = [_validation_vector(msg, context, purpose) / _num(cfg, R.SA_BOUND)]
        values, weight = {R.NUM_EXAMPLES: 1}, sa.max_weight
    inbox = {int(k): base64.b64decode(v) for k, v in
             json.loads(str(cfg[R.SA_INBOX])).items()}
    try:
        masked = site_masked(state, inbox, params, weight)
    except ProtocolError:
        path.unlink(missing_ok=True)
        raise
    state.save(path)
    return Message(RecordDict({R.ARRAYS: ArrayRecord(masked), R.METRICS: MetricRecord(values)}),
                   reply_to=msg)


@app.query(R.ACTION_SECAGG_CONSISTENCY)
@_guarded("secagg-consistency")
@_refuse_on_violation
def secagg_consistency(msg: Message, context: Context) -> Message:
    """SecAgg+ consistency check: sign the survivor list (once per tag) after checking it."""
    state, path = _secagg_load(context, msg, "masked")
    ident, _ = _secagg_identity(context, resolve_site(context))
    try:
        sig = site_sign_survivors(state, ident,
                                  json.loads(str(msg.content[R.CONFIG][R.SA_SURVIVORS])))
    except ProtocolError:
        path.unlink(missing_ok=True)
        raise
    state.save(path)
    return Message(RecordDict({R.INFO: ConfigRecord({R.SA_SIG: sig})}), reply_to=msg)


def _validation_vector(msg: Message, context: Context, purpose: str) -> np.ndarray:
    """The pass-1 or pass-2 pooled-validation sums of this site as one flat vector."""
    site = resolve_site(context)
    if site.role != R.ROLE_TRAIN:
        raise PermissionError(f"site {site.name} is external: it takes no part in validation")
    rc = context.run_config
    y, prob = _component_probs(msg, context, site, threshold_splits(str(rc["threshold-split"])))
    if purpose == "validation_sums":
        sums = validation_sums_prob(y, prob, _grid(context), _policy(context))
        return np.concatenate([sums["pos"], sums["neg"], sums["calibration"].ravel(),
                               [sums["n"], sums["n_pos"], sums["loss"] * sums["n"]]])
    if purpose == "validation_placements":
        pooled = cast(MetricRecord, msg.content[R.METRICS])
        hist = (np.asarray(pooled["pos"], dtype=np.float64),
                np.asarray(pooled["neg"], dtype=np.float64))
        return validation_placements_prob(y, prob, hist, _grid(context), _policy(context))
    raise ValueError(f"unknown secure-aggregation purpose '{purpose}'")


@app.query(R.ACTION_SECAGG_UNMASK)
@_guarded("secagg-unmask")
@_refuse_on_violation
def secagg_unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 5: shares of the survivors' seeds and the dropped sites' mask keys, once
    the threshold of survivors signed the same survivor list. The state is deleted either
    way."""
    state, path = _secagg_load(context, msg, "signed")
    ident, _ = _secagg_identity(context, resolve_site(context))
    cfg = msg.content[R.CONFIG]
    try:
        shares = site_unmask(state, ident, json.loads(str(cfg[R.SA_SURVIVORS])),
                             json.loads(str(cfg[R.SA_DROPPED])),
                             {int(k): str(v) for k, v in
                              json.loads(str(cfg[R.SA_SIGNATURES])).items()})
    finally:
        path.unlink(missing_ok=True)  # this tag's secrets are no longer needed
    out = {str(k): [kind, base64.b64encode(v).decode()] for k, (kind, v) in shares.items()}
    return Message(RecordDict({R.INFO: ConfigRecord({R.SA_SHARES: json.dumps(out)})}),
                   reply_to=msg)


@app.evaluate()
@_guarded("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    """Validation loss and AUC of the global model on the site's val split."""
    site = resolve_site(context)
    if site.role != R.ROLE_TRAIN:
        raise PermissionError(f"site {site.name} is external: per-round validation refused")
    model = _model(msg, context)
    timing.mark("model-built")
    data = _load(site, context, ("val",))
    timing.mark("data-loaded")
    if _stage(msg) == "ssl":
        m = ssl_validation(model, data, int(_num(context.run_config, "seed")))
    else:
        m = validation_metrics(model, data, str(context.run_config["device"]))
    if str(context.run_config.get("privacy-mode", "none")) == "central-dp":
        m["unit-weight"] = 1.0  # the strategy's weighting key under central DP
    return Message(RecordDict({R.METRICS: MetricRecord(m)}), reply_to=msg)


def _policy(context: Context) -> ReleasePolicy:
    """The site's release policy: from SITE.yaml (node config) in a deployment, where the
    coordinator cannot change it; from the run config in simulation (the same for every site)."""
    nc = context.node_config
    return ReleasePolicy.from_config(nc if "manifest" in nc else context.run_config)


def _grid(context: Context) -> ScoreGrid:
    return ScoreGrid(int(_num(context.run_config, "histogram-bins")))


@app.query(R.ACTION_VALIDATION)
@_guarded("validation-sums")
def validation_pass1(msg: Message, context: Context) -> Message:
    """Pass 1: class-wise histograms and calibration sums of the val split on the agreed grid,
    and the site's own AUC (for the pooled threshold, calibration and AUC)."""
    site = resolve_site(context)
    if site.role != R.ROLE_TRAIN:
        raise PermissionError(f"site {site.name} is external: its data never sets thresholds")
    rc = context.run_config
    y, prob = _component_probs(msg, context, site, threshold_splits(str(rc["threshold-split"])))
    sums = validation_sums_prob(y, prob, _grid(context), _policy(context))
    auc_lo, auc_hi = sums["auc_ci"] or (math.nan, math.nan)
    cells = sums["cells"]
    released = ({} if cells is None else
                {R.CELL_STARTS: list(cells.starts), R.CELL_CANDIDATES: cells.n_candidates})
    metrics = MetricRecord({**released,
        "pos": sums["pos"].tolist(), "neg": sums["neg"].tolist(),
        "calibration": sums["calibration"].ravel().tolist(),
        "n": sums["n"], "n-pos": sums["n_pos"], "loss": sums["loss"],
        "auc": math.nan if sums["auc"] is None else sums["auc"],
        "auc-lower": auc_lo, "auc-upper": auc_hi,
    })
    return Message(RecordDict({R.METRICS: metrics}), reply_to=msg)


@app.query(R.ACTION_PLACEMENTS)
@_guarded("validation-placements")
def validation_pass2(msg: Message, context: Context) -> Message:
    """Pass 2: placement-value sums of the site's own patients against the pooled histograms."""
    site = resolve_site(context)
    if site.role != R.ROLE_TRAIN:
        raise PermissionError(f"site {site.name} is external: it takes no part in validation")
    rc = context.run_config
    y, prob = _component_probs(msg, context, site, threshold_splits(str(rc["threshold-split"])))
    pooled = cast(MetricRecord, msg.content[R.METRICS])
    hist = (np.asarray(pooled["pos"], dtype=np.float64),
            np.asarray(pooled["neg"], dtype=np.float64))
    vec = validation_placements_prob(y, prob, hist, _grid(context), _policy(context))
    return Message(RecordDict({R.METRICS: MetricRecord({"sums": vec.tolist()})}), reply_to=msg)


@app.query(R.ACTION_RECALIBRATION)
@_guarded("recalibration-sums")
def recalibration_step(msg: Message, context: Context) -> Message:
    """One Newton step of the federated recalibration: the site's count, score, information and
    log-likelihood of ``y ~ intercept + slope * logit(p)`` at the coordinator's point, on the
    same rows as the pooled validation (7 numbers)."""
    site = resolve_site(context)
    if site.role != R.ROLE_TRAIN:
        raise PermissionError(f"site {site.name} is external: its data never sets calibration")
    cfg = msg.content[R.CONFIG]
    coef = (_num(cfg, R.RECAL_INTERCEPT), _num(cfg, R.RECAL_SLOPE))
    if not all(math.isfinite(c) and abs(c) <= 1e6 for c in coef):
        raise ValueError("recalibration point out of range")
    rc = context.run_config
    y, prob = _component_probs(msg, context, site, threshold_splits(str(rc["threshold-split"])))
    return Message(RecordDict({R.METRICS: MetricRecord(
        {"sums": recalibration_sums(y, prob, coef, _policy(context))})}), reply_to=msg)


@app.query(R.ACTION_EXTERNAL)
@_guarded("external-eval")
def external_eval(msg: Message, context: Context) -> Message:
    """Evaluate the final model on the external cohort; only aggregate statistics return."""
    site = resolve_site(context)
    if site.role != R.ROLE_EXTERNAL:
        raise PermissionError(f"site {site.name} is a training site, not the external site")
    cfg = msg.content[R.CONFIG]
    scorer = _scorer(msg, context, site)
    thresholds = (json.loads(str(cfg["thresholds"])) if "thresholds" in cfg
                  else {scorer.components.deep: _num(cfg, "threshold")})
    recalibrations = ({scorer.components.deep: Recalibration.from_dict(
        json.loads(str(cfg[R.RECALIBRATION])))} if R.RECALIBRATION in cfg else None)
    data = _load(site, context, ("test",))
    test_time: dict[str, int] | None = None
    if str(cfg.get(R.NORM_STATISTICS, "")) == "site" and scorer.deep is not None:
        test_time = _test_time_statistics(scorer.deep, data, str(context.run_config["device"]))
    out = external_components(scorer, thresholds, data.survival, recalibrations,
                              _policy(context))
    report = dict(out["components"][scorer.components.deep])
    if test_time is not None:
        report["test_time_statistics"] = test_time
    if len(thresholds) > 1 or out["resplit_auc"]:
        report.update(out)
    if scorer.deep is not None:
        report.update(deep_model_extras(scorer.deep, data, str(context.run_config["device"])))
    return Message(
        RecordDict({R.INFO: ConfigRecord({R.REPORT: json.dumps(report)})}), reply_to=msg
    )


def _test_time_statistics(model: torch.nn.Module, data: SiteData, device: str,
                          batch_size: int = 16) -> dict[str, int]:
    """FedBN + external statistics: the model's normalisation running statistics recomputed
    on this site's own test images (no labels; nothing of it leaves the site but the counts
    returned here)."""
    dev = resolve_device(device)
    model.to(dev)
    batches = ((data.video[i:i + batch_size].to(dev), data.clinical[i:i + batch_size].to(dev))
               for i in range(0, len(data), batch_size))
    layers = recompute_statistics(model, batches)
    log.info("test-time normalisation statistics: %d layer(s) recomputed on %d images", layers,
             len(data))
    return {"layers": layers, "n_images": len(data)}


@app.query(R.ACTION_NORM_STATE)
@_guarded("norm-state")
def norm_state(msg: Message, context: Context) -> Message:
    """FedBN, once after the last round: this training site's normalisation state and its
    training examples, for the coordinator's "FedBN + averaged statistics" model."""
    site = resolve_site(context)
    if site.role != R.ROLE_TRAIN:
        raise PermissionError(f"site {site.name} is external: it has no normalisation state")
    if not int(_num(context.run_config, R.RC_FEDBN, 0)):
        raise PermissionError("normalisation state is only sent in a FedBN arm")
    rc = context.run_config
    keys = norm_keys(build_model(str(rc["task"]), str(rc["profile"])))
    own = _norm_store(context, site).latest()
    if own is None or set(own) != set(keys):
        raise ValueError("FedBN: this site holds no normalisation state of this run")
    n = len(_load(site, context, ("train",)))
    return Message(RecordDict({R.ARRAYS: ArrayRecord({k: own[k] for k in keys}),
                               R.METRICS: MetricRecord({R.NUM_EXAMPLES: n})}), reply_to=msg)


@app.query(R.ACTION_COMPARE)
@_guarded("external-compare")
def external_compare(msg: Message, context: Context) -> Message:
    """Paired DeLong tests between the final models of the arms (ArrayRecords ``model-<i>``,
    names in config ``arms``) on the external cohort; only the test statistics return."""
    site = resolve_site(context)
    if site.role != R.ROLE_EXTERNAL:
        raise PermissionError(f"site {site.name} is a training site, not the external site")
    arms = json.loads(str(msg.content[R.CONFIG][R.COMPARE_ARMS]))
    if (not isinstance(arms, list) or not 2 <= len(arms) <= R.MAX_COMPARED
            or len(set(map(str, arms))) != len(arms)):
        raise ValueError(f"external_compare: give 2 to {R.MAX_COMPARED} distinct arm names")
    models = {str(a): _model(msg, context, f"{R.COMPARE_MODEL}{i}") for i, a in enumerate(arms)}
    data = _load(site, context, ("test",))
    for arm in json.loads(str(msg.content[R.CONFIG].get(R.NORM_STATISTICS, "[]"))):
        if str(arm) in models:  # FedBN + external statistics: this site's own, as in external_eval
            _test_time_statistics(models[str(arm)], data, str(context.run_config["device"]))
    out = compare_models(models, data, str(context.run_config["device"]), _policy(context))
    return Message(RecordDict({R.INFO: ConfigRecord({R.REPORT: json.dumps(out)})}),
                   reply_to=msg)


def _scorer(msg: Message, context: Context, site: SiteContext) -> SiteScorer:
    """The task's components as the coordinator sent them: the deep model's weights (when in
    the message), the tabular/stacked models (config ``bundle``) and the component layout
    (config ``components``; default: the deep model alone)."""
    rc = context.run_config
    cfg = msg.content.config_records.get(R.CONFIG) or ConfigRecord()
    task = str(rc["task"])
    comps = TaskComponents.from_task_config(
        json.loads(str(cfg["components"])) if "components" in cfg else {"name": task})
    deep = _model(msg, context) if R.ARRAYS in msg.content.array_records else None
    bundle = {k: TabularState.from_bundle(v)
              for k, v in json.loads(str(cfg.get("bundle", "{}"))).items()}
    _load(site, context, ("test",) if site.role == R.ROLE_EXTERNAL else ("train",))  # task check
    return SiteScorer(site.manifest, task, str(rc["profile"]), comps, deep, bundle,
                      seed=int(_num(rc, "seed")), device=str(rc["device"]))


def _component_probs(msg: Message, context: Context, site: SiteContext,
                     splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of the component named in config ``component`` (default: the
    deep model) on this site's rows of ``splits``."""
    scorer = _scorer(msg, context, site)
    cfg = msg.content.config_records.get(R.CONFIG) or ConfigRecord()
    name = str(cfg.get("component", scorer.components.deep))
    return scorer.labels(splits), scorer.probs(name, splits)


@app.query(R.ACTION_TABULAR)
@_guarded("tabular")
def tabular(msg: Message, context: Context) -> Message:
    """One step of a federated tabular fit (config ``op``: sums, newton, lipschitz or train) for the
    models named in config ``keys``; only sums, step bounds and coefficients go back."""
    site = resolve_site(context)
    if site.role != R.ROLE_TRAIN:
        raise PermissionError(f"site {site.name} is evaluation-only: training refused")
    cfg = msg.content[R.CONFIG]
    scorer = _scorer(msg, context, site)
    result = site_tabular(scorer, str(cfg["op"]), json.loads(str(cfg.get("options", "{}"))),
                          json.loads(str(cfg["keys"])))
    return Message(RecordDict({R.INFO: ConfigRecord({"result": json.dumps(result)})}),
                   reply_to=msg)
