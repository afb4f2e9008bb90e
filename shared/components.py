"""The models of a task besides its deep network: federated tabular models and a stacked model.

A task's *components* are scored models that the external site compares with DeLong tests:

* the **deep** model (trained by the Flower round loop; its name comes from ``task.deep``),
* **tabular** models (``task.tabular``): a penalised logistic regression on a site-computed
  feature block (``tic``, ``bmode``, ``radiomics``), standardised from summed site statistics
  and trained by FedAvg/FedProx over its coefficients with the L1 share applied by the server
  (proximal gradient, exact zeros),
* an optional **stacked** model (``task.stack``): a logistic regression on the logits of other
  components' scores, fitted on the held-out validation split.

Tabular models are keyed ``<name>@<r>``: ``r = 0`` uses the manifest's own train/validation
split, ``r = 1..resplits`` a seeded re-split of each site's train+val rows (robustness).

This module holds the plain-data pieces shared by the coordinator, the sites and the in-process
baselines (no Flower, no torch): the specs, the bundle that travels to the sites, the seeded
re-split, and the server-side combination steps.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hcc_fl.shared.tabular import (
    FeatureSums,
    LogisticModel,
    Standardiser,
    _soft_threshold,
    combine_sums,
    fedavg,
)

F64 = npt.NDArray[np.float64]
PENALTIES = ("l1", "l2", "elasticnet")
SOLVERS = ("newton", "fedavg")


@dataclass(frozen=True)
class TabularSpec:
    """One tabular model: its name, feature block and penalty (tabular.py conventions)."""

    name: str
    block: str
    penalty: str = "l1"
    alpha: float = 0.02
    l1_ratio: float = 0.5
    inputs: tuple[str, ...] = ()  # stacked model: the components whose logits are its features

    @property
    def l1_strength(self) -> float:
        """The L1 share of the penalty (what the server soft-thresholds with)."""
        if self.penalty == "l1":
            return self.alpha
        if self.penalty == "elasticnet":
            return self.alpha * self.l1_ratio
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "block": self.block, "penalty": self.penalty,
                "alpha": self.alpha, "l1_ratio": self.l1_ratio, "inputs": list(self.inputs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TabularSpec:
        spec = cls(str(d["name"]), str(d.get("block", "stack")), str(d.get("penalty", "l1")),
                   float(d.get("alpha", 0.02)), float(d.get("l1_ratio", 0.5)),
                   tuple(str(x) for x in d.get("inputs", ())))
        if spec.penalty not in PENALTIES:
            raise ValueError(f"component {spec.name}: penalty must be one of "
                             f"{', '.join(PENALTIES)}, got '{spec.penalty}'")
        if not spec.alpha >= 0:
            raise ValueError(f"component {spec.name}: alpha must be >= 0")
        return spec


@dataclass(frozen=True)
class TaskComponents:
    """The components of a task, read from its config block."""

    deep: str
    tabular: tuple[TabularSpec, ...] = ()
    stack: TabularSpec | None = None
    rounds: int = 30
    local_epochs: int = 5
    resplits: int = 0
    cox: tuple[TabularSpec, ...] = ()
    horizon: float = 30.0
    solver: str = "newton"  # "newton": exact, a handful of messages; "fedavg": rounds x epochs

    @property
    def names(self) -> list[str]:
        """Every component, deep first."""
        out = [self.deep, *(t.name for t in self.tabular)]
        out = [*out, self.stack.name] if self.stack else out
        return [*out, *(c.name for c in self.cox)]

    @classmethod
    def from_task_config(cls, task: Mapping[str, Any]) -> TaskComponents:
        """Parse ``cfg["task"]``; a task without ``tabular`` has the deep model only."""
        stack = task.get("stack")
        tab = tuple(TabularSpec.from_dict(t) for t in task.get("tabular") or ())
        cox = tuple(TabularSpec.from_dict({"name": c["name"], "block": "cox", "penalty": "l2",
                                           "alpha": float(c.get("l2", 0.0)),
                                           "inputs": c["features"]})
                    for c in task.get("cox") or ())
        out = cls(str(task.get("deep") or task["name"]), tab,
                  TabularSpec.from_dict({**stack, "block": "stack"}) if stack else None,
                  int(task.get("tabular_rounds", 30)), int(task.get("tabular_local_epochs", 5)),
                  int(task.get("resplits", 0)), cox, float(task.get("cox_horizon", 30.0)),
                  str(task.get("tabular_solver", "newton")))
        if out.solver not in SOLVERS:
            raise ValueError(f"tabular_solver must be one of {', '.join(SOLVERS)}, "
                             f"got '{out.solver}'")
        names = out.names
        if len(set(names)) != len(names):
            raise ValueError(f"task components must have distinct names, got {names}")
        if out.stack is not None:
            bases = [out.deep, *(t.name for t in out.tabular)]
            unknown = set(out.stack.inputs) - set(bases)
            if len(out.stack.inputs) < 2 or unknown:
                raise ValueError(f"stack.inputs must name at least two of {bases}")
        for c in out.cox:
            if not c.inputs or len(set(c.inputs)) != len(c.inputs):
                raise ValueError(f"cox model {c.name}: give distinct features")
            if not out.horizon > 0:
                raise ValueError("cox_horizon must be > 0")
        return out


def key(name: str, resplit: int = 0) -> str:
    """The key of a tabular model fitted on re-split ``resplit`` (0 = the manifest's split)."""
    return f"{name}@{resplit}"


def split_key(k: str) -> tuple[str, int]:
    name, _, r = k.rpartition("@")
    return name, int(r)


def resplit_parts(split: Sequence[str], resplit: int, seed: int, site_salt: str
                  ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Training and validation row masks over the rows of ``split`` (train and val rows).

    ``resplit = 0`` keeps the manifest's split. Otherwise the same number of validation rows as
    the manifest has is drawn at random from all train+val rows, seeded by ``(seed, resplit,
    site_salt)`` so every run and every arm draws the same re-splits.
    """
    s = np.asarray(split)
    if resplit == 0:
        return s == "train", s == "val"
    pool = np.flatnonzero((s == "train") | (s == "val"))
    n_val = int((s == "val").sum())
    rng = np.random.default_rng([seed, resplit, zlib.crc32(site_salt.encode())])
    val = np.zeros(len(s), dtype=bool)
    val[rng.choice(pool, size=n_val, replace=False)] = True
    train = np.zeros(len(s), dtype=bool)
    train[pool] = True
    return train & ~val, val


def standardiser_from(parts: Sequence[FeatureSums]) -> Standardiser:
    """Pool the sites' sums; a feature no site could measure (count 0) becomes a constant
    (centred to 0, i.e. ignored by the model) instead of an error."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    missing = total.count < 1
    if missing.any():
        total = FeatureSums(total.names, np.where(missing, 1.0, total.count), total.total,
                            total.total_sq, total.shift, total.n_rows)
    return combine_sums([total])


@dataclass
class TabularState:
    """The coordinator's state of one tabular model during its federated fit."""

    spec: TabularSpec
    standardiser: Standardiser | None = None
    model: LogisticModel | None = None
    lr: float = 1.0
    history: list[dict[str, float]] = field(default_factory=list)
    cox: dict[str, Any] = field(default_factory=dict)  # Cox models: coef, center, h0, horizon
    fit: dict[str, Any] = field(default_factory=dict)  # how the fit went (solver, messages)

    def to_bundle(self) -> dict[str, Any]:
        """What the sites need to score or train it (coefficients and standardisation)."""
        return {"spec": self.spec.to_dict(),
                "standardiser": self.standardiser.to_dict() if self.standardiser else None,
                "model": self.model.to_dict() if self.model else None, "lr": self.lr,
                "cox": self.cox}

    @classmethod
    def from_bundle(cls, d: Mapping[str, Any]) -> TabularState:
        return cls(TabularSpec.from_dict(d["spec"]),
                   Standardiser.from_dict(d["standardiser"]) if d.get("standardiser") else None,
                   LogisticModel.from_dict(d["model"]) if d.get("model") else None,
                   float(d.get("lr", 1.0)), cox=dict(d.get("cox") or {}))


def server_step(state: TabularState, replies: Sequence[tuple[F64, int, float, float]],
                rnd: int) -> None:
    """Replace the global model by the FedAvg of the sites' ``(theta, n, loss, steps)`` and
    soft-threshold the L1 share (``lr x l1 x`` the weighted mean number of local steps)."""
    if not replies:
        return
    old = state.model.to_vector() if state.model is not None else None
    new = fedavg([(LogisticModel.from_vector(t), n) for t, n, _, _ in replies])
    ns = np.array([n for _, n, _, _ in replies], dtype=np.float64)
    steps = float(np.dot(ns, [s for *_, s in replies]) / ns.sum())
    a1 = state.spec.l1_strength
    if a1 > 0:
        new = LogisticModel(_soft_threshold(new.weights, np.full(new.n_features,
                                                                 state.lr * a1 * steps)),
                            new.intercept)
    state.model = new
    state.history.append({
        "round": rnd,
        "train_loss": float(np.dot(ns, [loss for _, _, loss, _ in replies]) / ns.sum()),
        "n_selected": int(np.count_nonzero(new.weights)),
        "step_norm": (float(np.linalg.norm(new.to_vector() - old)) if old is not None
                      else math.nan),
    })


Ask = Callable[[str, dict[str, Any], dict[str, TabularState]], list[dict[str, Any]]]


def fit_tabular_newton(states: dict[str, TabularState], ask: Ask, max_evals: int = 30,
                       step_tol: float = 1e-5) -> None:
    """The coordinator's exact fit of the models of ``states`` (all at once, one message per
    step): one ``sums`` step (site-centred sums and positives: the pooled standardiser and the
    starting intercept), then ``newton`` steps until every model's proximal Newton direction is
    below ``step_tol`` (:mod:`hcc_fl.shared.newton`; that last step is taken without a message,
    leaving an error of order ``step_tol**2``). Sets each state's ``standardiser``,
    ``model``, ``history`` (one entry per accepted iterate) and ``fit`` (solver, messages,
    convergence, rejected replies)."""
    from hcc_fl.shared.newton import NewtonState, check_reply, combine_centred, pool
    from hcc_fl.shared.tabular import _check_penalty

    if not states:
        return
    first = ask("sums", {"centre": "own"}, states)
    fits: dict[str, NewtonState] = {}
    rejected = dict.fromkeys(states, 0)
    for k, st in states.items():
        parts: list[FeatureSums] = []
        positives, rows = 0.0, 0
        for r in first:
            try:
                fs = FeatureSums.from_dict(r[k])
                pos = float(r[k]["positives"])
                if not (0 <= pos <= fs.n_rows and np.all(fs.count <= fs.n_rows)
                        and np.all(fs.count >= 0)):
                    raise ValueError("counts outside [0, n]")
                if parts and fs.names != parts[0].names:
                    raise ValueError("feature names differ")
            except (KeyError, TypeError, ValueError):
                rejected[k] += 1
                continue
            parts.append(fs)
            positives += pos
            rows += fs.n_rows
        if not parts or rows == 0:
            raise ValueError(f"{k}: no site sent usable feature sums")
        st.standardiser = combine_centred(parts)
        a1, a2 = _check_penalty(st.spec.penalty, st.spec.alpha, st.spec.l1_ratio)
        fits[k] = NewtonState.start(len(st.standardiser.names), a1, a2, positives / rows)
    messages = 1
    while active := [k for k, f in fits.items() if not f.done]:
        for k in active:
            states[k].model = LogisticModel.from_vector(fits[k].candidate)
        replies = ask("newton", {}, {k: states[k] for k in active})
        messages += 1
        for k in active:
            ok = []
            for r in replies:
                try:
                    ok.append(check_reply(r.get(k) or {}, fits[k].p))
                except ValueError:
                    rejected[k] += 1
            if not ok:
                raise ValueError(f"{k}: no site sent a usable Newton reply")
            fits[k].update(*pool(ok), step_tol=step_tol, max_evals=max_evals)
    for k, st in states.items():
        f = fits[k]
        st.model = LogisticModel.from_vector(f.theta)
        st.history = f.history
        st.fit = {"solver": "newton", "messages": messages, "evaluations": f.evaluations,
                  "converged": f.converged, "rejected_replies": rejected[k]}


def fit_tabular(states: dict[str, TabularState], ask: Ask, rounds: int, epochs: int,
                proximal_mu: float = 0.0,
                on_round: Callable[[int, int], None] | None = None) -> None:
    """The coordinator's FedAvg/FedProx loop of a tabular fit (``tabular_solver: fedavg``;
    all models of ``states`` at once; :func:`fit_tabular_newton` is the default).

    ``ask(op, options, states)`` sends one step to every training site and returns their
    replies (``{key: result}`` each; see ``client.components.tabular_step``):

    1. ``sums`` twice: pooled mean, then the sums shifted by it -> exact pooled SD
       (:func:`standardiser_from`);
    2. ``lipschitz``: one common step ``1 / max_k L_k`` per model;
    3. ``rounds`` x ``train``: FedAvg/FedProx of the sites' coefficients, L1 share
       soft-thresholded by the server (:func:`server_step`).
    """
    if not states:
        return
    first = ask("sums", {}, states)
    shift = {k: standardiser_from([FeatureSums.from_dict(r[k]) for r in first]).mean.tolist()
             for k in states}
    second = ask("sums", {"shift": shift}, states)
    for k, st in states.items():
        st.standardiser = standardiser_from([FeatureSums.from_dict(r[k]) for r in second])
        st.model = LogisticModel.zeros(len(st.standardiser.names))
    bounds = ask("lipschitz", {"proximal_mu": proximal_mu}, states)
    for k, st in states.items():
        st.lr = 1.0 / max(float(b[k]) for b in bounds)
    for rnd in range(1, rounds + 1):
        replies = ask("train", {"epochs": epochs, "proximal_mu": proximal_mu}, states)
        for k, st in states.items():
            server_step(st, [(np.asarray(r[k]["theta"], dtype=np.float64), int(r[k]["n"]),
                              float(r[k]["loss"]), float(r[k]["steps"])) for r in replies], rnd)
        if on_round:
            on_round(rnd, rounds)
    for st in states.values():
        st.fit = {"solver": "fedavg", "messages": 3 + rounds}


def fit_components(
    comps: TaskComponents,
    ask_for: Callable[[dict[str, TabularState], bool], Ask],
    proximal_mu: float = 0.0,
    resplits: int | None = None,
) -> dict[str, TabularState]:
    """Fit a task's tabular models (every re-split at once), then its stacked model on the
    held-out validation scores of the deep model and the tabular models.

    ``ask_for(fixed, with_deep)`` returns the transport for one fit: ``fixed`` are models the
    sites need for scoring but do not train, ``with_deep`` says whether the deep model's weights
    must travel too (the stacked model scores with them). ``resplits`` overrides
    ``comps.resplits``.
    """
    n_resplits = comps.resplits if resplits is None else resplits
    states = {key(t.name, r): TabularState(t) for t in comps.tabular
              for r in range(n_resplits + 1)}

    def fit(these: dict[str, TabularState], ask: Ask) -> None:
        if comps.solver == "newton":
            fit_tabular_newton(these, ask)
        else:
            fit_tabular(these, ask, comps.rounds, comps.local_epochs, proximal_mu)

    fit(states, ask_for({}, False))
    if comps.stack is not None:
        base = {k: st for k, st in states.items() if split_key(k)[1] == 0}
        stack = {key(comps.stack.name): TabularState(comps.stack)}
        fit(stack, ask_for(base, True))
        states.update(stack)
    if comps.cox:
        cox = {key(c.name): TabularState(c) for c in comps.cox}
        fit_cox(cox, ask_for(main_models(states), True), comps.horizon)
        states.update(cox)
    return states


def fit_cox(states: dict[str, TabularState], ask: Ask, horizon: float,
            grid_step: float = 0.1) -> None:
    """Fit site-stratified Cox models by Newton-Raphson on the sites' summed gradients and
    Hessians (``shared.cox``), then the pooled Breslow baseline at ``horizon``.

    Site steps: ``cox-center`` (feature sums and counts: the pooled mean centres the
    covariates), ``cox`` (gradient, Hessian and log partial likelihood at ``beta``; one round
    per Newton step) and ``breslow`` (event counts and risk-set sums on the edges after 0 of
    ``TimeGrid(horizon, round(horizon / grid_step))``: exact multiples of ``grid_step`` when it
    divides ``horizon``, the last one ``horizon``). The model's ``cox`` entry then holds
    ``coef``, ``se``, ``center``, ``h0`` (cumulative baseline hazard at the horizon) and the
    fit's diagnostics; a site scores ``1 - exp(-h0 exp((x - center).coef))``, the risk by the
    horizon.
    """
    from hcc_fl.shared.cox import BreslowSums, cox_newton
    from hcc_fl.shared.metrics.pooled import TimeGrid

    for k, st in states.items():
        one = {k: st}
        parts = ask("cox-center", {}, one)
        total = np.sum([np.asarray(r[k]["sum"], dtype=np.float64) for r in parts], axis=0)
        n = sum(int(r[k]["n"]) for r in parts)
        center = total / max(n, 1)
        st.cox = {"center": center.tolist()}

        def summed(beta: F64, k: str = k, one: dict[str, TabularState] = one
                   ) -> tuple[F64, F64, float]:
            replies = ask("cox", {"beta": beta.tolist()}, one)
            g = np.sum([np.asarray(r[k]["gradient"], dtype=np.float64) for r in replies], axis=0)
            h = np.sum([np.asarray(r[k]["hessian"], dtype=np.float64) for r in replies], axis=0)
            return g, h, float(sum(float(r[k]["loglik"]) for r in replies))

        fit = cox_newton(summed, len(st.spec.inputs), l2=st.spec.alpha, names=st.spec.inputs)
        # the edges after 0 of the agreed TimeGrid: exact decimals (k * 0.1 days), last = horizon
        grid = TimeGrid(horizon, max(1, int(round(horizon / grid_step)))).edges[1:]
        replies = ask("breslow", {"beta": fit.coef.tolist(), "grid": grid.tolist()}, one)
        sums = [BreslowSums.from_dict(r[k]) for r in replies]
        pooled = sums[0]
        for extra in sums[1:]:
            pooled = pooled + extra
        st.cox.update(coef=fit.coef.tolist(), se=fit.se.tolist(), h0=pooled.at(float(grid[-1])),
                      horizon=float(grid[-1]), loglik=fit.loglik, converged=fit.converged,
                      iterations=fit.iterations, features=list(st.spec.inputs), n=n,
                      events=float(np.sum(pooled.events)))


def main_models(states: Mapping[str, TabularState]) -> dict[str, TabularState]:
    """The models fitted on the manifest's own split (re-split 0)."""
    return {k: st for k, st in states.items() if split_key(k)[1] == 0}


def selection_summary(st: TabularState) -> dict[str, Any]:
    """The selected features (non-zero coefficients, largest first) and the fit's history;
    for a Cox model its coefficients, standard errors and baseline."""
    if st.spec.block == "cox":
        return {"spec": st.spec.to_dict(), "cox": st.cox,
                "hazard_ratios": {f: math.exp(c) for f, c in
                                  zip(st.cox.get("features", []), st.cox.get("coef", []),
                                      strict=True)}}
    assert st.model is not None and st.standardiser is not None
    from hcc_fl.shared.tabular import selected_features

    return {"spec": st.spec.to_dict(), "n_features": len(st.standardiser.names),
            "selected": [{"feature": f, "coef": c} for f, c in
                         selected_features(st.model, st.standardiser.names)],
            "intercept": st.model.intercept,
            "unmeasured_or_constant": st.standardiser.constant_names,
            "history": st.history, "fit": st.fit}


def stack_matrix(probs: Mapping[str, F64], inputs: Sequence[str], eps: float = 1e-6) -> F64:
    """The stacked model's features: the logits of the input components' probabilities."""
    cols = []
    for name in inputs:
        p = np.clip(np.asarray(probs[name], dtype=np.float64), eps, 1 - eps)
        cols.append(np.log(p) - np.log1p(-p))
    return np.column_stack(cols)
