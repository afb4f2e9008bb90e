"""Test-only: turns one simulated site hostile (never installed; on PYTHONPATH only in
``tests/integration/test_faults.py::test_a_hostile_site_cannot_take_over_the_federation``).

With ``HCC_FL_TEST_HOSTILE=<site>``, every Python process of the simulation that imports the
ClientApp (``hcc_fl.client.flower_app``) gets two of that module's functions wrapped, for that
site only:

- training replies carry the update scaled by 1e6 (``global + 1e6 (trained - global)``);
- the validation rows are repeated ten times, so the pooled-validation sums carry forged,
  internally consistent counts (x10) — only the size the site declared betrays them.

The other sites run the unchanged code.

With ``HCC_FL_TEST_SECAGG_DROP=<site>`` (``tests/integration/test_secagg_e2e.py``), that site
fails every SecAgg+ ``share`` stage of a training round, as a site crashing after it advertised
its keys and before it shared them would.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Any

TARGET = "hcc_fl.client.flower_app"
HOSTILE = os.environ.get("HCC_FL_TEST_HOSTILE", "")
DROP = os.environ.get("HCC_FL_TEST_SECAGG_DROP", "")


def _patch(module: Any) -> None:
    if DROP:
        share = module.site_share

        def dropping_share(state: Any, ident: Any, adverts: Any) -> Any:
            if state.site == DROP and state.tag.startswith("train-"):
                raise ConnectionError("test: the site went away after set-up")
            return share(state, ident, adverts)

        module.site_share = dropping_share
    if not HOSTILE:
        return
    import numpy as np
    import torch

    train_local, component_probs = module._train_local, module._component_probs

    def hostile_train(msg: Any, context: Any) -> Any:
        model, values = train_local(msg, context)
        if module.resolve_site(context).name == HOSTILE:
            start = module._model(msg, context).state_dict()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.is_floating_point():
                        v.copy_(start[k] + 1e6 * (v - start[k]))
        return model, values

    def hostile_probs(msg: Any, context: Any, site: Any, splits: Any) -> Any:
        y, p = component_probs(msg, context, site, splits)
        if site.name == HOSTILE:
            return np.tile(y, 10), np.tile(p, 10)
        return y, p

    module._train_local, module._component_probs = hostile_train, hostile_probs


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if HOSTILE or DROP:
    sys.meta_path.insert(0, _Finder())
