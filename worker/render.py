"""Pictures of our result objects as PNGs, so a person can check what the radiologist will see.

A key image (SC) is written as it is. A presentation state (GSPS) is applied to an image it
references the way a viewer does: the image's modality LUT, the GSPS window for that image (else
the image's own, else the frame's 1st-99th percentile), then the GSPS graphic and text objects
in their layer's colour. Spatial transformation, displayed area and presentation LUT of the
GSPS are not applied (ours set none of them).

Images are enlarged by an integer factor (``display_scale``) to about ``DISPLAY_SIZE`` pixels so
labels come out at a readable size relative to the anatomy, as on a viewer's screen; the key
images of ``worker.overlays`` are drawn by this module at the same scale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage, SecondaryCaptureImageStorage

LOGGER = logging.getLogger(__name__)

RGB = tuple[int, int, int]
#: (left, top, right, bottom).
Box = tuple[float, float, float, float]

DISPLAY_SIZE = 768
LABEL_FONT_SIZE = 12
TEXT_PADDING = 2  # display pixels around a label's text
LINE_WIDTH = 2
POINT_RADIUS = 3
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)


@cache
def font(size: int = LABEL_FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at ``size`` pixels."""
    return ImageFont.load_default(size)


def display_scale(ds: Dataset) -> int:
    """The integer factor that brings an image to about DISPLAY_SIZE pixels (1 for large images)."""
    return max(1, DISPLAY_SIZE // max(int(ds.Rows), int(ds.Columns)))


def text_size(text: str) -> tuple[int, int]:
    """(width, height) in display pixels of a label box holding ``text``, padding included."""
    left, top, right, bottom = font().getbbox(text)
    return int(right) + 2 * TEXT_PADDING, int(bottom) + 2 * TEXT_PADDING


def windowed(image: Dataset, frame_number: int | None = None, voi: hd.VOILUTTransformation | None = None) -> np.ndarray:
    """One frame as 8-bit greyscale (rows, columns): modality LUT, then ``voi``, else the image's own
    VOI, else a window over the frame's 1st-99th percentile; MONOCHROME1 is inverted."""
    view = hd.Image.from_dataset(image, copy=False)
    number = frame_number or 1
    if voi is None and not _has_voi(image, number):
        low, high = np.percentile(view.get_frame(number), (1, 99))
        voi = hd.VOILUTTransformation(window_center=float(low + high) / 2, window_width=max(float(high - low), 1.0))
    frame = view.get_frame(number, apply_voi_transform=True, voi_transform_selector=0 if voi is None else voi,
                           voi_output_range=(0.0, 255.0))
    return np.round(frame).astype(np.uint8)


def _has_voi(image: Dataset, frame_number: int) -> bool:
    """Whether the image carries a window or VOI LUT for the frame (top level or functional groups)."""
    if "WindowCenter" in image or "VOILUTSequence" in image:
        return True
    groups = [*image.get("SharedFunctionalGroupsSequence", [])]
    if "PerFrameFunctionalGroupsSequence" in image:
        groups.append(image.PerFrameFunctionalGroupsSequence[frame_number - 1])
    return any("FrameVOILUTSequence" in g for g in groups)


def canvas(pixels: np.ndarray, scale: int) -> Image.Image:
    """An RGB picture of 8-bit greyscale ``pixels``, enlarged ``scale`` times."""
    picture = Image.fromarray(pixels).convert("RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BICUBIC)


def layer_colours(layers: Iterable[Dataset]) -> dict[str, RGB]:
    """Each graphic layer's recommended display colour (CIELab, else grey level, else white)."""
    colours: dict[str, RGB] = {}
    for layer in layers:
        if "GraphicLayerRecommendedDisplayCIELabValue" in layer:
            red, green, blue = hd.color.CIELabColor.from_dicom_value(layer.GraphicLayerRecommendedDisplayCIELabValue).to_rgb(clip=True)
            colours[str(layer.GraphicLayer)] = (int(red), int(green), int(blue))
        elif "GraphicLayerRecommendedDisplayGrayscaleValue" in layer:
            grey = int(layer.GraphicLayerRecommendedDisplayGrayscaleValue) >> 8
            colours[str(layer.GraphicLayer)] = (grey, grey, grey)
    return colours


def draw_annotations(picture: Image.Image, annotations: Iterable[Dataset], colours: Mapping[str, RGB], scale: int) -> None:
    """Draw GSPS graphic annotations (their graphic and text objects) on ``picture``, an image
    enlarged ``scale`` times, each in its layer's colour."""
    draw = ImageDraw.Draw(picture)
    for annotation in annotations:
        colour = colours.get(str(annotation.GraphicLayer), WHITE)
        for graphic in annotation.get("GraphicObjectSequence", []):
            _draw_graphic(draw, graphic, colour, _factor(graphic.GraphicAnnotationUnits, scale, picture.size))
        for text in annotation.get("TextObjectSequence", []):
            _draw_text(draw, text, colour, scale, picture.size)


def _factor(units: str, scale: int, size: tuple[int, int]) -> np.ndarray:
    """What multiplies (column, row) coordinates in ``units`` to give display pixels."""
    return np.asarray(size, float) if units == "DISPLAY" else np.array([scale, scale], float)


def _draw_graphic(draw: ImageDraw.ImageDraw, graphic: Dataset, colour: RGB, factor: np.ndarray) -> None:
    """One POINT, POLYLINE, INTERPOLATED (drawn as a polyline) or CIRCLE graphic object."""
    points = np.asarray(graphic.GraphicData, float).reshape(-1, 2) * factor
    kind = str(graphic.GraphicType)
    if kind in ("POLYLINE", "INTERPOLATED"):
        draw.line([tuple(p) for p in points], fill=colour, width=LINE_WIDTH, joint="curve")
    elif kind == "CIRCLE":
        radius = float(np.linalg.norm(points[1] - points[0]))
        draw.ellipse([*(points[0] - radius), *(points[0] + radius)], outline=colour, width=LINE_WIDTH)
    elif kind == "POINT":
        draw.ellipse([*(points[0] - POINT_RADIUS), *(points[0] + POINT_RADIUS)], fill=colour)
    else:
        LOGGER.warning("graphic type %s is not drawn", kind)


def _draw_text(draw: ImageDraw.ImageDraw, text: Dataset, colour: RGB, scale: int, size: tuple[int, int]) -> None:
    """One text object: its text at the bounding box's top left (else at the anchor point), with a
    line to the anchor point when the anchor is visible."""
    factor = _factor(str(text.get("BoundingBoxAnnotationUnits") or text.AnchorPointAnnotationUnits), scale, size)
    anchor = np.asarray(text.AnchorPoint, float) * factor if "AnchorPoint" in text else None
    if "BoundingBoxTopLeftHandCorner" in text:
        top_left = np.asarray(text.BoundingBoxTopLeftHandCorner, float) * factor
        bottom_right = np.asarray(text.BoundingBoxBottomRightHandCorner, float) * factor
        if anchor is not None and text.get("AnchorPointVisibility") == "Y":
            nearest = np.clip(anchor, top_left, bottom_right)
            draw.line([tuple(anchor), tuple(nearest)], fill=colour, width=1)
    else:
        top_left = anchor
    origin = tuple(np.asarray(top_left) + TEXT_PADDING)
    draw.text(origin, str(text.UnformattedTextValue), fill=colour, font=font(), stroke_width=1, stroke_fill=BLACK)


def _voi_for(gsps: Dataset, image: Dataset, frame_number: int | None) -> hd.VOILUTTransformation | None:
    """The GSPS's VOI for this image (frame): the first Softcopy VOI LUT item that names it or names no image."""
    for item in gsps.get("SoftcopyVOILUTSequence", []):
        refs = item.get("ReferencedImageSequence", [])
        if refs and not any(_refers_to(ref, image, frame_number) for ref in refs):
            continue
        if "WindowCenter" in item:
            return hd.VOILUTTransformation(window_center=item.WindowCenter, window_width=item.WindowWidth,
                                           voi_lut_function=item.get("VOILUTFunction"))
        return hd.VOILUTTransformation(voi_luts=[hd.VOILUT.from_dataset(lut) for lut in item.VOILUTSequence])
    return None


def _frames(ref: Dataset) -> list[int]:
    """The frame numbers a referenced-image item lists (none: all frames, or a single-frame image)."""
    frames = ref.get("ReferencedFrameNumber")
    return [] if frames is None else [int(f) for f in (frames if isinstance(frames, Sequence) else [frames])]


def _refers_to(ref: Dataset, image: Dataset, frame_number: int | None) -> bool:
    """Whether a referenced-image item names this image (and frame, when it lists frames)."""
    listed = _frames(ref)
    return ref.ReferencedSOPInstanceUID == image.SOPInstanceUID and (not listed or (frame_number or 1) in listed)


def presentation_picture(gsps: Dataset, image: Dataset, frame_number: int | None = None) -> Image.Image:
    """The image (frame) as a viewer shows it with ``gsps`` applied, enlarged by ``display_scale``."""
    scale = display_scale(image)
    picture = canvas(windowed(image, frame_number, _voi_for(gsps, image, frame_number)), scale)
    annotations = [a for a in gsps.get("GraphicAnnotationSequence", [])
                   if any(_refers_to(ref, image, frame_number) for ref in a.ReferencedImageSequence)]
    draw_annotations(picture, annotations, layer_colours(gsps.get("GraphicLayerSequence", [])), scale)
    return picture


def render_presentation_state(gsps: Dataset, image: Dataset, out_png: Path, frame_number: int | None = None) -> Path:
    """Write ``image`` (a full dataset with pixels; for a multi-frame image, ``frame_number``) with
    ``gsps`` applied as a PNG; returns the path."""
    out_png.parent.mkdir(parents=True, exist_ok=True)
    presentation_picture(gsps, image, frame_number).save(out_png)
    return out_png


def render_key_images(paths_or_datasets: Iterable[Path | Dataset], out_dir: Path) -> list[Path]:
    """Write each Secondary Capture as ``SC_<series>_<instance>.png`` in ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for item in paths_or_datasets:
        ds = item if isinstance(item, Dataset) else pydicom.dcmread(item)
        path = out_dir / f"SC_{int(ds.SeriesNumber)}_{int(ds.InstanceNumber):03d}.png"
        Image.fromarray(ds.pixel_array).save(path)
        written.append(path)
    return written


def _referenced_frames(gsps: Dataset) -> list[tuple[str, int | None]]:
    """(SOPInstanceUID, frame number or None) of every image (frame) the GSPS annotates, in order."""
    seen: dict[tuple[str, int | None], None] = {}
    for annotation in gsps.get("GraphicAnnotationSequence", []):
        for ref in annotation.ReferencedImageSequence:
            frames: list[int | None] = [*_frames(ref)] or [None]
            for frame in frames:
                seen[(str(ref.ReferencedSOPInstanceUID), frame)] = None
    return list(seen)


def render_result_objects(object_paths: Iterable[Path], source_dir: Path, out_dir: Path) -> list[Path]:
    """PNGs of our result objects for a person to check: each key image (SC), and each GSPS applied to
    every image (frame) it annotates, found by SOPInstanceUID among the DICOM files under
    ``source_dir``. Other objects (the SR) are skipped. Returns the paths written."""
    objects = [pydicom.dcmread(p) for p in object_paths]
    written = render_key_images([ds for ds in objects if ds.SOPClassUID == SecondaryCaptureImageStorage], out_dir)
    states = [ds for ds in objects if ds.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage]
    sources = _files_by_uid(source_dir) if states else {}
    for gsps in states:
        for uid, frame in _referenced_frames(gsps):
            if uid not in sources:
                LOGGER.warning("image %s referenced by presentation state %s is not under %s", uid, gsps.SOPInstanceUID, source_dir)
                continue
            image = pydicom.dcmread(sources[uid])
            name = (f"PR_{int(gsps.SeriesNumber)}_{int(gsps.InstanceNumber):03d}_series{image.get('SeriesNumber', '')}"
                    f"_image{image.get('InstanceNumber', '')}{'' if frame is None else f'_frame{frame}'}.png")
            written.append(render_presentation_state(gsps, image, out_dir / name, frame))
    return written


def _files_by_uid(folder: Path) -> dict[str, Path]:
    """The DICOM files under ``folder`` by SOPInstanceUID (files that are not DICOM are passed over)."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except pydicom.errors.InvalidDicomError:
            continue
        if "SOPInstanceUID" in ds:
            found[str(ds.SOPInstanceUID)] = path
    return found
