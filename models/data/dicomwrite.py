"""DICOM encoding of phantom series: headers like a scanner's (reference section 4).

Modelling choices:
- MR Image Storage, one file per slice, by default; optionally Legacy Converted Enhanced MR
  (multi-frame, built by highdicom from the single-frame datasets), and optionally compressed
  (JPEG 2000 lossless, JPEG-LS lossless or RLE lossless; pydicom's encoders).
- Vendors: Siemens, GE, Philips and United Imaging, each with its own SeriesDescription,
  SequenceName and model vocabulary; one vendor per study.
- UIDs are derived from the seed, study index and roles (pydicom ``generate_uid`` with entropy
  sources), so a seed reproduces the same UIDs. Patient values are synthetic.
- Pixels are 12-bit unsigned, scaled per series as a scanner would, windowed by percentiles.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    ExplicitVRLittleEndian,
    generate_uid,
)

from models.data.render import Stack
from models.data.tissues import Sequence, Weighting

COMPRESSIONS = {"jpeg2000": JPEG2000Lossless, "jpeg-ls": JPEGLSLossless, "rle": RLELossless}

# Per vendor: manufacturer, models, SeriesDescription per role, sequence names per weighting.
VENDORS: dict[str, dict] = {
    "siemens": {
        "manufacturer": "SIEMENS", "models": ("Avanto", "Skyra", "Prisma", "Aera"),
        "descriptions": {"T1_SAG": ("t1_tse_sag", "t1_tse_sag_384"), "T2_SAG": ("t2_tse_sag_384", "t2_tse_sag"),
                         "STIR_SAG": ("t2_tirm_sag",), "T2_AX": ("t2_tse_tra", "t2_tse_tra_msma")},
        "sequence": {Weighting.T1: "*tse2d1_3", Weighting.T2: "*tse2d1_17", Weighting.STIR: "*tir2d1_9"},
    },
    "ge": {
        "manufacturer": "GE MEDICAL SYSTEMS", "models": ("SIGNA Architect", "Optima MR450w", "SIGNA Explorer"),
        "descriptions": {"T1_SAG": ("OSag T1 FSE", "Sag T1 FSE"), "T2_SAG": ("OSag T2 FRFSE", "Sag T2 FRFSE"),
                         "STIR_SAG": ("OSag STIR",), "T2_AX": ("OAx T2 FSE", "FL08/FL08/OAX FRFSE T2")},
        "sequence": {Weighting.T1: "fse-xl", Weighting.T2: "frfse-xl", Weighting.STIR: "fse-ir"},
    },
    "philips": {
        "manufacturer": "Philips Medical Systems", "models": ("Ingenia", "Achieva", "Ingenia Elition"),
        "descriptions": {"T1_SAG": ("T1W_TSE_SAG",), "T2_SAG": ("T2W_TSE_SAG",), "STIR_SAG": ("STIR_SAG", "SG T2W Stir"),
                         "T2_AX": ("T2W_TSE_Tra", "T2W_TSE_TRA")},
        "sequence": {Weighting.T1: "TSE", Weighting.T2: "TSE", Weighting.STIR: "IR_TSE"},
    },
    "uih": {
        "manufacturer": "UIH", "models": ("uMR 780", "uMR 570"),
        "descriptions": {"T1_SAG": ("Sag FSE2D T1W",), "T2_SAG": ("Sag FSE2D T2W",), "STIR_SAG": ("Sag STIR2D T2W",),
                         "T2_AX": ("Axi TR-FSE2D T2W",)},
        "sequence": {Weighting.T1: "fse2d", Weighting.T2: "fse2d", Weighting.STIR: "fse_ir2d"},
    },
}


@dataclass(frozen=True)
class StudyHeader:
    """Study-level header values shared by every series of one phantom study."""

    uid_root: tuple[str, ...]
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: int
    weight: float
    height: float
    study_date: str
    study_time: str
    accession: str
    vendor: str
    model: str
    field_strength: float


@dataclass(frozen=True)
class SeriesInfo:
    """One series: role, number, description, sequence timing and its stacks (patient mm)."""

    role: str
    number: int
    description: str
    sequence: Sequence
    stacks: tuple[Stack, ...]
    series_instance_uid: str


def uid(root: tuple[str, ...], *parts: object) -> str:
    """Deterministic UID from the study's entropy root and more parts."""
    return str(generate_uid(entropy_srcs=[*root, *map(str, parts)]))


def study_header(rng: np.random.Generator, seed: int, index: int, field_strength: float, age: float) -> StudyHeader:
    """Synthetic patient and study values for study ``index`` of a run with ``seed``."""
    root = ("spine-node-phantom", str(seed), str(index))
    vendor = str(rng.choice(sorted(VENDORS)))
    date = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 700)))
    birth = date - dt.timedelta(days=int(age * 365.25))
    return StudyHeader(
        uid_root=root, study_instance_uid=uid(root, "study"), frame_of_reference_uid=uid(root, "frame"),
        patient_name=f"PHANTOM^{seed}_{index:04d}", patient_id=f"PH{seed}-{index:04d}", birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["F", "M"])), age=int(age), weight=round(float(rng.uniform(50, 110)), 1),
        height=round(float(rng.uniform(1.5, 1.95)), 2), study_date=date.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}00", accession=f"A{seed % 10000:04d}{index:06d}",
        vendor=vendor, model=str(rng.choice(VENDORS[vendor]["models"])), field_strength=field_strength,
    )


def _sequence_tags(ds: Dataset, seq: Sequence, vendor: str) -> None:
    """Scanning sequence, variant, timing and echo train of ``seq``."""
    ir = seq.weighting is Weighting.STIR
    ds.ScanningSequence = ["SE", "IR"] if ir else "SE"
    ds.SequenceVariant = ["SK", "SP", "MP"] if ir else ["SK", "SP"]
    ds.ScanOptions = ["IR"] if ir else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = VENDORS[vendor]["sequence"][seq.weighting]
    ds.RepetitionTime = seq.tr
    ds.EchoTime = seq.te
    if ir:
        ds.InversionTime = seq.ti
    ds.EchoTrainLength = seq.echo_train
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = round(42.577478 * seq.field_strength, 6)
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = seq.field_strength
    ds.FlipAngle = seq.flip_angle


def _base(study: StudyHeader, series: SeriesInfo) -> Dataset:
    """Patient, study, series, equipment and frame-of-reference modules."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = f"{study.age:03d}Y"
    ds.PatientWeight = study.weight
    ds.PatientSize = study.height
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"{study.study_time[:2]}{(int(study.study_time[2:4]) + series.number) % 60:02d}00"
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.accession[-6:]
    ds.AccessionNumber = study.accession
    ds.StudyDescription = "MR LUMBAR SPINE WO CONTRAST"
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.ProtocolName = series.description
    ds.BodyPartExamined = "LSPINE"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = VENDORS[study.vendor]["manufacturer"]
    ds.ManufacturerModelName = study.model
    ds.InstitutionName = "Spine-node Phantom Hospital"
    ds.StationName = "PHANTOM01"
    ds.SoftwareVersions = "spine-node phantom 1"
    ds.DeviceSerialNumber = "0000"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    _sequence_tags(ds, series.sequence, study.vendor)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    return ds


def to_pixels(images: list[np.ndarray], rng: np.random.Generator) -> tuple[list[np.ndarray], float, float]:
    """12-bit unsigned pixels of a series' stacks and a (centre, width) window."""
    hi = float(np.percentile(np.concatenate([im[:, ::4, ::4].ravel() for im in images]), 99.7)) or 1.0
    scale = rng.uniform(1200, 3000) / hi
    pixels = [np.clip(np.rint(im * scale), 0, 4095).astype(np.uint16) for im in images]
    top = float(np.percentile(pixels[0][:, ::4, ::4], 99.5))
    return pixels, round(top / 2, 1), round(max(top, 1.0), 1)


def instance_datasets(study: StudyHeader, series: SeriesInfo, pixels: list[np.ndarray], window: tuple[float, float], reverse: bool) -> list[Dataset]:
    """One MR Image dataset per slice, instance numbers in acquisition order (or reversed)."""
    slices = [(k, i) for k, stack in enumerate(series.stacks) for i in range(len(stack.positions))]
    out = []
    for n, (k, i) in enumerate(slices):
        stack = series.stacks[k]
        ds = _base(study, series)
        number = len(slices) - n if reverse else n + 1
        ds.SOPInstanceUID = uid(study.uid_root, series.role, series.number, "instance", n)
        ds.InstanceNumber = number
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [round(float(c), 4) for c in stack.positions[i]]
        ds.ImageOrientationPatient = [round(float(c), 6) for c in (*stack.row_dir, *stack.col_dir)]
        ds.PixelSpacing = [round(stack.pixel_spacing[0], 6), round(stack.pixel_spacing[1], 6)]
        ds.SliceThickness = stack.thickness
        ds.SpacingBetweenSlices = stack.spacing
        ds.SliceLocation = round(float(np.dot(stack.positions[i], stack.normal)), 4)
        ds.AcquisitionMatrix = [0, stack.acq_cols, stack.acq_rows, 0]
        ds.InPlanePhaseEncodingDirection = "COL" if series.role == "T2_AX" else "ROW"
        ds.Rows, ds.Columns = stack.rows, stack.cols
        ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels[k][i].tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def save(ds: Dataset, path: Path, compression: str | None) -> Path:
    """Write ``ds`` as a DICOM file, compressed when asked."""
    if compression is not None:
        ds.compress(COMPRESSIONS[compression])
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, study: StudyHeader, series: SeriesInfo, pixels: list[np.ndarray], window: tuple[float, float], reverse: bool = False, compression: str | None = None, enhanced: bool = False) -> list[Path]:
    """Write one series as single-frame files (or one multi-frame file); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    datasets = instance_datasets(study, series, pixels, window, reverse)
    if enhanced:
        multi = LegacyConvertedEnhancedMRImage(
            sorted(datasets, key=lambda d: d.InstanceNumber), series.series_instance_uid, series.number,
            uid(study.uid_root, series.role, series.number, "enhanced"), 1,
            transfer_syntax_uid=COMPRESSIONS[compression] if compression else ExplicitVRLittleEndian,
        )
        multi.BodyPartExamined = "LSPINE"
        if "ReferencedSeriesSequence" in multi:
            del multi.ReferencedSeriesSequence
        path = folder / "1.dcm"
        multi.save_as(path, enforce_file_format=True)
        return [path]
    return [save(ds, folder / f"{ds.InstanceNumber}.dcm", compression) for ds in datasets]
