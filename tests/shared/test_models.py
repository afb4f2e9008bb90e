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
        build_model("aclf_us", "tiny")
