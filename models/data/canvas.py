"""Partial-volume tissue canvas and the implicit-shape primitives the phantom paints with (mm).

A shape is an approximate signed distance f (mm, negative inside). Painting it with edge width
delta (the acquisition pixel, mm) covers a voxel by clip(0.5 - f / delta, 0, 1), which is the
in-plane partial-volume effect. Rounded intersections and smooth unions keep edges anatomical
(no box corners) at the cost of a few array operations.
"""

from __future__ import annotations

import functools

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
        alpha = (f * np.float32(-1.0 / delta)).astype(np.float32, copy=False)
        alpha += 0.5
        np.clip(alpha, 0.0, 1.0, out=alpha)
        edge = np.flatnonzero((alpha > 0) & (alpha < 1))
        where = edge if idx is None else idx[edge]
        t = tissue if isinstance(tissue, int) else tissue[edge]
        self.b[where] = np.where(self.frac[where] >= 0.5, self.a[where], self.b[where])
        self.a[where] = t
        self.frac[where] = alpha[edge]
        self._cover(alpha >= 1, tissue, idx)
        return alpha

    def _cover(self, full: Array, tissue: int | Array, idx: Array | None) -> None:
        """Fully cover voxels idx[full] (all voxels where full when idx is None) with ``tissue``."""
        if idx is None and isinstance(tissue, int):
            for arr, value in ((self.a, tissue), (self.b, tissue), (self.frac, 1.0)):
                np.copyto(arr, value, where=full, casting="unsafe")
            return
        k = np.flatnonzero(full)
        where = k if idx is None else idx[k]
        t = tissue if isinstance(tissue, int) else tissue[k]
        self.a[where] = t
        self.b[where] = t
        self.frac[where] = 1.0

    def labels(self) -> Array:
        """Dominant tissue per voxel."""
        return np.where(self.frac >= 0.5, self.a, self.b)

    def signals(self, table: Array) -> Array:
        """Signal (contrasts, N) from a table (contrasts, ids) of pure-tissue signals."""
        a, b = self.a.astype(np.intp), self.b.astype(np.intp)
        out = np.empty((len(table), len(a)), dtype=np.float32)
        for row, sig in zip(table, out):
            tb = row[b]
            np.subtract(row[a], tb, out=sig)
            sig *= self.frac
            sig += tb
        return out


def ellipse_f(dx: Array, dy: Array, rx: float | Array, ry: float | Array) -> Array:
    """Approximate signed distance (mm) to an ellipse with half axes rx, ry (mm)."""
    return (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * _scale(rx, ry, dx.dtype)


def superellipse_f(dx: Array, dy: Array, rx: float | Array, ry: float | Array, power: float | Array) -> Array:
    """Approximate signed distance (mm) to a superellipse |dx/rx|^p + |dy/ry|^p = 1."""
    r = (np.abs(dx / rx) ** power + np.abs(dy / ry) ** power) ** (1.0 / power)
    return (r - 1.0) * _scale(rx, ry, dx.dtype)


def _scale(rx: float | Array, ry: float | Array, dtype: np.dtype) -> Array:
    """Smaller half axis (mm) in the coordinates' dtype (keeps float32 shapes float32)."""
    return np.minimum(rx, ry).astype(dtype, copy=False)


def round_max(fs: list[Array], radius: float) -> Array:
    """Intersection of shapes fs with edges and corners rounded by ``radius`` (mm)."""
    inner = functools.reduce(np.maximum, fs) + radius
    outer = np.zeros_like(inner)
    for f in fs:
        part = np.maximum(f + radius, 0.0)
        part *= part
        outer += part
    np.sqrt(outer, out=outer)
    outer += np.minimum(inner, 0.0)
    outer -= radius
    return outer


def smooth_min(a: Array, b: Array, k: float) -> Array:
    """Union of two shapes blended over k mm (polynomial smooth minimum)."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25
