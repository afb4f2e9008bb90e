"""Site side of a task's components (no Flower): scores of every component on a site's rows,
and the site's part of the federated tabular fits (sums, step bounds, local training).

The coordinator sends a *bundle* (``{key: TabularState.to_bundle()}``) and, for the deep model
and the stacked model, the deep network's weights. Only sums, coefficients and counts go back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from hcc_fl.client.data import SiteData, load_site
from hcc_fl.client.disclosure import ReleasePolicy
from hcc_fl.client.features import feature_block
from hcc_fl.client.statistics import (
    NB_THRESHOLDS,
    external_comparisons,
    external_report_prob,
    recalibrated_report,
)
from hcc_fl.client.train import predict
from hcc_fl.shared.components import (
    Ask,
    TabularState,
    TaskComponents,
    key,
    resplit_parts,
    split_key,
    stack_matrix,
)
from hcc_fl.shared.metrics import auc_ci
from hcc_fl.shared.metrics.recalibration import Recalibration
from hcc_fl.shared.newton import centred_sums
from hcc_fl.shared.tabular import (
    Penalty,
    feature_sums,
    lipschitz_bound,
    local_train,
    newton_logistic_sums,
    predict_proba,
)

F64 = npt.NDArray[np.float64]
TRAIN_VAL = ("train", "val")


@dataclass
class SiteScorer:
    """Scores of the components of one task at one site.

    ``deep`` is the deep network (or None when only tabular components are asked for);
    ``bundle`` maps keys ``<name>@<r>`` to tabular/stacked model states.
    """

    manifest: Path
    task: str
    profile: str
    components: TaskComponents
    deep: nn.Module | None
    bundle: dict[str, TabularState] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    _memo: dict[tuple[str, tuple[str, ...]], F64] = field(default_factory=dict)

    def set_bundle(self, bundle: dict[str, TabularState]) -> None:
        """Replace the tabular models (forgets their memoised scores, keeps the deep model's)."""
        self.bundle = bundle
        self._memo = {k: v for k, v in self._memo.items() if k[0] == self.components.deep}

    def labels(self, splits: tuple[str, ...]) -> F64:
        data = load_site(self.manifest, self.task, self.profile, splits)
        return data.label.numpy().astype(np.float64)

    def probs(self, name: str, splits: tuple[str, ...]) -> F64:
        """Probabilities of component ``name`` (or key ``name@r``) for the rows of ``splits``
        in manifest order."""
        k = (name, splits)
        if k in self._memo:
            return self._memo[k]
        base = split_key(name)[0] if "@" in name else name
        if base == self.components.deep:
            if self.deep is None:
                raise ValueError("the deep model was not sent")
            p = predict(self.deep, load_site(self.manifest, self.task, self.profile, splits),
                        self.device)
        else:
            state = self.bundle[name if "@" in name else key(name)]
            if state.spec.block == "cox":
                p = 1.0 - np.exp(-float(state.cox["h0"]) * np.exp(self.cox_lp(state, splits)))
            else:
                if state.model is None or state.standardiser is None:
                    raise ValueError(f"component {name} has no fitted model yet")
                X = self._features(state, splits)
                p = predict_proba(state.model, state.standardiser.transform(X))
        self._memo[k] = p
        return p

    def cox_matrix(self, inputs: tuple[str, ...], splits: tuple[str, ...]) -> F64:
        """Cox covariates: the logit of a component's probability, or a clinical column."""
        data = load_site(self.manifest, self.task, self.profile, splits)
        clinical = CLINICAL_COLUMNS.get(self.task, ())
        cols = []
        for name in inputs:
            if name in clinical:
                cols.append(data.clinical[:, clinical.index(name)].numpy().astype(np.float64))
            else:
                p = np.clip(self.probs(name, splits), 1e-6, 1 - 1e-6)
                cols.append(np.log(p) - np.log1p(-p))
        return np.column_stack(cols)

    def cox_lp(self, state: TabularState, splits: tuple[str, ...]) -> F64:
        """The Cox linear predictor ``(x - center).coef`` (higher = higher hazard)."""
        X = self.cox_matrix(state.spec.inputs, splits)
        return np.asarray((X - np.asarray(state.cox["center"])) @ np.asarray(state.cox["coef"]),
                          dtype=np.float64)

    def survival(self, splits: tuple[str, ...]) -> tuple[F64, F64]:
        data = load_site(self.manifest, self.task, self.profile, splits)
        if "os" not in data.survival:
            raise ValueError(f"task {self.task} has no overall-survival columns")
        t, e = data.survival["os"]
        return np.asarray(t, dtype=np.float64), np.asarray(e, dtype=np.float64)

    def _features(self, state: TabularState, splits: tuple[str, ...]) -> F64:
        if state.spec.block == "stack":
            return stack_matrix({i: self.probs(i, splits) for i in state.spec.inputs},
                                state.spec.inputs)
        return feature_block(self.manifest, self.task, state.spec.block, splits).X

    def training_rows(self, k: str) -> tuple[F64, F64, tuple[str, ...]]:
        """(X, y, names) a tabular model trains on: the train rows of its (re-)split; for the
        stacked model the validation rows (held out from every base model)."""
        state = self.bundle[k]
        if state.spec.block == "stack":
            X = self._features(state, ("val",))
            return X, self.labels(("val",)), tuple(f"logit_{i}" for i in state.spec.inputs)
        fb = feature_block(self.manifest, self.task, state.spec.block, TRAIN_VAL)
        train, _ = resplit_parts(fb.split, split_key(k)[1], self.seed, fb.manifest_sha256)
        return fb.X[train], fb.y[train], fb.names


COX_OPS = ("cox-center", "cox", "breslow")
CLINICAL_COLUMNS = {"aclf_us": ("age", "meld")}  # SiteData.clinical columns usable by Cox


def site_tabular(scorer: SiteScorer, op: str, options: dict[str, Any], keys: list[str]
                 ) -> dict[str, Any]:
    """One step of the federated tabular or Cox fit at a training site, for the models
    ``keys`` of the scorer's bundle (see :func:`tabular_step`, :func:`cox_step`)."""
    if op in COX_OPS:
        return cox_step(scorer, op, options, keys)
    return tabular_step({k: scorer.training_rows(k) for k in keys}, scorer.bundle, op, options)


def cox_step(scorer: SiteScorer, op: str, options: dict[str, Any], keys: list[str]
             ) -> dict[str, Any]:
    """This site's part of a site-stratified Cox fit on its train+val rows: ``cox-center``
    (column sums and count), ``cox`` (gradient, Hessian, log partial likelihood at
    ``options["beta"]``; the site is its own stratum) or ``breslow`` (event counts and
    risk-set sums on ``options["grid"]``)."""
    from hcc_fl.shared.cox import baseline_hazard_sums, cox_site_sums

    out: dict[str, Any] = {}
    for k in keys:
        state = scorer.bundle[k]
        X = scorer.cox_matrix(state.spec.inputs, TRAIN_VAL)
        time, event = scorer.survival(TRAIN_VAL)
        if op == "cox-center":
            out[k] = {"sum": X.sum(axis=0).tolist(), "n": int(X.shape[0])}
            continue
        Xc = X - np.asarray(state.cox["center"])
        if op == "cox":
            g, h, ll = cox_site_sums(np.asarray(options["beta"]), Xc, time, event)
            out[k] = {"gradient": g.tolist(), "hessian": h.tolist(), "loglik": ll}
        elif op == "breslow":
            out[k] = baseline_hazard_sums(np.asarray(options["beta"]), Xc, time, event,
                                          np.asarray(options["grid"])).to_dict()
        else:
            raise ValueError(f"unknown Cox operation '{op}'")
    return out


def tabular_step(rows: dict[str, tuple[F64, F64, tuple[str, ...]]],
                 bundle: dict[str, TabularState], op: str, options: dict[str, Any]
                 ) -> dict[str, Any]:
    """One step of the federated tabular fit on the training rows ``rows[key] = (X, y, names)``.

    ``op``: ``sums`` (per-feature count, sum and sum of squares, shifted by
    ``options["shift"][key]`` when given; with ``options["centre"] == "own"`` centred on this
    site's own mean and with the number of positive outcomes), ``newton`` (gradient, Hessian,
    log-loss sum and n of the standardised rows at the bundle's model:
    :mod:`hcc_fl.shared.newton`), ``lipschitz`` (the step bound on the standardised
    features) or ``train`` (``options["epochs"]`` full-batch proximal-gradient epochs from the
    global model with FedProx ``options["proximal_mu"]``; the L1 share is left to the
    coordinator, which soft-thresholds the average). Returns ``{key: result}``.
    """
    out: dict[str, Any] = {}
    shifts = options.get("shift") or {}
    mu = float(options.get("proximal_mu", 0.0))
    for k, (X, y, names) in rows.items():
        if op == "sums" and options.get("centre") == "own":
            out[k] = {**centred_sums(X, names).to_dict(), "positives": int(np.sum(y == 1))}
            continue
        if op == "sums":
            out[k] = feature_sums(X, names, shifts.get(k)).to_dict()
            continue
        state = bundle[k]
        if state.standardiser is None:
            raise ValueError(f"{k}: no standardisation sent")
        Z = state.standardiser.transform(X)
        spec = state.spec
        # The sites train the smooth part: the L2 share of an elastic net, nothing for pure L1.
        smooth = cast(Penalty, "l2" if spec.penalty == "l1" else spec.penalty)
        alpha = 0.0 if spec.penalty == "l1" else spec.alpha
        if op == "newton":
            if state.model is None:
                raise ValueError(f"{k}: no model sent")
            g, H, loss, n = newton_logistic_sums(state.model, Z, y)
            out[k] = {"gradient": g.tolist(), "hessian": H.tolist(), "loss": loss, "n": n}
        elif op == "lipschitz":
            out[k] = lipschitz_bound(Z, smooth, alpha, spec.l1_ratio, mu)
        elif op == "train":
            if state.model is None:
                raise ValueError(f"{k}: no global model sent")
            epochs = int(options["epochs"])
            model, n, loss = local_train(state.model, Z, y, smooth, alpha, spec.l1_ratio,
                                         epochs=epochs, lr=state.lr, proximal_mu=mu,
                                         apply_l1=False)
            out[k] = {"theta": model.to_vector().tolist(), "n": n, "loss": loss,
                      "steps": epochs}
        else:
            raise ValueError(f"unknown tabular operation '{op}'")
    return out


def external_components(scorer: SiteScorer, thresholds: dict[str, float],
                        survival: dict[str, tuple[F64, F64]] | None,
                        recalibrations: dict[str, Recalibration] | None = None,
                        policy: ReleasePolicy | None = None) -> dict[str, Any]:
    """The external site's statistics of every component: a full report each (at the
    component's training threshold; with a ``recalibrations`` entry also the recalibrated
    probabilities' calibration and decision curve), paired DeLong tests between the components,
    and the AUC of every re-split model (robustness)."""
    test = ("test",)
    y = scorer.labels(test)
    probs = {name: scorer.probs(name, test) for name in thresholds}
    policy = policy or ReleasePolicy(mode="exact")
    reports = {name: external_report_prob(y, p, thresholds[name], survival, policy=policy)
               for name, p in probs.items()}
    for name, fit in (recalibrations or {}).items():
        if name in reports:
            reports[name]["recalibrated"] = recalibrated_report(y, probs[name], thresholds[name],
                                                                fit, policy)
    resplit: dict[str, list[float | None]] = {}
    for k in scorer.bundle:
        name, r = split_key(k)
        if r == 0:
            continue
        p = scorer.probs(k, test)
        auc = auc_ci(y, p).auc if 0 < y.sum() < len(y) else math.nan
        resplit.setdefault(name, []).append(auc if math.isfinite(auc) else None)
    out = {"components": reports, "comparisons": external_comparisons(probs, y),
           "resplit_auc": resplit}
    if scorer.components.cox:
        out["survival_models"] = survival_models(scorer, list(thresholds))
    return out


def deep_model_extras(model: nn.Module, data: SiteData, device: str = "cpu") -> dict[str, Any]:
    """What the deep model of a task reports beyond its scores, on an external cohort with
    masks: the Dice of a segmenting model (``segmentation``), or the Grad-CAM localisation of
    an encoder-based classifier (``cam``)."""
    if data.masks is None:
        return {}
    if hasattr(model, "segment_and_score"):
        return {"segmentation": segmentation_report(model, data, device)}
    if hasattr(model, "encoder"):
        return {"cam": cam_report(model, data)}
    return {}


def cam_report(model: nn.Module, data: SiteData, channel: int = 1) -> dict[str, Any]:
    """Grad-CAM of the classifier on every patient's patch, summarised where the patients are:
    the share of the top-10 % CAM mass inside the lesion mask against its chance level (a
    one-sided paired test over patients), and the lesion-centred mean CAM, mean image of
    ``channel`` (the arterial phase) and mean mask over all patients (no single patient's
    pixels leave the site)."""
    from hcc_fl.shared.cam import cam_mask_test, grad_cam

    assert data.masks is not None
    model.eval()
    cams = grad_cam(model, data.video).detach().cpu().numpy()
    masks = data.masks[:, 0].numpy() > 0.5
    test = cam_mask_test(cams, masks)
    return {"n": int(len(data)), "in_mask_fraction": float(test.mean_in_mask),
            "chance": float(test.chance), "p_value": float(test.p_value),
            "mean_cam": np.round(cams.mean(axis=0), 4).tolist(),
            "mean_image": np.round(data.video[:, channel].numpy().mean(axis=0), 4).tolist(),
            "mean_mask": np.round(masks.mean(axis=0), 4).tolist()}


@torch.no_grad()
def segmentation_report(model: nn.Module, data: SiteData, device: str = "cpu",
                        n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Dice of the predicted liver masks (probability >= 0.5) per time point: mean, SD, median
    and a percentile-bootstrap 95 % CI of the mean over patients (empty vs empty counts 1)."""
    from hcc_fl.client.train import resolve_device
    from hcc_fl.shared.metrics.segmentation import dice_per_case

    assert data.masks is not None
    dev = resolve_device(device)
    model.to(dev).eval()
    preds = []
    for i in range(0, len(data), 16):
        seg, _ = model.segment_and_score(data.video[i:i + 16].to(dev))  # type: ignore[operator]
        preds.append((torch.sigmoid(seg) >= 0.5).cpu().numpy())
    d = np.asarray(dice_per_case(np.concatenate(preds), data.masks.numpy() > 0.5),
                   dtype=np.float64)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"n": int(d.shape[0])}
    for j, name in enumerate(("t0", "t1")):
        col = d[:, j]
        boots = [float(col[rng.integers(0, len(col), len(col))].mean()) for _ in range(n_boot)]
        out[name] = {"mean": float(col.mean()), "sd": float(col.std(ddof=1)),
                     "median": float(np.median(col)),
                     "ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}
    return out


def survival_models(scorer: SiteScorer, names: list[str], n_boot: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """Harrell's C of every component's risk score on the external site's overall survival,
    with a percentile-bootstrap 95 % CI, the paired bootstrap difference of each Cox model
    against the others, and the Cox models' predicted-vs-observed risk by the horizon."""
    from hcc_fl.shared.cox import concordance
    from hcc_fl.shared.metrics import kaplan_meier, net_benefit_survival

    test = ("test",)
    time, event = scorer.survival(test)
    risks = {}
    for name in names:
        state = scorer.bundle.get(key(name))
        if state is not None and state.spec.block == "cox":
            risks[name] = scorer.cox_lp(state, test)
        else:
            risks[name] = scorer.probs(name, test)
    rng = np.random.default_rng(seed)
    n = len(time)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if event[idx].sum() == 0:
            continue
        boots.append({m: concordance(time[idx], event[idx], r[idx]) for m, r in risks.items()})
    out: dict[str, Any] = {"n": n, "events": int(event.sum()), "c_index": {}, "differences": [],
                           "horizon": scorer.components.horizon}
    for m, r in risks.items():
        vals = np.array([b[m] for b in boots])
        out["c_index"][m] = {"c": concordance(time, event, r),
                             "ci": [float(np.percentile(vals, 2.5)),
                                    float(np.percentile(vals, 97.5))]}
    cox_names = [c.name for c in scorer.components.cox]
    for i, a in enumerate(cox_names):
        for b in [*cox_names[i + 1:], scorer.components.deep]:
            d = np.array([x[a] - x[b] for x in boots])
            out["differences"].append({
                "a": a, "b": b, "diff": out["c_index"][a]["c"] - out["c_index"][b]["c"],
                "ci": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
                "p_value": float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))})
    h = scorer.components.horizon
    out["observed_risk_at_horizon"] = 1.0 - kaplan_meier(time, event).at(h)
    out["calibration"] = {}
    for name in cox_names:
        risk = scorer.probs(name, test)
        order = np.argsort(risk)
        groups = np.array_split(order, 3)  # tertiles of predicted risk
        rows = []
        for g in groups:
            rows.append([float(risk[g].mean()), 1.0 - kaplan_meier(time[g], event[g]).at(h),
                         int(len(g))])
        nb = net_benefit_survival(time, event, risk, h, NB_THRESHOLDS)
        out["calibration"][name] = {
            "predicted_mean": float(risk.mean()), "tertiles": rows,
            "net_benefit": {"thresholds": list(nb.thresholds), "model": list(nb.model),
                            "treat_all": list(nb.treat_all)}}
    return out


def in_process_asker(scorers: list[SiteScorer], pooled: bool) -> Any:
    """``ask_for(fixed, with_deep)`` for :func:`hcc_fl.shared.components.fit_components`
    without a network: the sites' steps run here (baselines). ``pooled=True`` stacks the
    scorers' rows into one site (the centralized baseline)."""

    def ask_for(fixed: dict[str, TabularState], with_deep: bool) -> Ask:
        def ask(op: str, options: dict[str, Any], states: dict[str, TabularState]
                ) -> list[dict[str, Any]]:
            bundle = {**fixed, **states}
            for sc in scorers:
                sc.set_bundle(bundle)
            if op in COX_OPS:  # site-stratified even when pooled: each site its own stratum
                return [cox_step(sc, op, options, list(states)) for sc in scorers]
            per_site = [{k: sc.training_rows(k) for k in states} for sc in scorers]
            if pooled:
                rows = {k: (np.vstack([r[k][0] for r in per_site]),
                            np.concatenate([r[k][1] for r in per_site]), per_site[0][k][2])
                        for k in states}
                return [tabular_step(rows, bundle, op, options)]
            return [tabular_step(r, bundle, op, options) for r in per_site]

        return ask

    return ask_for
