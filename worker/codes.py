"""The coded concepts of spine-node's structured report (TID 1500), keyed by our own names.

Standard codes where a verified one exists (reference/dicom-outputs.md section 2); local codes in
the private scheme ``99SPNODE`` for what has none: the neural foramen, the subarticular zone,
the "normal or mild" grade and the per-class probabilities. Meanings are written out here so
that none carries pydicom's "(attribute)" suffixes (pitfall P6).
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept

LOCAL_SCHEME = "99SPNODE"
#: Declared in every object that uses a local code (Coding Scheme Identification Sequence).
LOCAL_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=LOCAL_SCHEME, name="spine-node local codes", responsible_organization="spine-node")

# Report structure and group content.
PROCEDURE_REPORTED = CodedConcept("25056-3", "LN", "MRI unspecified body region")
FINDING = CodedConcept("18347007", "SCT", "Spinal stenosis of lumbar region")
FINDING_CATEGORY = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
SEVERITY = CodedConcept("246112005", "SCT", "Severity")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
#: TID 1500 row 12 container, here holding the result's warnings as text.
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
ANALYSIS_WARNING = CodedConcept("W001", LOCAL_SCHEME, "Analysis warning")

# Anatomy: compartments, sides and disc levels (CID 7604 "Intervertebral Disc").
VERTEBRAL_CANAL = CodedConcept("61853006", "SCT", "Vertebral canal")
NEURAL_FORAMEN = CodedConcept("S001", LOCAL_SCHEME, "Intervertebral foramen")
SUBARTICULAR_ZONE = CodedConcept("S002", LOCAL_SCHEME, "Subarticular zone")
LEFT = CodedConcept("7771000", "SCT", "Left")
RIGHT = CodedConcept("24028007", "SCT", "Right")

#: Each condition's finding site: the compartment and, for paired ones, its side.
CONDITION_SITES: dict[str, tuple[CodedConcept, CodedConcept | None]] = {
    "spinal_canal_stenosis": (VERTEBRAL_CANAL, None),
    "left_neural_foraminal_narrowing": (NEURAL_FORAMEN, LEFT),
    "right_neural_foraminal_narrowing": (NEURAL_FORAMEN, RIGHT),
    "left_subarticular_stenosis": (SUBARTICULAR_ZONE, LEFT),
    "right_subarticular_stenosis": (SUBARTICULAR_ZONE, RIGHT),
}

#: Each level's intervertebral disc, the second finding site.
LEVEL_SITES: dict[str, CodedConcept] = {
    "L1-L2": CodedConcept("80064006", "SCT", "L1/L2 disc"),
    "L2-L3": CodedConcept("67459009", "SCT", "L2/L3 disc"),
    "L3-L4": CodedConcept("62551000", "SCT", "L3/L4 disc"),
    "L4-L5": CodedConcept("84020006", "SCT", "L4/L5 disc"),
    "L5-S1": CodedConcept("715056000", "SCT", "L5/S1 disc"),
}

#: Each grade as the value of the Severity evaluation (CID 3716 where it has one).
GRADE_VALUES: dict[str, CodedConcept] = {
    "normal_mild": CodedConcept("G000", LOCAL_SCHEME, "Normal or mild"),
    "moderate": CodedConcept("6736007", "SCT", "Moderate"),
    "severe": CodedConcept("24484000", "SCT", "Severe"),
}

#: Each grade's probability, a unitless NUM measurement (no standard per-class concept exists).
PROBABILITY_NAMES: dict[str, CodedConcept] = {
    "normal_mild": CodedConcept("P000", LOCAL_SCHEME, "Probability of normal or mild"),
    "moderate": CodedConcept("P001", LOCAL_SCHEME, "Probability of moderate"),
    "severe": CodedConcept("P002", LOCAL_SCHEME, "Probability of severe"),
}
