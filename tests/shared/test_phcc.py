"""pHCC-SSL (science.md 1.4, 4): encoder sizes, kinetic channels, Barlow Twins pretraining,
two-view augmentation and Grad-CAM localisation on a synthetic lesion task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hcc_fl.shared.cam import cam_in_mask_rate, cam_mask_test, grad_cam
from hcc_fl.shared.models.phcc import (
    PHCC_PROFILES,
    BarlowTwinsModel,
    PhccClassifier,
    PhccEncoder,
    with_kinetics,
)
from hcc_fl.shared.ssl_augment import two_views


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("profile,encoder,classifier,ssl", [
    # MONAI ResNet basic [1,1,1,1] w16 on 4 channels without fc is 310,464 (science.md 1.4);
    # two more input channels add 2 x 16 x 7 x 7 = 1,568 stem weights
    ("tiny", 312_032, 312_032 + 129, 312_032 + 99_328),
    # MONAI resnet18 2-D on 4 channels without fc is 11,180,544; +2 x 64 x 7 x 7 = 6,272
    ("full", 11_186_816, 11_186_816 + 513, 11_186_816 + 197_632),
])
def test_parameter_counts_and_shapes(profile: str, encoder: int, classifier: int,
                                     ssl: int) -> None:
    cfg = PHCC_PROFILES[profile]
    enc, clf, bt = PhccEncoder(cfg), PhccClassifier(cfg), BarlowTwinsModel(cfg)
    assert (_n_params(enc), _n_params(clf), _n_params(bt)) == (encoder, classifier, ssl)
    for m in (enc, clf, bt):
        assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
        assert not any(getattr(x, "inplace", False) for x in m.modules())
    x = torch.randn(2, 4, 64, 64)
    clf.eval()
    with torch.no_grad():
        assert enc(with_kinetics(x)).shape == (2, enc.out_features)
        assert clf(x).shape == (2, 1)
        assert bt.embed(x).shape == (2, 256)
        assert bt(x, x).ndim == 0
    with pytest.raises(ValueError, match="B, 4, H, W"):
        clf(with_kinetics(x))


def test_with_kinetics_values() -> None:
    x = torch.stack([torch.full((3, 5), v) for v in (1.0, 4.0, 2.5, 3.0)])[None]
    k = with_kinetics(x)
    assert k.shape == (1, 6, 3, 5)
    assert torch.equal(k[:, :4], x)
    assert torch.all(k[0, 4] == 3.0)  # wash-in ART - PRE = 4 - 1
    assert torch.all(k[0, 5] == 1.0)  # wash-out ART - DEL = 4 - 3


def test_encoder_transfer_and_freeze() -> None:
    cfg = PHCC_PROFILES["tiny"]
    torch.manual_seed(0)
    ssl = BarlowTwinsModel(cfg)
    clf = PhccClassifier(cfg)
    x = torch.randn(3, 4, 64, 64)
    assert not torch.allclose(ssl.encoder(with_kinetics(x)), clf.encoder(with_kinetics(x)))
    result = clf.encoder.load_state_dict(ssl.encoder.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (k1, v1), (k2, v2) in zip(ssl.encoder.state_dict().items(),
                                  clf.encoder.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(ssl.encoder(with_kinetics(x)), clf.encoder(with_kinetics(x)))

    clf.freeze_encoder(True)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    F.binary_cross_entropy_with_logits(clf(x), torch.ones(3, 1)).backward()
    assert all(p.grad is None for p in clf.encoder.parameters())
    assert all(p.grad is not None for p in clf.head.parameters())
    clf.freeze_encoder(False)
    assert all(p.requires_grad for p in clf.parameters())


# ---------------------------------------------------------------------------------------------
# Barlow Twins


def _barlow_reference(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Zbontar et al. 2021, eq. 1, with features standardised over the batch."""
    b = z1.shape[0]
    n1 = (z1 - z1.mean(0)) / (z1.std(0) + 1e-6)
    n2 = (z2 - z2.mean(0)) / (z2.std(0) + 1e-6)
    c = n1.T @ n2 / b
    on = ((1 - torch.diagonal(c)) ** 2).sum()
    off = (c**2).sum() - (torch.diagonal(c) ** 2).sum()
    return on + lambd * off


def test_barlow_loss_identical_views_beat_independent() -> None:
    torch.manual_seed(1)
    cfg = PHCC_PROFILES["tiny"]
    model = BarlowTwinsModel(cfg, proj_dims=(64, 64))
    g = torch.Generator().manual_seed(1)
    x, other = torch.randn(16, 4, 32, 32, generator=g), torch.randn(16, 4, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.allclose(model(x, other),
                              _barlow_reference(model.embed(x), model.embed(other), 0.005),
                              rtol=1e-4)
        feats = model.encoder(with_kinetics(x))
        before = float(model(x, x))
    # train the projector towards an identity cross-correlation on these (fixed) features
    opt = torch.optim.Adam(model.projector.parameters(), lr=1e-2)
    for _ in range(60):
        z = model.projector(feats)
        loss = model.loss(z, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        same, independent = float(model(x, x)), float(model(x, other))
    assert same < before
    assert same < 0.5 * independent


def test_barlow_loss_decreases_with_two_views() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # smooth random "patches": structure that survives the augmentations
    pool = 2 * F.avg_pool2d(torch.randn(64, 4, 32, 32, generator=g), 5, 1, 2)
    model = BarlowTwinsModel(PHCC_PROFILES["tiny"], proj_dims=(64, 64))
    eval_views = [two_views(pool[i : i + 8], torch.Generator().manual_seed(100 + i))
                  for i in range(0, 64, 8)]

    def eval_loss() -> float:
        with torch.no_grad():
            return sum(float(model(a, b)) for a, b in eval_views) / len(eval_views)

    before = eval_loss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(30):
        v1, v2 = two_views(pool[torch.randperm(64, generator=g)[:8]], g)
        loss = model(v1, v2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before
    with pytest.raises(ValueError, match="batch size"):
        model(pool[:1], pool[:1])


# ---------------------------------------------------------------------------------------------
# augmentation


def test_two_views_deterministic_shape_and_shared_geometry() -> None:
    g = torch.Generator().manual_seed(3)
    img = F.avg_pool2d(torch.randn(6, 1, 48, 48, generator=g), 3, 1, 1)
    # PRE = img, ART = img + 1, PV = 2 img, DEL = img - 1: wash-in is 1 everywhere
    batch = torch.cat([img, img + 1, 2 * img, img - 1], dim=1)
    a1, b1 = two_views(batch, torch.Generator().manual_seed(7))
    a2, b2 = two_views(batch, torch.Generator().manual_seed(7))
    a3, _ = two_views(batch, torch.Generator().manual_seed(8))
    assert a1.shape == b1.shape == batch.shape
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.allclose(a1, b1) and not torch.allclose(a1, a3)

    # without noise, one geometric transform per sample for all phases and one intensity
    # scale per sample: the wash-in channel of a view is a per-sample constant (the scale)
    va, vb = two_views(batch, torch.Generator().manual_seed(9), noise_std=0.0)
    for v in (va, vb):
        wash_in = with_kinetics(v)[:, 4]
        assert torch.allclose(wash_in, v[:, 1] - v[:, 0])
        spread = wash_in.flatten(1).std(dim=1)
        assert float(spread.max()) < 1e-4
        scale = wash_in.flatten(1).mean(dim=1)
        assert torch.all((scale > 0.79) & (scale < 1.21))
        assert torch.allclose(v[:, 2] - v[:, 2].flatten(1).mean(1)[:, None, None],
                              2 * (v[:, 0] - v[:, 0].flatten(1).mean(1)[:, None, None]),
                              atol=1e-4)
    # with default noise the phases differ by independent noise only
    vn, _ = two_views(batch, torch.Generator().manual_seed(9))
    resid = with_kinetics(vn)[:, 4] - with_kinetics(va)[:, 4]
    assert 0.05 < float(resid.std()) < 0.1  # difference of two N(0, 0.05^2) fields: 0.0707


# ---------------------------------------------------------------------------------------------
# Grad-CAM


def _blob_set(n: int, seed: int, positive_only: bool = False, size: int = 64,
              radius: float = 6.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four noisy phases; positives carry a bright Gaussian blob in ART at a random spot."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 4, size, size, generator=g)
    y = torch.ones(n) if positive_only else (torch.rand(n, generator=g) < 0.5).float()
    centre = 10 + (size - 20) * torch.rand(n, 2, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    d2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    x[:, 1] += 2.0 * y[:, None, None] * torch.exp(-d2 / (2 * (radius / 2) ** 2))
    masks = (d2 <= radius**2) & (y[:, None, None] > 0)
    return x, y, masks


def test_cam_in_mask_rate_by_hand() -> None:
    cams = torch.zeros(2, 10, 10)
    cams[0, 0, :10] = torch.linspace(1.0, 0.1, 10)  # the top 10 pixels are row 0
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0, 0, :3] = True  # holds 1.0 + 0.9 + 0.8 of the 5.5 total
    masks[1, :5] = True  # case 1: all-zero map -> the mask's area fraction
    rate = cam_in_mask_rate(cams, masks)
    assert torch.allclose(rate, torch.tensor([2.7 / 5.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-empty"):
        cam_mask_test(cams, torch.zeros_like(masks))


def test_grad_cam_localises_synthetic_lesions() -> None:
    torch.manual_seed(0)
    x, y, _ = _blob_set(64, seed=1)
    model = PhccClassifier(PHCC_PROFILES["tiny"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(40):
        idx = torch.randperm(64, generator=gen)[:16]
        loss = F.binary_cross_entropy_with_logits(model(x[idx])[:, 0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    xt, _, masks = _blob_set(32, seed=3, positive_only=True)
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cams = grad_cam(model, xt)
    assert cams.shape == (32, 64, 64)
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    assert torch.allclose(cams.flatten(1).max(1).values, torch.ones(32))
    # the model is left as it was: same weights, no hooks, no gradients
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.encoder.layer4._forward_hooks and not model.encoder.layer4._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    model.freeze_encoder(True)  # a linear-probe model still gets gradients at layer4
    assert torch.allclose(grad_cam(model, xt[:4]), cams[:4], atol=1e-5)
    assert not any(p.requires_grad for p in model.encoder.parameters())

    result = cam_mask_test(cams, masks)
    assert result.n == 32
    assert result.chance == pytest.approx(float(masks.float().mean()))
    assert result.mean_in_mask > 2 * result.chance
    assert result.p_value < 0.05

    # negative control: the same lesion shapes moved to random places (cyclic shifts, so every
    # pixel is equally likely to be covered and the area fraction is the true chance level)
    shifts = torch.randint(0, 64, (32, 2), generator=torch.Generator().manual_seed(4))
    moved = torch.stack([torch.roll(m, (int(s[0]), int(s[1])), dims=(0, 1))
                         for m, s in zip(masks, shifts, strict=True)])
    control = cam_mask_test(cams, moved)
    assert control.chance == pytest.approx(result.chance)
    assert control.p_value > 0.05
