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
from torch import nn

from hcc_fl.client.data import load_site
from hcc_fl.client.features import feature_block
from hcc_fl.client.statistics import (
    external_comparisons,
    external_report_prob,
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
from hcc_fl.shared.tabular import (
    Penalty,
    feature_sums,
    lipschitz_bound,
    local_train,
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
            if state.model is None or state.standardiser is None:
                raise ValueError(f"component {name} has no fitted model yet")
            X = self._features(state, splits)
            p = predict_proba(state.model, state.standardiser.transform(X))
        self._memo[k] = p
        return p

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


def site_tabular(scorer: SiteScorer, op: str, options: dict[str, Any], keys: list[str]
                 ) -> dict[str, Any]:
    """One step of the federated tabular fit at a training site, for the models ``keys`` of
    the scorer's bundle (see :func:`tabular_step`)."""
    return tabular_step({k: scorer.training_rows(k) for k in keys}, scorer.bundle, op, options)


def tabular_step(rows: dict[str, tuple[F64, F64, tuple[str, ...]]],
                 bundle: dict[str, TabularState], op: str, options: dict[str, Any]
                 ) -> dict[str, Any]:
    """One step of the federated tabular fit on the training rows ``rows[key] = (X, y, names)``.

    ``op``: ``sums`` (per-feature count, sum and sum of squares, shifted by
    ``options["shift"][key]`` when given), ``lipschitz`` (the step bound on the standardised
    features) or ``train`` (``options["epochs"]`` full-batch proximal-gradient epochs from the
    global model with FedProx ``options["proximal_mu"]``; the L1 share is left to the
    coordinator, which soft-thresholds the average). Returns ``{key: result}``.
    """
    out: dict[str, Any] = {}
    shifts = options.get("shift") or {}
    mu = float(options.get("proximal_mu", 0.0))
    for k, (X, y, names) in rows.items():
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
        if op == "lipschitz":
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
                        survival: dict[str, tuple[F64, F64]] | None) -> dict[str, Any]:
    """The external site's statistics of every component: a full report each (at the
    component's training threshold), paired DeLong tests between the components, and the AUC
    of every re-split model (robustness)."""
    test = ("test",)
    y = scorer.labels(test)
    probs = {name: scorer.probs(name, test) for name in thresholds}
    reports = {name: external_report_prob(y, p, thresholds[name], survival)
               for name, p in probs.items()}
    resplit: dict[str, list[float | None]] = {}
    for k in scorer.bundle:
        name, r = split_key(k)
        if r == 0:
            continue
        p = scorer.probs(k, test)
        auc = auc_ci(y, p).auc if 0 < y.sum() < len(y) else math.nan
        resplit.setdefault(name, []).append(auc if math.isfinite(auc) else None)
    return {"components": reports, "comparisons": external_comparisons(probs, y),
            "resplit_auc": resplit}


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
            per_site = [{k: sc.training_rows(k) for k in states} for sc in scorers]
            if pooled:
                rows = {k: (np.vstack([r[k][0] for r in per_site]),
                            np.concatenate([r[k][1] for r in per_site]), per_site[0][k][2])
                        for k in states}
                return [tabular_step(rows, bundle, op, options)]
            return [tabular_step(r, bundle, op, options) for r in per_site]

        return ask

    return ask_for
