"""DICOM encoding of phantom series: headers like a scanner's (reference section 4).

Modelling choices:
- MR Image Storage, one file per slice, by default (Enhanced MR multi-frame is ``enhanced.py``),
  optionally compressed: JPEG 2000 lossless, JPEG-LS lossless or RLE lossless with pydicom's
  encoders, JPEG Lossless SV1 with GDCM (``ljpeg.py``).
- The elements a series' slices share are encoded once and copied raw into every slice.
- Vendors: Siemens, GE, Philips and United Imaging, each with its own SeriesDescription,
  SequenceName and model vocabulary; one vendor per study.
- UIDs are derived from the seed, study index and roles (pydicom ``generate_uid`` with entropy
  sources), so a seed reproduces the same UIDs. Patient values are synthetic.
- Pixels are 12-bit unsigned, scaled per series as a scanner would, windowed by percentiles.
"""

from __future__ import annotations

import datetime as dt
import io
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    ExplicitVRLittleEndian,
    generate_uid,
)

from models.data.ljpeg import encode_frame
from models.data.render import Stack
from models.data.tissues import Sequence, Weighting

COMPRESSIONS = {"jpeg2000": JPEG2000Lossless, "jpeg-ls": JPEGLSLossless, "rle": RLELossless, "jpeg-lossless": JPEGLosslessSV1}

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


def common_dataset(study: StudyHeader, series: SeriesInfo) -> Dataset:
    """Patient, study, series, equipment, frame-of-reference and image pixel modules."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = f"{study.age:03d}Y"
    ds.PatientWeight = study.weight
    ds.PatientSize = study.height
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = ds.ContentTime = series_time(study, series)
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
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    return ds


def series_time(study: StudyHeader, series: SeriesInfo) -> str:
    """Series (and acquisition) time, HHMMSS: the study time plus a minute per series number."""
    return f"{study.study_time[:2]}{(int(study.study_time[2:4]) + series.number) % 60:02d}00"


def _base(study: StudyHeader, series: SeriesInfo) -> Dataset:
    """Common modules plus the MR Image module of single-frame MR Image Storage."""
    ds = common_dataset(study, series)
    ds.SOPClassUID = MRImageStorage
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = series_time(study, series)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    _sequence_tags(ds, series.sequence, study.vendor)
    return ds


def to_pixels(images: list[np.ndarray], rng: np.random.Generator) -> tuple[list[np.ndarray], float, float]:
    """12-bit unsigned pixels of a series' stacks and a (centre, width) window."""
    hi = float(np.percentile(np.concatenate([im[:, ::4, ::4].ravel() for im in images]), 99.7)) or 1.0
    scale = rng.uniform(1200, 3000) / hi
    pixels = [_quantise(im * np.float32(scale)) for im in images]
    top = float(np.percentile(pixels[0][:, ::4, ::4], 99.5))
    return pixels, round(top / 2, 1), round(max(top, 1.0), 1)


def _quantise(scaled: np.ndarray) -> np.ndarray:
    """12-bit unsigned pixels of scaled images: rounded and clipped in place, then converted."""
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 4095, out=scaled)
    return scaled.astype(np.uint16)


def _series_template(study: StudyHeader, series: SeriesInfo, window: tuple[float, float]) -> Dataset:
    """Elements shared by every slice of a series, encoded once and read back as raw elements."""
    ds = _base(study, series)
    stack = series.stacks[0]
    ds.SOPInstanceUID = uid(study.uid_root, series.role, series.number, "template")
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.PixelSpacing = [round(stack.pixel_spacing[0], 6), round(stack.pixel_spacing[1], 6)]
    ds.SliceThickness = stack.thickness
    ds.SpacingBetweenSlices = stack.spacing
    ds.AcquisitionMatrix = [0, stack.acq_cols, stack.acq_rows, 0]
    ds.InPlanePhaseEncodingDirection = "COL" if series.role == "T2_AX" else "ROW"
    ds.Rows, ds.Columns = stack.rows, stack.cols
    ds.WindowCenter, ds.WindowWidth = window
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _from_template(template: Dataset) -> Dataset:
    """A new dataset holding the template's (raw, still encoded) elements and encoding."""
    ds = Dataset({tag: template.get_item(tag) for tag in template.keys()})
    ds.set_original_encoding(False, True, template.original_character_set)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


_SliceValue = tuple[int, str, object]


def _slice_values(study: StudyHeader, series: SeriesInfo, reverse: bool) -> list[list[_SliceValue]]:
    """Per slice in acquisition order, (tag, VR, value) of the elements that differ between slices, in tag order."""
    slices = [(stack, i) for stack in series.stacks for i in range(len(stack.positions))]
    out = []
    for n, (stack, i) in enumerate(slices):
        out.append([
            (0x00080018, "UI", uid(study.uid_root, series.role, series.number, "instance", n)),
            (0x00200013, "IS", len(slices) - n if reverse else n + 1),
            (0x00200032, "DS", [round(float(c), 4) for c in stack.positions[i]]),
            (0x00200037, "DS", [round(float(c), 6) for c in (*stack.row_dir, *stack.col_dir)]),
            (0x00201041, "DS", round(float(np.dot(stack.positions[i], stack.normal)), 4)),
        ])
    return out


def instance_datasets(study: StudyHeader, series: SeriesInfo, pixels: list[np.ndarray], window: tuple[float, float], reverse: bool) -> list[Dataset]:
    """One MR Image dataset per slice, instance numbers in acquisition order (or reversed)."""
    template = _series_template(study, series, window)
    frames = [frame for stack in pixels for frame in stack]
    out = []
    for values, frame in zip(_slice_values(study, series, reverse), frames):
        ds = _from_template(template)
        for tag, vr, value in values:
            ds.add_new(tag, vr, value)
        ds["PixelData"] = DataElement(0x7FE00010, "OW", frame.tobytes())
        out.append(ds)
    return out


def compress(ds: Dataset, frames: np.ndarray, compression: str | None) -> None:
    """Replace the pixel data of ``ds`` by its ``frames`` (n, rows, cols) compressed losslessly."""
    if compression is None:
        return
    if compression != "jpeg-lossless":
        ds.compress(COMPRESSIONS[compression], frames if len(frames) > 1 else frames[0], generate_instance_uid=False)
        return
    ds.PixelData = encapsulate([encode_frame(f, int(ds.BitsStored)) for f in frames], has_bot=len(frames) > 1)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


_META_UID = 0x00020003  # Media Storage SOP Instance UID, the file meta's one per-slice element


def _encode(elements: Iterable[DataElement | RawDataElement]) -> bytes:
    """Explicit VR little endian bytes of data elements, in the order given."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    for elem in elements:
        write_data_element(fp, elem)
    return fp.getvalue()


def _between(ds: Dataset, cuts: list[int]) -> list[bytes]:
    """Encoded elements of ds before, between and after the tags ``cuts`` (len(cuts) + 1 parts)."""
    bounds = [-1, *cuts, 1 << 32]
    tags = sorted(ds.keys())
    return [_encode(ds.get_item(t) for t in tags if lo < t < hi) for lo, hi in zip(bounds, bounds[1:])]


def _text_element(tag: int, vr: str, value: object) -> bytes:
    """Explicit VR little endian bytes of a short UI, IS or DS element (one value or a list), as pydicom writes it."""
    text = "\\".join(map(str, value if isinstance(value, list) else [value])).encode("ascii")
    text += (b"\0" if vr == "UI" else b" ") * (len(text) % 2)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(text)) + text


def _file_bytes(meta: list[bytes], body: list[bytes], values: list[_SliceValue], frame: np.ndarray) -> bytes:
    """A whole Part 10 file: preamble, file meta, shared and per-slice elements, OW pixel data."""
    meta_group = meta[1] + _text_element(_META_UID, "UI", values[0][2]) + meta[2]
    parts = [body[0]]
    for (tag, vr, value), shared in zip(values, body[1:]):
        parts += [_text_element(tag, vr, value), shared]
    pixels = frame.astype("<u2", copy=False).tobytes()
    return b"".join([
        bytes(128), b"DICM", struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(meta_group)), meta_group,
        *parts, struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(pixels)), pixels,
    ])


def write_series(folder: Path, study: StudyHeader, series: SeriesInfo, pixels: list[np.ndarray], window: tuple[float, float], reverse: bool = False, compression: str | None = None) -> list[Path]:
    """Write one series as single-frame MR Image files; returns the paths.

    Uncompressed files are assembled from the series' shared elements, encoded once, and the
    few per-slice elements; compressed ones go through pydicom's encoders.
    """
    folder.mkdir(parents=True, exist_ok=True)
    frames = [frame for stack in pixels for frame in stack]
    paths = []
    if compression is not None:
        for ds, frame in zip(instance_datasets(study, series, pixels, window, reverse), frames):
            compress(ds, frame[None], compression)
            paths.append(folder / f"{ds.InstanceNumber}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        return paths
    template = _series_template(study, series, window)
    values = _slice_values(study, series, reverse)
    body = _between(template, [tag for tag, _, _ in values[0]])
    meta = _between(template.file_meta, [0x00020000, _META_UID])
    for slice_values, frame in zip(values, frames):
        paths.append(folder / f"{slice_values[1][2]}.dcm")
        paths[-1].write_bytes(_file_bytes(meta, body, slice_values, frame))
    return paths
