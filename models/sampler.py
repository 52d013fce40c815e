"""The one sampler: every crop in the project is a ``Box`` sampled out of a volume.

A box is a centre, three orthonormal axes (slice, row, column) and a voxel size in millimetres
in patient space; its affine maps box voxel indices (slice, row, column) to patient LPS, the
same convention as highdicom's ``Volume``, and ``to_source`` maps box voxels back to the source
volume's voxels (for the SR and presentation-state coordinates). ``sample`` resamples any
number of boxes from one volume with a single trilinear ``torch.nn.functional.grid_sample``
call; samples outside the volume are zero, as SpineNet pads, and ``coverage`` says how much of
each box the volume covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Box", "sample"]


@dataclass(frozen=True, eq=False)
class Box:
    """A sampling grid in patient space: ``shape`` voxels of ``spacing`` mm along ``axes``.

    Boxes hold arrays, so they compare by identity."""

    centre: np.ndarray
    axes: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        centre = np.asarray(self.centre, dtype=float)
        if centre.shape != (3,) or not np.isfinite(centre).all():
            raise ValueError("box centre must be one finite patient position (3,)")
        axes = np.asarray(self.axes, dtype=float)
        if axes.shape != (3, 3) or not np.allclose(axes @ axes.T, np.eye(3), atol=1e-4):
            raise ValueError("box axes must be three orthonormal row vectors (slice, row, column)")
        if len(self.shape) != 3 or any(int(n) != n or n < 1 for n in self.shape):
            raise ValueError(f"box shape must be three positive voxel counts, not {self.shape}")
        if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"box spacing must be three positive sizes in mm, not {self.spacing}")
        # normalised, so that boxes built from lists or numpy scalars compare and sample alike
        object.__setattr__(self, "centre", centre)
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))

    @classmethod
    def around(cls, centre: np.ndarray, slice_axis: np.ndarray, row_axis: np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Box:
        """A box whose axes are made orthonormal from a slice axis and a row direction; the
        column axis completes them right-handed (row x column = slice, as in a Volume)."""
        s = np.asarray(slice_axis, dtype=float)
        s = s / np.linalg.norm(s)
        r = np.asarray(row_axis, dtype=float)
        r = r - (r @ s) * s
        r = r / np.linalg.norm(r)
        return cls(np.asarray(centre, dtype=float), np.stack([s, r, np.cross(s, r)]), shape, spacing)

    @property
    def affine(self) -> np.ndarray:
        """4x4 map from box voxel (slice, row, column) to patient position (mm)."""
        a = np.eye(4)
        a[:3, :3] = (np.asarray(self.axes, dtype=float) * np.asarray(self.spacing)[:, None]).T
        a[:3, 3] = np.asarray(self.centre, dtype=float) - a[:3, :3] @ ((np.asarray(self.shape) - 1) / 2)
        return a

    def to_patient(self, indices: np.ndarray) -> np.ndarray:
        """Patient positions (N, 3) of box voxel indices (N, 3), fractional allowed."""
        idx = np.atleast_2d(np.asarray(indices, dtype=float))
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_voxels(self, points: np.ndarray) -> np.ndarray:
        """Box voxel indices (N, 3) of patient positions (N, 3)."""
        p = np.atleast_2d(np.asarray(points, dtype=float))
        return (p - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T

    def to_source(self, volume: hd.Volume, indices: np.ndarray) -> np.ndarray:
        """Source voxel indices (slice, row, column) in ``volume`` of box voxel indices."""
        return np.asarray(volume.map_reference_to_indices(self.to_patient(indices), round_output=False, check_bounds=False))

    def corners(self) -> np.ndarray:
        """The eight corner voxel centres of the box, in patient space (8, 3)."""
        n = np.asarray(self.shape) - 1
        idx = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=float)
        return self.to_patient(idx)


def sample(volume: hd.Volume, boxes: Sequence[Box], device: torch.device | str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Trilinear samples of every box, (boxes, slices, rows, columns) float32, and the fraction
    of each box's voxels that lie inside the volume. All boxes must share one shape."""
    if not boxes:
        raise ValueError("sample needs at least one box")
    shape = boxes[0].shape
    if any(b.shape != shape for b in boxes):
        raise ValueError("all boxes of one sample call must share one shape")
    size = np.asarray(volume.spatial_shape, dtype=float)
    # box voxel -> source voxel (slice, row, column) -> grid_sample's normalised (x=col, y=row, z=slice)
    inverse = np.linalg.inv(volume.affine)
    to_norm = np.zeros((4, 4))
    to_norm[[2, 1, 0], [0, 1, 2]] = 2.0 / np.maximum(size - 1, 1)
    to_norm[:3, 3] = -1.0
    to_norm[3, 3] = 1.0
    maps = np.stack([(to_norm @ inverse @ b.affine)[:3] for b in boxes])  # (B, 3, 4)
    grid_idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"), dim=-1)
    homogeneous = torch.cat([grid_idx, torch.ones((*shape, 1))], dim=-1).to(device)  # (D, H, W, 4)
    grid = torch.einsum("dhwk,bjk->bdhwj", homogeneous, torch.as_tensor(maps, dtype=torch.float32, device=device))
    inside = (grid.abs() <= 1.0 + 1e-3).all(dim=-1)
    source = torch.as_tensor(np.ascontiguousarray(volume.array, dtype=np.float32), device=device)[None, None]
    out = F.grid_sample(source, grid.reshape(1, len(boxes) * shape[0], shape[1], shape[2], 3), mode="bilinear", padding_mode="zeros", align_corners=True)
    coverage = inside.reshape(len(boxes), -1).float().mean(dim=1).cpu().numpy()
    return out.reshape(len(boxes), *shape), coverage
