"""Reader of the RSNA 2024 Lumbar Spine layout: annotated points in patient space (reference spine-ml.md section 3).

The counterpart of ``models.data.rsna`` (the writer). ``read_level_points`` reads
``train_series_descriptions.csv`` and ``train_label_coordinates.csv`` under a root holding
``train_images/<study_id>/<series_id>/<instance_number>.dcm``, keeps the rows of one condition
(optionally only series of one description), and maps each annotation (instance, x column,
y row) to patient coordinates (LPS mm) through that instance's header::

    p = ImagePositionPatient + x * PixelSpacing[1] * IOP[:3] + y * PixelSpacing[0] * IOP[3:]

(IOP[:3] is the direction of increasing column index along a row, IOP[3:] that of increasing
row index; PixelSpacing is [row spacing, column spacing] = [distance between rows, distance
between columns].) Only headers are read. Points whose instance file is missing or unusable are
skipped with a warning that names ids and instance numbers only, never header values.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from models.data.pathology import CONDITIONS, LEVELS

LOGGER = logging.getLogger(__name__)

DESCRIPTIONS_CSV = "train_series_descriptions.csv"
COORDINATES_CSV = "train_label_coordinates.csv"
IMAGES_DIR = "train_images"
_DESCRIPTION_COLUMNS = ("study_id", "series_id", "series_description")
_COORDINATE_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")

__all__ = ["LevelPoints", "read_level_points", "condition_name", "level_name", "pixel_to_patient", "natural_key"]


@dataclass(frozen=True)
class LevelPoints:
    """Annotated points of one series, in patient space (LPS mm), keyed by level 'L1-L2'..'L5-S1'."""

    study_id: str
    series_id: str
    series_dir: Path  # train_images/<study>/<series>
    description: str  # e.g. "Sagittal T2/STIR"
    condition: str  # our snake_case name, e.g. "spinal_canal_stenosis"
    points: dict[str, np.ndarray]  # level -> (3,) patient position


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders digit runs by value ("2" before "10")."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


def condition_name(text: str) -> str:
    """Our snake_case condition name of an RSNA condition string ("Spinal Canal Stenosis" -> "spinal_canal_stenosis")."""
    return re.sub(r"[\s_]+", "_", text.strip().lower())


def level_name(text: str) -> str:
    """Our level name of an RSNA level string ("L1/L2", "l1_l2" -> "L1-L2")."""
    return re.sub(r"[\s/_-]+", "-", text.strip().upper())


def pixel_to_patient(ds: pydicom.Dataset, x: float, y: float) -> np.ndarray:
    """Patient position (LPS mm, shape (3,)) of pixel (x column, y row) of a single-frame image header.

    Raises ValueError when ImagePositionPatient, ImageOrientationPatient or PixelSpacing is missing
    or malformed.
    """
    try:
        ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=float)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        spacing = [float(v) for v in ds.PixelSpacing]
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"image plane attributes missing or malformed ({type(exc).__name__})") from exc
    if ipp.shape != (3,) or iop.shape != (6,) or len(spacing) != 2:
        raise ValueError("image plane attributes have the wrong number of values")
    row_dir, col_dir = iop[:3], iop[3:]  # along a row (columns increase), along a column (rows increase)
    return ipp + x * spacing[1] * row_dir + y * spacing[0] * col_dir


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV that must exist and hold ``columns``; FileNotFoundError/ValueError name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"RSNA layout incomplete: {path.name} not found at {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path.name} ({path}) lacks the column(s) {missing}; it has {header}")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _id(text: str) -> str:
    """A study/series id as a string ("123", "123.0" -> "123")."""
    text = text.strip()
    return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text


def read_level_points(root: Path, condition: str = "spinal_canal_stenosis", description: str | None = "Sagittal T2/STIR") -> list[LevelPoints]:
    """Annotated points of ``condition`` per series under an RSNA 2024 root, in patient space.

    ``condition`` is our snake_case name (one of ``models.data.pathology.CONDITIONS``) matched
    exactly: "left_neural_foraminal_narrowing" does not include the right side. ``description``
    keeps only series of that series_description (None keeps all). Series are returned in natural
    order of (study_id, series_id), each with its points ordered L1-L2..L5-S1; series left without
    any usable point are dropped. Rows whose instance file is missing or unreadable, or whose level
    is unknown, are skipped with a warning; a second point at the same level of a series is ignored
    with a warning (the first is kept).

    Raises FileNotFoundError when ``root``, its train_images folder or one of the two CSVs is
    missing, and ValueError for an unknown ``condition``, a CSV without the expected columns or a
    row with non-numeric instance_number/x/y.
    """
    root = Path(root)
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    if not root.is_dir():
        raise FileNotFoundError(f"RSNA root not found: {root}")
    descriptions_rows = _read_csv(root / DESCRIPTIONS_CSV, _DESCRIPTION_COLUMNS)
    coordinate_rows = _read_csv(root / COORDINATES_CSV, _COORDINATE_COLUMNS)
    images = root / IMAGES_DIR
    if not images.is_dir():
        raise FileNotFoundError(f"RSNA layout incomplete: {IMAGES_DIR}/ not found at {images}")
    descriptions = {(_id(r["study_id"]), _id(r["series_id"])): r["series_description"] for r in descriptions_rows}

    headers: dict[Path, pydicom.Dataset | None] = {}
    undescribed: set[tuple[str, str]] = set()
    points: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for line, row in enumerate(coordinate_rows, start=2):
        if condition_name(row["condition"]) != condition:
            continue
        study_id, series_id = _id(row["study_id"]), _id(row["series_id"])
        series_description = descriptions.get((study_id, series_id))
        if series_description is None and (study_id, series_id) not in undescribed:
            undescribed.add((study_id, series_id))
            LOGGER.warning("series %s of study %s is not in %s", series_id, study_id, DESCRIPTIONS_CSV)
        if description is not None and series_description != description:
            continue
        level = level_name(row["level"])
        if level not in LEVELS:
            LOGGER.warning("skipping %s line %d: unknown level (study %s, series %s)", COORDINATES_CSV, line, study_id, series_id)
            continue
        try:
            instance = int(float(row["instance_number"]))
            x, y = float(row["x"]), float(row["y"])
        except ValueError as exc:
            raise ValueError(f"{COORDINATES_CSV} line {line}: instance_number, x and y must be numbers") from exc
        series_points = points.setdefault((study_id, series_id), {})
        if level in series_points:
            LOGGER.warning("study %s series %s: second %s point at %s ignored", study_id, series_id, condition, level)
            continue
        path = images / study_id / series_id / f"{instance}.dcm"
        ds = _header(path, headers, study_id, series_id, instance)
        if ds is None:
            LOGGER.warning("skipping %s point at %s: study %s series %s instance %d unusable", condition, level, study_id, series_id, instance)
            continue
        try:
            series_points[level] = pixel_to_patient(ds, x, y)
        except ValueError as exc:
            LOGGER.warning("skipping point at %s: study %s series %s instance %d: %s", level, study_id, series_id, instance, exc)

    out = []
    for (study_id, series_id), found in sorted(points.items(), key=lambda kv: (natural_key(kv[0][0]), natural_key(kv[0][1]))):
        if not found:
            continue
        out.append(LevelPoints(
            study_id=study_id, series_id=series_id, series_dir=images / study_id / series_id,
            description=descriptions.get((study_id, series_id), ""), condition=condition,
            points={lv: found[lv] for lv in LEVELS if lv in found},
        ))
    return out


def _header(path: Path, cache: dict[Path, pydicom.Dataset | None], study_id: str, series_id: str, instance: int) -> pydicom.Dataset | None:
    """Header of an instance file (cached; None, with a warning, when missing or unreadable)."""
    if path in cache:
        return cache[path]
    ds: pydicom.Dataset | None = None
    if not path.is_file():
        LOGGER.warning("study %s series %s: instance %d not found (%s)", study_id, series_id, instance, path.name)
    else:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            LOGGER.warning("study %s series %s: instance %d unreadable (%s)", study_id, series_id, instance, type(exc).__name__)
        else:
            number = str(ds.get("InstanceNumber", "")).strip()
            if number != str(instance):
                LOGGER.warning("study %s series %s: file %d.dcm holds InstanceNumber %r", study_id, series_id, instance, number)
    cache[path] = ds
    return ds
