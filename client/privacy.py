"""Local differential privacy at a site: DP-SGD with Opacus, the run's accountant, the ledger.

No Flower here. The pieces:

- :class:`PrivacyConfig` (config group ``privacy/``): ``none``, ``dp`` (local DP-SGD: a target
  epsilon per run or an explicit noise multiplier, delta, max grad norm) or ``central-dp``
  (server-side clipping and noise; nothing happens here).
- :func:`dp_train_round`: one round of local training with per-sample gradient clipping and
  Gaussian noise (Opacus ``GradSampleModule`` + ``DPOptimizer``), Poisson sampling of patients
  with the site's seeded generator, and the RDP accountant advanced once per step. The Opacus
  wrapper is removed before the weights leave the site.
- :class:`RunAccountant`: the accountant's history (noise multiplier, sample rate, steps) stored
  in a JSON file at the site, so epsilon accumulates over the rounds of a run even though Flower
  starts a fresh process for every message.
- :class:`PrivacyLedger`: per dataset (manifest SHA-256), the epsilon every run spent; a run that
  would take the site past its total budget is refused before it trains.

Losses that couple the samples of a batch (Barlow Twins and other contrastive/SSL losses, the Cox
partial likelihood) give no per-patient guarantee under per-sample clipping: DP mode refuses them
(:func:`check_dp_loss`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

COUPLED_LOSSES = frozenset({"barlow_twins", "vicreg", "contrastive", "simclr", "cox"})
MODES = ("none", "dp", "central-dp")


class PrivacyError(PermissionError):
    """DP cannot run as configured, or the site's privacy budget would be exceeded."""


@dataclass(frozen=True)
class PrivacyConfig:
    """The ``privacy`` config group (see configs/privacy/)."""

    mode: str = "none"
    target_epsilon: float | None = None  # per run (local DP); None with noise_multiplier set
    delta: float | None = None  # default 1 / (10 n_site)
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # explicit sigma instead of a target epsilon
    sample_rate: float | None = None  # Poisson sampling rate; default batch_size / n
    grad_sample_mode: str = "hooks"  # hooks | ghost (Opacus ghost clipping)
    site_budget: float | None = None  # simulation: total epsilon per site (deployment: SITE.yaml)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> PrivacyConfig:
        """From the composed config's ``privacy`` block (or run-config keys)."""
        raw = dict(raw or {})
        known = set(cls.__dataclass_fields__)
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Reject settings that cannot give a guarantee, naming the key."""
        if self.mode not in MODES:
            raise PrivacyError(f"privacy.mode must be one of {', '.join(MODES)}, not {self.mode}")
        if self.mode == "central-dp":
            if self.noise_multiplier is None or not self.noise_multiplier > 0:
                raise PrivacyError("privacy.noise_multiplier must be > 0 for central-dp")
            if not self.max_grad_norm > 0:
                raise PrivacyError("privacy.max_grad_norm (the update clipping norm) must be > 0")
            return
        if self.mode != "dp":
            return
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise PrivacyError("privacy: give exactly one of target_epsilon and "
                               "noise_multiplier for mode dp")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise PrivacyError(f"privacy.target_epsilon must be > 0, not {self.target_epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise PrivacyError("privacy.noise_multiplier must be > 0")
        if not self.max_grad_norm > 0:
            raise PrivacyError("privacy.max_grad_norm must be > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise PrivacyError(f"privacy.delta must be in (0, 1), not {self.delta}")

    def delta_for(self, n: int) -> float:
        """delta, by default 1 / (10 n) for a site of n patients."""
        return float(self.delta) if self.delta is not None else 1.0 / (10.0 * max(n, 1))

    def rate_for(self, n: int, batch_size: int) -> float:
        """Poisson sampling rate q (default batch_size / n, at most 1)."""
        q = self.sample_rate if self.sample_rate is not None else batch_size / max(n, 1)
        return float(min(max(q, 1.0 / max(n, 1)), 1.0))


def check_dp_loss(loss: str) -> None:
    """Refuse losses that couple the samples of a batch (no per-patient DP guarantee)."""
    if loss in COUPLED_LOSSES:
        raise PrivacyError(
            f"loss '{loss}' couples the samples of a batch, so per-sample clipping gives no "
            "per-patient guarantee: run it without DP (privacy=none) or use a per-sample loss"
        )


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float,
                     steps: int) -> float:
    """The noise multiplier that spends ``target_epsilon`` over ``steps`` (RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=max(steps, 1),
                                      accountant="rdp", epsilon_tolerance=0.005))


def planned_steps(n: int, sample_rate: float, epochs_per_round: int, rounds: int) -> int:
    """DP-SGD steps of a whole run: rounds x epochs x ceil(1 / q)."""
    return int(rounds * epochs_per_round * math.ceil(1.0 / sample_rate))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class RunAccountant:
    """The RDP accountant of one run at one site, persisted in ``path`` (JSON)."""

    path: Path
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds_done: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> RunAccountant:
        """Read the accountant (empty if the run has not trained here yet)."""
        if not path.is_file():
            return cls(path)
        raw = json.loads(path.read_text())
        return cls(path, [tuple(h) for h in raw["history"]],  # type: ignore[misc]
                   list(raw.get("rounds_done", [])))

    def save(self) -> None:
        """Write atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, {"history": [list(h) for h in self.history],
                                  "rounds_done": self.rounds_done})

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far by this run at this site (RDP, converted at ``delta``)."""
        if not self.history:
            return 0.0
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = [(float(s), float(q), int(k)) for s, q, k in self.history]
        return float(acc.get_epsilon(delta))

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record ``steps`` steps of the subsampled Gaussian mechanism."""
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, k = self.history[-1]
            self.history[-1] = (s, q, k + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))


class PrivacyLedger:
    """Epsilon spent per dataset (manifest SHA-256) and run, against the site's total budget.

    File layout (JSON)::

        {"<manifest sha256>": {"<run key>": {"epsilon": 1.9, "delta": 0.0025,
                                             "planned": 2.0, "updated": "..."}}}
    """

    def __init__(self, path: Path, total_epsilon: float | None) -> None:
        self.path = path
        self.total = total_epsilon

    def _read(self) -> dict[str, dict[str, dict[str, Any]]]:
        if not self.path.is_file():
            return {}
        return json.loads(self.path.read_text())  # type: ignore[no-any-return]

    def spent(self, dataset: str, exclude_run: str | None = None) -> dict[str, float]:
        """Run key -> epsilon (the larger of planned and spent) on this dataset."""
        runs = self._read().get(dataset, {})
        return {k: max(float(v.get("epsilon", 0.0)), float(v.get("planned", 0.0)))
                for k, v in runs.items() if k != exclude_run}

    def reserve(self, dataset: str, run: str, planned_epsilon: float, delta: float) -> None:
        """Book a run's planned epsilon before it trains, or refuse it (PrivacyError)."""
        with _locked(self.path):
            data = self._read()
            others = {k: max(float(v.get("epsilon", 0.0)), float(v.get("planned", 0.0)))
                      for k, v in data.get(dataset, {}).items() if k != run}
            used = sum(others.values())
            if self.total is not None and used + planned_epsilon > self.total + 1e-9:
                detail = ", ".join(f"{k}: {v:.3g}" for k, v in sorted(others.items())) or "none"
                raise PrivacyError(
                    f"privacy budget exceeded for this dataset: total epsilon {self.total:g}, "
                    f"already spent {used:.3g} by earlier runs ({detail}), this run needs "
                    f"{planned_epsilon:.3g}"
                )
            entry = data.setdefault(dataset, {}).setdefault(run, {})
            entry.update({"planned": float(planned_epsilon), "delta": float(delta)})
            entry.setdefault("epsilon", 0.0)
            _write_atomic(self.path, data)

    def record(self, dataset: str, run: str, epsilon: float) -> None:
        """Record the epsilon a run has spent so far."""
        with _locked(self.path):
            data = self._read()
            entry = data.setdefault(dataset, {}).setdefault(run, {})
            entry["epsilon"] = float(epsilon)
            _write_atomic(self.path, data)


@dataclass(frozen=True)
class DPOutcome:
    """What one DP round reports (aggregates only)."""

    loss: float
    n_examples: int
    steps: int
    noise_multiplier: float
    sample_rate: float


def dp_train_round(
    model: nn.Module,
    n: int,
    batch: Callable[[torch.Tensor], tuple[tuple[torch.Tensor, ...], torch.Tensor]],
    loss_fn: nn.Module,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    seed: int,
    proximal_mu: float = 0.0,
    device: str = "cpu",
    grad_sample_mode: str = "hooks",
) -> DPOutcome:
    """DP-SGD for ``epochs`` epochs of ``ceil(1/q)`` Poisson-sampled steps each.

    ``batch(idx)`` returns the model inputs and labels of the patients ``idx``. Per-sample
    gradients come from Opacus' ``GradSampleModule``; ``DPOptimizer`` clips each to
    ``max_grad_norm`` and adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` (its
    generator is seeded, so a run is reproducible; this is not Opacus' ``secure_mode``). The
    FedProx term is data-independent and applied after the private step:
    ``w -= lr * mu * (w - w_start)``. An empty Poisson batch releases nothing and is skipped,
    but still counted as a step (conservative accounting). The wrapper is removed at the end;
    ``model`` holds the new weights.

    ``grad_sample_mode``: ``hooks`` materialises per-sample gradients (Opacus'
    ``GradSampleModule``); ``ghost`` uses Opacus' ghost clipping (per-sample gradient norms
    without per-sample gradients, two backward passes), which needs less memory. Both give the
    same clipped, noised update (``bench/dp_step.py`` measures which is faster per model).
    """
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    if grad_sample_mode not in ("hooks", "ghost"):
        raise PrivacyError(f"privacy.grad_sample_mode must be hooks or ghost, not "
                           f"{grad_sample_mode}")
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    torch.manual_seed(seed)
    start = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    expected = max(1, int(round(sample_rate * n)))
    gsm: Any
    criterion: Any = loss_fn
    if grad_sample_mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(
            model.to(device).train(), loss_reduction="mean", max_grad_norm=max_grad_norm,
            use_ghost_clipping=True)
        base = torch.optim.AdamW(gsm.parameters(), lr=lr, weight_decay=weight_decay)
        opt: Any = DPOptimizerFastGradientClipping(
            base, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected, loss_reduction="mean", generator=noise_gen)
        criterion = DPLossFastGradientClipping(gsm, opt, loss_fn, loss_reduction="mean")
    else:
        gsm = GradSampleModule(model.to(device).train(), loss_reduction="mean")
        base = torch.optim.AdamW(gsm.parameters(), lr=lr, weight_decay=weight_decay)
        opt = DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                          expected_batch_size=expected, loss_reduction="mean",
                          generator=noise_gen)
    steps_per_epoch = math.ceil(1.0 / sample_rate)
    total, count, steps = 0.0, 0, 0
    try:
        for _ in range(epochs):
            for _ in range(steps_per_epoch):
                steps += 1
                idx = torch.nonzero(torch.rand(n, generator=gen) < sample_rate).flatten()
                if len(idx) == 0:
                    continue
                inputs, target = batch(idx)
                logits = gsm(*(x.to(device) for x in inputs)).squeeze(1)
                loss = criterion(logits, target.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if start:
                    with torch.no_grad():
                        for p, s in zip(model.parameters(), start, strict=True):
                            p.sub_(lr * proximal_mu * (p - s))
                total += float(loss.detach()) * len(idx)
                count += len(idx)
    finally:
        gsm._close()  # remove Opacus' hooks and per-sample attributes from the module
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    return DPOutcome(total / max(count, 1), n, steps, noise_multiplier, sample_rate)
