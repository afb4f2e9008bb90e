"""Write phantom images as real DICOM files (pydicom), one SOP class per modality.

Only the synthetic phantom writes DICOM; hospitals bring their own exports. Every identifier
written here is pseudonymous (``PHANTOM^<patient_id>``) and UIDs are derived deterministically
from the phantom seed, so two runs of ``hcc-fl synth`` with the same seed write identical files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class StudyInfo:
    """Identifiers shared by every file of one phantom patient (all pseudonymous)."""

    patient_id: str
    site: str
    manufacturer: str
    seed: int

    def uid(self, *parts: object) -> str:
        """Return a deterministic UID derived from the seed, the patient and ``parts``."""
        return str(generate_uid(entropy_srcs=[str(self.seed), self.patient_id, *map(str, parts)]))


def _base_dataset(info: StudyInfo, sop_class: str, sop_instance: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.Modality = modality
    ds.PatientID = info.patient_id
    ds.PatientName = f"PHANTOM^{info.patient_id}"
    ds.StudyInstanceUID = info.uid("study")
    ds.StudyDate = "20250101"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.InstitutionName = info.site
    ds.Manufacturer = info.manufacturer
    ds.ManufacturerModelName = "hcc-fl phantom"
    ds.BurnedInAnnotation = "NO"
    return ds


def _set_pixels_8bit(ds: Dataset, pixels: npt.NDArray[np.uint8]) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()


def _us_region(pixel_mm: float, rows: int, cols: int) -> Sequence:
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0 = 0
    region.RegionLocationMinY0 = 0
    region.RegionLocationMaxX1 = cols - 1
    region.RegionLocationMaxY1 = rows - 1
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = pixel_mm / 10.0
    region.PhysicalDeltaY = pixel_mm / 10.0
    return Sequence([region])


def write_us_cine(
    path: Path,
    info: StudyInfo,
    frames: npt.NDArray[np.uint8],
    fps: float,
    pixel_mm: float,
    series: str = "CEUS",
) -> None:
    """Write a CEUS cine as Ultrasound Multi-frame Image Storage with frame-time tags.

    Parameters
    ----------
    path : Path
        Output file.
    info : StudyInfo
        Pseudonymous patient and site identifiers.
    frames : ndarray, shape (T, H, W), uint8
        Contrast-mode frames.
    fps : float
        Frame rate; written as ``FrameTime`` (ms) and ``CineRate``.
    pixel_mm : float
        Pixel size, written in ``SequenceOfUltrasoundRegions`` (cm).
    series : str
        Series description.
    """
    sop = info.uid(series, "cine")
    ds = _base_dataset(info, US_MULTIFRAME_STORAGE, sop, "US")
    ds.SeriesInstanceUID = info.uid(series, "series")
    ds.SeriesDescription = series
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.NumberOfFrames = int(frames.shape[0])
    ds.FrameTime = float(1000.0 / fps)
    ds.FrameIncrementPointer = (0x0018, 0x1063)
    ds.CineRate = int(round(fps)) if fps >= 1 else 1
    ds.RecommendedDisplayFrameRate = ds.CineRate
    ds.SequenceOfUltrasoundRegions = _us_region(pixel_mm, frames.shape[1], frames.shape[2])
    _set_pixels_8bit(ds, frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_us_image(
    path: Path, info: StudyInfo, image: npt.NDArray[np.uint8], pixel_mm: float, series: str
) -> None:
    """Write one ultrasound still (B-mode, CEUS phase still, follow-up scan) as US Image Storage."""
    sop = info.uid(series, "image")
    ds = _base_dataset(info, US_IMAGE_STORAGE, sop, "US")
    ds.SeriesInstanceUID = info.uid(series, "series")
    ds.SeriesDescription = series
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.SequenceOfUltrasoundRegions = _us_region(pixel_mm, image.shape[0], image.shape[1])
    _set_pixels_8bit(ds, image)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_mr_series(
    folder: Path,
    info: StudyInfo,
    volume: npt.NDArray[np.uint16],
    phase: str,
    phase_index: int,
    trigger_time_s: float,
    pixel_mm: float,
    slice_mm: float,
    flip_angle: float = 12.0,
    tr_ms: float = 4.0,
    te_ms: float = 1.5,
) -> None:
    """Write one DCE-MRI phase as an MR series, one 16-bit file per slice.

    Parameters
    ----------
    folder : Path
        Series folder (one per phase).
    volume : ndarray, shape (S, H, W), uint16
        Slices of this phase.
    phase : str
        ``PRE``, ``ART``, ``PV`` or ``DEL`` (written as SeriesDescription).
    phase_index : int
        1-based TemporalPositionIdentifier.
    trigger_time_s : float
        Acquisition time after injection, written as TriggerTime (ms).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = info.uid("mr", phase, "series")
    frame_of_ref = info.uid("mr", "frame")
    for k in range(volume.shape[0]):
        ds = _base_dataset(info, MR_IMAGE_STORAGE, info.uid("mr", phase, k), "MR")
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_ref
        ds.SeriesDescription = phase
        ds.SeriesNumber = 10 + phase_index
        ds.InstanceNumber = k + 1
        ds.TemporalPositionIdentifier = phase_index
        ds.NumberOfTemporalPositions = 4
        ds.TriggerTime = float(trigger_time_s * 1000.0)
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.SliceThickness = slice_mm
        ds.ImagePositionPatient = [0.0, 0.0, float(k * slice_mm)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = float(k * slice_mm)
        ds.RepetitionTime = tr_ms
        ds.EchoTime = te_ms
        ds.FlipAngle = flip_angle
        ds.MagneticFieldStrength = 1.5
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])
        ds.PixelData = np.ascontiguousarray(volume[k], dtype="<u2").tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
