"""The objects of a result are made even from sources with invalid dates, which they leave blank."""

from __future__ import annotations

import copy

import pydicom

from tests.worker.conftest import Graded
from worker.anchors import find_anchors
from worker.identity import Identity
from worker.objects import build_objects


def test_an_invalid_birth_date_is_blanked_not_fatal(graded: Graded) -> None:
    """A PatientBirthDate written 1923-04-05 (not a DICOM DA) in every source: the SR, the
    presentation states and the key images are still made, with the birth date empty."""
    headers = {uid: [copy.deepcopy(ds) for ds in datasets] for uid, datasets in graded.headers.items()}
    for datasets in headers.values():
        for ds in datasets:
            ds.PatientBirthDate = "1923-04-05"
    anchors = find_anchors(graded.result, headers)
    paths = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in graded.study.rglob("*.dcm")}
    images = {}
    for sop in {a.plane.sop_instance_uid for a in anchors.values()}:
        images[sop] = pydicom.dcmread(paths[sop])
        images[sop].PatientBirthDate = "1923-04-05"
    evidence = [ds for datasets in headers.values() for ds in datasets]
    built = build_objects(graded.result, anchors, evidence, images, Identity("2.25.1234", "2.25", "test"), [])
    assert {kind for kind, _ in built} == {"SR", "SR-2D", "PR", "SC"}
    assert [(kind, ds.PatientBirthDate) for kind, ds in built if ds.get("PatientBirthDate") not in (None, "")] == []
