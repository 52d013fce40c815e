"""The grading result as a DICOM structured report: a TID 1500 Measurement Report, and back.

One TID 1410 planar measurement group per graded (level, condition): the finding (lumbar
stenosis), its sites (compartment with side, then the disc), the algorithm (TID 4019), the
grade as a Severity evaluation, the three class probabilities as unitless numbers and a point
on the image the grade is shown on (reference/dicom-outputs.md). Only 2-D SCOORD is used, so
the same tree is valid as Comprehensive 3D SR and, for archives that refuse it, Comprehensive SR.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, cast

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage

from worker.anchors import Anchor
from worker.codes import (
    ANALYSIS_WARNING,
    CONDITION_SITES,
    FINDING,
    FINDING_CATEGORY,
    GRADE_VALUES,
    LEVEL_SITES,
    LOCAL_SCHEME_ITEM,
    NO_UNITS,
    PROBABILITY_NAMES,
    PROCEDURE_REPORTED,
    QUALITATIVE_EVALUATIONS,
    SEVERITY,
)
from worker.identity import SERIES_DESCRIPTIONS, SERIES_NUMBERS, Identity

LOGGER = logging.getLogger(__name__)

#: Where a multi-frame image keeps the geometry that the Image Library describes.
LIBRARY_GEOMETRY = (("PixelMeasuresSequence", "PixelSpacing"), ("PixelMeasuresSequence", "SliceThickness"),
                    ("PlaneOrientationSequence", "ImageOrientationPatient"), ("PlanePositionSequence", "ImagePositionPatient"))
FUNCTIONAL_GROUPS = (Tag("PerFrameFunctionalGroupsSequence"), Tag("SharedFunctionalGroupsSequence"))
SR_CLASSES: dict[str, type[ComprehensiveSR] | type[Comprehensive3DSR]] = {Comprehensive3DSRStorage: Comprehensive3DSR, ComprehensiveSRStorage: ComprehensiveSR}


class Grade(TypedDict):
    """One (level, condition) as read back from a report, in DESIGN.md's names."""

    grade: str
    probabilities: dict[str, float]


def _key(code: CodedConcept) -> tuple[str, str]:
    """A hashable identity of a code: its value and scheme (the meaning is free text)."""
    return str(code.value), str(code.scheme_designator)


def _skip_reason(entry: Mapping[str, Any], anchor: Anchor | None) -> str | None:
    """Why a graded condition cannot go into the report, or None if it can."""
    if entry.get("grade") not in GRADE_VALUES:
        return f"unknown grade {entry.get('grade')!r}"
    if not all(math.isfinite(float(p)) for p in entry.get("probabilities", {}).values()):
        return "non-finite probability"  # DS cannot encode it (pitfall P8), and the grade is its argmax
    if anchor is None:
        return "no image to mark it on"
    return None


def _reportable(result: Mapping[str, Any], anchors: Mapping[tuple[str, str], Anchor]) -> list[tuple[str, str, Mapping[str, Any], Anchor]]:
    """Every graded (level, condition, entry, anchor) of ``result`` that a report can carry, in
    level then condition order; a grade it cannot carry is logged and left out (the report is then partial)."""
    out = []
    for level in LEVEL_SITES:
        for condition in CONDITION_SITES:
            entry = result["levels"].get(level, {}).get("conditions", {}).get(condition)
            if entry is None:
                continue
            anchor = anchors.get((level, condition))
            reason = _skip_reason(entry, anchor)
            if reason is None and anchor is not None:
                out.append((level, condition, entry, anchor))
            else:
                LOGGER.warning("grade left out of the SR: %s", reason,
                               extra={"study_instance_uid": result.get("study_instance_uid"), "level": level, "condition": condition})
    return out


def _algorithm(result: Mapping[str, Any], identity: Identity) -> AlgorithmIdentification:
    """TID 4019: the grader's name and version, with the weights' hashes as parameters."""
    model = result.get("model", {})
    parameters = [f"{name}={model[name]}" for name in ("weights_sha256", "detector_sha256") if model.get(name)]
    return AlgorithmIdentification(name=identity.algorithm_name, version=identity.software_version, parameters=parameters or None)


def _observation_context(identity: Identity) -> ObservationContext:
    """TID 1001 with a device observer (TID 1004): the node itself, by its stable device UID."""
    device = DeviceObserverIdentifyingAttributes(
        uid=identity.device_uid, name=identity.model_name, manufacturer_name=identity.manufacturer,
        model_name=identity.model_name, serial_number=identity.device_serial_number)
    return ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _region(anchor: Anchor) -> ImageRegion:
    """The anchor's point as a 2-D SCOORD on its image (and frame, for a multi-frame image)."""
    frames = None if anchor.plane.frame_number is None else [anchor.plane.frame_number]
    source = SourceImageForRegion.from_source_image(anchor.plane.dataset, referenced_frame_numbers=frames)
    return ImageRegion(graphic_type=GraphicTypeValues.POINT, graphic_data=np.array([anchor.point], dtype=float), source_image=source)


def _finding_sites(level: str, condition: str) -> list[FindingSite]:
    """The compartment first (with its side), then the disc: viewers label a group by its first site."""
    compartment, side = CONDITION_SITES[condition]
    return [FindingSite(anatomic_location=compartment, laterality=side), FindingSite(anatomic_location=LEVEL_SITES[level])]


def _group(level: str, condition: str, entry: Mapping[str, Any], anchor: Anchor, identity: Identity,
           algorithm: AlgorithmIdentification) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for one grade; the tracking identifier is readable text, e.g. "L4-L5 left neural
    foraminal narrowing" (pitfall P4)."""
    probabilities = entry.get("probabilities", {})
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=identity.new_uid(), identifier=f"{level} {condition.replace('_', ' ')}"),
        referenced_region=_region(anchor),
        finding_type=FINDING,
        finding_category=FINDING_CATEGORY,
        finding_sites=_finding_sites(level, condition),
        algorithm_id=algorithm,
        qualitative_evaluations=[QualitativeEvaluation(name=SEVERITY, value=GRADE_VALUES[entry["grade"]])],
        measurements=[Measurement(name=name, value=float(probabilities[grade]), unit=NO_UNITS)
                      for grade, name in PROBABILITY_NAMES.items() if grade in probabilities],
    )


def _warnings(warnings: Sequence[str]) -> ContainerContentItem:
    """TID 1500 row 12, "Qualitative Evaluations": the result's warnings as text items."""
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = ContentSequence([
        TextContentItem(name=ANALYSIS_WARNING, value=text, relationship_type=RelationshipTypeValues.CONTAINS) for text in warnings])
    return container


def _first_frame_attribute(ds: Dataset, sequence: str, keyword: str) -> Any:
    """An attribute of a multi-frame image's first frame: per-frame if given there, else shared."""
    for groups in (ds.PerFrameFunctionalGroupsSequence[0], ds.SharedFunctionalGroupsSequence[0]):
        if sequence in groups and keyword in groups[sequence][0]:
            return groups[sequence][0][keyword].value
    return None


def _library_view(ds: Dataset) -> Dataset:
    """An image as highdicom's Image Library reads it (TID 1604 wants single-frame geometry): a
    multi-frame image's header with its first frame's plane and pixel measures at the top level."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    view = Dataset({tag: elem for tag, elem in ds.items() if tag not in FUNCTIONAL_GROUPS})
    for sequence, keyword in LIBRARY_GEOMETRY:
        value = _first_frame_attribute(ds, sequence, keyword)
        if value is not None:
            setattr(view, keyword, value)
    return view


def _distinct_images(anchors: Sequence[Anchor]) -> list[Dataset]:
    """The anchors' source images, each once, in first-use order (the Image Library, pitfall P3)."""
    return [_library_view(ds) for ds in {a.plane.sop_instance_uid: a.plane.dataset for a in anchors}.values()]


def build_sr(result: Mapping[str, Any], anchors: Mapping[tuple[str, str], Anchor], evidence: Sequence[Dataset],
             identity: Identity, *, three_d: bool = True, previous: Sequence[Dataset] | None = None) -> ComprehensiveSR | Comprehensive3DSR:
    """The TID 1500 report of ``result`` (DESIGN.md's shape), each grade pointing at its anchor.

    ``evidence`` is every source instance the grades came from (headers suffice; it must hold
    every anchor's image, pitfall P1); ``previous`` the earlier reports of this study that this one
    supersedes. Comprehensive 3D SR by default, Comprehensive SR with ``three_d=False``. COMPLETE
    only when all 25 grades are in it; always PRELIMINARY, UNVERIFIED and RESEARCH.
    """
    graded = _reportable(result, anchors)
    if not graded:
        raise ValueError("result: no grade that a report can carry")
    algorithm = _algorithm(result, identity)
    report = MeasurementReport(
        observation_context=_observation_context(identity),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[_group(level, condition, entry, anchor, identity, algorithm) for level, condition, entry, anchor in graded],
        referenced_images=_distinct_images([anchor for *_, anchor in graded]),
    )
    if result.get("warnings"):
        report[0].ContentSequence.append(_warnings(result["warnings"]))
    sr_class = Comprehensive3DSR if three_d else ComprehensiveSR
    equipment = identity.equipment()
    return sr_class(
        evidence=list(evidence), content=report,
        series_instance_uid=identity.new_uid(), series_number=SERIES_NUMBERS["SR"],
        sop_instance_uid=identity.new_uid(), instance_number=1,
        is_complete=len(graded) == len(LEVEL_SITES) * len(CONDITION_SITES), is_final=False, is_verified=False,
        previous_versions=list(previous) if previous else None,
        series_description=SERIES_DESCRIPTIONS["SR"], content_qualification="RESEARCH",
        coding_schemes=[LOCAL_SCHEME_ITEM], **equipment,
    )


def _measurement_report(sr: Dataset) -> MeasurementReport:
    """The TID 1500 content of a Comprehensive (3D) SR dataset, parsed by highdicom."""
    sr_class = SR_CLASSES.get(sr.SOPClassUID)
    if sr_class is None:
        raise ValueError(f"sr: SOP class {sr.SOPClassUID} is not a Comprehensive (3D) SR")
    content = sr_class.from_dataset(sr).content
    if not isinstance(content, MeasurementReport):
        raise ValueError("sr: not a TID 1500 Measurement Report")
    return content


def _level_and_condition(sites: Sequence[FindingSite]) -> tuple[str, str]:
    """Our level and condition names from a group's finding sites (disc; compartment and side)."""
    levels = {_key(code): name for name, code in LEVEL_SITES.items()}
    conditions = {(_key(site), None if side is None else _key(side)): name for name, (site, side) in CONDITION_SITES.items()}
    found_levels = [levels[_key(s.value)] for s in sites if _key(s.value) in levels]
    found_conditions = [conditions[k] for s in sites
                        if (k := (_key(s.value), None if s.laterality is None else _key(s.laterality))) in conditions]
    if len(found_levels) != 1 or len(found_conditions) != 1:
        raise ValueError(f"sr: a measurement group's finding sites name no single level and condition: {[s.value.meaning for s in sites]}")
    return found_levels[0], found_conditions[0]


def read_grades(sr: Dataset) -> dict[str, dict[str, Grade]]:
    """The grades in a report written by :func:`build_sr`, by level and condition, with the
    probabilities it holds; for comparison with the database and the result JSON."""
    grade_names = {_key(code): name for name, code in GRADE_VALUES.items()}
    grades: dict[str, dict[str, Grade]] = {}
    for group in _measurement_report(sr).get_planar_roi_measurement_groups():
        level, condition = _level_and_condition(group.finding_sites)
        severity = group.get_qualitative_evaluations(name=SEVERITY)  # not the finding category (pitfall P9)
        if len(severity) != 1:
            raise ValueError(f"sr: {level} {condition} has {len(severity)} severity evaluations")
        probabilities = {grade: float(found[0].value) for grade, name in PROBABILITY_NAMES.items()
                         if (found := group.get_measurements(name=name))}
        value = cast(CodedConcept, severity[0].value)  # a CODE item; highdicom annotates it as a number
        grades.setdefault(level, {})[condition] = {"grade": grade_names[_key(value)], "probabilities": probabilities}
    return grades
