"""FedBN at the coordinator (Li et al., ICLR 2021), without Flower imports.

During the rounds of a ``fedbn`` arm the coordinator never sends or receives normalisation
state: training and validation messages carry the model without the normalisation entries
(:func:`hcc_fl.shared.normstate.norm_keys`), each site replies with the same entries only, and
everything it receives is screened and averaged exactly as under FedAvg. The global model's
normalisation entries stay the values of the start of the arm (the sites take them as their
own in their first round, from the ``norm-init`` record).

Once, after the last round, the coordinator asks each training site for its normalisation
state (``query.norm_state``) to form the "FedBN + averaged statistics" model: the same shares
as a training round (example counts bounded by the site's declaration, capped at
``max_site_weight``). :func:`average_norm_states` screens and averages those replies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hcc_fl.server import screen

Layout = Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]


def check_norm_reply(views: Mapping[str, np.ndarray], expected: Layout, n: Any,
                     declared: int | None) -> str | None:
    """Why a site's normalisation-state reply is refused (None: accepted): exactly the
    expected names, shapes and dtypes, finite values, a valid ``num-examples``."""
    problem = screen.check_arrays(views, expected) or screen.check_num_examples(n, declared)
    if problem:
        return problem
    for k, v in views.items():
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            return f"non-finite values in {k}"
    return None


def average_norm_states(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                        max_site_weight: float = 1.0) -> dict[str, np.ndarray]:
    """The weighted mean of screened normalisation states (shares proportional to
    ``weights``, capped at ``max_site_weight``; float64 accumulation, cast back to each
    array's dtype; integer arrays such as ``num_batches_tracked`` are rounded)."""
    if not states:
        raise ValueError("no normalisation state to average")
    shares = screen.capped_shares(weights, max_site_weight)
    out: dict[str, np.ndarray] = {}
    for k, first in states[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for s, share in zip(states, shares, strict=True):
            acc += share * np.asarray(s[k], dtype=np.float64)
        if np.issubdtype(first.dtype, np.floating):
            out[k] = acc.astype(first.dtype)
        else:
            out[k] = np.rint(acc).astype(first.dtype)
    return out
