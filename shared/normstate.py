"""FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021): which entries of a model's state are normalisation state, how a
site keeps its own on disk, and test-time statistics at a site that never trained.

Normalisation state is found from the model's modules, never from key names: every parameter
and buffer of a ``BatchNorm``/``InstanceNorm`` (``torch.nn.modules.batchnorm._NormBase``:
affine weight and bias, ``running_mean``, ``running_var``, ``num_batches_tracked``),
``GroupNorm`` or ``LayerNorm`` (affine weight and bias). A module without parameters or
buffers (``InstanceNorm`` without ``affine`` or ``track_running_stats``) contributes nothing.

A site's normalisation state is written atomically (a 0600 temporary file, fsync, then
``os.replace``; the folder is fsynced too) so that a fresh process per message (deployment)
or a crash between messages reads either the old or the new state, never a torn one.

Nothing here imports Flower.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm)
_ROUND_FILE = re.compile(r"^(?P<stage>[a-z]+)-round-(?P<round>\d{1,6})\.pt$")


def norm_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of ``model`` that belong to normalisation layers, in state-dict
    order (parameters and buffers of every ``BatchNorm``/``InstanceNorm``/``GroupNorm``/
    ``LayerNorm`` module, found with ``isinstance``)."""
    owned: set[str] = set()
    for prefix, module in model.named_modules():
        if not isinstance(module, NORM_TYPES):
            continue
        dot = f"{prefix}." if prefix else ""
        owned.update(dot + name for name, _ in module.named_parameters(recurse=False))
        owned.update(dot + name for name, _ in module.named_buffers(recurse=False))
    return [k for k in model.state_dict() if k in owned]


def split_state(state: Mapping[str, torch.Tensor], local: Iterable[str]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(shared, local)``: ``state`` split into the entries not in ``local`` and those in it
    (both in ``state``'s order)."""
    keep = set(local)
    shared = {k: v for k, v in state.items() if k not in keep}
    mine = {k: v for k, v in state.items() if k in keep}
    return shared, mine


def save_state_atomic(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write ``state`` (tensors) to ``path``: a 0600 temporary file beside it, fsync, then
    ``os.replace`` over the old one, then fsync of the folder. The folder is created 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by the umask; 0600 exactly
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a state written by :func:`save_state_atomic` (tensors only)."""
    state: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
    return state


class SiteNormStore:
    """A site's normalisation state of one run, one file per stage and round:
    ``<folder>/<stage>-round-<r>.pt``. A training message of round ``r`` starts from the newest
    round before ``r`` (so a round repeated after the coordinator's resume starts from exactly
    the state it started from the first time); any other message uses the newest."""

    def __init__(self, folder: Path, stage: str = "supervised") -> None:
        if not re.fullmatch(r"[a-z]+", stage):
            raise ValueError(f"stage must be lower-case letters, got {stage!r}")
        self.folder = Path(folder)
        self.stage = stage

    def path(self, server_round: int) -> Path:
        return self.folder / f"{self.stage}-round-{int(server_round)}.pt"

    def rounds(self) -> list[int]:
        """The rounds whose state this site saved for its stage, ascending."""
        if not self.folder.is_dir():
            return []
        out = []
        for p in self.folder.iterdir():
            m = _ROUND_FILE.match(p.name)
            if m and m["stage"] == self.stage:
                out.append(int(m["round"]))
        return sorted(out)

    def latest(self, before: int | None = None) -> dict[str, torch.Tensor] | None:
        """The newest saved state (of a round ``< before`` when given), or None."""
        rounds = [r for r in self.rounds() if before is None or r < before]
        return load_state(self.path(rounds[-1])) if rounds else None

    def save(self, server_round: int, state: Mapping[str, torch.Tensor]) -> Path:
        path = self.path(server_round)
        save_state_atomic(path, state)
        return path


def _running_stat_modules(model: nn.Module) -> list[_NormBase]:
    return [m for m in model.modules()
            if isinstance(m, _NormBase) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


@torch.no_grad()
def recompute_statistics(model: nn.Module, inputs: Iterable[tuple[torch.Tensor, ...]]) -> int:
    """Test-time normalisation statistics: replace the running mean and variance of every
    BatchNorm/InstanceNorm that tracks them by the cumulative average over ``inputs`` (forward
    passes with ``momentum=None``, no gradient; only the normalisation layers in train mode,
    so dropout stays off). Affine parameters are not changed and no labels are used.

    Parameters
    ----------
    model : nn.Module
        Left in eval mode, each layer's momentum as it was.
    inputs : iterable of tuples of tensors
        The model's positional inputs, batch by batch (e.g. ``(video, clinical)``).

    Returns
    -------
    int
        The number of layers whose statistics were recomputed (0: the model has none, e.g.
        GroupNorm or InstanceNorm without running statistics, and is unchanged).
    """
    layers = _running_stat_modules(model)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    seen = 0
    try:
        for batch in inputs:
            model(*batch)
            seen += 1
    finally:
        for m, mom in zip(layers, momenta, strict=True):
            m.momentum = mom
            m.eval()
    if seen == 0:
        raise ValueError("test-time statistics need at least one batch of images")
    return len(layers)
