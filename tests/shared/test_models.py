"""CECMM sizes (science.md 1.2), shapes, and DP-friendly layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hcc_fl.shared.models import build_model, input_shape


@pytest.mark.parametrize("profile,params", [("tiny", 127_249), ("full", 12_566_689)])
def test_parameter_counts(profile: str, params: int) -> None:
    model = build_model("ki67_ceus", profile)
    assert sum(p.numel() for p in model.parameters()) == params


def test_forward_and_layers() -> None:
    torch.manual_seed(0)
    model = build_model("ki67_ceus", "tiny")
    t, s = input_shape("ki67_ceus", "tiny")
    out = model(torch.randn(3, 1, t, s, s), torch.randn(3, 7))
    assert out.shape == (3, 1)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    with pytest.raises(ValueError, match="clinical"):
        model(torch.randn(1, 1, t, s, s))


def test_unknown_names() -> None:
    with pytest.raises(KeyError, match="profile"):
        build_model("ki67_ceus", "huge")
    with pytest.raises(KeyError, match="trainable"):
        build_model("nosuch", "tiny")


def test_tace_and_er_models() -> None:
    import torch

    from hcc_fl.shared.models import build_model, input_shape

    tace = build_model("tace_ceus", "tiny")
    assert tace.clinical is None  # R-DLCEUS: the video encoder alone
    frames, size = input_shape("tace_ceus", "tiny")
    assert tace(torch.zeros(2, 1, frames, size, size)).shape == (2, 1)
    er = build_model("er_ceus", "tiny")
    # MONAI ResNet basic [1,1,1,1] widths 8..64 (77,640) + a linear head on 3 x 64 features
    assert sum(p.numel() for p in er.parameters()) == 77_640 + 3 * 64 + 1
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in er.modules())
    assert input_shape("er_ceus", "tiny") == (0, 64)
    x = torch.randn(2, 3, 64, 64)
    er.eval()
    out = er(x)
    assert out.shape == (2, 1)
    # one backbone shared by the three images: swapping the images changes only the order of
    # the concatenated features
    f = er.features(x)  # type: ignore[operator]
    g = er.features(x[:, [1, 0, 2]])  # type: ignore[operator]
    assert torch.allclose(f[:, :64], g[:, 64:128]) and torch.allclose(f[:, 64:128], g[:, :64])
