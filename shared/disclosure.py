"""The release policy of a site (what its statistics may say about its patients; applied at the
site by :mod:`hcc_fl.client.disclosure`), the released score cells, and what the coordinator can
still say exactly about a pooled AUC computed from them. Both sides import this module: the
coordinator to configure simulations and to read the cells, the sites to apply the policy."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hcc_fl.shared.metrics.pooled import ScoreGrid

F64 = npt.NDArray[np.float64]

MODES = ("cells", "exact")
# node-config / run-config keys (deployment: SITE.yaml -> node config; simulation: run config)
KEY_MODE = "disclosure-mode"
KEY_MIN_CELL = "disclosure-min-cell"
KEY_MIN_SPLIT = "disclosure-min-split"
KEY_CELL_WIDTH = "disclosure-cell-width"


class DisclosureRefused(PermissionError):
    """A release the site's policy does not allow; ``rule`` names the rule."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"disclosure policy, rule {rule}: {detail}")
        self.rule = rule


@dataclass(frozen=True)
class ReleasePolicy:
    """A site's release policy (see the module docstring)."""

    mode: str = "cells"
    min_cell: int = 5
    min_split: int = 10
    cell_width: float = 0.01

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"disclosure.mode must be one of {', '.join(MODES)}, "
                             f"got {self.mode!r}")
        if isinstance(self.min_cell, bool) or not isinstance(self.min_cell, int) \
                or self.min_cell < 1:
            raise ValueError(f"disclosure.min_cell must be an integer >= 1, got "
                             f"{self.min_cell!r}")
        if isinstance(self.min_split, bool) or not isinstance(self.min_split, int) \
                or self.min_split < 0:
            raise ValueError(f"disclosure.min_split must be an integer >= 0, got "
                             f"{self.min_split!r}")
        w = self.cell_width
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1 \
                or abs(1 / w - round(1 / w)) > 1e-9:
            raise ValueError(f"disclosure.cell_width must be 1/m for a whole m >= 1 (0.01, "
                             f"0.02, 0.05, ...), got {w!r}")

    @property
    def exact(self) -> bool:
        return self.mode == "exact"

    @property
    def n_candidates(self) -> int:
        """Number of candidate cells on [0, 1]."""
        return int(round(1 / self.cell_width))

    def as_config(self) -> dict[str, Any]:
        return {KEY_MODE: self.mode, KEY_MIN_CELL: self.min_cell,
                KEY_MIN_SPLIT: self.min_split, KEY_CELL_WIDTH: float(self.cell_width)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ReleasePolicy:
        """From node-config or run-config keys (defaults where absent)."""
        d = cls()
        return cls(mode=str(cfg.get(KEY_MODE, d.mode)),
                   min_cell=int(cfg.get(KEY_MIN_CELL, d.min_cell)),
                   min_split=int(cfg.get(KEY_MIN_SPLIT, d.min_split)),
                   cell_width=float(cfg.get(KEY_CELL_WIDTH, d.cell_width)))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "disclosure") -> ReleasePolicy:
        """From a YAML/Hydra mapping (``mode``, ``min_cell``, ``min_split``, ``cell_width``);
        ValueError names the key."""
        unknown = set(raw) - {"mode", "min_cell", "min_split", "cell_width"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        d = cls()
        return cls(mode=str(raw.get("mode", d.mode)), min_cell=raw.get("min_cell", d.min_cell),
                   min_split=raw.get("min_split", d.min_split),
                   cell_width=raw.get("cell_width", d.cell_width))

    def describe(self) -> str:
        if self.exact:
            return "exact (fine histograms and exact curves leave the site)"
        return (f"cells (k = {self.min_cell} per cell, splits of >= {self.min_split} patients, "
                f"cells >= {self.cell_width:g} wide)")



@dataclass(frozen=True)
class Cells:
    """A released partition of [0, 1] on a candidate grid of ``n_candidates`` equal cells:
    cell j is [starts[j], starts[j + 1]) in candidate units (the last one closed), with its
    cases (``pos``) and controls (``neg``)."""

    starts: tuple[int, ...]
    n_candidates: int
    pos: tuple[int, ...]
    neg: tuple[int, ...]

    def bounds(self) -> list[tuple[float, float]]:
        ends = [*self.starts[1:], self.n_candidates]
        m = self.n_candidates
        return [(a / m, b / m) for a, b in zip(self.starts, ends, strict=True)]

    def middles(self) -> F64:
        """The score at which each cell's patients are represented (its middle)."""
        ends = [*self.starts[1:], self.n_candidates]
        m = self.n_candidates
        return np.array([(a + b) / (2 * m) for a, b in zip(self.starts, ends, strict=True)])

    def cell_of(self, score: npt.ArrayLike) -> npt.NDArray[np.int64]:
        # the candidate cell by the exactly rounded edges, as the cells were counted (a score on
        # an edge, 0.29 on the 100-cell grid, belongs to the cell that starts there)
        cand = ScoreGrid(self.n_candidates).index(score)
        return (np.searchsorted(np.asarray(self.starts), cand, side="right") - 1).astype(np.int64)

    @classmethod
    def from_histograms(cls, starts: Iterable[int], n_candidates: int, pos: F64, neg: F64
                        ) -> Cells:
        """The cells of ``starts`` with their counts summed from fine histograms (whose length
        is a multiple of ``n_candidates``); ValueError if the starts are not a partition."""
        st = [int(s) for s in starts]
        if not st or st[0] != 0 or any(b <= a for a, b in zip(st, st[1:], strict=False)) \
                or st[-1] >= n_candidates:
            raise ValueError("the cell starts are not an increasing partition from 0")
        per, rem = divmod(len(pos), n_candidates)
        if rem or per == 0:
            raise ValueError("the histograms do not align with the cells")
        ends = [*st[1:], n_candidates]
        p = tuple(int(pos[a * per:b * per].sum()) for a, b in zip(st, ends, strict=False))
        q = tuple(int(neg[a * per:b * per].sum()) for a, b in zip(st, ends, strict=False))
        return cls(tuple(st), n_candidates, p, q)


def fine_cells(pos: F64, neg: F64) -> list[tuple[float, float, float, float]]:
    """(lo, hi, cases, controls) of every non-empty bin of fine histograms on [0, 1]."""
    n = len(pos)
    return [(i / n, (i + 1) / n, float(pos[i]), float(neg[i]))
            for i in np.nonzero((pos + neg) > 0)[0]]


def cell_intervals(cells: Cells) -> list[tuple[float, float, float, float]]:
    return [(a, b, float(p), float(q)) for (a, b), p, q in zip(cells.bounds(), cells.pos,
                                                               cells.neg, strict=False) if p + q]


def auc_bounds(intervals: Iterable[tuple[float, float, float, float]]) -> tuple[float, float]:
    """The smallest and largest AUC over every placement of the patients inside their released
    intervals ``(lo, hi, cases, controls)``: a case-control pair counts 1 when the case's
    interval lies wholly above the control's (case lo >= control hi), 0 when wholly below, and
    anything (ties included) when they overlap. O(n log n) in the number of intervals."""
    items = np.asarray(list(intervals), dtype=np.float64).reshape(-1, 4)
    lo_e, hi_e, p, q = items.T
    n1, n0 = float(p.sum()), float(q.sum())
    if n1 == 0 or n0 == 0:
        return (math.nan, math.nan)
    by_hi = np.argsort(hi_e, kind="stable")
    hi_sorted, q_by_hi = hi_e[by_hi], np.concatenate([[0.0], np.cumsum(q[by_hi])])
    by_lo = np.argsort(lo_e, kind="stable")
    lo_sorted, q_by_lo = lo_e[by_lo], np.concatenate([[0.0], np.cumsum(q[by_lo])])
    # controls wholly below a case interval: control hi <= case lo
    below = q_by_hi[np.searchsorted(hi_sorted, lo_e, side="right")]
    # controls not wholly above it: control lo < case hi
    not_above = q_by_lo[np.searchsorted(lo_sorted, hi_e, side="left")]
    return (float((p * below).sum()) / (n1 * n0), float((p * not_above).sum()) / (n1 * n0))
