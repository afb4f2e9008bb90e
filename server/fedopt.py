"""Server optimisers (FedOpt: Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The coordinator treats the difference between the round's aggregate (FedAvg's weighted mean, or
the robust, secure or noisy aggregate the run uses) and the current global model as a
pseudo-gradient and takes an adaptive step with it:

    d_t = aggregate_t - x_t
    m_t = beta_1 m_(t-1) + (1 - beta_1) d_t
    v_t = beta_2 v_(t-1) + (1 - beta_2) d_t^2                     (FedAdam)
        = v_(t-1) - (1 - beta_2) d_t^2 sign(v_(t-1) - d_t^2)       (FedYogi)
        = v_(t-1) + d_t^2                                          (FedAdagrad)
    x_(t+1) = x_t + eta_t m_t / (sqrt(v_t) + tau)

with m and v starting at 0 and, for FedAdam, Kingma and Ba's bias correction
``eta_t = eta sqrt(1 - beta_2^t) / (1 - beta_1^t)`` (t = the optimiser's step, from 1). These are
the formulas of Flower's own ``FedAdam``/``FedYogi``/``FedAdagrad`` (tests/server/test_fedopt.py
checks against them; Flower counts FedAdam's t from the round number + 1), written here because
our strategies aggregate with their own screening, packed transfer, SecAgg+ and central DP.

Normalisation statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) and integer
arrays are not optimiser parameters: they take the aggregate as it is. Moments are float64 and
the step is cast back to each array's dtype; :meth:`ServerOptimizer.state` and
:meth:`~ServerOptimizer.load_state` carry everything a resume needs, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

KINDS = ("fedadam", "fedyogi", "fedadagrad")
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
F64 = npt.NDArray[np.float64]


@dataclass
class ServerOptimizer:
    """One arm's server optimiser and its state."""

    kind: str
    lr: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    steps: int = 0
    m: dict[str, F64] = field(default_factory=dict)
    v: dict[str, F64] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"server optimiser must be one of {', '.join(KINDS)}, got "
                             f"{self.kind!r}")
        for name, value, lo, hi in (("server_lr", self.lr, 0.0, math.inf),
                                    ("beta_1", self.beta_1, -1e-300, 1.0),
                                    ("beta_2", self.beta_2, -1e-300, 1.0),
                                    ("tau", self.tau, 0.0, math.inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or not lo < value < hi:
                raise ValueError(f"{self.kind}: {name} = {value!r} is out of range")

    @staticmethod
    def optimised(name: str, array: np.ndarray) -> bool:
        """Whether ``name`` is a parameter the optimiser moves (floating, not a BN statistic)."""
        return np.issubdtype(array.dtype, np.floating) and not name.endswith(STATISTICS)

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
        """The next global model from the current one and the round's aggregate (same keys,
        shapes and dtypes; the result keeps the aggregate's key order)."""
        if set(current) != set(aggregate):
            raise ValueError("the aggregate and the global model have different arrays")
        self.steps += 1
        t = self.steps
        eta = self.lr
        if self.kind == "fedadam":
            eta = self.lr * math.sqrt(1 - self.beta_2 ** t) / (1 - self.beta_1 ** t)
        out: dict[str, np.ndarray] = {}
        for k, agg in aggregate.items():
            cur = current[k]
            if cur.shape != agg.shape:
                raise ValueError(f"array {k}: shape {agg.shape} differs from {cur.shape}")
            if not self.optimised(k, agg):
                out[k] = np.array(agg, copy=True)
                continue
            x = cur.astype(np.float64)
            d = agg.astype(np.float64) - x
            m = self.beta_1 * self.m.get(k, 0.0) + (1 - self.beta_1) * d
            v_prev = self.v.get(k, np.zeros_like(d))
            d2 = d * d
            if self.kind == "fedadam":
                v = self.beta_2 * v_prev + (1 - self.beta_2) * d2
            elif self.kind == "fedyogi":
                v = v_prev - (1 - self.beta_2) * d2 * np.sign(v_prev - d2)
            else:
                v = v_prev + d2
            self.m[k], self.v[k] = m, v
            out[k] = (x + eta * m / (np.sqrt(v) + self.tau)).astype(agg.dtype)
        return out

    def state(self) -> dict[str, Any]:
        """The optimiser's settings and moments (numpy float64 arrays)."""
        return {"kind": self.kind, "lr": self.lr, "beta_1": self.beta_1, "beta_2": self.beta_2,
                "tau": self.tau, "steps": self.steps,
                "m": {k: v.copy() for k, v in self.m.items()},
                "v": {k: v.copy() for k, v in self.v.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` (the settings must be the same as this run's)."""
        for key in ("kind", "lr", "beta_1", "beta_2", "tau"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's server optimiser has {key} = "
                                 f"{state[key]!r}, this run {getattr(self, key)!r}")
        self.steps = int(state["steps"])
        self.m = {k: np.asarray(v, dtype=np.float64).copy() for k, v in state["m"].items()}
        self.v = {k: np.asarray(v, dtype=np.float64).copy() for k, v in state["v"].items()}


def from_arm(arm: Mapping[str, Any]) -> ServerOptimizer | None:
    """The server optimiser an arm's configuration asks for (``name`` fedadam, fedyogi or
    fedadagrad; ``server_lr``, ``beta_1``, ``beta_2``, ``tau``), or None for FedAvg/FedProx."""
    name = str(arm.get("name", ""))
    kind = str(arm.get("server_optimizer") or (name if name in KINDS else ""))
    if not kind:
        return None
    d = ServerOptimizer(kind)
    return ServerOptimizer(kind, lr=arm.get("server_lr", d.lr),
                           beta_1=arm.get("beta_1", d.beta_1), beta_2=arm.get("beta_2", d.beta_2),
                           tau=arm.get("tau", d.tau))
