"""Partial-volume tissue canvas and the implicit-shape primitives the phantom paints with (mm).

A shape is an approximate signed distance f (mm, negative inside). Painting it with edge width
delta (the acquisition pixel, mm) covers a voxel by clip(0.5 - f / delta, 0, 1), which is the
in-plane partial-volume effect. Rounded intersections and smooth unions keep edges anatomical
(no box corners) at the cost of a few array operations.
"""

from __future__ import annotations

import numpy as np

Array = np.ndarray


class Canvas:
    """Two-tissue partial-volume mixture per voxel: tissues a, b and the fraction of a."""

    def __init__(self, n: int) -> None:
        self.a = np.zeros(n, dtype=np.int16)
        self.b = np.zeros(n, dtype=np.int16)
        self.frac = np.ones(n, dtype=np.float32)

    def paint(self, f: Array, tissue: int | Array, delta: float, idx: Array | None = None) -> Array:
        """Paint ``tissue`` (an id, or one per voxel) with signed distance f (mm) on voxels idx; coverage."""
        alpha = np.clip(0.5 - f * np.float32(1.0 / delta), 0.0, 1.0).astype(np.float32, copy=False)
        hit = np.flatnonzero(alpha > 0)
        where = hit if idx is None else idx[hit]
        al = alpha[hit]
        t = tissue if isinstance(tissue, int) else tissue[hit]
        frac = self.frac[where]
        dominant = np.where(frac >= 0.5, self.a[where], self.b[where])
        self.b[where] = np.where(al >= 1.0, t, dominant)
        self.a[where] = t
        self.frac[where] = al
        return alpha

    def labels(self) -> Array:
        """Dominant tissue per voxel."""
        return np.where(self.frac >= 0.5, self.a, self.b)

    def signals(self, table: Array) -> Array:
        """Signal (contrasts, N) from a table (contrasts, ids) of pure-tissue signals."""
        return table[:, self.a] * self.frac + table[:, self.b] * (1.0 - self.frac)


def ellipse_f(dx: Array, dy: Array, rx: float | Array, ry: float | Array) -> Array:
    """Approximate signed distance (mm) to an ellipse with half axes rx, ry (mm)."""
    return (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * np.minimum(rx, ry)


def superellipse_f(dx: Array, dy: Array, rx: float | Array, ry: float | Array, power: float | Array) -> Array:
    """Approximate signed distance (mm) to a superellipse |dx/rx|^p + |dy/ry|^p = 1."""
    r = (np.abs(dx / rx) ** power + np.abs(dy / ry) ** power) ** (1.0 / power)
    return (r - 1.0) * np.minimum(rx, ry)


def round_max(fs: list[Array], radius: float) -> Array:
    """Intersection of shapes fs with edges and corners rounded by ``radius`` (mm)."""
    inner = np.maximum.reduce(fs) + radius
    outer = np.sqrt(sum(np.maximum(f + radius, 0.0) ** 2 for f in fs))
    return outer + np.minimum(inner, 0.0) - radius


def smooth_min(a: Array, b: Array, k: float) -> Array:
    """Union of two shapes blended over k mm (polynomial smooth minimum)."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25
