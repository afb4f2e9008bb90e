"""Model definitions, built by name from the task registry (never from a server-sent class path)."""

from __future__ import annotations

from torch import nn

from hcc_fl.shared.models.cecmm import CECMM, PROFILES, CecmmConfig

__all__ = ["CECMM", "CecmmConfig", "build_model", "input_shape"]


def build_model(task: str, profile: str) -> nn.Module:
    """Build the model of ``task`` at ``profile`` (``tiny`` or ``full``).

    Raises
    ------
    KeyError
        Unknown task or profile (the message lists what is known).
    """
    if task == "ki67_ceus":
        if profile not in PROFILES:
            raise KeyError(f"unknown model profile '{profile}'; known: {', '.join(PROFILES)}")
        return CECMM(PROFILES[profile])
    raise KeyError(f"task '{task}' has no model in this release; trainable: ki67_ceus")


def input_shape(task: str, profile: str) -> tuple[int, int]:
    """(frames, size) of the video input of ``task`` at ``profile``."""
    if task == "ki67_ceus":
        cfg = PROFILES[profile]
        return cfg.frames, cfg.size
    raise KeyError(f"task '{task}' has no model in this release")
