"""The DICOM objects of one result, made once by the grading job and kept beside the study: the
TID 1500 SR with its Comprehensive SR twin (for peers without 3D SR), the presentation states
and the key images. Deliveries send these files, so a retry sends the very same instances."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset, config
from pydicom.valuerep import validate_value
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import reading
from node.schema import Result, ResultObject
from worker.anchors import Anchor, find_anchors
from worker.identity import Identity
from worker.overlays import build_key_images, build_presentation_states
from worker.pipeline import SeriesEntry
from worker.reports import build_sr
from worker.storage import InstanceStorage

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedObject:
    """One object written to the store: its kind (SR, SR-2D, PR, SC), UIDs and relative path."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str


def blank_invalid_dates(datasets: Iterable[Dataset]) -> None:
    """Blank top-level dates and times that are not valid DICOM (e.g. a birth date written
    1923-04-05): highdicom copies them into our objects and refuses invalid ones, and another
    attempt could never fix that. Type 2 attributes may be empty; the value is not logged."""
    for ds in datasets:
        for elem in ds:
            if elem.VR in ("DA", "TM", "DT") and elem.value not in (None, ""):
                try:
                    validate_value(elem.VR, elem.value, config.RAISE)
                except ValueError:
                    LOGGER.warning("blanking an invalid %s value of %s in the copy used for result objects", elem.VR, elem.keyword)
                    elem.value = ""


def build_objects(result: Mapping[str, Any], anchors: Mapping[tuple[str, str], Anchor], evidence: Sequence[Dataset],
                  images: Mapping[str, Dataset], identity: Identity, previous: Sequence[Dataset]) -> list[tuple[str, Dataset]]:
    """Every object of a result, by kind; ``images`` holds the anchored images with pixels.
    Invalid dates in the sources are blanked first (in these in-memory copies only)."""
    blank_invalid_dates([*evidence, *images.values()])
    sr = build_sr(result, anchors, evidence, identity, three_d=True, previous=previous)
    twin = build_sr(result, anchors, evidence, identity, three_d=False, previous=previous)
    return [("SR", sr), ("SR-2D", twin),
            *(("PR", ds) for ds in build_presentation_states(result, anchors, images, identity)),
            *(("SC", ds) for ds in build_key_images(result, anchors, images, identity))]


def make_objects(settings: Settings, storage: InstanceStorage, sessions: sessionmaker[Session], study_id: int,
                 result: Mapping[str, Any], series: Sequence[SeriesEntry]) -> list[SavedObject]:
    """Read the used series' instances, build the objects and save them under ``results/<study>/``."""
    headers: dict[str, list[Dataset]] = {}
    path_of: dict[str, Path] = {}
    for entry in series:
        if not entry.used:
            continue
        for path in entry.paths:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, OSError, ValueError):
                continue  # the volume loader left it out too, with its reason
            headers.setdefault(entry.series_instance_uid, []).append(ds)
            path_of[str(ds.SOPInstanceUID)] = path
    anchors = find_anchors(result, headers)
    images = {sop: pydicom.dcmread(path_of[sop]) for sop in {a.plane.sop_instance_uid for a in anchors.values()}}
    evidence = [ds for datasets in headers.values() for ds in datasets]
    built = build_objects(result, anchors, evidence, images, Identity.from_result(settings, dict(result)),
                          previous_reports(storage, sessions, study_id))
    return [save(storage, str(result["study_instance_uid"]), kind, ds) for kind, ds in built]


def previous_reports(storage: InstanceStorage, sessions: sessionmaker[Session], study_id: int) -> list[Dataset]:
    """The study's newest earlier SR, which a new report names as its predecessor."""
    with reading(sessions) as session:
        path = session.scalar(
            select(ResultObject.path).join(Result, Result.id == ResultObject.result_id)
            .where(Result.study_id == study_id, ResultObject.kind == "SR").order_by(ResultObject.id.desc()).limit(1)
        )
    if path is None:
        return []
    with storage.local_files([path]) as (local,):
        return [pydicom.dcmread(local)]


def save(storage: InstanceStorage, study_uid: str, kind: str, ds: Dataset) -> SavedObject:
    """Write one object durably to the store, named by its SOP Instance UID."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    relative = f"results/{study_uid}/{ds.SOPInstanceUID}.dcm"
    storage.save(relative, buffer.getvalue())
    return SavedObject(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), relative)
