"""Task registry: what each seed task reads from a site's manifest.

A task is looked up by name (never by a class path sent from the coordinator). Every task has a
manifest schema, so ``hcc-fl-client check-data`` validates a site export for any of the five
seed tasks; ``trainable`` says which tasks have a training pipeline in this release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ColumnKind = Literal[
    "str", "int", "float", "binary", "choice", "dicom", "dicom_dir", "cine", "mask"
]


@dataclass(frozen=True)
class Column:
    """One manifest column and the rule its values must satisfy."""

    name: str
    kind: ColumnKind
    required: bool = True
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    modality: str | None = None
    label: bool = False


@dataclass(frozen=True)
class ClinicalFeature:
    """A clinical input, standardised with fixed, agreed reference values (no data sharing)."""

    column: str
    transform: Literal["identity", "log10", "sex_male", "bclc"] = "identity"
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class TaskSpec:
    """A seed task: its manifest schema, label, inputs and training status."""

    name: str
    seed_paper: str
    description: str
    label: str
    columns: tuple[Column, ...]
    clinical: tuple[ClinicalFeature, ...] = ()
    trainable: bool = False
    survival_endpoints: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def column(self, name: str) -> Column:
        """Return the column called ``name``."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


_ID = (
    Column("patient_id", "str"),
    Column("split", "choice", choices=("train", "val", "test")),
)
_ROI = tuple(
    Column(f"ceus_roi_{c}", "int", required=False, lo=0, hi=100000)
    for c in ("x0", "y0", "x1", "y1")
)
_CLINICAL_HCC = (
    Column("age", "float", lo=0, hi=120),
    Column("sex", "choice", choices=("M", "F")),
    Column("afp", "float", lo=0, hi=1e7),
    Column("tumor_size_cm", "float", lo=0.1, hi=40),
    Column("hbv", "binary"),
    Column("cirrhosis", "binary"),
    Column("bclc", "choice", choices=("0", "A", "B", "C", "D")),
)
_SURVIVAL_HCC = (
    Column("pfs_time", "float", required=False, lo=0, hi=1000),
    Column("pfs_event", "binary", required=False),
    Column("ihr_time", "float", required=False, lo=0, hi=1000),
    Column("ihr_event", "binary", required=False),
    Column("rfs_time", "float", required=False, lo=0, hi=1000),
    Column("rfs_event", "binary", required=False),
)

# The scanner's log-compression law, needed to linearise CEUS intensities for the TIC analysis
# (shared/perfusion.linearise): dynamic range and gain in dB, and the exponent of a gamma-curved
# law (1 = plain log compression, the default when the column is absent or empty).
_COMPRESSION = (
    Column("dr_db", "float", lo=1, hi=120),
    Column("gain_db", "float", required=False, lo=-60, hi=60),
    Column("gamma", "float", required=False, lo=0.1, hi=5),
)

KI67_CLINICAL = (
    ClinicalFeature("age", "identity", 55.0, 10.0),
    ClinicalFeature("sex", "sex_male", 0.85, 0.36),
    ClinicalFeature("afp", "log10", 1.5, 1.0),
    ClinicalFeature("tumor_size_cm", "identity", 4.0, 1.5),
    ClinicalFeature("hbv", "identity", 0.8, 0.4),
    ClinicalFeature("cirrhosis", "identity", 0.7, 0.46),
    ClinicalFeature("bclc", "bclc", 1.2, 0.7),
)

TASKS: dict[str, TaskSpec] = {
    "ki67_ceus": TaskSpec(
        name="ki67_ceus",
        seed_paper="Zou 2026 (seed 000): CECMM, Ki-67 from CEUS video + clinical data",
        description="Ki-67 high vs low from a CEUS cine and 7 clinical variables (CECMM)",
        label="ki67_high",
        columns=(
            *_ID,
            Column("ceus_cine", "cine", modality="US"),
            *_ROI,
            *_CLINICAL_HCC,
            Column("ki67_high", "binary", label=True),
            *_SURVIVAL_HCC,
        ),
        clinical=KI67_CLINICAL,
        trainable=True,
        survival_endpoints=(("pfs_time", "pfs_event"), ("ihr_time", "ihr_event"),
                            ("rfs_time", "rfs_event")),
    ),
    "tace_ceus": TaskSpec(
        name="tace_ceus",
        seed_paper="Liu 2020 (seed 001): R-DLCEUS / R-TIC / R-BMode, response to first TACE",
        description="Objective response to TACE from the CEUS cine, its TIC and the B-mode image",
        label="tace_or",
        columns=(
            *_ID,
            Column("ceus_cine", "cine", modality="US"),
            *_ROI,
            Column("ceus_lesion_mask", "mask"),
            Column("bmode", "dicom", modality="US"),
            Column("tumor_size_cm", "float", lo=0.1, hi=40),
            *_COMPRESSION,
            Column("tace_or", "binary", label=True),
        ),
        trainable=True,
    ),
    "er_ceus": TaskSpec(
        name="er_ceus",
        seed_paper="Zhang & Huo 2022 (seed 003): ResNet + radiomics, early recurrence",
        description="Recurrence within 1 year from B-mode, arterial- and portal-phase CEUS stills",
        label="er_1y",
        columns=(
            *_ID,
            Column("bmode", "dicom", modality="US"),
            Column("ceus_ap", "dicom", modality="US"),
            Column("ceus_pp", "dicom", modality="US"),
            Column("ceus_lesion_mask", "mask"),
            Column("er_1y", "binary", label=True),
            Column("rfs_time", "float", required=False, lo=0, hi=1000),
            Column("rfs_event", "binary", required=False),
        ),
        trainable=True,
        survival_endpoints=(("rfs_time", "rfs_event"),),
    ),
    "phcc_mri": TaskSpec(
        name="phcc_mri",
        seed_paper="Qu 2025 (seed 002): pHCC-SSL, proliferative HCC from DCE-MRI",
        description="Proliferative subtype from 4-phase DCE-MRI with self-supervised pretraining",
        label="prolif",
        columns=(
            *_ID,
            Column("mr_pre_dir", "dicom_dir", modality="MR"),
            Column("mr_art_dir", "dicom_dir", modality="MR"),
            Column("mr_pv_dir", "dicom_dir", modality="MR"),
            Column("mr_del_dir", "dicom_dir", modality="MR"),
            Column("mr_lesion_mask", "mask", required=False),
            Column("prolif", "binary", label=True),
        ),
        trainable=True,
    ),
    "aclf_us": TaskSpec(
        name="aclf_us",
        seed_paper="HBV-ACLF (seed 004): Siamese U-Net, liver segmentation + 30-day mortality",
        description="30-day mortality and liver segmentation from T0/T1 ultrasound",
        label="death_30d",
        columns=(
            *_ID,
            Column("us_t0", "dicom", modality="US"),
            Column("us_t1", "dicom", modality="US"),
            Column("liver_mask_t0", "mask"),
            Column("liver_mask_t1", "mask"),
            Column("age", "float", lo=0, hi=120),
            Column("meld", "float", lo=0, hi=60),
            Column("death_30d", "binary", label=True),
            Column("os_time", "float", lo=0, hi=10000),
            Column("os_event", "binary"),
        ),
        trainable=True,
    ),
}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name; the error lists the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASKS))}") from None
