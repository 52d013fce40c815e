"""Rendering the phantom: tissue labels and MR signal sampled at voxel centres (patient LPS, mm).

Modelling choices:
- Each tissue is an implicit shape with an approximate signed distance f (mm, negative inside);
  it is painted over what lies below it with coverage clip(0.5 - f / pixel, 0, 1), which is the
  in-plane partial-volume effect at the acquisition resolution. Through-plane partial volume is
  approximated by averaging ``subslices`` planes across the slice thickness (1 by default).
- Images are sampled on the acquisition matrix and their k-space zero-filled to the
  reconstruction matrix (truncation ringing and blur as on a scanner), done as two small real
  matrix products per stack (the zero-filled DFT is linear); complex Gaussian noise is
  then added per reconstructed pixel and the magnitude taken (Rician noise floor).
- The receive bias is a spine-coil profile: sensitivity falls with distance anterior to the skin
  of the back, plus a gentle cranio-caudal fall-off.
- The shapes and their painting order are in ``paint.py``; only voxels near the spine are
  straightened and painted with spinal anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.data.anatomy import Spine
from models.data.canvas import Array, Canvas
from models.data.paint import NUCLEUS_BASE, paint_spine, paint_torso

__all__ = ["NUCLEUS_BASE", "Stack", "render_points", "render_stack", "signal_table", "stack_points"]


@dataclass(frozen=True)
class Stack:
    """Parallel slices of one orientation; all vectors in patient LPS, distances in mm."""

    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    thickness: float
    spacing: float
    acq_rows: int
    acq_cols: int

    @property
    def normal(self) -> np.ndarray:
        """Slice normal, row_dir x col_dir."""
        return np.cross(self.row_dir, self.col_dir)

    def affine(self, k: int) -> np.ndarray:
        """4x4 map from (column, row, 0, 1) pixel indices of slice k to patient LPS mm."""
        m = np.eye(4)
        m[:3, 0] = self.row_dir * self.pixel_spacing[1]
        m[:3, 1] = self.col_dir * self.pixel_spacing[0]
        m[:3, 2] = self.normal
        m[:3, 3] = self.positions[k]
        return m


def _torso_coords(sp: Spine, p: Array) -> tuple[Array, Array, Array]:
    """Arc length at the point's height, and x, y from the centreline there (mm), per point."""
    sz = np.interp(p[:, 2], sp.centre[:, 2], sp.s).astype(np.float32)
    ry = p[:, 1] - sp.centre_y(sz)
    return sz, p[:, 0] - np.float32(sp.x0), ry


def _paint(sp: Spine, p: Array, sz: Array, rx: Array, ry: Array, delta: float) -> Canvas:
    """Tissue mixture at points p (N, 3) given their torso coordinates (mm)."""
    c = Canvas(len(p))
    paint_torso(c, sp, rx, ry, sz, delta)
    near = np.flatnonzero((np.abs(rx) < 56.0) & (ry > -45.0) & (ry < 100.0))
    s, v = sp.straighten(p[near, 1], p[near, 2])
    box = (v > -30) & (v < 75) & (s > sp.s[0] + 5) & (s < sp.s[-1] - 5)
    idx = near[box]
    paint_spine(c, sp, s[box].astype(np.float32), v[box].astype(np.float32), rx[idx], idx, delta)
    return c


def render_points(sp: Spine, p: Array, delta: float) -> Canvas:
    """Tissue mixture at patient points p (N, 3), LPS mm, painted with edge width delta (mm)."""
    p = np.asarray(p, dtype=np.float32)
    return _paint(sp, p, *_torso_coords(sp, p), delta)


def stack_points(stack: Stack, k: int, offset: float = 0.0) -> np.ndarray:
    """Acquisition-grid voxel centres of slice k (acq_rows*acq_cols, 3), patient mm, row-major."""
    dr = stack.pixel_spacing[0] * stack.rows / stack.acq_rows
    dc = stack.pixel_spacing[1] * stack.cols / stack.acq_cols
    i = np.arange(stack.acq_rows, dtype=np.float32)[:, None, None]
    j = np.arange(stack.acq_cols, dtype=np.float32)[None, :, None]
    origin = stack.positions[k] + offset * stack.normal
    return (origin + i * dr * stack.col_dir + j * dc * stack.row_dir).reshape(-1, 3).astype(np.float32)


def coil_bias(sp: Spine, sz: Array, ry: Array, falloff: float) -> Array:
    """Receive sensitivity (N,) of a posterior spine coil at torso coordinates sz, ry (mm)."""
    depth = np.clip(sp.torso.back_offset - ry, 0, None)
    return ((0.3 + 0.7 * np.exp(-depth / falloff)) * np.exp(-(((sz - 90.0) / 260.0) ** 2))).astype(np.float32)


def zero_fill_matrix(n: int, m: int) -> Array:
    """(m, n) real map of zero-filled k-space interpolation from n samples to m over the same FOV."""
    spectrum = np.fft.fft(np.eye(n), axis=0)
    padded = np.zeros((m, n), dtype=complex)
    half = n // 2
    padded[:half] = spectrum[:half]
    padded[m - (n - half):] = spectrum[half:]
    if n % 2 == 0 and m > n:
        padded[half] = padded[m - half] = spectrum[half] / 2
    return (np.fft.ifft(padded, axis=0).real * (m / n)).astype(np.float32)


def zero_fill(img: Array, rows: int, cols: int) -> Array:
    """Zero-filled k-space interpolation of real images (..., r, c) to (..., rows, cols)."""
    lead, (r, c) = img.shape[:-2], img.shape[-2:]
    out = img.reshape(-1, c) @ zero_fill_matrix(c, cols).T
    out = out.reshape(-1, r, cols).transpose(0, 2, 1).reshape(-1, r) @ zero_fill_matrix(r, rows).T
    return np.ascontiguousarray(out.reshape(-1, cols, rows).transpose(0, 2, 1)).reshape(*lead, rows, cols)


def signal_table(tissues: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Signal per painted id (contrasts, NUCLEUS_BASE + discs) from tissue and nucleus signals."""
    return np.concatenate([tissues, np.zeros((tissues.shape[0], NUCLEUS_BASE - tissues.shape[1]), np.float32), nuclei], axis=1)


def render_stack(
    sp: Spine, stack: Stack, table: np.ndarray, rng: np.random.Generator,
    noise: float, falloff: float, subslices: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude images (contrasts, slices, rows, cols) and labels (slices, acq_rows, acq_cols).

    ``table`` (contrasts, ids) is the pure signal of each painted id (see ``signal_table``).
    """
    n, ar, ac = len(stack.positions), stack.acq_rows, stack.acq_cols
    delta = float(max(stack.pixel_spacing[0] * stack.rows / ar, stack.pixel_spacing[1] * stack.cols / ac))
    offsets = [0.0] if subslices <= 1 else list(np.linspace(-0.35, 0.35, subslices) * stack.thickness)
    acc = np.zeros((table.shape[0], n * ar * ac), dtype=np.float32)
    labels = np.zeros(n * ar * ac, dtype=np.int16)
    for o in offsets:
        p = np.concatenate([stack_points(stack, k, o) for k in range(n)])
        sz, rx, ry = _torso_coords(sp, p)
        canvas = _paint(sp, p, sz, rx, ry, delta)
        acc += canvas.signals(table) * (coil_bias(sp, sz, ry, falloff) / len(offsets))
        if o == offsets[len(offsets) // 2]:
            labels = canvas.labels()
    img = zero_fill(acc.reshape(-1, n, ar, ac), stack.rows, stack.cols)
    scale = (noise * table.max(axis=1)).astype(np.float32)[:, None, None, None]
    return _rician(img, scale, rng), labels.reshape(n, ar, ac)


def _rician(img: Array, scale: Array, rng: np.random.Generator) -> Array:
    """Magnitude of img plus complex Gaussian noise of standard deviation scale, in place (float32)."""
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= scale
    img += noise
    img *= img
    rng.standard_normal(img.shape, dtype=np.float32, out=noise)
    noise *= scale
    noise *= noise
    img += noise
    return np.sqrt(img, out=img)
