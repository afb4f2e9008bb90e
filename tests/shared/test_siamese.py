"""Siamese U-Net of aclf_us (science.md 1.6), its loss, DP compatibility (1.7) and per-case Dice."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import BasicUNet
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from sklearn.metrics import f1_score
from torch import nn

from hcc_fl.client.longitudinal import load_pairs
from hcc_fl.shared.metrics.segmentation import dice, dice_per_case
from hcc_fl.shared.models.siamese import (
    SIAMESE_PROFILES,
    SiameseUNet,
    segmentation_loss,
    siamese_loss,
)

TINY = SIAMESE_PROFILES["tiny"]


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batch(b: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2, size, size, generator=g, dtype=dtype)
    masks = (torch.rand(b, 2, size, size, generator=g) > 0.6).to(dtype)
    label = torch.tensor([0.0, 1.0, 0.0, 1.0][:b], dtype=dtype)
    return x, masks, label


def test_parameter_counts() -> None:
    tiny = SiameseUNet(TINY)
    # BasicUNet (8,8,16,32,64,8), 1 output channel: 124,625; head Linear(3 x 64 -> 1): 193
    assert _n(tiny.unet) == 124_625
    assert _n(tiny) == 124_818
    assert TINY.size == 64 and SIAMESE_PROFILES["full"].size == 256
    # MONAI default features (32,32,64,128,256,32): 1,978,433 + Linear(3 x 256 -> 1)
    assert _n(SiameseUNet(SIAMESE_PROFILES["full"])) == 1_978_433 + 769
    # science.md 1.6 counts 137,051 for the tiny net with 2 output channels and an MLP head
    # (192 -> 64 -> 1); with one output channel that is 9 parameters fewer
    assert _n(SiameseUNet(replace(TINY, hidden=64))) == 137_051 - 9


def test_layers_are_dp_friendly() -> None:
    model = SiameseUNet(TINY)
    assert sum(isinstance(m, BasicUNet) for m in model.modules()) == 1  # one shared U-Net
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 18 and all(m.affine for m in norms)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []


def test_shapes_and_monai_forward() -> None:
    torch.manual_seed(0)
    model = SiameseUNet(TINY).eval()
    x, _, _ = _batch()
    with torch.no_grad():
        seg, logit = model.segment_and_score(x)
        assert seg.shape == (3, 2, 64, 64) and logit.shape == (3, 1)
        assert torch.allclose(model(x), logit)
        assert model(x, torch.randn(3, 2)).shape == (3, 1)  # clinical ignored
        # the hand-written forward equals MONAI's own, at each time point
        for t in range(2):
            assert torch.allclose(seg[:, t:t + 1], model.unet(x[:, t:t + 1]), atol=1e-6)
        assert model.features(x).shape == (3, 192)
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        model(torch.randn(3, 1, 64, 64))


def test_weight_sharing_swaps_outputs() -> None:
    torch.manual_seed(1)
    model = SiameseUNet(TINY).eval()
    x, _, _ = _batch()
    swapped = x[:, [1, 0]]
    with torch.no_grad():
        seg, _ = model.segment_and_score(x)
        seg_s, _ = model.segment_and_score(swapped)
        f = model.features(x)
        f_s = model.features(swapped)
    assert torch.allclose(seg_s, seg[:, [1, 0]], atol=1e-6)
    f0, f1, d = f[:, :64], f[:, 64:128], f[:, 128:]
    assert torch.allclose(d, f1 - f0)
    assert not torch.allclose(f0, f1)
    assert torch.allclose(f_s, torch.cat([f1, f0, f0 - f1], dim=1), atol=1e-6)


def test_loss_matches_monai_dicece_and_bce() -> None:
    g = torch.Generator().manual_seed(2)
    seg = torch.randn(4, 2, 32, 32, generator=g)
    masks = (torch.rand(4, 2, 32, 32, generator=g) > 0.5).float()
    logit = torch.randn(4, 1, generator=g)
    label = torch.tensor([1.0, 0.0, 0.0, 1.0])
    monai = DiceCELoss(sigmoid=True)
    per_time = [monai(seg[:, t:t + 1], masks[:, t:t + 1]) for t in range(2)]
    assert torch.allclose(segmentation_loss(seg, masks), per_time[0] + per_time[1], atol=1e-6)
    per_sample = segmentation_loss(seg, masks, reduction="none")
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample.mean(), per_time[0] + per_time[1], atol=1e-6)
    bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))(logit, label[:, None])
    total = siamese_loss(seg, masks, logit, label, seg_weight=0.5, pos_weight=3.0)
    assert torch.allclose(total, 0.5 * (per_time[0] + per_time[1]) + bce, atol=1e-6)
    none = siamese_loss(seg, masks, logit, label, reduction="none")
    assert none.shape == (4,) and torch.allclose(none.mean(), siamese_loss(seg, masks, logit,
                                                                           label))
    with pytest.raises(ValueError, match="batch sizes"):
        siamese_loss(seg, masks, logit[:3], label)
    with pytest.raises(ValueError, match="reduction"):
        segmentation_loss(seg, masks, reduction="median")


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and float(grad.abs().sum()) > 0


def test_gradients_flow_from_both_losses() -> None:
    torch.manual_seed(3)
    model = SiameseUNet(TINY).eval()
    x, masks, label = _batch(size=32)
    encoder = "unet.conv_0.conv_0.conv.weight"
    bottleneck = "unet.down_4.convs.conv_1.conv.weight"
    decoder = "unet.upcat_1.convs.conv_1.conv.weight"
    final = "unet.final_conv.weight"
    head = "head.1.weight"

    seg, logit = model.segment_and_score(x)
    segmentation_loss(seg, masks).backward()
    g = _grads(model)
    assert g[head] is None  # the segmentation loss does not reach the risk head
    for name in (encoder, bottleneck, decoder, final):
        assert _nonzero(g[name])

    model.zero_grad(set_to_none=True)
    seg, logit = model.segment_and_score(x)
    nn.functional.binary_cross_entropy_with_logits(logit[:, 0], label).backward()
    g = _grads(model)
    assert g[decoder] is None and g[final] is None  # the risk loss stops at the bottleneck
    for name in (encoder, bottleneck, head):
        assert _nonzero(g[name])

    model.zero_grad(set_to_none=True)
    seg, logit = model.segment_and_score(x)
    siamese_loss(seg, masks, logit, label).backward()
    g = _grads(model)
    assert all(v is not None and bool(torch.isfinite(v).all()) for v in g.values())
    for name in (encoder, bottleneck, decoder, final, head):
        assert _nonzero(g[name])


def test_one_step_on_phantom_pairs_reduces_loss(small_phantom: Path) -> None:
    data = load_pairs(small_phantom / "site_A" / "manifest.csv", ("train",), TINY.size)
    x, masks, label = data.images[:4], data.masks[:4], data.label[:4]
    torch.manual_seed(4)
    model = SiameseUNet(TINY).eval()  # no dropout: the step is taken on the loss it is judged on
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss() -> torch.Tensor:
        seg, logit = model.segment_and_score(x)
        return siamese_loss(seg, masks, logit, label)

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < before.item() - 1e-3


def test_opacus_hooks_per_sample_gradients_and_one_dp_step() -> None:
    torch.manual_seed(5)
    cfg = replace(TINY, dropout=0.0)  # Opacus hooks only record in training mode
    model = SiameseUNet(cfg).double().train()
    reference = copy.deepcopy(model)
    x, masks, label = _batch(dtype=torch.float64, size=32)
    gsm = GradSampleModule(model)  # hooks mode (ConvTranspose2d falls back to functorch)
    assert isinstance(gsm._module, SiameseUNet)
    seg, logit = gsm._module.segment_and_score(x)
    siamese_loss(seg, masks, logit, label).backward()
    # per-sample gradients (summed over the two uses of the shared U-Net) equal single-patient
    # backward passes; conv biases in front of an InstanceNorm have a true gradient of 0
    params = dict(reference.named_parameters())
    for i in range(3):
        reference.zero_grad()
        s, z = reference.segment_and_score(x[i:i + 1])
        siamese_loss(s, masks[i:i + 1], z, label[i:i + 1]).backward()
        for name, p in model.named_parameters():
            per_sample = getattr(p, "grad_sample", None)
            assert per_sample is not None and per_sample.shape == (3, *p.shape)
            ref = params[name].grad
            assert ref is not None
            assert torch.allclose(per_sample[i], ref, rtol=1e-6,
                                  atol=1e-9 * max(1.0, float(ref.abs().max())))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=3)
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "head.1.weight" in moved and "unet.final_conv.weight" in moved
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_dice_per_case_matches_sklearn_and_monai() -> None:
    rng = np.random.default_rng(6)
    pred = rng.random((5, 2, 24, 24)) > 0.5
    true = rng.random((5, 2, 24, 24)) > 0.4
    pred[4, 1] = False
    true[4, 1] = False  # empty-empty case
    pred[3, 0] = False  # empty prediction, non-empty truth
    out = dice_per_case(pred, true)
    assert out.shape == (5, 2)
    for i in range(4):
        for t in range(2):
            f1 = f1_score(true[i, t].ravel(), pred[i, t].ravel(), zero_division=1.0)
            assert out[i, t] == pytest.approx(f1, abs=1e-12)
            assert out[i, t] == pytest.approx(dice(pred[i, t], true[i, t]), abs=1e-12)
    assert out[3, 0] == 0.0
    assert out[4, 1] == 1.0
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    monai = np.asarray(metric(torch.from_numpy(pred).float(), torch.from_numpy(true).float()))
    assert np.allclose(out, monai, atol=1e-6)
    # NaN for empty-empty, as DiceMetric(ignore_empty=True)
    nan = dice_per_case(pred, true, empty_value=float("nan"))
    ignore = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    monai_ignore = np.asarray(ignore(torch.from_numpy(pred).float(),
                                     torch.from_numpy(true).float()))
    assert np.isnan(nan[4, 1]) and np.isnan(monai_ignore[4, 1])
    assert np.allclose(nan, monai_ignore, atol=1e-6, equal_nan=True)
    assert dice_per_case(pred[:, 0], true[:, 0]).shape == (5,)
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_case(pred, true[:, :1])
