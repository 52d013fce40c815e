"""Contact sheet of one phantom study: mid-sagittal T1/T2/STIR and one axial slice per level.

Ground-truth points are drawn where they project (within 5 mm of the slice): IVD centres in
yellow on the sagittal images, the canal point in cyan and the subarticular points in magenta on
the axial images. Images are read back from the DICOM files, so the sheet also shows what a
reader of the files sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw

from models.data.pathology import LEVELS

TILE = 320


def _slices(folder: Path) -> list[tuple[pydicom.Dataset, np.ndarray]]:
    """(header, pixels) per frame of a series folder; multi-frame files are split per frame."""
    out = []
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        pixels = ds.pixel_array.astype(np.float32)
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.SharedFunctionalGroupsSequence[0]
            for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
                fd = pydicom.Dataset()
                fd.ImagePositionPatient = _group(frame, shared, "PlanePositionSequence").ImagePositionPatient
                fd.ImageOrientationPatient = _group(frame, shared, "PlaneOrientationSequence").ImageOrientationPatient
                fd.PixelSpacing = _group(frame, shared, "PixelMeasuresSequence").PixelSpacing
                out.append((fd, pixels[k]))
        else:
            out.append((ds, pixels))
    return out


def _group(frame: pydicom.Dataset, shared: pydicom.Dataset, name: str) -> pydicom.Dataset:
    """The item of functional group ``name`` for a frame: per-frame if present, else shared."""
    return (frame if name in frame else shared)[name][0]


def _pixel(ds: pydicom.Dataset, p: np.ndarray) -> tuple[float, float, float]:
    """Column, row and out-of-plane distance (mm) of patient point p in slice ds."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    d = p - np.array(ds.ImagePositionPatient, dtype=float)
    sp = [float(v) for v in ds.PixelSpacing]
    return float(d @ iop[:3]) / sp[1], float(d @ iop[3:]) / sp[0], float(abs(d @ np.cross(iop[:3], iop[3:])))


def _tile(pixels: np.ndarray, marks: list[tuple[float, float, str]], label: str) -> Image.Image:
    """Windowed 8-bit tile with marks (col, row, colour) and a caption."""
    hi = float(np.percentile(pixels, 99.5)) or 1.0
    img = Image.fromarray((np.clip(pixels / hi, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    sx, sy = TILE / img.width, TILE / img.height
    img = img.resize((TILE, TILE))
    draw = ImageDraw.Draw(img)
    for col, row, colour in marks:
        x, y = col * sx, row * sy
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), outline=colour, width=2)
    draw.text((4, 4), label, fill="yellow")
    return img


def write_contact_sheet(study_dir: Path, png: Path) -> Path:
    """Write the PNG contact sheet of a phantom study folder; returns its path."""
    study_dir, png = Path(study_dir), Path(png)
    truth = json.loads((study_dir / "truth.json").read_text())
    centres = {lv: np.array(v["center"]) for lv, v in truth["levels"].items()}
    canal = [np.array(truth["levels"][lv]["conditions"]["spinal_canal_stenosis"]["point"]) for lv in LEVELS]
    tiles = []
    for role in ("T1_SAG", "T2_SAG", "STIR_SAG"):
        series = next((s for s in truth["series"] if s["role"] == role), None)
        if series is None:
            tiles.append(_tile(np.zeros((TILE, TILE)), [], f"{role}: missing"))
            continue
        slices = _slices(study_dir / series["folder"])
        ds, pixels = min(slices, key=lambda sl: sum(_pixel(sl[0], p)[2] for p in canal))
        marks = [(c, r, "yellow") for c, r, d in (_pixel(ds, p) for p in centres.values()) if d < 5]
        tiles.append(_tile(pixels, marks, f"{role} {series['series_description']}"))
    axial = next((s for s in truth["series"] if s["role"] == "T2_AX"), None)
    slices = _slices(study_dir / axial["folder"]) if axial else []
    for level in LEVELS:
        if not slices:
            tiles.append(_tile(np.zeros((TILE, TILE)), [], f"{level}: no axial"))
            continue
        ds, pixels = min(slices, key=lambda sl: _pixel(sl[0], centres[level])[2])
        conditions = truth["levels"][level]["conditions"]
        marks = []
        for name, colour in (("spinal_canal_stenosis", "cyan"), ("left_subarticular_stenosis", "magenta"), ("right_subarticular_stenosis", "magenta")):
            c, r, d = _pixel(ds, np.array(conditions[name]["point"]))
            if d < 5:
                marks.append((c, r, colour))
        grades = "/".join(conditions[n]["grade"][0].upper() for n in ("spinal_canal_stenosis", "left_subarticular_stenosis", "right_subarticular_stenosis"))
        tiles.append(_tile(pixels, marks, f"{level} SCS/LSS/RSS {grades}"))
    sheet = Image.new("RGB", (TILE * 5, TILE * 2))
    for i, tile in enumerate(tiles[:3]):
        sheet.paste(tile, (i * TILE + TILE, 0))
    for i, tile in enumerate(tiles[3:]):
        sheet.paste(tile, (i * TILE, TILE))
    png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png)
    return png
