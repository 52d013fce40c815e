"""Acquisition geometry of the phantom's series (patient LPS, mm; reference section 4).

Modelling choices:
- Sagittal T1, T2 and STIR share one slice prescription (as when the technologist copies it):
  13-17 slices of 3-4 mm with a 10 % gap, field of view 280-320 mm centred near L3 with a random
  offset, small in-plane, yaw and roll obliquity, slices ordered left-to-right or right-to-left.
- Axial T2 is either one stack per disc, each tilted to its disc plane (RSNA quirk: several
  stacks inside one series), or a single stack covering L1-L2..L5-S1, tilted to the mean disc
  angle. 4 mm slices with 0.4 mm gaps, field of view 160-200 mm.
- Reconstruction matrices (default 384 sagittal, 320 axial) are larger than the acquisition
  matrices (default 2/3 of them), as zero-filled interpolation on scanners makes them.
"""

from __future__ import annotations

import math

import numpy as np

from models.data.anatomy import Spine
from models.data.pathology import LEVELS
from models.data.render import Stack


def _rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation about patient axis 0 (x), 1 (y) or 2 (z)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _positions(centre: np.ndarray, row: np.ndarray, col: np.ndarray, step: np.ndarray, n: int, rows: int, cols: int, spacing: tuple[float, float]) -> np.ndarray:
    """ImagePositionPatient of n slices (n, 3) whose image centres run along step from centre."""
    corner = -((cols - 1) / 2) * spacing[1] * row - ((rows - 1) / 2) * spacing[0] * col
    return np.array([centre + (k - (n - 1) / 2) * step + corner for k in range(n)])


def _acq(n: int, fraction: float) -> int:
    """Acquisition matrix for a reconstruction matrix n (even)."""
    return int(round(n * fraction / 2) * 2)


def sagittal_stack(sp: Spine, rng: np.random.Generator, matrix: int = 384, acq_fraction: float = 2 / 3) -> Stack:
    """Shared sagittal prescription for T1/T2/STIR."""
    rot = _rotation(2, rng.uniform(-3, 3)) @ _rotation(1, rng.uniform(-2, 2)) @ _rotation(0, rng.uniform(-6, 6))
    row, col = rot @ np.array([0.0, 1.0, 0.0]), rot @ np.array([0.0, 0.0, -1.0])
    fov = float(rng.uniform(280, 320))
    spacing = (fov / matrix, fov / matrix)
    n = int(rng.integers(13, 18))
    thickness = float(rng.choice([3.0, 3.5, 4.0]))
    gap = round(thickness * 1.1, 1)
    l3 = next(v.s_centre for v in sp.vertebrae if v.name == "L3")
    centre = sp.point(l3, v=15.0) + rng.uniform(-20, 20) * col + rng.uniform(-15, 15) * row
    normal = np.cross(row, col)
    centre = centre + normal * (np.dot(normal, np.array([sp.x0, 0, 0]) - centre) + rng.uniform(-3, 3))
    step = normal * gap * (1 if rng.random() < 0.5 else -1)
    acq = _acq(matrix, acq_fraction)
    return Stack(_positions(centre, row, col, step, n, matrix, matrix, spacing), row, col, matrix, matrix, spacing, thickness, gap, acq, acq)


def _axial_frame(sp: Spine, s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and normal of an axial slice tilted to the centreline at s, with jitter."""
    normal = _rotation(0, rng.uniform(-3, 3)) @ sp.tangent(s)
    row = _rotation(2, rng.uniform(-3, 3)) @ np.array([1.0, 0.0, 0.0])
    row = row - np.dot(row, normal) * normal
    row /= np.linalg.norm(row)
    return row, np.cross(normal, row), normal


def axial_stacks(sp: Spine, rng: np.random.Generator, multi: bool, matrix: int = 320, acq_fraction: float = 2 / 3) -> list[Stack]:
    """Axial T2 stacks, top to bottom: one per disc (multi) or one covering L1-L2..L5-S1."""
    fov = float(rng.uniform(160, 200))
    spacing = (fov / matrix, fov / matrix)
    acq = _acq(matrix, acq_fraction)
    thickness, gap = 4.0, 4.4
    offset = rng.uniform(-8, 8, 2)
    if multi:
        stacks = []
        for name in LEVELS:
            s = sp.level(name).s_centre
            row, col, normal = _axial_frame(sp, s, rng)
            n = int(rng.integers(4, 6))
            centre = sp.point(s, v=28.0) + offset[0] * row + offset[1] * col + normal * rng.uniform(-1, 1)
            stacks.append(Stack(_positions(centre, row, col, -normal * gap, n, matrix, matrix, spacing), row, col, matrix, matrix, spacing, thickness, gap, acq, acq))
        return stacks
    top, bottom = sp.level("L1-L2").s_centre + 8, sp.level("L5-S1").s_centre - 8
    s_mid = (top + bottom) / 2
    row, col, normal = _axial_frame(sp, s_mid, rng)
    # the block covers both the disc centres and the canal behind them at the end discs,
    # however the lordosis tilts L5-S1 against the block
    ends = [sp.point(s, v=v) for s in (top, bottom) for v in (0.0, 28.0)]
    along = [float(np.dot(p, normal)) for p in ends]
    n = int(math.ceil((max(along) - min(along)) / gap)) + 1
    p_mid = (sp.point(top, v=28.0) + sp.point(bottom, v=28.0)) / 2
    centre = p_mid + ((max(along) + min(along)) / 2 - float(np.dot(p_mid, normal))) * normal + offset[0] * row + offset[1] * col
    return [Stack(_positions(centre, row, col, -normal * gap, n, matrix, matrix, spacing), row, col, matrix, matrix, spacing, thickness, gap, acq, acq)]
