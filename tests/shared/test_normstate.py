"""FedBN's site side without Flower: which entries are normalisation state, how a site keeps
its own, and test-time statistics at the external site."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hcc_fl.shared.models import build_model
from hcc_fl.shared.normstate import (
    SiteNormStore,
    norm_keys,
    recompute_statistics,
    save_state_atomic,
    split_state,
)

TASKS = ["ki67_ceus", "tace_ceus", "er_ceus", "phcc_mri", "aclf_us"]


class _Net(nn.Module):
    """Every kind of normalisation layer, plus layers that are not (and a misleading name)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.inorm_plain = nn.InstanceNorm2d(4)  # no parameters, no buffers
        self.gn = nn.GroupNorm(2, 4)
        self.norm_head = nn.Linear(4, 4)  # named "norm", not a normalisation layer
        self.ln = nn.LayerNorm(4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, _unused: torch.Tensor | None = None) -> torch.Tensor:
        h = self.gn(self.inorm_plain(self.inorm(self.bn(self.conv(x)))))
        return self.out(self.ln(self.norm_head(h.mean(dim=(2, 3)))))


def test_norm_keys_by_module_type_not_by_name() -> None:
    keys = norm_keys(_Net())
    assert keys == [
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
        "inorm.weight", "inorm.bias", "inorm.running_mean", "inorm.running_var",
        "inorm.num_batches_tracked", "gn.weight", "gn.bias", "ln.weight", "ln.bias"]
    shared, local = split_state(_Net().state_dict(), keys)
    assert list(local) == keys
    assert set(shared) == {"conv.weight", "conv.bias", "norm_head.weight", "norm_head.bias",
                           "out.weight", "out.bias"}


@pytest.mark.parametrize("task", TASKS, ids=TASKS)
def test_norm_keys_of_every_task_model(task: str) -> None:
    """Each task's model: the split is exactly the parameters of its GroupNorm/InstanceNorm
    modules (counted independently), none of its convolutions or linear layers; and the
    normalisation layers start at the same values whatever the seed (the FedBN round-1 state
    every site starts from is the coordinator's)."""
    torch.manual_seed(0)
    model = build_model(task, "tiny")
    keys = norm_keys(model)
    expected = sum(2 for m in model.modules()
                   if isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d, nn.InstanceNorm3d,
                                     nn.BatchNorm2d, nn.LayerNorm))
                   and getattr(m, "weight", None) is not None)
    assert len(keys) == expected > 0
    modules = dict(model.named_modules())
    for k in keys:
        owner = modules[k.rsplit(".", 1)[0]]
        assert isinstance(owner, (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase))
    torch.manual_seed(1)
    other = build_model(task, "tiny").state_dict()
    for k in keys:
        assert torch.equal(model.state_dict()[k], other[k]), k


def test_save_is_atomic_0600_and_read_by_a_fresh_process(tmp_path: Path) -> None:
    store = SiteNormStore(tmp_path / "state" / "fedbn" / "run")
    state = {k: v + 1.5 if v.is_floating_point() else v
             for k, v in _Net().state_dict().items() if k in norm_keys(_Net())}
    path = store.save(3, state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    code = ("import sys, torch; from pathlib import Path; "
            "from hcc_fl.shared.normstate import SiteNormStore; "
            "s = SiteNormStore(Path(sys.argv[1])).latest(); "
            "print(float(s['bn.weight'].sum()), s['bn.num_batches_tracked'].dtype)")
    out = subprocess.run([sys.executable, "-c", code, str(store.folder)], capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.split() == ["10.0", "torch.int64"]  # 4 x (1 + 1.5)
    # a write that fails half-way leaves the old file as it was, and no temporary file
    class Unsaveable(torch.Tensor):
        def __reduce_ex__(self, protocol: object) -> object:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_state_atomic(path, {"x": torch.zeros(2).as_subclass(Unsaveable)})
    assert set(store.latest() or {}) == set(state)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_store_rounds_for_resume(tmp_path: Path) -> None:
    """A training message of round r starts from the newest state before r, so a round
    repeated after the coordinator's resume starts where it started the first time."""
    store = SiteNormStore(tmp_path)
    assert store.latest() is None
    for r in (1, 2, 3):
        store.save(r, {"w": torch.full((2,), float(r))})
    assert store.rounds() == [1, 2, 3]
    assert float((store.latest(before=3) or {})["w"][0]) == 2.0
    assert float((store.latest() or {})["w"][0]) == 3.0
    assert store.latest(before=1) is None
    assert SiteNormStore(tmp_path, "ssl").rounds() == []  # stages are kept apart


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Dropout(0.5), nn.Flatten(), nn.Linear(3 * 8 * 8, 1))


def test_test_time_statistics_use_no_labels_and_follow_the_site() -> None:
    """Statistics are those of the site's images (cumulative mean and unbiased variance over
    the batches), independent of labels and of their order; they change the outputs of a
    site whose intensities are shifted; dropout stays off; affine parameters do not move."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(24, 1, 8, 8, generator=gen) * 3.0 + 5.0  # a shifted-intensity site
    labels = torch.randint(0, 2, (24,), generator=gen)
    model = _bn_model()
    with torch.no_grad():
        model[1].weight.mul_(2.0)
        before = model.eval()(images)
    affine = model[1].weight.clone()

    def batches(x: torch.Tensor, y: torch.Tensor | None) -> list[tuple[torch.Tensor, ...]]:
        # y is carried along to show it plays no part (the model takes images only)
        return [(x[i:i + 8],) for i in range(0, len(x), 8)]

    assert recompute_statistics(model, batches(images, labels)) == 1
    after = model(images)
    assert not model.training and not model[1].training
    assert torch.equal(model[1].weight, affine)
    conv = model[0](images)
    per_batch_mean = torch.stack([conv[i:i + 8].mean(dim=(0, 2, 3)) for i in (0, 8, 16)])
    torch.testing.assert_close(model[1].running_mean, per_batch_mean.mean(0))
    assert model[1].momentum == 0.1  # restored
    assert (after - before).abs().max() > 0.1  # the shifted site's outputs change
    assert torch.equal(after, model(images))  # deterministic: dropout is off

    other = _bn_model()
    with torch.no_grad():
        other[1].weight.mul_(2.0)
    recompute_statistics(other, batches(images, 1 - labels))  # labels flipped or absent
    assert torch.equal(other[1].running_mean, model[1].running_mean)
    assert torch.equal(other[1].running_var, model[1].running_var)


@pytest.mark.parametrize("task", ["ki67_ceus", "er_ceus"], ids=["cecmm", "er"])
def test_test_time_statistics_leave_groupnorm_models_unchanged(task: str) -> None:
    """Our task models normalise with GroupNorm (per sample): nothing to recompute, so
    "FedBN + external statistics" is the averaged model itself."""
    model = build_model(task, "tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recompute_statistics(model, [(torch.zeros(1),)]) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
