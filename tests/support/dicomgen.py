"""A small header-level MR study generator for the node's tests (tiny pixel arrays).

It writes what a scanner would: geometry, acquisition tags and vendor-style descriptions,
so series roles and readiness see realistic headers. The full phantom is models.data.phantom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


@dataclass(frozen=True)
class SeriesSpec:
    """How one series of a generated study looks."""

    description: str
    orientation: tuple[float, ...]
    tr: float
    te: float
    ti: float | None = None
    scanning_sequence: str = "SE"


SPECS = {
    "T1_SAG": SeriesSpec("t1_tse_sag", SAGITTAL, 550.0, 11.0),
    "T2_SAG": SeriesSpec("t2_tse_sag_384", SAGITTAL, 3500.0, 104.0),
    "STIR_SAG": SeriesSpec("t2_tirm_sag", SAGITTAL, 4000.0, 40.0, 160.0, "IR"),
    "T2_AX": SeriesSpec("t2_tse_tra", AXIAL, 4000.0, 100.0),
    "COR": SeriesSpec("t2_tse_cor", CORONAL, 3500.0, 100.0),
}


@dataclass
class GeneratedStudy:
    """UIDs and files of a generated study."""

    study_instance_uid: str
    series: dict[str, str] = field(default_factory=dict)  # role name -> SeriesInstanceUID
    files: list[Path] = field(default_factory=list)


def make_study(
    out: Path,
    roles: tuple[str, ...] = ("T1_SAG", "T2_SAG", "T2_AX"),
    slices: int = 3,
    size: int = 16,
    patient_name: str = "TEST^PATIENT",
    patient_id: str = "TEST-0001",
    study_instance_uid: str | None = None,
) -> GeneratedStudy:
    """Write one study, a folder per series, ``slices`` instances each; return its UIDs and files."""
    study = GeneratedStudy(study_instance_uid or generate_uid())
    frame_of_reference = generate_uid()
    for number, role in enumerate(roles, start=1):
        spec = SPECS[role]
        series_uid = generate_uid()
        study.series[role] = series_uid
        folder = out / f"{number:02d}_{role}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(slices):
            ds = _instance(spec, study.study_instance_uid, series_uid, frame_of_reference, number, index, size)
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            path = folder / f"{index + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            study.files.append(path)
    return study


def _instance(spec: SeriesSpec, study_uid: str, series_uid: str, for_uid: str, number: int, index: int, size: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "MR", "LSPINE", "SIEMENS"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
    ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "19600101", "O", ""
    ds.SeriesNumber, ds.InstanceNumber = number, index + 1
    ds.SeriesDescription = spec.description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = spec.scanning_sequence, "SK", "", "2D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = spec.tr, spec.te, 16
    if spec.ti is not None:
        ds.InversionTime = spec.ti
    ds.MagneticFieldStrength = 1.5
    ds.ImageOrientationPatient = list(spec.orientation)
    row, col = np.array(spec.orientation[:3]), np.array(spec.orientation[3:])
    normal = np.cross(row, col)
    position = -0.5 * size * (row + col) + (index - 1) * 4.0 * normal
    ds.ImagePositionPatient = [round(float(v), 3) for v in position]
    ds.SliceThickness, ds.SpacingBetweenSlices, ds.PixelSpacing = 3.5, 4.0, [1.0, 1.0]
    ds.SliceLocation = round(float(position @ normal), 3)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(size * size, dtype=np.uint16).reshape(size, size) % 4096).tobytes()
    return ds
