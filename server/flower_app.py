"""Flower ServerApp of the coordinator: the only server module that runs the round loop.

Reads: build the model -> discover the sites (bounded wait) -> ``strategy.start`` over the
training sites -> pooled Youden threshold from summed site histograms -> external-site statistics
-> write the arm's result into the run directory. Nothing here sees a patient-level record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from hcc_fl.server.fedbn import average_norm_states, check_norm_reply
from hcc_fl.server.identity import AllowList, SiteGate
from hcc_fl.server.messages import CountingGrid
from hcc_fl.server.screen import check_pass1, check_pass2, declared_rows
from hcc_fl.server.strategy import (
    CHECKPOINT_VERSION,
    CentralDP,
    build_strategy,
    load_checkpoint,
    save_checkpoint,
)
from hcc_fl.shared import records as R
from hcc_fl.shared.audit import AuditLog, metric_names, payload_bytes
from hcc_fl.shared.components import (
    TabularState,
    TaskComponents,
    fit_components,
    main_models,
    selection_summary,
)
from hcc_fl.shared.evaluation import (
    combine_pass1,
    finish_pass2,
    recalibrate_pooled,
    recalibration_of,
    threshold_splits,
)
from hcc_fl.shared.jsonio import write_json
from hcc_fl.shared.metrics.pooled import ScoreGrid
from hcc_fl.shared.models import build_model
from hcc_fl.shared.normstate import norm_keys
from hcc_fl.shared.version import code_version

log = logging.getLogger("hcc_fl.coordinator")
app = ServerApp()


class FederationError(RuntimeError):
    """The federation cannot go on (sites missing, every round failed, ...)."""


AUDIT = AuditLog(None, "coordinator")  # replaced by run_arm with the run's audit file
NAMES: dict[int, str] = {}  # node id -> site name, as far as known (for the audit log)
GATE: SiteGate | None = None  # deployment with a PKI: identity from the key (run_arm sets it)


def _refusal(sent: Message, reason: str) -> Message:
    """The error reply that stands for a reply the coordinator refused (identity gate)."""
    return Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=sent)


def site_gate(grid_: Grid, context: Context, training: list[str], external: str | None
              ) -> Grid:
    """With an allow-list in the run config (a deployment with a PKI), the grid behind the
    identity gate (:mod:`hcc_fl.server.identity`): a node is the site whose key it holds.
    Without one (simulation, ``--insecure``), the grid itself and the sites' own claims."""
    global GATE
    folder = str(context.run_config.get(R.RC_ALLOW_LIST, "") or "")
    if not folder:
        GATE = None
        return grid_
    GATE = SiteGate(grid_, AllowList(Path(folder)), AUDIT, _refusal)
    GATE.expected = {**dict.fromkeys(training, R.ROLE_TRAIN),
                     **({external: R.ROLE_EXTERNAL} if external else {})}
    return cast(Grid, GATE)


def _audit_sent(node_ids: list[int], action: str, content: RecordDict) -> None:
    size = payload_bytes(content)
    for n in node_ids:
        AUDIT.record("sent", type=action, peer=NAMES.get(n, f"node-{n}"), bytes=size,
                     metrics=metric_names([*content.config_records.values(),
                                           *content.metric_records.values()]))


def _audit_received(replies: list[Message], action: str) -> None:
    for r in replies:
        peer = NAMES.get(r.metadata.src_node_id, f"node-{r.metadata.src_node_id}")
        if r.has_error():
            # the site sends a PHI-free reason (client/flower_app.py: rule and count, no value)
            AUDIT.record("received", type=action, peer=peer, bytes=0,
                         decision=f"site error: {_reason(r)}")
        else:
            AUDIT.record("received", type=action, peer=peer, bytes=payload_bytes(r.content),
                         metrics=metric_names([*r.content.config_records.values(),
                                               *r.content.metric_records.values()]),
                         decision="accepted")


def _reason(reply: Message) -> str:
    """The error a site replied with, on one line and bounded."""
    return " ".join(str(reply.error.reason).split())[:400]


def _audit_missing(node_ids: set[int], action: str, timeout: float) -> None:
    for n in sorted(node_ids):
        AUDIT.record("timeout", type=action, peer=NAMES.get(n, f"node-{n}"),
                     decision=f"no reply within {timeout:.0f} s")


def _messages(node_ids: list[int], action: str, content: RecordDict) -> list[Message]:
    return [Message(content=content, message_type=f"{MessageType.QUERY}.{action}", dst_node_id=n)
            for n in node_ids]


def _query(grid_: Grid, node_ids: list[int], action: str, content: RecordDict,
           timeout: float) -> list[Message]:
    messages = _messages(node_ids, action, content)
    if GATE is not None:  # a refused node is not sent the message (the gate audits "not-sent")
        node_ids = [n for n in node_ids if n not in GATE.refused]
    _audit_sent(node_ids, action, content)
    replies = list(grid_.send_and_receive(messages, timeout=timeout))
    _audit_received(replies, action)
    refused = set(GATE.refused) if GATE is not None else set()
    _audit_missing(set(node_ids) - {r.metadata.src_node_id for r in replies} - refused, action,
                   timeout)
    return replies


FAILED: dict[int, str] = {}  # node id -> the PHI-free reason of its last error reply


def _site_infos(replies: list[Message], refused: set[int] | None) -> dict[int, dict[str, Any]]:
    """node id -> site description from ``site_info`` replies; nodes that answered with an
    error, or (with the identity gate) whose claimed name or role is not their key's, go to
    ``refused``."""
    known: dict[int, dict[str, Any]] = {}
    for reply in replies:
        if reply.has_error():
            log.warning("node %d could not describe itself: %s",
                        reply.metadata.src_node_id, _reason(reply))
            FAILED[reply.metadata.src_node_id] = _reason(reply)
            if refused is not None:
                refused.add(reply.metadata.src_node_id)
            continue
        info = dict(reply.content[R.INFO])
        info.update({k: int(cast(Any, v)) for k, v in reply.content[R.METRICS].items()})
        if GATE is not None and GATE.check_claim(reply.metadata.src_node_id,
                                                 str(info.get("site")), str(info.get("role"))):
            if refused is not None:
                refused.add(reply.metadata.src_node_id)
            continue
        known[reply.metadata.src_node_id] = info
        NAMES[reply.metadata.src_node_id] = str(info["site"])
    return known


def describe_nodes(grid_: Grid, node_ids: list[int], timeout: float = 60.0,
                   refused: set[int] | None = None) -> dict[int, dict[str, Any]]:
    """Ask nodes who they are: node id -> {"site", "role", "code-version", counts...}.
    Nodes that answered with an error are added to ``refused``."""
    return _site_infos(_query(grid_, node_ids, R.ACTION_SITE_INFO, RecordDict(),
                              timeout=timeout), refused)


def _some(names: set[str], most: int = 20) -> str:
    """Sorted names, at most ``most`` of them, then how many more."""
    shown = sorted(names)
    more = f" and {len(shown) - most} more" if len(shown) > most else ""
    return ", ".join(shown[:most]) + more


def discover_sites(
    grid: Grid, training: list[str], external: str | None, timeout_s: float,
    poll_s: float = 1.0,
) -> dict[int, dict[str, Any]]:
    """Ask every connected node who it is until all expected sites answered, or until
    ``timeout_s`` seconds pass without a new site answering.

    Every node is asked once, when it is first seen; its answer is collected whenever it comes
    (a site answers after reading its data, so with many sites on few cores the answers take
    a while; asking a silent node again would only queue the same work twice). The wait is
    bounded: it ends ``timeout_s`` after the start or after the last new answer, whichever is
    later, so a large federation that keeps answering is not cut off while a site that never
    answers still ends the run.

    Returns node id -> {"site", "role", "code-version", "n-train", "n-val", "n-test"}.

    Raises
    ------
    FederationError
        When the expected sites have not all answered in time.
    """
    expected = set(training) | ({external} if external else set())
    known: dict[int, dict[str, Any]] = {}
    failed: set[int] = set()  # nodes that answered with an error
    asked: set[int] = set()
    pending: dict[str, int] = {}  # message id -> node id, sent and not yet answered
    start = last_news = time.monotonic()
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            if GATE is not None:  # named after the key they hold
                NAMES.update({n: GATE.name(n) for n in new})
            _audit_sent(new, R.ACTION_SITE_INFO, RecordDict())
            ids = list(grid.push_messages(_messages(new, R.ACTION_SITE_INFO, RecordDict())))
            pending.update((i, n) for i, n in zip(ids, new, strict=True) if i)
            asked.update(new)
        if pending:
            replies = [r for r in grid.pull_messages(list(pending))
                       if r.metadata.reply_to_message_id in pending]
            for r in replies:
                pending.pop(r.metadata.reply_to_message_id)
            _audit_received(replies, R.ACTION_SITE_INFO)
            before = {v["site"] for v in known.values()}
            known.update(_site_infos(replies, failed))
            if {v["site"] for v in known.values()} - before:
                last_news = time.monotonic()
        found = {v["site"] for v in known.values()}
        # a site whose key a refused node holds cannot join as well: no use waiting for it
        gone = GATE.refused_sites() - found if GATE is not None else set()
        if expected <= found | gone:
            if gone & expected:
                log.error("refused: %s (see the audit log); going on without them",
                          _some(gone & expected))
            return known
        now = time.monotonic()
        if now > max(start, last_news) + timeout_s:
            _audit_missing(set(pending.values()), R.ACTION_SITE_INFO, now - start)
            quiet = "" if last_news == start else \
                f" without a new site answering ({now - start:.0f} s in all)"
            errors = "; ".join(f"{NAMES.get(n, f'node {n}')} answered with an error: "
                               f"{FAILED[n]}" for n in sorted(failed) if n in FAILED)
            raise FederationError(
                f"sites missing after {timeout_s:.0f} s{quiet}: {_some(expected - found)}"
                f" (connected: {_some(found) or 'none'})" + (f"; {errors}" if errors else "")
            )
        time.sleep(poll_s)


def _exclude(excluded: list[dict[str, Any]], site: str, step: str, reason: str) -> None:
    """A training site whose validation sums failed a screen: left out of the pooled
    statistics, named in the log, the audit log and the validation block."""
    log.warning("%s of %s excluded from the pooled statistics: %s", step, site, reason)
    AUDIT.record("excluded", type=step, peer=site,
                 decision=f"excluded from the pooled statistics: {reason}")
    excluded.append({"site": site, "step": step, "reason": reason})


def pooled_validation(
    grid_: Grid, train_nodes: list[int], names: dict[int, str], final: ArrayRecord,
    grid: ScoreGrid, timeout: float, component: dict[str, str] | None = None,
    recalibrate: bool = False, declared: dict[str, int] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Two passes of summed sufficient statistics over the training sites' validation split.

    Pass 1 (histograms, calibration sums) gives the Youden threshold and calibration; pass 2
    (placement sums against the broadcast pooled histograms) gives the AUC with its DeLong CI.
    With ``recalibrate``, Newton rounds of recalibration sums (``recalibration_sums``, usually
    two or three messages, started from the fit on the pooled histograms) give the logistic
    recalibration (``validation["pooled"]["recalibration"]``).
    ``component`` (config entries ``component``, ``components``, ``bundle``) selects another
    component of the task than the deep model.

    Every site's sums are screened (:func:`hcc_fl.server.screen.check_pass1` against the rows
    it declared for the threshold split, ``declared``: site -> rows; None = no bound, and
    :func:`~hcc_fl.server.screen.check_pass2` against its pass-1 counts); a site whose sums
    fail is excluded (``validation["excluded"]``). A site excluded in pass 2 had its histograms
    in the broadcast pooled ones, so pass 1 is combined again without it and pass 2 repeated.
    """
    content = RecordDict({R.ARRAYS: final, R.CONFIG: ConfigRecord(dict(component or {}))})
    pass1: dict[str, dict[str, Any]] = {}
    excluded: list[dict[str, Any]] = []
    allowed = set(train_nodes)
    for reply in _query(grid_, train_nodes, R.ACTION_VALIDATION, content, timeout):
        site = names.get(reply.metadata.src_node_id, "?")
        if reply.has_error():
            log.warning("validation statistics failed at %s: %s", site, reply.error.reason)
            reason = str(reply.error.reason or "")
            if "disclosure policy" in reason and site not in pass1:
                _exclude(excluded, site, "validation sums", reason[:300])
            continue
        if reply.metadata.src_node_id not in allowed or site in pass1:
            continue
        try:
            bound = None if declared is None else declared.get(site, 0)
            pass1[site] = check_pass1(reply.content[R.METRICS], grid.n_bins, bound)
        except (KeyError, TypeError, ValueError) as exc:
            _exclude(excluded, site, "validation sums", str(exc).strip("'\""))
    vectors: dict[str, np.ndarray] = {}
    while True:
        if not pass1:
            why = "; ".join(f"{e['site']}: {e['reason']}" for e in excluded)
            raise FederationError("no training site returned valid validation statistics"
                                  + (f" ({why})" if why else ""))
        try:
            threshold, (pos, neg), validation = combine_pass1(pass1, grid)
        except ValueError as exc:
            raise FederationError(f"pooled validation: {exc}") from None
        content = RecordDict({R.ARRAYS: final, R.CONFIG: ConfigRecord(dict(component or {})),
                              R.METRICS: MetricRecord({"pos": pos.tolist(),
                                                       "neg": neg.tolist()})})
        responders = [n for n in train_nodes if names[n] in pass1]
        vectors, failed = {}, {}
        for reply in _query(grid_, responders, R.ACTION_PLACEMENTS, content, timeout):
            site = names.get(reply.metadata.src_node_id, "?")
            if reply.has_error():
                log.warning("validation placements failed at %s: %s", site, reply.error.reason)
                continue
            if site not in pass1 or site in vectors or site in failed:
                continue
            try:
                vectors[site] = check_pass2(reply.content[R.METRICS]["sums"],
                                            pass1[site]["n_pos"],
                                            pass1[site]["n"] - pass1[site]["n_pos"])
            except (KeyError, TypeError, ValueError) as exc:
                failed[site] = str(exc).strip("'\"")
        if not failed:
            break
        for site, reason in sorted(failed.items()):
            _exclude(excluded, site, "placement sums", reason)
            del pass1[site]
    validation["excluded"] = excluded
    if vectors:
        validation = finish_pass2(validation, [vectors[k] for k in sorted(vectors)])
    if recalibrate:
        counts = {site: int(v["n"]) for site, v in pass1.items()}
        by_name = {names[n]: n for n in responders}

        def ask(coef: tuple[float, float]) -> dict[str, Any]:
            cfg = ConfigRecord({**(component or {}), R.RECAL_INTERCEPT: coef[0],
                                R.RECAL_SLOPE: coef[1]})
            out: dict[str, Any] = {}
            replies = _query(grid_, list(by_name.values()), R.ACTION_RECALIBRATION,
                             RecordDict({R.ARRAYS: final, R.CONFIG: cfg}), timeout)
            for reply in replies:
                site = names.get(reply.metadata.src_node_id, "?")
                if reply.has_error():
                    raise ValueError(f"{site} failed: {reply.error.reason}")
                try:
                    out[site] = list(cast(Any, reply.content[R.METRICS]["sums"]))
                except (KeyError, TypeError) as exc:
                    raise ValueError(f"{site}: malformed recalibration sums ({exc})") from None
            return out

        fit = recalibrate_pooled(validation, ask, counts)
        entry = validation["pooled"]["recalibration"]
        AUDIT.record("recalibration", decision="applied" if fit else "not applied",
                     detail=entry.get("reason", f"{entry.get('iterations')} evaluations"))
    return threshold, validation


def secure_pooled_validation(
    strategy: Any, grid_: Grid, train_nodes: list[int], final: ArrayRecord, grid: ScoreGrid,
    bound: float, rnd: int, timeout: float, declared: dict[str, int] | None = None,
) -> tuple[float, dict[str, Any]]:
    """The two pooled-validation passes through SecAgg+: only the sums over the training sites
    reach the coordinator (no per-site AUC or counts). ``bound`` (the largest site) scales the
    sums into the quantiser's range; counts are rounded back to integers.

    The sums can only be screened as a whole: finite, non-negative histograms whose total
    equals the rows the contributing sites declared (``declared``: site -> rows) and the
    placement counts of pass 1. A failing sum cannot be traced to a site under SecAgg+, so the
    arm ends with a :class:`FederationError` naming the problem."""
    nb = grid.n_bins
    survivors: list[int] = []

    def run(purpose: str, length: int, extra: RecordDict | None) -> np.ndarray:
        def content(node: int, entries: dict[str, Any]) -> RecordDict:
            rd = RecordDict({R.CONFIG: ConfigRecord({**entries, R.SA_PURPOSE: purpose,
                                                     R.SA_BOUND: bound})})
            rd[R.ARRAYS] = final
            if extra is not None:
                rd[R.METRICS] = cast(MetricRecord, extra[R.METRICS])
            return rd

        out = strategy.secure_aggregate(grid_, rnd, f"{purpose}-{rnd}", train_nodes, content,
                                        [(1,), (length,)], timeout, 1.0)
        if out is None:
            raise FederationError(f"secure aggregation of the {purpose} failed")
        good, weight_sum, mean, _ = out
        survivors[:] = sorted(good)
        vec = np.asarray(mean[0], dtype=np.float64) * weight_sum * bound
        if vec.shape != (length,) or not np.all(np.isfinite(vec)):
            raise FederationError(f"the securely summed {purpose} are malformed or non-finite")
        return vec

    v1 = run("validation_sums", 2 * nb + 33 + 3, None)  # histograms, calibration (11x3), n...
    counts = np.rint(v1[: 2 * nb])
    n, n_pos = int(round(v1[-3])), int(round(v1[-2]))
    names = strategy.site_names
    expected = (sum(declared.get(names.get(x, "?"), 0) for x in survivors)
                if declared is not None else n)
    if np.any(counts < 0) or counts.sum() != n or counts[:nb].sum() != n_pos or n != expected:
        raise FederationError(
            f"the securely summed validation sums are inconsistent (histograms count "
            f"{counts.sum():g} patients, {counts[:nb].sum():g} cases; the sums say {n}, "
            f"{n_pos}; the contributing sites declared {expected}): a site sent forged sums, "
            "which secure aggregation cannot attribute")
    pooled = {"pos": counts[:nb], "neg": counts[nb:], "calibration": v1[2 * nb:-3],
              "n": n, "n_pos": n_pos, "loss": float(v1[-1] / max(n, 1)), "auc": None,
              "auc_ci": None,
              # each site applied its own release policy before masking; the coordinator sees
              # neither the policies nor the cells, so it cannot bound the AUC
              "release": "secure sum (the sites' policies are not visible)"}
    threshold, (pos, neg), validation = combine_pass1({"all sites (secure sum)": pooled}, grid)
    hist = RecordDict({R.METRICS: MetricRecord({"pos": pos.tolist(), "neg": neg.tolist()})})
    v2 = run("validation_placements", 12, hist)
    if round(v2[0]) != n_pos or round(v2[6]) != n - n_pos:
        raise FederationError("the securely summed placement sums count other patients than "
                              "the validation sums")
    return threshold, finish_pass2(validation, [v2])


def external_evaluation(
    grid_: Grid, node: int, final: ArrayRecord, threshold: float, timeout: float,
    components: dict[str, str] | None = None, recalibration: dict[str, Any] | None = None,
    site_statistics: bool = False,
) -> dict[str, Any]:
    """Ask the external site for its aggregate statistics of the final model (and, with
    ``components``: ``thresholds``, ``components``, ``bundle``, of every component; with
    ``recalibration``, also of the deep model's recalibrated probabilities). With
    ``site_statistics`` the site first recomputes the model's normalisation running statistics
    on its own unlabelled test images (FedBN + external statistics)."""
    extra: dict[str, Any] = {R.RECALIBRATION: json.dumps(recalibration)} if recalibration else {}
    if site_statistics:
        extra[R.NORM_STATISTICS] = "site"
    content = RecordDict({R.ARRAYS: final, R.CONFIG: ConfigRecord(
        {"threshold": threshold, **(components or {}), **extra})})
    replies = _query(grid_, [node], R.ACTION_EXTERNAL, content, timeout)
    if not replies:
        raise FederationError("external evaluation: no reply from the external site")
    reply = replies[0]
    if reply.has_error():
        raise FederationError(f"external evaluation failed: {reply.error.reason}")
    return json.loads(str(reply.content[R.INFO][R.REPORT]))  # type: ignore[no-any-return]


def fedbn_averaged(grid_: Grid, strategy: Any, final: ArrayRecord, timeout: float
                   ) -> tuple[ArrayRecord, dict[str, Any]]:
    """FedBN, once after the last round: each training site's normalisation state
    (``query.norm_state``), screened (names, shapes and dtypes of the global model's entries,
    finite values, ``num-examples`` within the site's declared ``n-train``) and averaged with
    the training rounds' capped shares into ``final``. Returns the "FedBN + averaged
    statistics" model and a summary (sites used and refused)."""
    keys = list(strategy.local_keys)
    expected = {k: (tuple(int(x) for x in np.shape(final[k].numpy())),
                    np.dtype(final[k].numpy().dtype)) for k in keys}
    nodes = list(strategy.training_nodes)
    replies = _query(grid_, nodes, R.ACTION_NORM_STATE,
                     RecordDict({R.CONFIG: ConfigRecord({"keys": len(keys)})}), timeout)
    states, weights, used, refused = [], [], [], []
    for r in sorted(replies, key=lambda m: strategy.site_names.get(m.metadata.src_node_id, "")):
        site = strategy.site_names.get(r.metadata.src_node_id, f"node-{r.metadata.src_node_id}")
        if r.metadata.src_node_id not in nodes:
            refused.append({"site": site, "reason": "reply from a node that is not a training "
                                                    "site"})
            continue
        if r.has_error():
            refused.append({"site": site, "reason": f"site error: {_reason(r)}"})
            continue
        content = r.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            refused.append({"site": site, "reason": "malformed reply (records)"})
            continue
        arrays = next(iter(content.array_records.values()))
        n = next(iter(content.metric_records.values())).get(R.NUM_EXAMPLES)
        try:
            views = {k: np.asarray(v.numpy()) for k, v in arrays.items()}
        except (ValueError, TypeError) as exc:
            refused.append({"site": site, "reason": f"unreadable arrays ({exc})"})
            continue
        why = check_norm_reply(views, expected, n, strategy.declared.get(site))
        if why:
            refused.append({"site": site, "reason": why})
            continue
        states.append(views)
        weights.append(float(cast(Any, n)))
        used.append(site)
    for item in refused:
        log.warning("FedBN: normalisation state of %s refused: %s", item["site"], item["reason"])
    if not states:
        raise FederationError("FedBN: no training site sent a usable normalisation state")
    mean = average_norm_states(states, weights, float(strategy.max_site_weight))
    state = final.to_torch_state_dict()
    state.update({k: torch.from_numpy(np.array(v, order="C")) for k, v in mean.items()})
    out = ArrayRecord(state)
    return out, {"local_entries": len(keys), "sites": used, "refused": refused}


def robust_settings(fed: dict[str, Any]) -> dict[str, Any]:
    """The strategy's weight cap and aggregation rule from the federation block."""
    return {"max_site_weight": float(fed.get("max_site_weight", 1.0)),
            "aggregation": str(fed.get("aggregation", "mean")),
            "trim_fraction": float(fed.get("trim_fraction", 0.0))}


def pretrain_ssl(
    grid_: Grid, cfg: dict[str, Any], arm: str, arm_cfg: dict[str, Any], model: torch.nn.Module,
    names: dict[int, str], train_nodes: list[int], training: list[str],
    sizes: dict[str, dict[str, Any]] | None = None,
) -> tuple[ArrayRecord, list[dict[str, Any]]]:
    """Stage 1: federated self-supervised pretraining (Barlow Twins) of the task's encoder on
    the training sites' unlabelled patches, with the arm's strategy; the pretrained encoder is
    loaded into ``model`` (in place). Returns the model's weights and the stage's history
    (arm ``<arm>:ssl``). ``sizes`` (site -> declared counts) bound the examples a site may
    claim (its train and val patches)."""
    from hcc_fl.shared.models import build_ssl_model

    fed, ssl = cfg["federation"], cfg["task"]["ssl"]
    torch.manual_seed(int(cfg["seed"]) + 1)
    ssl_model = build_ssl_model(cfg["task"]["name"], cfg["model"]["profile"])
    strategy = build_strategy(str(arm_cfg["name"]), len(train_nodes),
                              float(arm_cfg.get("proximal_mu", 0.0)), arm=dict(arm_cfg))
    strategy.setup_sites(  # type: ignore[attr-defined]
        f"{arm}:ssl", names, train_nodes, int(fed["min_sites"]),
        max_norm_ratio=float(fed.get("max_update_norm_ratio", 0.0)), audit=AUDIT,
        describe=lambda nodes: describe_nodes(grid_, nodes, timeout=60.0),
        training_sites=training, site_sizes=sizes, size_keys=("n-train", "n-val"),
        **robust_settings(fed),
    )
    strategy.transfer = str(fed.get("transfer", "fp32"))  # type: ignore[attr-defined]
    stage = {"stage": "ssl"}
    train_config = ConfigRecord({
        **stage, "local-epochs": int(ssl["local_epochs"]), "batch-size": int(ssl["batch_size"]),
        "lr": float(ssl["lr"]), "weight-decay": float(cfg["model"]["weight_decay"]),
        "objective": "barlow",
        "projector-local": int(str(ssl.get("projector", "average")) == "local"),
    })
    log.info("%s: stage 1, %d rounds of federated Barlow Twins pretraining", arm,
             int(ssl["rounds"]))
    final = strategy.run_rounds(  # type: ignore[attr-defined]
        grid_, ArrayRecord(ssl_model.state_dict()), 1, int(ssl["rounds"]),
        float(fed["round_timeout_s"]), train_config, ConfigRecord({"stage": "ssl"}),
    )
    if not strategy.aggregated_rounds:  # type: ignore[attr-defined]
        raise FederationError(f"{arm}: the self-supervised stage produced no model")
    ssl_model.load_state_dict(final.to_torch_state_dict())
    model.encoder.load_state_dict(ssl_model.encoder.state_dict())  # type: ignore[union-attr,operator]
    history = [{**h, "arm": f"{arm}:ssl"} for h in strategy.history]  # type: ignore[attr-defined]
    return ArrayRecord(model.state_dict()), history


def tabular_asker(
    grid_: Grid, nodes: list[int], names: dict[int, str], comps_json: str, timeout: float,
    fixed: dict[str, TabularState] | None = None, deep: ArrayRecord | None = None,
) -> Any:
    """``ask(op, options, states)`` for :func:`hcc_fl.shared.components.fit_tabular`: one
    ``tabular`` query to the training sites carrying the models being fitted (plus ``fixed``
    ones and the deep weights that a stacked model scores with)."""

    def ask(op: str, options: dict[str, Any], states: dict[str, TabularState]
            ) -> list[dict[str, Any]]:
        bundle = {k: st.to_bundle() for k, st in {**(fixed or {}), **states}.items()}
        content = RecordDict({R.CONFIG: ConfigRecord({
            "op": op, "options": json.dumps(options), "keys": json.dumps(list(states)),
            "bundle": json.dumps(bundle), "components": comps_json})})
        if deep is not None:
            content[R.ARRAYS] = deep
        out = []
        for reply in _query(grid_, nodes, R.ACTION_TABULAR, content, timeout):
            if reply.has_error():
                log.warning("tabular %s failed at %s: %s", op,
                            names.get(reply.metadata.src_node_id, "?"), reply.error.reason)
                continue
            out.append(json.loads(str(reply.content[R.INFO]["result"])))
        if not out:
            raise FederationError(f"no training site answered the tabular step '{op}'")
        return out

    return ask


@app.main()
def main(grid_: Grid, context: Context) -> None:
    """Run one federated arm; a failure is also written as ``error.json`` for the driver."""
    if str(context.run_config.get(R.RC_STAGE, "")) == "compare":
        run_compare(grid_, context)
        return
    arm_dir = Path(str(context.run_config["arm-dir"]))
    try:
        run_arm(grid_, context)
    except FederationError as exc:
        arm_dir.mkdir(parents=True, exist_ok=True)
        write_json(arm_dir / "error.json", {"error": str(exc)})
        log.error("%s", exc)
        raise


def run_compare(grid_: Grid, context: Context) -> None:
    """The comparison stage of a deployment: one ``external_compare`` message carries every
    arm's final model (``compare`` in the run config: JSON arm -> model file) to the external
    site, whose paired DeLong tests go to ``<arm-dir>/comparisons.json`` (``error.json`` when
    the site refused or did not answer)."""
    global AUDIT
    rc = context.run_config
    cfg = json.loads(Path(str(rc["config-path"])).read_text())
    out_dir = Path(str(rc["arm-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    AUDIT = AuditLog(str(rc.get("audit-path", "")) or None, "coordinator")
    fed = cfg["federation"]
    training, external = list(fed["training_sites"]), fed.get("external_site")
    grid_ = site_gate(grid_, context, training, external)
    try:
        sites = discover_sites(grid_, training, external, float(fed["discovery_timeout_s"]))
        ext = [nid for nid, v in sites.items() if v["site"] == external]
        if not ext:
            raise FederationError(f"the external site {external} did not connect: no "
                                  "comparison of the arms")
        models: dict[str, str] = json.loads(str(rc[R.RC_COMPARE]))
        content = RecordDict({R.CONFIG: ConfigRecord({
            R.COMPARE_ARMS: json.dumps(list(models)),
            R.NORM_STATISTICS: json.dumps([a for a in models if a.endswith(R.SITE_STATS)])})})
        for i, path in enumerate(models.values()):
            content[f"{R.COMPARE_MODEL}{i}"] = ArrayRecord(torch.load(path, weights_only=True))
        replies = _query(grid_, ext[:1], R.ACTION_COMPARE, content,
                         float(fed["round_timeout_s"]))
        if not replies or replies[0].has_error():
            raise FederationError("the external site did not compare the arms: " + (
                str(replies[0].error.reason) if replies else "no reply"))
        write_json(out_dir / "comparisons.json",
                   json.loads(str(replies[0].content[R.INFO][R.REPORT])))
    except FederationError as exc:
        write_json(out_dir / "error.json", {"error": str(exc)})
        log.error("%s", exc)


def validation_rows(sizes: dict[str, dict[str, Any]], splits: tuple[str, ...]
                    ) -> dict[str, int]:
    """Site -> the rows it declared for the threshold splits (0 when it declared none: every
    sum it sends is then refused)."""
    out = {}
    for site, v in sizes.items():
        try:
            out[site] = declared_rows(v, splits)
        except ValueError:
            out[site] = 0
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_arm(grid_: Grid, context: Context) -> None:
    """Run one federated arm (FedAvg or FedProx) and write its result into the run directory.

    After every round the global model, the round number, the strategy's state and the timing
    go to ``<arm-dir>/checkpoint.pt`` (atomically); with ``resume`` in the run config an arm
    whose checkpoint exists continues after the checkpointed round.
    """
    global AUDIT
    rc = context.run_config
    config_path = Path(str(rc["config-path"]))
    cfg = json.loads(config_path.read_text())
    arm = str(rc["arm"])
    arm_dir = Path(str(rc["arm-dir"]))
    arm_dir.mkdir(parents=True, exist_ok=True)
    AUDIT = AuditLog(str(rc.get("audit-path", "")) or None, "coordinator")
    AUDIT.record("run-start", arm=arm, run=int(context.run_id),
                 detail=f"hcc-fl {code_version()}")
    fed = cfg["federation"]
    from hcc_fl.server.config import arm_strategy

    arm_cfg, ssl_on = arm_strategy(cfg, arm)
    training = list(fed["training_sites"])
    external = fed.get("external_site")
    counter = CountingGrid(site_gate(grid_, context, training, external))
    grid_ = cast(Grid, counter)

    sites = discover_sites(grid_, training, external, float(fed["discovery_timeout_s"]))
    names = {nid: str(v["site"]) for nid, v in sites.items()}
    train_nodes = [nid for nid, v in sites.items() if v["site"] in training]
    ext_nodes = [nid for nid, v in sites.items() if v["site"] == external]
    if len(train_nodes) < int(fed["min_sites"]):
        raise FederationError(f"{len(train_nodes)} training site(s) identified, fewer than "
                              f"federation.min_sites={fed['min_sites']}")
    mine = code_version()
    for nid, v in sites.items():
        if v["code-version"] != mine:
            log.warning("site %s runs hcc-fl %s, coordinator %s", names[nid], v["code-version"],
                        mine)
    log.info("sites: %s", ", ".join(f"{v['site']} ({v['role']})" for v in sites.values()))

    torch.manual_seed(int(cfg["seed"]))
    model = build_model(cfg["task"]["name"], cfg["model"]["profile"])
    privacy = cfg.get("privacy") or {"mode": "none"}
    central_dp = privacy.get("mode") == "central-dp"
    fedbn = str(arm_cfg["name"]) == "fedbn"
    strategy = build_strategy(str(arm_cfg["name"]), len(train_nodes),
                              float(arm_cfg.get("proximal_mu", 0.0)), equal_weights=central_dp,
                              arm=dict(arm_cfg), local_keys=norm_keys(model) if fedbn else ())
    sizes = {str(v["site"]): dict(v) for v in sites.values() if v["site"] in training}
    strategy.setup_sites(  # type: ignore[attr-defined]
        arm, names, train_nodes, int(fed["min_sites"]),
        max_norm_ratio=float(fed.get("max_update_norm_ratio", 0.0)), audit=AUDIT,
        describe=lambda nodes: describe_nodes(grid_, nodes, timeout=60.0),
        training_sites=training, site_sizes=sizes, **robust_settings(fed),
    )
    strategy.transfer = str(fed.get("transfer", "fp32"))  # type: ignore[attr-defined]
    strategy.insecure = bool(rc.get("insecure", False))  # type: ignore[attr-defined]
    sa = cfg.get("secure_aggregation") or {}
    if sa.get("enabled"):
        strategy.secagg = {k: sa[k] for k in  # type: ignore[attr-defined]
                           ("clipping_range", "quantization_range", "modulus")}
        strategy.secagg["max_weight"] = float(  # type: ignore[attr-defined]
            sa.get("max_weight") or max(int(sites[n]["n-train"]) for n in train_nodes))
    if central_dp:
        m = len(training)
        strategy.central = CentralDP(  # type: ignore[attr-defined]
            strategy, float(privacy["noise_multiplier"]), float(privacy["max_grad_norm"]), m,
            float(privacy["delta"]) if privacy.get("delta") else 1.0 / (10.0 * m),
            float(privacy["target_epsilon"]) if privacy.get("target_epsilon") else None)
    train_config = ConfigRecord({
        "local-epochs": int(fed["local_epochs"]),
        "batch-size": int(cfg["model"]["batch_size"]),
        "lr": float(cfg["model"]["lr"]),
        "weight-decay": float(cfg["model"]["weight_decay"]),
        "objective": str(cfg["task"].get("objective", "bce")),
    })
    ckpt_path = arm_dir / "checkpoint.pt"
    config_sha = _sha256(config_path)
    arrays = ArrayRecord(model.state_dict())
    first_round, done_seconds = 1, 0.0
    if bool(rc.get("resume", False)) and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["config_sha256"] != config_sha or ckpt["arm"] != arm:
            raise FederationError(f"{ckpt_path} belongs to another configuration or arm: "
                                  "cannot resume from it")
        model.load_state_dict(ckpt["model"])
        arrays = ArrayRecord(model.state_dict())
        strategy.load_state(ckpt["strategy"])  # type: ignore[attr-defined]
        first_round, done_seconds = int(ckpt["round"]) + 1, float(ckpt["train_seconds"])
        log.info("%s: resuming after round %d from %s", arm, first_round - 1, ckpt_path)
        AUDIT.record("resume", arm=arm, round=first_round - 1)
    t0 = time.monotonic()
    ssl_history: list[dict[str, Any]] = []
    if ssl_on and first_round == 1:
        arrays, ssl_history = pretrain_ssl(grid_, cfg, arm, arm_cfg, model, names, train_nodes,
                                           training, sizes)
        if cfg["task"].get("finetune", "full") == "linear":
            train_config["freeze-encoder"] = 1

    def checkpoint(rnd: int, current: ArrayRecord) -> None:
        save_checkpoint(ckpt_path, {
            "version": CHECKPOINT_VERSION, "arm": arm, "round": rnd, "config_sha256": config_sha,
            "model": current.to_torch_state_dict(),
            "strategy": strategy.state(),  # type: ignore[attr-defined]
            "train_seconds": done_seconds + time.monotonic() - t0,
        })
        AUDIT.record("checkpoint", arm=arm, round=rnd)

    final = strategy.run_rounds(  # type: ignore[attr-defined]
        grid_, arrays, first_round, int(fed["rounds"]), float(fed["round_timeout_s"]),
        train_config, ConfigRecord(), on_round_end=checkpoint,
    )
    train_seconds = done_seconds + time.monotonic() - t0
    if not strategy.aggregated_rounds:  # type: ignore[attr-defined]
        reasons = sorted({r["reason"] for r in strategy.rejections})  # type: ignore[attr-defined]
        raise FederationError(f"{arm}: no round produced a model (every round failed); the "
                              f"sites said: {' | '.join(reasons)[:1500] or 'nothing'}")
    fedbn_summary: dict[str, Any] | None = None
    if fedbn:
        final, fedbn_summary = fedbn_averaged(grid_, strategy, final, float(fed["round_timeout_s"]))
    model.load_state_dict(final.to_torch_state_dict())

    grid = ScoreGrid(int(cfg["evaluation"]["histogram_bins"]))
    timeout = float(fed["round_timeout_s"])
    train_nodes = list(strategy.training_nodes)  # type: ignore[attr-defined]
    names = dict(strategy.site_names)  # type: ignore[attr-defined]
    declared = validation_rows(strategy.site_sizes,  # type: ignore[attr-defined]
                               threshold_splits(str(cfg["evaluation"]["threshold_split"])))
    connected = set(grid_.get_node_ids())  # a restarted external site has a new node id
    ext_nodes = [n for n, s in names.items() if s == external and n in connected] or ext_nodes
    if sa.get("enabled"):
        bound = float(max(int(v["n-train"]) + int(v["n-val"]) for v in sites.values()
                          if v["site"] in training))
        threshold, validation = secure_pooled_validation(
            strategy, grid_, train_nodes, final, grid, bound, int(fed["rounds"]) + 1, timeout,
            declared)
    else:
        threshold, validation = pooled_validation(
            grid_, train_nodes, names, final, grid, timeout,
            recalibrate=bool(cfg["evaluation"].get("recalibration", True)), declared=declared)
    comps = TaskComponents.from_task_config(cfg["task"])
    states: dict[str, TabularState] = {}
    thresholds = {comps.deep: threshold}
    component_validation: dict[str, Any] = {}
    extra: dict[str, str] | None = None
    if len(comps.names) > 1:
        comps_json = json.dumps(cfg["task"])
        states = fit_components(
            comps, lambda fixed, with_deep: tabular_asker(
                grid_, train_nodes, names, comps_json, timeout, fixed=fixed,
                deep=final if with_deep else None),
            float(arm_cfg.get("proximal_mu", 0.0)))
        main_bundle = json.dumps({k: st.to_bundle() for k, st in main_models(states).items()})
        for name in comps.names[1:]:
            thresholds[name], component_validation[name] = pooled_validation(
                grid_, train_nodes, names, final, grid, timeout,
                {"component": name, "components": comps_json, "bundle": main_bundle},
                declared=declared)
        extra = {"thresholds": json.dumps(thresholds), "components": comps_json,
                 "bundle": json.dumps({k: st.to_bundle() for k, st in states.items()})}
    fit = (recalibration_of(validation)
           if cfg["evaluation"].get("recalibration", True) else None)
    external_stats = (external_evaluation(grid_, ext_nodes[0], final, threshold, timeout,
                                          extra, fit.as_dict() if fit else None)
                      if ext_nodes else None)
    external_site_stats = (external_evaluation(grid_, ext_nodes[0], final, threshold, timeout,
                                               extra, fit.as_dict() if fit else None,
                                               site_statistics=True)
                           if ext_nodes and fedbn else None)

    torch.save(model.state_dict(), arm_dir / "model.pt")
    write_json(arm_dir / "result.json", {
        "arm": arm,
        "strategy": arm_cfg,
        "code_version": mine,
        "train_seconds": train_seconds,
        "resumed_after_round": first_round - 1 if first_round > 1 else None,
        "aggregated_rounds": strategy.aggregated_rounds,  # type: ignore[attr-defined]
        "central_dp": (strategy.central.summary()  # type: ignore[attr-defined]
                       if central_dp else None),
        "secure_aggregation": (strategy.secagg_rounds  # type: ignore[attr-defined]
                               if sa.get("enabled") else None),
        "threshold": threshold,
        "validation": validation,
        "external": external_stats,
        "external_site_statistics": external_site_stats,
        "fedbn": fedbn_summary,
        "component_thresholds": thresholds,
        "component_validation": component_validation,
        "tabular": {k: selection_summary(st) for k, st in main_models(states).items()},
        "sites": [
            {"site": v["site"], "role": v["role"], "code_version": v["code-version"],
             "manifest_sha256": v["manifest-sha256"],
             "n_train": v["n-train"], "n_val": v["n-val"], "n_test": v["n-test"]}
            for v in sites.values()
        ],
        "history": ssl_history + strategy.history,  # type: ignore[attr-defined]
        "ssl": ({"rounds": int(cfg["task"]["ssl"]["rounds"]),
                 "finetune": cfg["task"].get("finetune", "full")} if ssl_on else None),
        "rejections": strategy.rejections,  # type: ignore[attr-defined]
        "messages": counter.summary(),
    })
    AUDIT.record("run-end", arm=arm, run=int(context.run_id))
    log.info("%s finished: external AUC %s", arm, external_stats and external_stats.get("auc"))
