"""RSNA 2024 Lumbar Spine layout of phantom studies (reference spine-ml.md section 3).

Writes ``train.csv``, ``train_series_descriptions.csv``, ``train_label_coordinates.csv`` and
``train_images/<study_id>/<series_id>/<instance_number>.dcm`` (hard links to the study's files,
copies where links are impossible). Numeric study and series ids are derived from the UIDs.
Annotation points follow the competition: canal on sagittal T2 (STIR when T2 is missing),
foramina on sagittal T1, subarticular recesses on axial T2; each on the nearest slice, x,y in
that instance's pixel columns/rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom

from models.data.pathology import CONDITIONS, LEVELS

GRADE_TEXT = {"normal_mild": "Normal/Mild", "moderate": "Moderate", "severe": "Severe"}
DESCRIPTION = {"T1_SAG": "Sagittal T1", "T2_SAG": "Sagittal T2/STIR", "STIR_SAG": "Sagittal T2/STIR", "T2_AX": "Axial T2"}
CONDITION_TEXT = {c: c.replace("_", " ").title() for c in CONDITIONS}
SERIES_FOR = {"spinal_canal_stenosis": ("T2_SAG", "STIR_SAG"), "neural_foraminal_narrowing": ("T1_SAG",), "subarticular_stenosis": ("T2_AX",)}


def numeric_id(uid: str) -> int:
    """Stable 9-digit numeric id of a UID."""
    return int(hashlib.sha1(uid.encode()).hexdigest()[:12], 16) % 900_000_000 + 100_000_000


def _link(src: Path, dst: Path) -> None:
    """Hard-link src to dst, copying when linking is not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def project(point: list[float], headers: list[pydicom.Dataset]) -> tuple[int, float, float, float]:
    """Nearest instance to a patient point (LPS mm): (instance number, x col, y row, distance mm)."""
    best = None
    p = np.asarray(point)
    for ds in headers:
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        row, col = iop[:3], iop[3:]
        d = p - np.array(ds.ImagePositionPatient, dtype=float)
        dist = abs(float(np.dot(np.cross(row, col), d)))
        if best is None or dist < best[3]:
            spacing = [float(v) for v in ds.PixelSpacing]
            best = (int(ds.InstanceNumber), float(np.dot(d, row)) / spacing[1], float(np.dot(d, col)) / spacing[0], dist)
    assert best is not None
    return best


def write_rsna(root: Path, study_dirs: list[Path]) -> Path:
    """Write the RSNA 2024 layout and CSVs for ``study_dirs`` under ``root``; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    train, descriptions, coordinates = [], [], []
    for study_dir in study_dirs:
        truth = json.loads((study_dir / "truth.json").read_text())
        study_id = numeric_id(truth["study_instance_uid"])
        headers: dict[str, list[pydicom.Dataset]] = {}
        series_ids: dict[str, int] = {}
        for series in truth["series"]:
            series_id = numeric_id(series["series_instance_uid"])
            series_ids[series["role"]] = series_id
            descriptions.append([study_id, series_id, DESCRIPTION[series["role"]]])
            files = sorted((study_dir / series["folder"]).glob("*.dcm"))
            headers[series["role"]] = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            for f, ds in zip(files, headers[series["role"]]):
                _link(f, root / "train_images" / str(study_id) / str(series_id) / f"{ds.InstanceNumber}.dcm")
        row: list[int | str] = [study_id]
        for condition in CONDITIONS:
            for level in LEVELS:
                c = truth["levels"][level]["conditions"][condition]
                row.append(GRADE_TEXT[c["grade"]])
                key = condition.removeprefix("left_").removeprefix("right_")
                role = next((r for r in SERIES_FOR[key] if r in headers), None)
                if role is None:
                    continue
                instance, x, y, _ = project(c["point"], headers[role])
                coordinates.append([study_id, series_ids[role], instance, CONDITION_TEXT[condition], level.replace("-", "/"), round(x, 3), round(y, 3)])
        train.append(row)
    _csv(root / "train.csv", ["study_id", *[f"{c}_{lv.lower().replace('-', '_')}" for c in CONDITIONS for lv in LEVELS]], train)
    _csv(root / "train_series_descriptions.csv", ["study_id", "series_id", "series_description"], descriptions)
    _csv(root / "train_label_coordinates.csv", ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"], coordinates)
    return root


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    """Write a CSV with a header line."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
