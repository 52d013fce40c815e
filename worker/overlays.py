"""What a radiologist sees of a result in any viewer: presentation states (GSPS) with the grades
drawn over the source images, and key images (Secondary Capture) with the same marks burned in
plus a summary table, for viewers that show neither SR nor GSPS.

Every annotated image (frame) gets one plan: a box around each disc (in the colour of the worst
grade shown on it), a circle at each anchor, a label such as "L4-L5 canal: SEVERE 0.87" (the
predicted grade and its probability) beside the box, and "NOT FOR DIAGNOSTIC USE" in the top-left
corner. The plan is written once, as GSPS graphic annotations in one layer per grade; the key
images are those same annotations drawn by ``worker.render`` onto the windowed pixels, so the
GSPS and the key images always agree.

``images`` maps SOPInstanceUID to the source instances and must hold every anchored image: the
presentation states need only their headers, the key images need their pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom import Dataset

from worker import render
from worker.anchors import CONDITIONS, Anchor, Plane
from worker.identity import NOT_FOR_DIAGNOSIS, SERIES_DESCRIPTIONS, SERIES_NUMBERS, Identity

__all__ = ["build_key_images", "build_presentation_states", "label_text"]

GRADES = ("normal_mild", "moderate", "severe")
GRADE_WORDS = {"normal_mild": "NORMAL/MILD", "moderate": "MODERATE", "severe": "SEVERE"}
SHORT_CONDITIONS = {
    "spinal_canal_stenosis": "canal",
    "left_neural_foraminal_narrowing": "L foramen",
    "right_neural_foraminal_narrowing": "R foramen",
    "left_subarticular_stenosis": "L subart.",
    "right_subarticular_stenosis": "R subart.",
}


@dataclass(frozen=True)
class Layer:
    """A GSPS graphic layer: name (CS, at most 16 characters), drawing order, description, colour."""

    name: str
    order: int
    description: str
    rgb: render.RGB

    def graphic_layer(self) -> hd.pr.GraphicLayer:
        return hd.pr.GraphicLayer(layer_name=self.name, order=self.order, description=self.description,
                                  display_color=hd.color.CIELabColor.from_rgb(*self.rgb))


#: One layer per grade, severe drawn last (on top), and one for the notice.
GRADE_LAYERS = {
    "normal_mild": Layer("SPINE NORMAL", 1, "spine-node grades: normal or mild", (70, 210, 70)),
    "moderate": Layer("SPINE MODERATE", 2, "spine-node grades: moderate", (255, 200, 0)),
    "severe": Layer("SPINE SEVERE", 3, "spine-node grades: severe", (255, 50, 50)),
}
NOTICE_LAYER = Layer("SPINE NOTICE", 4, NOT_FOR_DIAGNOSIS, render.WHITE)
LAYERS = (*GRADE_LAYERS.values(), NOTICE_LAYER)
CONTENT_LABEL = "SPINE GRADES"
MARKER_RADIUS_PX = 3.0
GAP_PX = 3.0  # between a disc box and its labels, in image pixels
CLEARANCE_PX = 12.0  # between an anchor and its label, so the label leaves the anchored structure visible


@dataclass(frozen=True)
class _Page:
    """One annotated image (frame): the source image, its plane and the anchors shown on it."""

    image: Dataset
    plane: Plane
    anchors: tuple[Anchor, ...]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.Columns), int(self.image.Rows)


def grading(result: Mapping[str, Any], level: str, condition: str) -> tuple[str, float]:
    """The predicted grade of a level's condition and its probability."""
    graded = result["levels"][level]["conditions"][condition]
    return str(graded["grade"]), float(graded["probabilities"][graded["grade"]])


def label_text(result: Mapping[str, Any], level: str, condition: str) -> str:
    """The label of one grade, e.g. "L4-L5 canal: SEVERE 0.87"."""
    grade, probability = grading(result, level, condition)
    return f"{level} {SHORT_CONDITIONS[condition]}: {GRADE_WORDS[grade]} {probability:.2f}"


def _pages(anchors: Mapping[tuple[str, str], Anchor], images: Mapping[str, Dataset]) -> list[_Page]:
    """The annotated images (frames): canal images first, then the foramina, then the subarticular zones."""
    grouped: dict[tuple[str, int | None], list[Anchor]] = {}
    for level, condition in sorted(anchors, key=lambda key: (CONDITIONS.index(key[1]), key[0])):
        anchor = anchors[(level, condition)]
        grouped.setdefault((anchor.plane.sop_instance_uid, anchor.plane.frame_number), []).append(anchor)
    pages = []
    for (uid, _), group in grouped.items():
        if uid not in images:
            raise ValueError(f'Argument "images" lacks the anchored image {uid}.')
        pages.append(_Page(images[uid], group[0].plane, tuple(group)))
    return pages


def _inside(box: render.Box, size: tuple[int, int]) -> bool:
    return box[0] >= 0 and box[1] >= 0 and box[2] <= size[0] and box[3] <= size[1]


def _overlap(a: render.Box, b: render.Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _clamp(box: render.Box, size: tuple[int, int]) -> render.Box:
    """``box`` moved (and if need be cut) to lie inside the image."""
    left = min(max(box[0], 0.0), max(size[0] - (box[2] - box[0]), 0.0))
    top = min(max(box[1], 0.0), max(size[1] - (box[3] - box[1]), 0.0))
    return left, top, min(left + box[2] - box[0], size[0]), min(top + box[3] - box[1], size[1])


def _place(text: str, point: tuple[float, float], disc: render.Box, page: _Page, taken: list[render.Box]) -> render.Box:
    """The label's bounding box in image pixels: beside the disc box and clear of its point, on the
    point's side (else the other side, else below or above), moved by whole lines until it covers
    nothing in ``taken`` and lies inside the image; the first choice, clamped, when nothing fits."""
    scale = render.display_scale(page.image)
    width, height = (v / scale for v in render.text_size(text))
    sides = [max(disc[2] + GAP_PX, point[0] + CLEARANCE_PX), min(disc[0] - GAP_PX, point[0] - CLEARANCE_PX) - width]
    if point[0] < (disc[0] + disc[2]) / 2:
        sides.reverse()
    tops = [(left, point[1] - height / 2 + k * height) for left in sides for k in (0, 1, -1, 2, -2, 3, -3)]
    tops += [(point[0] - width / 2, disc[3] + GAP_PX + k * height) for k in range(3)]
    tops += [(point[0] - width / 2, disc[1] - GAP_PX - (k + 1) * height) for k in range(3)]
    boxes = [(left, top, left + width, top + height) for left, top in tops]
    fits = [b for b in boxes if _inside(b, page.size) and not any(_overlap(b, t) for t in taken)]
    return fits[0] if fits else _clamp(boxes[0], page.size)


def _rectangle(box: render.Box) -> np.ndarray:
    """A closed polyline around ``box``."""
    left, top, right, bottom = box
    return np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]])


def _around(point: tuple[float, float], radius: float) -> render.Box:
    """The square box around a circle."""
    return point[0] - radius, point[1] - radius, point[0] + radius, point[1] + radius


def _circle(point: tuple[float, float], page: _Page) -> np.ndarray:
    """A marker circle: its centre and a point on it, both inside the image."""
    column, row = point
    edge = column + MARKER_RADIUS_PX if column + MARKER_RADIUS_PX <= page.size[0] else column - MARKER_RADIUS_PX
    return np.array([[column, row], [edge, row]])


def _notice_box(page: _Page) -> render.Box:
    """Where "NOT FOR DIAGNOSTIC USE" goes: the image's top-left corner."""
    scale = render.display_scale(page.image)
    width, height = (v / scale for v in render.text_size(NOT_FOR_DIAGNOSIS))
    return _clamp((1.0, 1.0, 1.0 + width, 1.0 + height), page.size)


def _annotations(result: Mapping[str, Any], page: _Page) -> list[hd.pr.GraphicAnnotation]:
    """The page's plan as GSPS graphic annotations, one per layer that has marks on it."""
    graphics: dict[str, list[hd.pr.GraphicObject]] = {}
    notice = _notice_box(page)
    texts = {NOTICE_LAYER.name: [hd.pr.TextObject(NOT_FOR_DIAGNOSIS, units="PIXEL", bounding_box=notice, text_justification="LEFT")]}
    discs: dict[str, render.Box] = {a.level: a.box for a in page.anchors}
    worst = {level: max((grading(result, a.level, a.condition)[0] for a in page.anchors if a.level == level), key=GRADES.index)
             for level in discs}
    for level, box in discs.items():
        graphics.setdefault(GRADE_LAYERS[worst[level]].name, []).append(
            hd.pr.GraphicObject("POLYLINE", _rectangle(box), units="PIXEL"))
    taken = [*discs.values(), notice, *(_around(a.point, MARKER_RADIUS_PX) for a in page.anchors)]
    for anchor in page.anchors:
        layer = GRADE_LAYERS[grading(result, anchor.level, anchor.condition)[0]].name
        graphics.setdefault(layer, []).append(hd.pr.GraphicObject("CIRCLE", _circle(anchor.point, page), units="PIXEL"))
        text = label_text(result, anchor.level, anchor.condition)
        taken.append(_place(text, anchor.point, anchor.box, page, taken))
        texts.setdefault(layer, []).append(hd.pr.TextObject(text, units="PIXEL", bounding_box=taken[-1], anchor_point=anchor.point,
                                                            text_justification="LEFT", anchor_point_visible=True))
    return [hd.pr.GraphicAnnotation(referenced_images=[page.image], graphic_layer=layer.graphic_layer(),
                                    referenced_frame_number=page.plane.frame_number,
                                    graphic_objects=graphics.get(layer.name), text_objects=texts.get(layer.name))
            for layer in LAYERS if layer.name in graphics or layer.name in texts]


def _layers_of(annotations: Sequence[Dataset]) -> list[hd.pr.GraphicLayer]:
    """The graphic layers the annotations use, in drawing order."""
    used = {str(a.GraphicLayer) for a in annotations}
    return [layer.graphic_layer() for layer in LAYERS if layer.name in used]


def _copy_body_part(target: Dataset, source: Dataset) -> None:
    """Copy BodyPartExamined, which highdicom leaves out and dciodvfy then misses (Laterality, type 2C)."""
    if "BodyPartExamined" in source:
        target.BodyPartExamined = source.BodyPartExamined


def build_presentation_states(result: Mapping[str, Any], anchors: Mapping[tuple[str, str], Anchor],
                              images: Mapping[str, Dataset], identity: Identity) -> list[Dataset]:
    """One GSPS per source series with anchors, all in one new series: every anchored image of the
    series referenced, its window kept, and the page plans as annotations (see the module docstring)."""
    by_series: dict[str, list[_Page]] = {}
    for page in _pages(anchors, images):
        by_series.setdefault(str(page.image.SeriesInstanceUID), []).append(page)
    series_instance_uid, equipment = identity.new_uid(), identity.equipment()
    states: list[Dataset] = []
    for number, pages in enumerate(by_series.values(), start=1):
        referenced = list({str(p.image.SOPInstanceUID): p.image for p in pages}.values())
        annotations = [a for p in pages for a in _annotations(result, p)]
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=referenced, series_instance_uid=series_instance_uid, series_number=SERIES_NUMBERS["PR"],
            sop_instance_uid=identity.new_uid(), instance_number=number, content_label=CONTENT_LABEL,
            content_description=SERIES_DESCRIPTIONS["PR"], graphic_annotations=annotations, graphic_layers=_layers_of(annotations),
            series_description=SERIES_DESCRIPTIONS["PR"], content_qualification="RESEARCH", **equipment)
        _copy_body_part(gsps, referenced[0])
        states.append(gsps)
    return states


def _orientation(plane: Plane) -> tuple[str, str]:
    """The patient directions of the image's rows and columns (e.g. ("P", "F") on a sagittal)."""
    rows_direction, columns_direction, _ = hd.spatial.get_closest_patient_orientation(np.linalg.inv(plane.transformer.affine))
    return rows_direction.value, columns_direction.value


def _spacing(plane: Plane, scale: int) -> tuple[float, float]:
    """PixelSpacing (between rows, between columns) in mm of the image enlarged ``scale`` times."""
    to_patient = np.linalg.inv(plane.transformer.affine)[:3, :2]
    between_columns, between_rows = np.linalg.norm(to_patient, axis=0)
    return float(between_rows) / scale, float(between_columns) / scale


def _key_image(result: Mapping[str, Any], page: _Page, identity: Identity, series_instance_uid: str, number: int) -> Dataset:
    """The page's image (frame), windowed and enlarged as in ``worker.render``, with its plan burned in."""
    scale = render.display_scale(page.image)
    picture = render.canvas(render.windowed(page.image, page.plane.frame_number), scale)
    render.draw_annotations(picture, _annotations(result, page), {layer.name: layer.rgb for layer in LAYERS}, scale)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=page.image, pixel_array=np.asarray(picture), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=_orientation(page.plane),
        pixel_spacing=_spacing(page.plane, scale),  # type: ignore[arg-type]  # hinted as ints, used as floats
        series_instance_uid=series_instance_uid, series_number=SERIES_NUMBERS["SC"], sop_instance_uid=identity.new_uid(),
        instance_number=number, series_description=SERIES_DESCRIPTIONS["SC"], content_qualification="RESEARCH", **identity.equipment())
    source = Dataset()
    source.ReferencedSOPClassUID = page.image.SOPClassUID
    source.ReferencedSOPInstanceUID = page.image.SOPInstanceUID
    if page.plane.frame_number is not None:
        source.ReferencedFrameNumber = page.plane.frame_number
    sc.SourceImageSequence = [source]
    sc.ConversionType = "WSD"  # rendered on a workstation, not digitised
    _copy_body_part(sc, page.image)
    return sc


TABLE_LABEL_WIDTH, TABLE_CELL = 90, (130, 46)  # pixels
TABLE_TOP = 110  # pixels above the first row: title, notice and column heads


def _table_cell(draw: ImageDraw.ImageDraw, left: float, top: float, result: Mapping[str, Any], level: str, condition: str) -> None:
    """One cell: the grade and its probability on the grade's colour, or "-" where nothing was graded."""
    width, height = TABLE_CELL
    if condition not in result["levels"][level].get("conditions", {}):
        draw.text((left + width / 2, top + height / 2), "-", fill=render.WHITE, font=render.font(15), anchor="mm")
        return
    grade, probability = grading(result, level, condition)
    draw.rectangle([left + 2, top + 2, left + width - 2, top + height - 2], fill=tuple(int(c * 0.6) for c in GRADE_LAYERS[grade].rgb))
    draw.text((left + width / 2, top + 15), GRADE_WORDS[grade], fill=render.WHITE, font=render.font(15), anchor="mm")
    draw.text((left + width / 2, top + 33), f"{probability:.2f}", fill=render.WHITE, font=render.font(14), anchor="mm")


def _summary_pixels(result: Mapping[str, Any]) -> np.ndarray:
    """An RGB table, a row per level and a column per condition, under a title and the notice, over
    the model's version and the result's first warnings."""
    levels, (cell_width, cell_height) = list(result["levels"]), TABLE_CELL
    model = result.get("model", {})
    notes = [f"cell: predicted grade and its probability - model {model.get('name', '')} {model.get('version', '')}",
             *result.get("warnings", [])[:4]]
    picture = Image.new("RGB", (20 + TABLE_LABEL_WIDTH + cell_width * len(CONDITIONS),
                                TABLE_TOP + cell_height * len(levels) + 20 + 18 * len(notes)), (25, 25, 25))
    draw = ImageDraw.Draw(picture)
    draw.text((10, 10), "spine-node lumbar stenosis grades", fill=render.WHITE, font=render.font(22))
    draw.text((10, 42), NOT_FOR_DIAGNOSIS, fill=GRADE_LAYERS["severe"].rgb, font=render.font(18))
    for column, condition in enumerate(CONDITIONS):
        draw.text((10 + TABLE_LABEL_WIDTH + cell_width * (column + 0.5), TABLE_TOP - 14), SHORT_CONDITIONS[condition],
                  fill=render.WHITE, font=render.font(15), anchor="mm")
    for row, level in enumerate(levels):
        top = TABLE_TOP + cell_height * row
        draw.text((10, top + cell_height / 2), level, fill=render.WHITE, font=render.font(16), anchor="lm")
        for column, condition in enumerate(CONDITIONS):
            _table_cell(draw, 10 + TABLE_LABEL_WIDTH + cell_width * column, top, result, level, condition)
    for n, note in enumerate(notes):
        draw.text((10, TABLE_TOP + cell_height * len(levels) + 12 + 18 * n), note, fill=(200, 200, 200), font=render.font(13))
    return np.asarray(picture)


def _summary_image(result: Mapping[str, Any], reference: Dataset, identity: Identity, series_instance_uid: str) -> Dataset:
    """The summary table as the first key image, with an empty patient orientation: it shows no anatomy."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference, pixel_array=_summary_pixels(result), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("P", "F"), series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBERS["SC"], sop_instance_uid=identity.new_uid(), instance_number=1,
        series_description=SERIES_DESCRIPTIONS["SC"], content_qualification="RESEARCH", **identity.equipment())
    sc["PatientOrientation"].value = None  # type 2: highdicom wants some value for a PATIENT image, the table has none
    sc.ConversionType = "WSD"
    _copy_body_part(sc, reference)
    return sc


def build_key_images(result: Mapping[str, Any], anchors: Mapping[tuple[str, str], Anchor],
                     images: Mapping[str, Dataset], identity: Identity) -> list[Dataset]:
    """Secondary Captures in one new series: the summary table first, then each anchored image (frame)
    with its plan burned in (canal images, foramina, subarticular zones); none without anchors."""
    pages = _pages(anchors, images)
    if not pages:
        return []
    series_instance_uid = identity.new_uid()
    summary = _summary_image(result, pages[0].image, identity, series_instance_uid)
    return [summary, *(_key_image(result, page, identity, series_instance_uid, number) for number, page in enumerate(pages, start=2))]
