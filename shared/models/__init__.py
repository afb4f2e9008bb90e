"""Model definitions, built by name from the task registry (never from a server-sent class path)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from hcc_fl.shared.models.cecmm import CECMM, PROFILES, CecmmConfig
from hcc_fl.shared.models.er import ER_PROFILES, ErConfig, SharedResNet2D

__all__ = ["CECMM", "CecmmConfig", "ErConfig", "PhccClassifier", "SharedResNet2D",
           "SiameseUNet", "build_model", "build_ssl_model", "input_shape"]


def __getattr__(name: str) -> Any:
    """``PhccClassifier`` and ``SiameseUNet`` on first use: their modules subclass or import
    MONAI, whose import takes seconds, and a site's ClientApp process (one per message in
    deployment) that trains another task's model should not pay for it."""
    if name == "PhccClassifier":
        from hcc_fl.shared.models.phcc import PhccClassifier

        return PhccClassifier
    if name == "SiameseUNet":
        from hcc_fl.shared.models.siamese import SiameseUNet

        return SiameseUNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_TRAINABLE = ("ki67_ceus", "tace_ceus", "er_ceus", "phcc_mri", "aclf_us")


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise KeyError(f"unknown model profile '{profile}'; known: {', '.join(PROFILES)}")


def build_model(task: str, profile: str) -> nn.Module:
    """Build the deep model of ``task`` at ``profile`` (``tiny`` or ``full``).

    ``ki67_ceus``: CECMM (video + 7 clinical variables); ``tace_ceus``: R-DLCEUS, the same video
    encoder without the clinical branch; ``er_ceus``: the shared 2-D ResNet over three images;
    ``aclf_us``: the Siamese U-Net over the T0/T1 ultrasound pair; ``phcc_mri``: the 2-D ResNet
    over the 4 DCE-MRI phases plus wash-in and wash-out channels.

    Raises
    ------
    KeyError
        Unknown task or profile (the message lists what is known).
    """
    _check_profile(profile)
    if task == "ki67_ceus":
        return CECMM(PROFILES[profile])
    if task == "tace_ceus":
        return CECMM(replace(PROFILES[profile], n_clinical=0))
    if task == "er_ceus":
        return SharedResNet2D(ER_PROFILES[profile])
    if task == "aclf_us":
        from hcc_fl.shared.models.siamese import SIAMESE_PROFILES, SiameseUNet

        return SiameseUNet(SIAMESE_PROFILES[profile])
    if task == "phcc_mri":
        from hcc_fl.shared.models.phcc import PHCC_PROFILES, PhccClassifier

        return PhccClassifier(PHCC_PROFILES[profile])
    raise KeyError(f"task '{task}' has no model in this release; trainable: "
                   f"{', '.join(_TRAINABLE)}")


def build_ssl_model(task: str, profile: str) -> nn.Module:
    """The self-supervised pretraining model of ``task`` (``phcc_mri``: Barlow Twins on the
    classifier's encoder; its ``encoder`` state loads into ``build_model``'s ``encoder``)."""
    _check_profile(profile)
    if task == "phcc_mri":
        from hcc_fl.shared.models.phcc import PHCC_PROFILES, BarlowTwinsModel

        return BarlowTwinsModel(PHCC_PROFILES[profile])
    raise KeyError(f"task '{task}' has no self-supervised stage")


def input_shape(task: str, profile: str) -> tuple[int, int]:
    """(frames, size) of the image input of ``task`` at ``profile`` (frames 0: still images)."""
    _check_profile(profile)
    if task in ("ki67_ceus", "tace_ceus"):
        cfg = PROFILES[profile]
        return cfg.frames, cfg.size
    if task == "er_ceus":
        return 0, ER_PROFILES[profile].size
    if task == "aclf_us":
        from hcc_fl.shared.models.siamese import SIAMESE_PROFILES

        return 0, SIAMESE_PROFILES[profile].size
    if task == "phcc_mri":
        from hcc_fl.shared.models.phcc import PHCC_PROFILES

        return 0, PHCC_PROFILES[profile].size
    raise KeyError(f"task '{task}' has no model in this release")
