"""Overlays: the presentation states (GSPS) and key images (SC) pass dcmpschk and dciodvfy, mark
every grade on its image in its grade's colour, and render to PNGs a person can check."""

from __future__ import annotations

import copy
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from models.data.pathology import CONDITIONS, LEVELS
from tests.worker.conftest import Graded
from worker.anchors import Anchor, find_anchors
from worker.identity import NOT_FOR_DIAGNOSIS, Identity
from worker.overlays import GRADE_LAYERS, build_key_images, build_presentation_states, label_text
from worker.render import canvas, display_scale, presentation_picture, render_result_objects, windowed

IDENTITY = Identity(device_uid="2.25.1234", uid_root="2.25", software_version="test")
LABEL = re.compile(r"^L\d-[LS]\d (canal|[LR] foramen|[LR] subart\.): (NORMAL/MILD|MODERATE|SEVERE) [01]\.\d\d$")


@dataclass(frozen=True)
class Written:
    """The overlays of the graded study, written as DICOM files and read back."""

    state_paths: list[Path]
    key_image_paths: list[Path]

    @property
    def states(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in self.state_paths]

    @property
    def key_images(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in self.key_image_paths]


@pytest.fixture(scope="module")
def anchors(graded: Graded) -> dict[tuple[str, str], Anchor]:
    return find_anchors(graded.result, graded.headers)


@pytest.fixture(scope="module")
def sources(graded: Graded) -> dict[str, pydicom.Dataset]:
    """Every instance of the study with its pixels, by SOPInstanceUID."""
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in sorted(graded.study.rglob("*.dcm")))}


@pytest.fixture(scope="module")
def written(graded: Graded, anchors: dict[tuple[str, str], Anchor], sources: dict[str, pydicom.Dataset],
            tmp_path_factory: pytest.TempPathFactory) -> Written:
    out = tmp_path_factory.mktemp("overlays")
    paths: dict[str, list[Path]] = {"PR": [], "SC": []}
    for kind, objects in (("PR", build_presentation_states(graded.result, anchors, sources, IDENTITY)),
                          ("SC", build_key_images(graded.result, anchors, sources, IDENTITY))):
        for ds in objects:
            paths[kind].append(out / f"{kind}_{int(ds.InstanceNumber):03d}.dcm")
            ds.save_as(paths[kind][-1], enforce_file_format=True)
    return Written(paths["PR"], paths["SC"])


def _run(*args: str | Path) -> str:
    """A validator's stdout and stderr together."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _dciodvfy_errors(path: Path) -> list[str]:
    return [line for line in _run("/usr/bin/dciodvfy", "-new", path).splitlines() if line.startswith("Error")]


def _anchored_frames(anchors: dict[tuple[str, str], Anchor]) -> set[tuple[str, int | None]]:
    return {(a.plane.sop_instance_uid, a.plane.frame_number) for a in anchors.values()}


def _texts(gsps: pydicom.Dataset) -> list[tuple[str, pydicom.Dataset]]:
    """(layer, text object) of every text object of the GSPS."""
    return [(str(a.GraphicLayer), t) for a in gsps.GraphicAnnotationSequence for t in a.get("TextObjectSequence", [])]


def test_presentation_states_pass_dcmpschk_and_dciodvfy(written: Written) -> None:
    """dcmpschk exits 0 even when it fails, so its verdict is read from what it prints."""
    assert written.state_paths
    for path in written.state_paths:
        output = _run("/usr/bin/dcmpschk", path)
        assert "Test passed." in output and not [line for line in output.splitlines() if line.startswith("E:")], output
        assert _dciodvfy_errors(path) == []


def test_key_images_pass_dciodvfy(written: Written) -> None:
    assert written.key_image_paths
    for path in written.key_image_paths:
        assert _dciodvfy_errors(path) == []


def test_one_presentation_state_per_anchored_series_in_one_new_series(written: Written, graded: Graded,
                                                                      anchors: dict[tuple[str, str], Anchor]) -> None:
    states = written.states
    referenced = [[s.SeriesInstanceUID for s in gsps.ReferencedSeriesSequence] for gsps in states]
    assert sorted(uid for uids in referenced for uid in uids) == sorted({a.series_instance_uid for a in anchors.values()})
    assert all(len(uids) == 1 for uids in referenced)
    assert {gsps.StudyInstanceUID for gsps in states} == {graded.result["study_instance_uid"]}
    (series_uid,) = {gsps.SeriesInstanceUID for gsps in states}
    assert series_uid not in graded.headers and series_uid.startswith("2.25.")
    assert {gsps.SeriesNumber for gsps in states} == {902}
    assert sorted(gsps.InstanceNumber for gsps in states) == list(range(1, len(states) + 1))
    for gsps in states:
        assert gsps.ContentQualification == "RESEARCH" and gsps.BodyPartExamined == "LSPINE"
        assert NOT_FOR_DIAGNOSIS in gsps.ContentDescription and NOT_FOR_DIAGNOSIS in gsps.SeriesDescription


def test_every_annotated_image_is_referenced_with_its_window(written: Written, anchors: dict[tuple[str, str], Anchor],
                                                             sources: dict[str, pydicom.Dataset]) -> None:
    for gsps in written.states:
        (series,) = gsps.ReferencedSeriesSequence
        referenced = {str(r.ReferencedSOPInstanceUID) for r in series.ReferencedImageSequence}
        annotated = {str(r.ReferencedSOPInstanceUID) for a in gsps.GraphicAnnotationSequence for r in a.ReferencedImageSequence}
        assert referenced == annotated == {a.plane.sop_instance_uid for a in anchors.values()
                                           if a.series_instance_uid == series.SeriesInstanceUID}
        for uid in referenced:
            (voi,) = [v for v in gsps.SoftcopyVOILUTSequence if "ReferencedImageSequence" not in v
                      or uid in {str(r.ReferencedSOPInstanceUID) for r in v.ReferencedImageSequence}]
            image = sources[uid]
            assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (float(image.WindowCenter), float(image.WindowWidth))


def test_every_grade_is_labelled_on_its_image_in_its_grade_layer(written: Written, graded: Graded,
                                                                  anchors: dict[tuple[str, str], Anchor]) -> None:
    shown: dict[str, tuple[str, set[str]]] = {}
    for gsps in written.states:
        for layer, text in _texts(gsps):
            images = {str(r.ReferencedSOPInstanceUID) for a in gsps.GraphicAnnotationSequence
                      for r in a.ReferencedImageSequence if text in a.get("TextObjectSequence", [])}
            shown[str(text.UnformattedTextValue)] = (layer, images)
    assert len(shown) == len(anchors) + 1 and shown[NOT_FOR_DIAGNOSIS][0] == "SPINE NOTICE"
    for (level, condition), anchor in anchors.items():
        label = label_text(graded.result, level, condition)
        grade = graded.result["levels"][level]["conditions"][condition]["grade"]
        assert LABEL.match(label) and label.startswith(level)
        assert shown[label] == (GRADE_LAYERS[grade].name, {anchor.plane.sop_instance_uid})
    assert label_text(graded.result, LEVELS[3], CONDITIONS[0]).startswith("L4-L5 canal: ")


def test_marks_lie_inside_their_image_and_labels_do_not_overlap(written: Written, sources: dict[str, pydicom.Dataset]) -> None:
    for gsps in written.states:
        boxes: dict[str, list[np.ndarray]] = {}
        for annotation in gsps.GraphicAnnotationSequence:
            (ref,) = annotation.ReferencedImageSequence
            image = sources[str(ref.ReferencedSOPInstanceUID)]
            size = np.array([image.Columns, image.Rows], float)
            points = [np.reshape(g.GraphicData, (-1, 2)) for g in annotation.get("GraphicObjectSequence", [])]
            for text in annotation.get("TextObjectSequence", []):
                box = np.array([text.BoundingBoxTopLeftHandCorner, text.BoundingBoxBottomRightHandCorner], float)
                boxes.setdefault(str(ref.ReferencedSOPInstanceUID), []).append(box)
                points += [box, *([np.reshape(text.AnchorPoint, (1, 2))] if "AnchorPoint" in text else [])]
            assert all(np.all(p >= 0) and np.all(p <= size) for p in points)
        for image_boxes in boxes.values():
            for i, a in enumerate(image_boxes):
                for b in image_boxes[i + 1:]:
                    assert not (np.all(a[0] < b[1]) and np.all(b[0] < a[1])), (a, b)


def test_key_images_are_a_summary_then_each_anchored_image(written: Written, graded: Graded,
                                                            anchors: dict[tuple[str, str], Anchor],
                                                            sources: dict[str, pydicom.Dataset]) -> None:
    summary, *keys = written.key_images
    assert summary.InstanceNumber == 1 and "SourceImageSequence" not in summary
    assert "PatientOrientation" in summary and not summary.PatientOrientation
    assert summary.PhotometricInterpretation == "RGB" and summary.Columns > 600
    refs = {(str(k.SourceImageSequence[0].ReferencedSOPInstanceUID), k.SourceImageSequence[0].get("ReferencedFrameNumber"))
            for k in keys}
    assert refs == _anchored_frames(anchors)
    first_source = next(iter(sources.values()))
    for sc in written.key_images:
        assert sc.StudyInstanceUID == graded.result["study_instance_uid"] and sc.PatientID == first_source.PatientID
        assert sc.SeriesNumber == 903 and sc.ContentQualification == "RESEARCH" and sc.BodyPartExamined == "LSPINE"
        assert NOT_FOR_DIAGNOSIS in sc.SeriesDescription
    assert len({sc.SeriesInstanceUID for sc in written.key_images}) == 1


def test_key_images_change_pixels_at_the_marks_only(written: Written, anchors: dict[tuple[str, str], Anchor],
                                                    sources: dict[str, pydicom.Dataset]) -> None:
    """Each key image is its source, windowed and enlarged, changed inside every disc box's outline and
    nowhere far from the marks (the GSPS graphics and labels of that image)."""
    marks = {str(r.ReferencedSOPInstanceUID): a for gsps in written.states for a in gsps.GraphicAnnotationSequence
             for r in a.ReferencedImageSequence}
    assert marks
    for sc in written.key_images[1:]:
        source = sources[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        scale = display_scale(source)
        changed = np.any(sc.pixel_array != np.asarray(canvas(windowed(source), scale)), axis=-1)
        near = np.zeros_like(changed)
        uid = str(source.SOPInstanceUID)
        for annotation in (a for gsps in written.states for a in gsps.GraphicAnnotationSequence
                           if any(str(r.ReferencedSOPInstanceUID) == uid for r in a.ReferencedImageSequence)):
            for corners in _mark_extents(annotation):
                (left, top), (right, bottom) = np.floor(corners[0] * scale) - 6, np.ceil(corners[1] * scale) + 6
                near[max(int(top), 0):int(bottom), max(int(left), 0):int(right)] = True
        assert changed.any() and not (changed & ~near).any()
        for anchor in (a for a in anchors.values() if a.plane.sop_instance_uid == uid):
            left, top, right, bottom = (int(round(v * scale)) for v in anchor.box)
            assert changed[top - 2:top + 3, left:right].any() and changed[top:bottom, left - 2:left + 3].any()


def _mark_extents(annotation: pydicom.Dataset) -> list[np.ndarray]:
    """[[left, top], [right, bottom]] (image pixels) of each graphic and text object, a text's anchor included."""
    extents = []
    for graphic in annotation.get("GraphicObjectSequence", []):
        points = np.reshape(graphic.GraphicData, (-1, 2))
        radius = np.linalg.norm(points[1] - points[0]) if graphic.GraphicType == "CIRCLE" else 0.0
        extents.append(np.array([points.min(axis=0) - radius, points.max(axis=0) + radius]))
    for text in annotation.get("TextObjectSequence", []):
        points = np.array([text.BoundingBoxTopLeftHandCorner, text.BoundingBoxBottomRightHandCorner,
                           *([text.AnchorPoint] if "AnchorPoint" in text else [])], float)
        extents.append(np.array([points.min(axis=0), points.max(axis=0)]))
    return extents


@pytest.fixture(scope="module")
def rendered(written: Written, graded: Graded, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return render_result_objects([*written.state_paths, *written.key_image_paths], graded.study, tmp_path_factory.mktemp("png"))


def test_render_writes_every_key_image_and_each_state_on_each_of_its_images(rendered: list[Path], written: Written,
                                                                          anchors: dict[tuple[str, str], Anchor]) -> None:
    key_pngs = [p for p in rendered if p.name.startswith("SC_")]
    state_pngs = [p for p in rendered if p.name.startswith("PR_")]
    assert len(key_pngs) == len(written.key_image_paths) and len(state_pngs) == len(_anchored_frames(anchors))
    for png, sc in zip(key_pngs, written.key_images, strict=True):
        with Image.open(png) as picture:
            assert picture.size == (sc.Columns, sc.Rows) and picture.mode == "RGB"


def test_a_rendered_state_shows_coloured_marks_the_plain_image_lacks(written: Written, sources: dict[str, pydicom.Dataset],
                                                                     graded: Graded) -> None:
    gsps = written.states[0]
    image = sources[str(gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)]
    scale = display_scale(image)
    plain = np.asarray(canvas(windowed(image), scale)).astype(int)
    shown = np.asarray(presentation_picture(gsps, image)).astype(int)
    assert shown.shape == (image.Rows * scale, image.Columns * scale, 3)
    assert not np.any(plain.max(axis=-1) - plain.min(axis=-1))
    coloured = shown.max(axis=-1) - shown.min(axis=-1) > 60
    assert 50 < coloured.sum() < 0.2 * coloured.size
    grades = {graded.result["levels"][a.level]["conditions"][a.condition]["grade"]
              for a in find_anchors(graded.result, graded.headers).values() if a.plane.sop_instance_uid == image.SOPInstanceUID}
    for grade in grades:
        colour = np.array(GRADE_LAYERS[grade].rgb)
        assert np.any(np.all(np.abs(shown - colour) <= 12, axis=-1)), grade


def test_a_rendered_state_uses_its_own_window(written: Written, sources: dict[str, pydicom.Dataset]) -> None:
    gsps = copy.deepcopy(written.states[0])
    image = sources[str(gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)]
    plain = np.asarray(canvas(windowed(image), display_scale(image)))
    for voi in gsps.SoftcopyVOILUTSequence:
        voi.WindowWidth = float(voi.WindowWidth) / 4
    shown = np.asarray(presentation_picture(gsps, image))
    grey = shown.max(axis=-1) == shown.min(axis=-1)
    assert (shown[..., 0][grey] != plain[..., 0][grey]).mean() > 0.3


def test_an_image_without_a_window_is_windowed_over_its_pixels(sources: dict[str, pydicom.Dataset]) -> None:
    image = copy.deepcopy(next(iter(sources.values())))
    del image.WindowCenter, image.WindowWidth
    pixels = windowed(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (image.Rows, image.Columns)
    assert pixels.min() == 0 and pixels.max() == 255 and 0 < (pixels == 255).mean() < 0.05
