"""Series roles: which received series is the sagittal T1, sagittal T2, sagittal STIR or axial T2
that the grader reads, decided once per series from the header of its first instance.

The decision uses the slice normal (patient LPS), the acquisition timing (TR, TE, TI, inversion
recovery; classic tags or the Enhanced MR functional groups) and the SeriesDescription, and
returns one sentence saying why, shown by ``spine-node show``. When tags and description both
give a weighting and disagree, clear tags win: descriptions are free text that technologists
copy between protocols. Each fills in when the other is missing or unclear.

Choices for what the grader does not read (all OTHER unless stated):

- Coronal series, localizers, and planes more than 45 degrees from every patient axis.
- Axial series that are not plain T2 (axial T1, axial STIR): the model's axial view is T2.
- PD and T2-FLAIR (fluid-nulled, so the canal loses its CSF contrast). T1-FLAIR (inversion
  recovery with TI 500-1400 ms and TE < 30 ms, GE's usual spine T1 at 3 T) counts as T1.
- Diffusion (DWI, trace, ADC) and parametric maps.
- Dixon: the water image of a T2 Dixon is fat-suppressed and fluid-bright, the contrast of
  STIR, so a sagittal one is STIR_SAG; the in-phase image is a conventional TSE and keeps its
  weighting; fat, opposed-phase and unlabelled Dixon images, and T1 water images (fat-suppressed
  T1 hides the foraminal fat), are OTHER.
- Contrast-enhanced T1 is OTHER: the grader is trained on non-contrast T1, and a study with a
  post-contrast T1 has its pre-contrast T1 as well. T2 and STIR acquired after injection keep
  their role (gadolinium barely changes them); the reason says so.
- Our own results (DeviceUID equal to ours, SR, PR, SC, KO) and anything that is not an MR
  image are OTHER, so the node never grades its own output.

Only header elements are read, never PixelData, so this is cheap enough for the receive path.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    UID,
    EnhancedMRColorImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)


class SeriesRole(str, enum.Enum):
    """The part a series plays for the grader; OTHER series are stored but not read."""

    T1_SAG = "T1_SAG"
    T2_SAG = "T2_SAG"
    STIR_SAG = "STIR_SAG"
    T2_AX = "T2_AX"
    OTHER = "OTHER"


@dataclass(frozen=True)
class RoleDecision:
    """A series' role and one human-readable sentence saying why (never patient-identifying)."""

    role: SeriesRole
    reason: str


class Plane(str, enum.Enum):
    """The imaging plane, named by the patient axis the slice normal is closest to."""

    SAGITTAL = "sagittal"
    CORONAL = "coronal"
    AXIAL = "axial"


class Weighting(str, enum.Enum):
    """The image contrast, as far as roles need to know it."""

    T1 = "T1"
    T2 = "T2"
    STIR = "STIR"
    PD = "PD"
    FLAIR = "T2-FLAIR"


_ROLES: dict[tuple[Plane | None, Weighting | None], SeriesRole] = {
    (Plane.SAGITTAL, Weighting.T1): SeriesRole.T1_SAG,
    (Plane.SAGITTAL, Weighting.T2): SeriesRole.T2_SAG,
    (Plane.SAGITTAL, Weighting.STIR): SeriesRole.STIR_SAG,
    (Plane.AXIAL, Weighting.T2): SeriesRole.T2_AX,
}

#: Patient LPS axis index of the slice normal -> plane (x = sagittal, y = coronal, z = axial).
_AXIS_PLANES = (Plane.SAGITTAL, Plane.CORONAL, Plane.AXIAL)
_MAX_OBLIQUITY_DEG = 45.0
#: |row x column| below this means the direction cosines are not two orthogonal unit vectors.
_MIN_NORMAL_LENGTH = 0.5

# Timing thresholds, ms (reference/lumbar-anatomy-mri.md section 4).
_T1_MAX_TR = 1000.0
_T2_MIN_TR = 1500.0
_SHORT_TE = 30.0
_LONG_TE = 60.0
_STIR_TI = (90.0, 300.0)
_T1_FLAIR_MIN_TI = 500.0
_T2_FLAIR_MIN_TI = 1400.0

_MR_IMAGE_CLASSES = frozenset(
    {MRImageStorage, EnhancedMRImageStorage, EnhancedMRColorImageStorage, LegacyConvertedEnhancedMRImageStorage}
)
#: SR (incl. KO), presentation states, secondary capture: compared as ``uid + "."`` prefixes.
_RESULT_CLASS_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.7.")
_RESULT_MODALITIES = frozenset({"SR", "PR", "KO"})

#: Where Enhanced MR keeps a classic attribute: the functional-group macro sequence.
_FRAME_MACROS = {
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "RepetitionTime": "MRTimingAndRelatedParametersSequence",
    "EffectiveEchoTime": "MREchoSequence",
    "InversionRecovery": "MRModifierSequence",
    "InversionTimes": "MRModifierSequence",
    "FrameType": "MRImageFrameTypeSequence",
    "AcquisitionContrast": "MRImageFrameTypeSequence",
    "DiffusionBValue": "MRDiffusionSequence",
}
#: Where Legacy Converted Enhanced MR keeps the classic attributes that have no macro.
_CONVERTED = ("UnassignedSharedConvertedAttributesSequence", "UnassignedPerFrameConvertedAttributesSequence")

_CONTRASTS = {
    "T1": Weighting.T1,
    "T2": Weighting.T2,
    "STIR": Weighting.STIR,
    "PROTON_DENSITY": Weighting.PD,
    "FLUID_ATTENUATED": Weighting.FLAIR,
}
_DIFFUSION_TYPES = frozenset({"DIFFUSION", "DIFFUSION_ANISO", "DIFFUSION_ATTNTD", "ADC", "EADC", "TRACEW", "FA"})
_DIXON_TYPES = {
    "water": frozenset({"WATER", "W"}),
    "fat": frozenset({"FAT", "F"}),
    "in-phase": frozenset({"IN_PHASE", "IP"}),
    "opposed-phase": frozenset({"OUT_PHASE", "OPP_PHASE", "OUT_OF_PHASE", "OP"}),
}
_NO_AGENT = frozenset({"NONE", "NO", "N/A", "-"})


def _term(pattern: str) -> re.Pattern[str]:
    """A case-insensitive pattern matched as a whole term; digits may follow (as in 'STIR2D')."""
    return re.compile(rf"(?<![a-z0-9])(?:{pattern})(?![a-z])", re.IGNORECASE)


_SAGITTAL = _term(r"o?sag(?:ittal)?|sg")
_AXIAL = _term(r"o?ax(?:ial|i)?|tra(?:ns(?:verse)?)?")
_CORONAL = _term(r"o?cor(?:onal)?")
_T1 = _term(r"t1w?")
_T2 = _term(r"t2w?(?!\*)")
_STIR = _term(r"stir|tirm")
_T2_OR_STIR = re.compile(r"t2w?\s*/\s*stir|stir\s*/\s*t2", re.IGNORECASE)
_PD = _term(r"pdw?")
_FLAIR = _term(r"flair|dark[ _-]?fluid")
_LOCALIZER = _term(r"locali[sz]er|loc|scout|survey|3[ _-]?pl(?:ane)?|tri[ _-]?pl(?:ane)?")
_DIFFUSION = _term(r"dwi|adc|diff(?:usion)?|tracew?|ep2d|b\d{2,4}")
_CONTRAST = re.compile(
    r"\+\s*c(?![a-z])|(?<![a-z0-9])c\s*\+|(?<![a-z0-9])(?:post|gad|gado|gd|contrast|ce|km)(?![a-z])", re.IGNORECASE
)
_PRE_CONTRAST = _term(r"pre|non|native?|nc")
_DIXON = _term(r"m?dixon|ideal")
_DIXON_TERMS = {
    "water": _term(r"w|wat|water"),
    "fat": _term(r"f|fat"),
    "in-phase": _term(r"in|ip|in[ _-]?phase"),
    "opposed-phase": _term(r"opp?|oop|out|opp?[ _-]?phase|out[ _-]?phase"),
}


def classify_series(ds: Dataset, own_device_uid: str) -> RoleDecision:
    """The role of the series whose first instance is ``ds``, with the reason; reads no PixelData."""
    description = str(ds.get("SeriesDescription") or "").strip()
    refusal = _refusal(ds, own_device_uid, description)
    if refusal is not None:
        return RoleDecision(SeriesRole.OTHER, refusal)
    plane, plane_text = _plane(ds, description)
    weighting, weighting_text = _weighting(ds, description)
    weighting, dixon_text = _apply_dixon(ds, description, weighting)
    weighting, contrast_text = _apply_contrast(ds, description, weighting)
    role = _ROLES.get((plane, weighting), SeriesRole.OTHER)
    parts = [plane_text, weighting_text, dixon_text, contrast_text]
    if role is SeriesRole.OTHER and plane is not None and weighting is not None:
        parts.append(f"{plane.value} {weighting.value} is not read by the grader")
    return RoleDecision(role, "; ".join(part for part in parts if part))


# Refusals: instances that can never be a graded series, whatever their geometry and timing.


def _refusal(ds: Dataset, own_device_uid: str, description: str) -> str | None:
    """Why this instance can never be graded (our output, not an MR image, localizer, diffusion)."""
    return (
        _own_output(ds, own_device_uid)
        or _not_mr_image(ds)
        or _localizer(ds, description)
        or _diffusion_or_map(ds, description)
    )


def _own_output(ds: Dataset, own_device_uid: str) -> str | None:
    """Our own results (by DeviceUID, or any SR/PR/SC/KO object) must never be graded again."""
    device_uid = str(ds.get("DeviceUID") or "").strip()
    if own_device_uid and device_uid == own_device_uid.strip():
        return "DeviceUID is this node's own: our results are never inputs"
    modality = str(ds.get("Modality") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID") or "").strip()
    if modality in _RESULT_MODALITIES or (sop_class + ".").startswith(_RESULT_CLASS_PREFIXES):
        kind = UID(sop_class).name if sop_class else f"modality {modality}"
        return f"{kind} is a result object (SR, PR, SC or KO), never an input"
    return None


def _not_mr_image(ds: Dataset) -> str | None:
    """Only MR images are graded: another modality or a non-image MR class is refused."""
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality and modality != "MR":
        return f"modality {modality} is not MR"
    sop_class = str(ds.get("SOPClassUID") or "").strip()
    if sop_class and sop_class not in _MR_IMAGE_CLASSES:
        return f"SOP class {UID(sop_class).name} is not an MR image"
    return None


def _localizer(ds: Dataset, description: str) -> str | None:
    """Localizers (3-plane scouts, surveys) are planning images, not diagnostic series."""
    if "LOCALIZER" in _image_types(ds):
        return "ImageType says LOCALIZER: localizers are not graded"
    if _LOCALIZER.search(description):
        return f"{_quoted(description)} names a localizer: localizers are not graded"
    return None


def _diffusion_or_map(ds: Dataset, description: str) -> str | None:
    """Diffusion images and parametric maps have long TR/TE but are not T2 anatomy."""
    types = _image_types(ds)
    if types & _DIFFUSION_TYPES or str(_value(ds, "AcquisitionContrast") or "").upper() == "DIFFUSION":
        return "ImageType or AcquisitionContrast says diffusion: diffusion images are not graded"
    if (_number(_value(ds, "DiffusionBValue")) or 0.0) > 0.0:
        return "DiffusionBValue is set: diffusion images are not graded"
    if any(value.endswith("_MAP") for value in types):
        return "ImageType says parametric map: maps are not graded"
    if _DIFFUSION.search(description):
        return f"{_quoted(description)} names diffusion: diffusion images are not graded"
    return None


# Orientation.


def _plane(ds: Dataset, description: str) -> tuple[Plane | None, str]:
    """The plane from the slice normal or, without ImageOrientationPatient, from the description."""
    normal = _normal(ds)
    described = _described_plane(description)
    if normal is not None:
        return _plane_from_normal(normal, described)
    if described is None:
        return None, "orientation unknown (no usable ImageOrientationPatient, no plane in the description)"
    return described, f"{described.value} by {_quoted(description)} (no usable ImageOrientationPatient)"


def _normal(ds: Dataset) -> tuple[float, float, float] | None:
    """The unit slice normal (patient LPS), row x column direction cosines; None if absent or bad."""
    value = _value(ds, "ImageOrientationPatient")
    if not isinstance(value, Sequence) or isinstance(value, str):
        return None
    cosines = [number for number in map(_number, value) if number is not None]
    if len(cosines) != 6:
        return None
    rx, ry, rz, cx, cy, cz = cosines
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.hypot(*normal)
    if length < _MIN_NORMAL_LENGTH:
        return None
    return normal[0] / length, normal[1] / length, normal[2] / length


def _plane_from_normal(normal: tuple[float, float, float], described: Plane | None) -> tuple[Plane | None, str]:
    """Name the plane by the normal's dominant axis, up to 45 degrees oblique; geometry beats text."""
    axis = max(range(3), key=lambda i: abs(normal[i]))
    component = abs(normal[axis])
    obliquity = math.degrees(math.acos(min(1.0, component)))
    geometry = f"slice normal {component:.2f} along {'xyz'[axis]}, {obliquity:.0f} deg oblique"
    if obliquity > _MAX_OBLIQUITY_DEG:
        return None, f"no plane ({geometry}: more than {_MAX_OBLIQUITY_DEG:.0f} deg from every axis)"
    plane = _AXIS_PLANES[axis]
    if described is not None and described is not plane:
        return plane, f"{plane.value} ({geometry}; the description says {described.value}, geometry wins)"
    return plane, f"{plane.value} ({geometry})"


def _described_plane(description: str) -> Plane | None:
    """The one plane a SeriesDescription names, or None when it names none or several."""
    named = [p for p, pattern in ((Plane.SAGITTAL, _SAGITTAL), (Plane.AXIAL, _AXIAL), (Plane.CORONAL, _CORONAL))
             if pattern.search(description)]
    return named[0] if len(named) == 1 else None


# Weighting.


def _weighting(ds: Dataset, description: str) -> tuple[Weighting | None, str]:
    """The weighting from tags and description: clear tags win, the description fills in."""
    tagged, tag_text = _tag_weighting(ds)
    described = _described_weightings(description)
    quoted = _quoted(description)
    if tagged is not None:
        return tagged, f"{tag_text}; {_agreement(tagged, described, description)}"
    if len(described) == 1:
        (only,) = described
        return only, f"{only.value} by {quoted} ({tag_text})"
    if described == {Weighting.T2, Weighting.STIR}:
        return Weighting.T2, f"T2 by {quoted}, which allows T2 or STIR and the tags do not decide ({tag_text})"
    return None, f"weighting unknown ({tag_text}; {_agreement(None, described, description)})"


def _agreement(tagged: Weighting | None, described: frozenset[Weighting], description: str) -> str:
    """What the description says about the weighting, relative to the one the tags gave (if any)."""
    quoted = _quoted(description)
    names = " or ".join(sorted(w.value for w in described))
    if not description:
        return quoted
    if not described:
        return f"{quoted} names no weighting"
    if tagged is None:
        return f"{quoted} names {names}"
    if tagged not in described:
        return f"{quoted} says {names}, but the tags win"
    if len(described) > 1:
        return f"{quoted} allows {names}, the tags decide"
    return f"{quoted} agrees"


def _tag_weighting(ds: Dataset) -> tuple[Weighting | None, str]:
    """The weighting from the timing tags, else the scanner's AcquisitionContrast (Enhanced MR)."""
    tr = _ms(ds, "RepetitionTime")
    te = _ms(ds, "EchoTime", "EffectiveEchoTime")
    ti = _ms(ds, "InversionTime", "InversionTimes")
    inversion = "IR" in _codes(ds, "ScanningSequence") or "YES" in _codes(ds, "InversionRecovery") or ti is not None
    weighting, text = _inversion_weighting(tr, te, ti) if inversion else _spin_weighting(tr, te)
    contrast = _CONTRASTS.get(str(_value(ds, "AcquisitionContrast") or "").strip().upper())
    if weighting is None and contrast is not None:
        return contrast, f"{contrast.value} by AcquisitionContrast ({text})"
    return weighting, text


def _spin_weighting(tr: float | None, te: float | None) -> tuple[Weighting | None, str]:
    """T1 (short TR, short TE), T2 (long TR, long TE) or PD (long TR, short TE); else unclear."""
    if tr is None or te is None:
        missing = " and ".join(name for name, v in (("RepetitionTime", tr), ("EchoTime", te)) if v is None)
        return None, f"no {missing}"
    timing = f"TE {te:g} ms / TR {tr:g} ms"
    if tr < _T1_MAX_TR and te < _SHORT_TE:
        return Weighting.T1, f"T1 by {timing}"
    if tr >= _T2_MIN_TR and te > _LONG_TE:
        return Weighting.T2, f"T2 by {timing}"
    if tr >= _T2_MIN_TR and te < _SHORT_TE:
        return Weighting.PD, f"PD by {timing}"
    return None, f"{timing} is neither clearly T1, T2 nor PD"


def _inversion_weighting(tr: float | None, te: float | None, ti: float | None) -> tuple[Weighting | None, str]:
    """STIR (short TI), T2-FLAIR (long TI) or T1-FLAIR (middle TI, short TE) for inversion recovery."""
    if ti is None:
        return None, "inversion recovery without an inversion time"
    timing = f"TI {ti:g} ms" + (f", TE {te:g} ms" if te else "") + (f" / TR {tr:g} ms" if tr else "")
    if _STIR_TI[0] <= ti <= _STIR_TI[1]:
        return Weighting.STIR, f"STIR by inversion recovery with {timing}"
    if ti >= _T2_FLAIR_MIN_TI:
        return Weighting.FLAIR, f"T2-FLAIR by inversion recovery with {timing}"
    if ti >= _T1_FLAIR_MIN_TI and te is not None and te < _SHORT_TE:
        return Weighting.T1, f"T1 (T1-FLAIR) by inversion recovery with {timing}"
    return None, f"inversion recovery with {timing} is neither STIR nor FLAIR"


def _described_weightings(description: str) -> frozenset[Weighting]:
    """The weightings a SeriesDescription names: none, one, or a choice such as 'T2/STIR'."""
    if _T2_OR_STIR.search(description):
        return frozenset({Weighting.T2, Weighting.STIR})
    if _STIR.search(description):  # 'SG T2W Stir', 't2_tirm_sag': STIR is named with its T2 look
        return frozenset({Weighting.STIR})
    if _FLAIR.search(description):
        return frozenset({Weighting.T1 if _T1.search(description) else Weighting.FLAIR})
    named = ((Weighting.T1, _T1), (Weighting.T2, _T2), (Weighting.PD, _PD))
    return frozenset(w for w, pattern in named if pattern.search(description))


# Dixon and contrast: variants that change what a weighting means for the grader.


def _apply_dixon(ds: Dataset, description: str, weighting: Weighting | None) -> tuple[Weighting | None, str | None]:
    """Water T2 reads as STIR, in-phase as a plain TSE; other Dixon images are unusable (None)."""
    component = _dixon_component(ds, description)
    if component is None:
        return weighting, None
    if component == "in-phase":
        return weighting, "Dixon in-phase image, read as a conventional TSE"
    if component == "water" and weighting is Weighting.T2:
        return Weighting.STIR, "Dixon water-only T2 is fat-suppressed and fluid-bright, read as STIR"
    of = f" of a {weighting.value}" if weighting else ""
    return None, f"Dixon {component} image{of} is not read by the grader"


def _dixon_component(ds: Dataset, description: str) -> str | None:
    """'water', 'fat', 'in-phase', 'opposed-phase' or 'unlabelled' for a Dixon image, else None."""
    types = _image_types(ds)
    for component, codes in _DIXON_TYPES.items():
        if types & codes:
            return component
    if "DIXON" not in types and not _DIXON.search(description):
        return None
    return next((c for c, pattern in _DIXON_TERMS.items() if pattern.search(description)), "unlabelled")


def _apply_contrast(
    ds: Dataset, description: str, weighting: Weighting | None
) -> tuple[Weighting | None, str | None]:
    """Post-contrast T1 is unusable (None); T2 and STIR keep their weighting with a note."""
    evidence = _contrast_evidence(ds, description)
    if evidence is None:
        return weighting, None
    if weighting is Weighting.T1:
        return None, f"contrast-enhanced ({evidence}): the grader reads pre-contrast T1 only"
    if weighting is None:
        return None, f"contrast-enhanced ({evidence})"
    return weighting, f"contrast-enhanced ({evidence}), which barely changes {weighting.value} images"


def _contrast_evidence(ds: Dataset, description: str) -> str | None:
    """What says the images are contrast-enhanced: a contrast tag or the description; else None."""
    agent = str(ds.get("ContrastBolusAgent") or "").strip().upper()
    if agent and agent not in _NO_AGENT:
        return "ContrastBolusAgent is set"
    if ds.get("ContrastBolusAgentSequence"):
        return "ContrastBolusAgentSequence is present"
    if "POST_CONTRAST" in _image_types(ds):
        return "ImageType says POST_CONTRAST"
    if _CONTRAST.search(description) and not _PRE_CONTRAST.search(description):
        return f"{_quoted(description)} says so"
    return None


# Reading header values: classic, Enhanced MR functional groups, Legacy Converted leftovers.


def _value(ds: Dataset, keyword: str) -> Any:
    """keyword's value at the top level, else in the shared then first per-frame functional group."""
    value = ds.get(keyword)
    if _present(value):
        return value
    for group_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = _first_item(ds, group_keyword)
        for item in _group_items(group, keyword) if group is not None else ():
            value = item.get(keyword)
            if _present(value):
                return value
    return None


def _group_items(group: Dataset, keyword: str) -> list[Dataset]:
    """The items of one functional group that may hold keyword: its macro, then converted leftovers."""
    names = (_FRAME_MACROS.get(keyword), *_CONVERTED)
    items = (_first_item(group, name) for name in names if name is not None)
    return [item for item in items if item is not None]


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of a sequence element, or None when it is absent or empty."""
    value = ds.get(keyword)
    if isinstance(value, Sequence) and len(value) and isinstance(value[0], Dataset):
        return value[0]
    return None


def _present(value: Any) -> bool:
    """Whether an element value carries something (not None, not empty)."""
    return value is not None and (not isinstance(value, (str, Sequence)) or len(value) > 0)


def _number(value: Any) -> float | None:
    """A value (the first of several) as a finite float, or None when absent or not a number."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _ms(ds: Dataset, *keywords: str) -> float | None:
    """The first positive time (ms) among keywords; 0 or blank means not recorded (GE writes TI 0)."""
    for keyword in keywords:
        number = _number(_value(ds, keyword))
        if number is not None and number > 0.0:
            return number
    return None


def _codes(ds: Dataset, keyword: str) -> frozenset[str]:
    """The upper-case values of a code-string element such as ImageType; empty when absent."""
    value = _value(ds, keyword)
    if value is None:
        return frozenset()
    values = [value] if isinstance(value, str) or not isinstance(value, Sequence) else value
    return frozenset(str(v).strip().upper() for v in values)


def _image_types(ds: Dataset) -> frozenset[str]:
    """ImageType and (Enhanced MR) FrameType values together."""
    return _codes(ds, "ImageType") | _codes(ds, "FrameType")


def _quoted(description: str) -> str:
    """The description as the reason quotes it (LO is at most 64 characters)."""
    return f"description '{description[:64]}'" if description else "no SeriesDescription"
