"""Series roles (node/series.py): the tables below are the specification of classify_series."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    MRSpectroscopyStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from node.series import RoleDecision, SeriesRole, classify_series

OWN_DEVICE_UID = "2.25.1234567890"

# ImageOrientationPatient (row cosines, column cosines), patient LPS.
SAG = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # normal along x
AX = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # normal along z
COR = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # normal along y
TRIPLE_OBLIQUE = [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0, 1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]

# Timing (ms) typical of each sequence (reference/lumbar-anatomy-mri.md section 4).
T1_TAGS = {"RepetitionTime": 550, "EchoTime": 10, "ScanningSequence": "SE"}
T2_TAGS = {"RepetitionTime": 3500, "EchoTime": 104, "ScanningSequence": "SE"}
STIR_TAGS = {"RepetitionTime": 4000, "EchoTime": 50, "InversionTime": 160, "ScanningSequence": ["SE", "IR"]}
NO_TAGS: dict[str, Any] = {}

T1_SAG, T2_SAG, STIR_SAG, T2_AX, OTHER = (
    SeriesRole.T1_SAG,
    SeriesRole.T2_SAG,
    SeriesRole.STIR_SAG,
    SeriesRole.T2_AX,
    SeriesRole.OTHER,
)


def tilted(iop: list[float], degrees: float, axis: str) -> list[float]:
    """iop with both direction cosines rotated by degrees about a patient axis ('x', 'y' or 'z')."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]

    def rotate(v: list[float]) -> list[float]:
        out = list(v)
        out[i], out[j] = c * v[i] - s * v[j], s * v[i] + c * v[j]
        return out

    return rotate(iop[:3]) + rotate(iop[3:])


def mr(description: str = "", iop: list[float] | None = SAG, **tags: Any) -> Dataset:
    """A classic MR Image header (no pixel data) with the given description, orientation and tags."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.SeriesDescription = description
    if iop is not None:
        ds.ImageOrientationPatient = iop
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def classify(ds: Dataset) -> RoleDecision:
    """classify_series with this node's device UID."""
    return classify_series(ds, OWN_DEVICE_UID)


def item(**elements: Any) -> Dataset:
    """One sequence item with the given elements."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def enhanced(
    shared: dict[str, Any], per_frame: dict[str, Any], sop_class: UID = EnhancedMRImageStorage, **top: Any
) -> Dataset:
    """An Enhanced MR header whose functional groups hold the given macro items (keyword -> item)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = "MR"
    ds.NumberOfFrames = 2
    ds.SharedFunctionalGroupsSequence = Sequence([item(**{k: Sequence([v]) for k, v in shared.items()})])
    frame = item(**{k: Sequence([v]) for k, v in per_frame.items()})
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame, frame])
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    return ds


# Vendor and RSNA descriptions, description only (no timing tags): the vocabulary is the spec.
@pytest.mark.parametrize(
    ("description", "iop", "role"),
    [
        ("SAG T1 TSE", SAG, T1_SAG),
        ("t1_tse_sag", SAG, T1_SAG),
        ("t1_tse_sag_384", SAG, T1_SAG),
        ("t2_tse_sag", SAG, T2_SAG),
        ("t2_tse_sag_384", SAG, T2_SAG),
        ("t2_tirm_sag", SAG, STIR_SAG),
        ("STIR_SAG", SAG, STIR_SAG),
        ("SG T2W Stir", SAG, STIR_SAG),
        ("OSag T1 FSE", SAG, T1_SAG),
        ("OSag T2 FRFSE", SAG, T2_SAG),
        ("OSag STIR", SAG, STIR_SAG),
        ("AX T2 FSE", AX, T2_AX),
        ("OAx T2 FSE", AX, T2_AX),
        ("FL08/FL08/OAX FRFSE T2", AX, T2_AX),
        ("t2_tse_tra", AX, T2_AX),
        ("t2_tse_tra_msma", AX, T2_AX),
        ("T1W_TSE_SAG", SAG, T1_SAG),
        ("T2W_TSE_SAG", SAG, T2_SAG),
        ("T1W_TSE_Tra", AX, OTHER),
        ("Sag FSE2D T1W", SAG, T1_SAG),
        ("Sag STIR2D T2W", SAG, STIR_SAG),
        ("Axi TR-FSE2D T2W", AX, T2_AX),
        ("Sagittal T1", SAG, T1_SAG),
        ("Sagittal T2/STIR", SAG, T2_SAG),
        ("Axial T2", AX, T2_AX),
    ],
)
def test_vendor_and_rsna_descriptions(description: str, iop: list[float], role: SeriesRole) -> None:
    decision = classify(mr(description, iop))
    assert decision.role is role
    assert f"'{description}'" in decision.reason


@pytest.mark.parametrize(
    ("description", "tags", "role"),
    [
        ("t1_tse_sag", T1_TAGS, T1_SAG),
        ("t2_tse_sag_384", T2_TAGS, T2_SAG),
        ("t2_tirm_sag", STIR_TAGS, STIR_SAG),
        ("SG T2W Stir", STIR_TAGS, STIR_SAG),
        ("OSag T2 FRFSE", {"RepetitionTime": 3207, "EchoTime": 100}, T2_SAG),
    ],
)
def test_tags_and_description_agree(description: str, tags: dict[str, Any], role: SeriesRole) -> None:
    decision = classify(mr(description, SAG, **tags))
    assert decision.role is role
    assert "agrees" in decision.reason


def test_reason_names_plane_normal_and_timing() -> None:
    reason = classify(mr("t2_tse_sag_384", SAG, RepetitionTime=3500, EchoTime=104)).reason
    assert reason.startswith("sagittal (slice normal 1.00 along x")
    assert "TE 104 ms / TR 3500 ms" in reason


# "Sagittal T2/STIR" (RSNA 2024) is either: the tags decide, else T2 and the reason says so.
@pytest.mark.parametrize(
    ("tags", "role", "said"),
    [
        (STIR_TAGS, STIR_SAG, "allows STIR or T2, the tags decide"),
        (T2_TAGS, T2_SAG, "allows STIR or T2, the tags decide"),
        (NO_TAGS, T2_SAG, "allows T2 or STIR and the tags do not decide"),
        ({"RepetitionTime": 2000, "EchoTime": 45}, T2_SAG, "allows T2 or STIR and the tags do not decide"),
    ],
)
def test_rsna_t2_or_stir(tags: dict[str, Any], role: SeriesRole, said: str) -> None:
    decision = classify(mr("Sagittal T2/STIR", SAG, **tags))
    assert decision.role is role
    assert said in decision.reason


# Blank description: the tags alone decide.
@pytest.mark.parametrize(
    ("iop", "tags", "role", "said"),
    [
        (SAG, T1_TAGS, T1_SAG, "T1 by TE 10 ms / TR 550 ms"),
        (SAG, T2_TAGS, T2_SAG, "T2 by TE 104 ms / TR 3500 ms"),
        (SAG, STIR_TAGS, STIR_SAG, "STIR by inversion recovery with TI 160 ms"),
        (SAG, {"RepetitionTime": 3500, "EchoTime": 40, "InversionTime": 230}, STIR_SAG, "TI 230 ms"),
        (AX, T2_TAGS, T2_AX, "T2 by"),
        (AX, T1_TAGS, OTHER, "axial T1 is not read by the grader"),
        (AX, STIR_TAGS, OTHER, "axial STIR is not read by the grader"),
        (COR, T2_TAGS, OTHER, "coronal T2 is not read by the grader"),
        (SAG, {"RepetitionTime": 3000, "EchoTime": 20}, OTHER, "sagittal PD is not read"),
        (SAG, {"RepetitionTime": 2200, "EchoTime": 10, "InversionTime": 860, "ScanningSequence": "IR"}, T1_SAG,
         "T1-FLAIR"),
        (SAG, {"RepetitionTime": 9000, "EchoTime": 120, "InversionTime": 2500, "ScanningSequence": "IR"}, OTHER,
         "sagittal T2-FLAIR is not read"),
        (SAG, {"RepetitionTime": 4000, "EchoTime": 50, "ScanningSequence": ["SE", "IR"]}, OTHER,
         "inversion recovery without an inversion time"),
        (SAG, {"RepetitionTime": 2000, "EchoTime": 45}, OTHER, "neither clearly T1, T2 nor PD"),
        (SAG, {"RepetitionTime": 3500, "EchoTime": 104, "InversionTime": 0}, T2_SAG, "T2 by"),  # GE: TI 0 = none
        (SAG, {"RepetitionTime": 550}, OTHER, "no EchoTime"),
    ],
)
def test_tags_only(iop: list[float], tags: dict[str, Any], role: SeriesRole, said: str) -> None:
    decision = classify(mr("", iop, **tags))
    assert decision.role is role
    assert said in decision.reason
    assert "no SeriesDescription" in decision.reason


# Tags and description disagree: clear tags win; unclear tags leave it to the description.
@pytest.mark.parametrize(
    ("description", "tags", "role", "said"),
    [
        ("t1_tse_sag", T2_TAGS, T2_SAG, "description 't1_tse_sag' says T1, but the tags win"),
        ("t2_tse_sag", STIR_TAGS, STIR_SAG, "says T2, but the tags win"),
        ("OSag STIR", T1_TAGS, T1_SAG, "says STIR, but the tags win"),
        ("Sagittal T2/STIR", T1_TAGS, T1_SAG, "says STIR or T2, but the tags win"),
        ("t2_tse_sag", {"RepetitionTime": 2000, "EchoTime": 45}, T2_SAG, "T2 by description 't2_tse_sag'"),
        ("t2_tirm_sag", {"InversionTime": 400, "EchoTime": 50, "RepetitionTime": 4000}, STIR_SAG,
         "STIR by description 't2_tirm_sag'"),
    ],
)
def test_tags_beat_description(description: str, tags: dict[str, Any], role: SeriesRole, said: str) -> None:
    decision = classify(mr(description, SAG, **tags))
    assert decision.role is role
    assert said in decision.reason


# Orientation: the dominant axis of the slice normal, up to 45 degrees oblique.
@pytest.mark.parametrize(
    ("iop", "role", "said"),
    [
        (tilted(SAG, 20, "z"), T2_SAG, "sagittal (slice normal 0.94 along x, 20 deg oblique)"),
        (tilted(SAG, -20, "y"), T2_SAG, "sagittal (slice normal 0.94 along x, 20 deg oblique)"),
        (tilted(AX, 20, "x"), T2_AX, "axial (slice normal 0.94 along z, 20 deg oblique)"),
        (tilted(AX, 38, "x"), T2_AX, "38 deg oblique"),
        (TRIPLE_OBLIQUE, OTHER, "no plane (slice normal 0.58 along x, 55 deg oblique"),
        (COR, OTHER, "coronal (slice normal 1.00 along y"),
        (tilted(COR, 15, "z"), OTHER, "coronal"),
    ],
)
def test_orientation(iop: list[float], role: SeriesRole, said: str) -> None:
    decision = classify(mr("", iop, **T2_TAGS))
    assert decision.role is role
    assert said in decision.reason


def test_geometry_beats_the_described_plane() -> None:
    decision = classify(mr("t2_tse_sag", AX, **T2_TAGS))
    assert decision.role is T2_AX
    assert "the description says sagittal, geometry wins" in decision.reason


@pytest.mark.parametrize(
    ("description", "role"),
    [("t2_tse_sag", T2_SAG), ("OAx T2 FSE", T2_AX), ("Cor T2", OTHER), ("T2 TSE", OTHER)],
)
def test_plane_from_description_without_orientation(description: str, role: SeriesRole) -> None:
    decision = classify(mr(description, None, **T2_TAGS))
    assert decision.role is role
    assert "ImageOrientationPatient" in decision.reason


@pytest.mark.parametrize(
    "raw",
    [b"0\\0\\0\\0\\0\\0 ", b"1\\0\\0 ", b"1\\0\\0\\1\\0\\0 ", b"a\\b\\c\\d\\e\\f"],
    ids=["zeros", "three values", "parallel cosines", "not numbers"],
)
def test_unusable_orientation(raw: bytes) -> None:
    ds = mr("", None, **T2_TAGS)
    tag = Tag("ImageOrientationPatient")
    ds[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, False, True)  # as read from a malformed file
    decision = classify(ds)
    assert decision.role is OTHER
    assert "no usable ImageOrientationPatient" in decision.reason


# Enhanced MR: orientation and timing in the functional groups.
ENHANCED_CASES = [
    pytest.param(
        {"PlaneOrientationSequence": item(ImageOrientationPatient=SAG),
         "MRTimingAndRelatedParametersSequence": item(RepetitionTime=3500.0)},
        {"MREchoSequence": item(EffectiveEchoTime=104.0)},
        {}, T2_SAG, "T2 by TE 104 ms / TR 3500 ms", id="T2 sag, orientation shared",
    ),
    pytest.param(
        {"MRTimingAndRelatedParametersSequence": item(RepetitionTime=4000.0),
         "MRModifierSequence": item(InversionRecovery="YES", InversionTimes=[150.0])},
        {"PlaneOrientationSequence": item(ImageOrientationPatient=SAG),
         "MREchoSequence": item(EffectiveEchoTime=60.0)},
        {}, STIR_SAG, "STIR by inversion recovery with TI 150 ms", id="STIR sag, orientation per frame",
    ),
    pytest.param(
        {"MRTimingAndRelatedParametersSequence": item(RepetitionTime=560.0),
         "MREchoSequence": item(EffectiveEchoTime=9.0)},
        {"PlaneOrientationSequence": item(ImageOrientationPatient=tilted(AX, 20, "x"))},
        {}, OTHER, "axial T1 is not read", id="T1 axial",
    ),
    pytest.param(
        {"PlaneOrientationSequence": item(ImageOrientationPatient=AX),
         "MRImageFrameTypeSequence": item(FrameType=["ORIGINAL", "PRIMARY", "T2", "NONE"], AcquisitionContrast="T2")},
        {},
        {}, T2_AX, "T2 by AcquisitionContrast", id="no timing, AcquisitionContrast",
    ),
    pytest.param(
        {"PlaneOrientationSequence": item(ImageOrientationPatient=COR),
         "MRTimingAndRelatedParametersSequence": item(RepetitionTime=3500.0)},
        {"MREchoSequence": item(EffectiveEchoTime=104.0)},
        {}, OTHER, "coronal T2", id="coronal",
    ),
    pytest.param(
        {"PlaneOrientationSequence": item(ImageOrientationPatient=SAG),
         "MRImageFrameTypeSequence": item(FrameType=["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"])},
        {}, {}, OTHER, "LOCALIZER", id="localizer frame type",
    ),
    pytest.param(
        {"PlaneOrientationSequence": item(ImageOrientationPatient=AX)},
        {"MRDiffusionSequence": item(DiffusionBValue=800.0)},
        {}, OTHER, "DiffusionBValue", id="diffusion",
    ),
    pytest.param(
        {"PlaneOrientationSequence": item(ImageOrientationPatient=SAG),
         "UnassignedSharedConvertedAttributesSequence": item(RepetitionTime=600, EchoTime=12)},
        {}, {"SeriesDescription": "t1_tse_sag"}, T1_SAG, "agrees", id="legacy converted",
    ),
]


@pytest.mark.parametrize(("shared", "per_frame", "top", "role", "said"), ENHANCED_CASES)
def test_enhanced_mr(
    shared: dict[str, Any], per_frame: dict[str, Any], top: dict[str, Any], role: SeriesRole, said: str
) -> None:
    sop_class = LegacyConvertedEnhancedMRImageStorage if "UnassignedSharedConvertedAttributesSequence" in shared else (
        EnhancedMRImageStorage
    )
    decision = classify(enhanced(shared, per_frame, sop_class, **top))
    assert decision.role is role
    assert said in decision.reason


@pytest.mark.parametrize(
    ("description", "tags"),
    [
        ("3-plane loc", {"ImageType": ["ORIGINAL", "PRIMARY", "M"]}),
        ("Localizer", NO_TAGS),
        ("Survey", NO_TAGS),
        ("SCOUT", NO_TAGS),
        ("t2_tse_sag", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}),
    ],
)
def test_localizers_are_other(description: str, tags: dict[str, Any]) -> None:
    decision = classify(mr(description, SAG, **{**T1_TAGS, **tags}))
    assert decision.role is OTHER
    assert "localizer" in decision.reason.lower()


@pytest.mark.parametrize(
    ("description", "tags"),
    [
        ("ep2d_diff_tra", {"RepetitionTime": 5000, "EchoTime": 80}),
        ("DWI b800", {"RepetitionTime": 5000, "EchoTime": 80}),
        ("t2_tra", {"RepetitionTime": 5000, "EchoTime": 80, "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}),
        ("", {"RepetitionTime": 5000, "EchoTime": 80, "DiffusionBValue": 1000.0}),
        ("", {"RepetitionTime": 5000, "EchoTime": 80, "ImageType": ["DERIVED", "PRIMARY", "T2_MAP", "NONE"]}),
    ],
)
def test_diffusion_and_maps_are_other(description: str, tags: dict[str, Any]) -> None:
    decision = classify(mr(description, AX, **tags))
    assert decision.role is OTHER
    assert "not graded" in decision.reason


# Dixon: water T2 reads as STIR, in-phase keeps its weighting, the rest is OTHER.
@pytest.mark.parametrize(
    ("description", "iop", "tags", "role", "said"),
    [
        ("t2_tse_dixon_sag_320_W", SAG, T2_TAGS, STIR_SAG, "Dixon water-only T2"),
        ("t2_tse_dixon_sag_320_F", SAG, T2_TAGS, OTHER, "Dixon fat image of a T2"),
        ("t2_tse_dixon_sag_320_in", SAG, T2_TAGS, T2_SAG, "Dixon in-phase"),
        ("t2_tse_dixon_sag_320_opp", SAG, T2_TAGS, OTHER, "Dixon opposed-phase"),
        ("t2_tse_dixon_sag_320", SAG, T2_TAGS, OTHER, "Dixon unlabelled"),
        ("t2_dixon_sag", SAG, {**T2_TAGS, "ImageType": ["DERIVED", "PRIMARY", "DIXON", "WATER"]}, STIR_SAG,
         "Dixon water-only"),
        ("T2W_mDIXON_SAG", SAG, {**T2_TAGS, "ImageType": ["DERIVED", "PRIMARY", "W", "W", "DERIVED"]}, STIR_SAG,
         "Dixon water-only"),
        ("t1_tse_dixon_sag_W", SAG, T1_TAGS, OTHER, "Dixon water image of a T1"),
        ("t2_tse_dixon_tra_W", AX, T2_TAGS, OTHER, "axial STIR is not read"),
        ("t2_tse_sag_384", SAG, {**T2_TAGS, "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]}, T2_SAG, "agrees"),
    ],
)
def test_dixon(description: str, iop: list[float], tags: dict[str, Any], role: SeriesRole, said: str) -> None:
    decision = classify(mr(description, iop, **tags))
    assert decision.role is role
    assert said in decision.reason


# Contrast: post-contrast T1 is OTHER; T2 and STIR keep their role with a note.
@pytest.mark.parametrize(
    ("description", "tags", "role", "said"),
    [
        ("SAG T1 +C", T1_TAGS, OTHER, "pre-contrast T1 only"),
        ("OSag T1 FSE C+", T1_TAGS, OTHER, "pre-contrast T1 only"),
        ("t1_tse_sag_post", T1_TAGS, OTHER, "pre-contrast T1 only"),
        ("t1_tse_sag", {**T1_TAGS, "ContrastBolusAgent": "Gadobutrol"}, OTHER, "ContrastBolusAgent is set"),
        ("t1_tse_sag", {**T1_TAGS, "ContrastBolusAgent": "NONE"}, T1_SAG, "agrees"),
        ("T1 pre contrast sag", T1_TAGS, T1_SAG, "agrees"),
        ("t2_tse_sag", {**T2_TAGS, "ContrastBolusAgent": "Gadobutrol"}, T2_SAG, "barely changes T2"),
        ("t2_tirm_sag_post", STIR_TAGS, STIR_SAG, "barely changes STIR"),
    ],
)
def test_contrast(description: str, tags: dict[str, Any], role: SeriesRole, said: str) -> None:
    decision = classify(mr(description, SAG, **tags))
    assert decision.role is role
    assert said in decision.reason


# Vocabulary counts only as whole terms: these words merely contain it.
@pytest.mark.parametrize(
    ("description", "iop", "tags", "role"),
    [
        ("t1_space_sag_iso", SAG, T1_TAGS, T1_SAG),  # 'ce' of SPACE is not contrast-enhanced
        ("Sag T1 FSE posterior", SAG, T1_TAGS, T1_SAG),  # 'post' of posterior is not post-contrast
        ("OAx T2 FSE blocks", AX, T2_TAGS, T2_AX),  # 'loc' of blocks is not a localizer
        ("T2W_DIXON_SAG_IP", SAG, T2_TAGS, T2_SAG),  # 'W' of T2W is not the water image
        ("t2_tse_sag_radcomp", SAG, T2_TAGS, T2_SAG),  # 'adc' inside a word is not diffusion
    ],
)
def test_terms_inside_words_do_not_count(
    description: str, iop: list[float], tags: dict[str, Any], role: SeriesRole
) -> None:
    assert classify(mr(description, iop, **tags)).role is role


@pytest.mark.parametrize(
    ("description", "tags", "role"),
    [
        ("Sag T1 FLAIR", NO_TAGS, T1_SAG),
        ("OSag T2 FLAIR", NO_TAGS, OTHER),
        ("pd_tse_sag", NO_TAGS, OTHER),
        ("T2 T1 sag", NO_TAGS, OTHER),
    ],
)
def test_other_weightings_by_description(description: str, tags: dict[str, Any], role: SeriesRole) -> None:
    assert classify(mr(description, SAG, **tags)).role is role


# Never inputs: other modalities, non-image MR, and our own (or any) result objects.
@pytest.mark.parametrize(
    ("sop_class", "modality", "said"),
    [
        (CTImageStorage, "CT", "modality CT is not MR"),
        (ComprehensiveSRStorage, "SR", "Comprehensive SR Storage is a result object"),
        (KeyObjectSelectionDocumentStorage, "KO", "Key Object Selection Document Storage is a result object"),
        (GrayscaleSoftcopyPresentationStateStorage, "PR", "Presentation State Storage is a result object"),
        (SecondaryCaptureImageStorage, "OT", "Secondary Capture Image Storage is a result object"),
        (SecondaryCaptureImageStorage, "MR", "Secondary Capture Image Storage is a result object"),
        (MRSpectroscopyStorage, "MR", "MR Spectroscopy Storage is not an MR image"),
        ("", "SR", "modality SR is a result object"),
    ],
)
def test_non_mr_and_results_are_other(sop_class: str, modality: str, said: str) -> None:
    ds = mr("t2_tse_sag", SAG, **T2_TAGS)
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    decision = classify(ds)
    assert decision.role is OTHER
    assert said in decision.reason


@pytest.mark.parametrize(("device_uid", "role"), [(OWN_DEVICE_UID, OTHER), ("2.25.999", T2_SAG), ("", T2_SAG)])
def test_own_device_uid_is_other(device_uid: str, role: SeriesRole) -> None:
    decision = classify(mr("t2_tse_sag", SAG, DeviceUID=device_uid, **T2_TAGS))
    assert decision.role is role
    assert ("this node's own" in decision.reason) is (role is OTHER)


def test_blank_own_device_uid_matches_nothing() -> None:
    assert classify_series(mr("t2_tse_sag", SAG, DeviceUID="", **T2_TAGS), "").role is T2_SAG


@pytest.mark.parametrize("ds", [Dataset(), mr("", None)], ids=["empty dataset", "MR without anything"])
def test_missing_everything_is_other_and_says_what_is_missing(ds: Dataset) -> None:
    decision = classify(ds)
    assert decision.role is OTHER
    for missing in ("no usable ImageOrientationPatient", "no RepetitionTime and EchoTime", "no SeriesDescription"):
        assert missing in decision.reason


def test_reason_is_one_line_without_patient_values() -> None:
    ds = mr("t2_tse_sag_384", SAG, **T2_TAGS)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-8675309"
    ds.PatientBirthDate = "19611123"
    ds.StudyDate = "20240229"
    reason = classify(ds).reason
    assert "\n" not in reason
    for value in ("Doe", "Jane", "8675309", "19611123", "20240229"):
        assert value not in reason


def test_pixel_data_is_never_read(tmp_path: Path) -> None:
    """The receive path classifies lazily read files: PixelData must stay unread (here: unreadable)."""
    ds = mr("t2_tse_sag_384", SAG, **T2_TAGS)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 256, 256, 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = bytes(256 * 256 * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "instance.dcm"
    ds.save_as(path, enforce_file_format=True)
    lazy = dcmread(path, defer_size="64 KB")
    path.unlink()  # a deferred read of PixelData would now fail
    decision = classify(lazy)
    assert decision.role is T2_SAG
    with pytest.raises(OSError):
        _ = lazy.PixelData


def test_role_values_and_frozen_decision() -> None:
    assert [r.value for r in SeriesRole] == ["T1_SAG", "T2_SAG", "STIR_SAG", "T2_AX", "OTHER"]
    assert SeriesRole("T2_AX") is T2_AX
    decision = classify(mr("t2_tse_sag"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.role = OTHER  # type: ignore[misc]
