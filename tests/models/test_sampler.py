"""The box sampler (models.sampler): box geometry, its maps to patient and source voxels, and
trilinear sampling checked against the source array and against analytic patterns."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from numpy.typing import ArrayLike
import pytest
import torch

from models.sampler import Box, sample

# an oblique prescription: rows and columns rotated off the patient axes
ROW_DIR = np.array([0.9, 0.3, np.sqrt(1 - 0.9**2 - 0.3**2)])
COL_DIR = np.cross(ROW_DIR, [0.0, 0.0, 1.0])
COL_DIR /= np.linalg.norm(COL_DIR)
ORIENTATION = [*ROW_DIR, *COL_DIR]
SHAPE = (6, 8, 10)  # slices, rows, columns: all different, so a swapped axis shows
SPACING = (3.0, 0.7, 0.9)  # slice step, row spacing, column spacing


def _volume(array: np.ndarray | None = None, seed: int = 0) -> hd.Volume:
    """An oblique anisotropic volume of SHAPE; random values unless ``array`` is given."""
    values = np.random.default_rng(seed).uniform(0, 1, SHAPE).astype(np.float32) if array is None else array
    return hd.Volume.from_attributes(
        array=values, image_position=[12.0, -30.0, 45.0], image_orientation=ORIENTATION,
        pixel_spacing=list(SPACING[1:]), spacing_between_slices=SPACING[0], coordinate_system="PATIENT",
    )


def _own_box(volume: hd.Volume) -> Box:
    """The box whose grid is the volume's own voxel grid."""
    centre = volume.map_indices_to_reference(((np.asarray(volume.spatial_shape) - 1) / 2)[None])[0]
    return Box(centre, np.stack(volume.unit_vectors()), volume.spatial_shape, volume.spacing)


def _rotation(axis: ArrayLike, degrees: float) -> np.ndarray:
    """Rotation matrix by ``degrees`` about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * skew + (1 - np.cos(t)) * skew @ skew


def _grid(shape: tuple[int, int, int]) -> np.ndarray:
    """Every voxel index of a box, (N, 3) in C order."""
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3).astype(float)


def _ramp(points: np.ndarray) -> np.ndarray:
    """A linear function of patient position, which trilinear interpolation reproduces exactly."""
    return (np.asarray(points) - [12.0, -30.0, 45.0]) @ np.array([0.7, -1.3, 2.1]) + 5.0


def _ramp_volume() -> hd.Volume:
    """The volume whose voxels hold the ramp at their centres."""
    geometry = _volume()
    values = _ramp(geometry.map_indices_to_reference(_grid(SHAPE).astype(int))).reshape(SHAPE)
    return _volume(values.astype(np.float32))


def test_the_volumes_own_box_reproduces_its_array() -> None:
    """Sampling the volume on its own grid gives its array back, fully covered."""
    volume = _volume()
    box = _own_box(volume)
    assert np.allclose(box.affine, volume.affine, atol=1e-9)
    values, coverage = sample(volume, [box])
    assert values.shape == (1, *SHAPE) and values.dtype == torch.float32
    assert np.allclose(values[0].numpy(), volume.array, atol=1e-4)
    assert coverage.tolist() == [1.0]


def test_box_maps_are_inverses() -> None:
    """affine, to_patient and to_voxels agree and invert each other; the centre is the middle
    voxel, corners are the extreme voxels, and Box.around builds right-handed axes."""
    axes = _rotation([1.0, 2.0, -0.5], 40.0)
    box = Box(np.array([3.0, -7.0, 11.0]), axes, (5, 7, 9), (2.0, 0.5, 1.5))
    idx = np.random.default_rng(1).uniform(-2, 10, (50, 3))
    points = box.to_patient(idx)
    assert np.allclose((box.affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3], points)
    assert np.allclose(box.to_voxels(points), idx)
    assert np.allclose(box.to_patient(box.to_voxels(points)), points)
    assert np.allclose(box.to_patient(np.array([2.0, 3.0, 4.0]))[0], box.centre)
    # one step along each index moves spacing mm along that axis
    for i in range(3):
        step = np.zeros(3)
        step[i] = 1
        assert np.allclose(box.to_patient(step) - box.to_patient(np.zeros(3)), box.spacing[i] * axes[i])
    corners = box.corners()
    assert corners.shape == (8, 3)
    assert np.allclose(np.sort(box.to_voxels(corners), axis=0)[[0, -1]], [[0, 0, 0], [4, 6, 8]])
    around = Box.around(box.centre, 2 * axes[0], axes[1] + 0.4 * axes[0], (3, 3, 3), (1.0, 1.0, 1.0))
    assert np.allclose(around.axes, axes) and np.isclose(np.linalg.det(around.axes), 1.0)
    volume = _volume()
    unit = np.stack(volume.unit_vectors())
    assert np.allclose(Box.around(np.zeros(3), unit[0], unit[1], SHAPE, SPACING).axes, unit)  # the Volume's convention


def test_to_source_gives_the_source_voxel_indices() -> None:
    """to_source maps box voxels to source voxels: a box on every other voxel of the source grid,
    and a box whose axes are the source's permuted and flipped, land on known source indices."""
    volume = _volume()
    unit = np.stack(volume.unit_vectors())
    centre_index = np.array([2.0, 3.5, 4.0])
    centre = volume.map_indices_to_reference(centre_index[None])[0]
    coarse = Box(centre, unit, (3, 4, 5), tuple(2 * s for s in SPACING))  # type: ignore[arg-type]
    idx = _grid(coarse.shape)
    assert np.allclose(coarse.to_source(volume, idx), centre_index + 2 * (idx - (np.array(coarse.shape) - 1) / 2))
    # box slice = source column, box row = minus source row, box column = source slice (right-handed)
    permuted = Box(centre, np.stack([unit[2], -unit[1], unit[0]]), (3, 3, 3), (SPACING[2], SPACING[1], SPACING[0]))
    assert np.isclose(np.linalg.det(permuted.axes), 1.0)
    idx = _grid(permuted.shape)
    offset = idx - 1
    expected = centre_index + np.stack([offset[:, 2], -offset[:, 1], offset[:, 0]], axis=1)
    assert np.allclose(permuted.to_source(volume, idx), expected)


def test_a_rotated_box_samples_the_analytic_pattern() -> None:
    """A box turned 30 degrees in-plane (and one tilted out of plane) inside a volume holding a
    linear ramp in patient space samples the ramp's exact values at its voxel positions."""
    volume = _ramp_volume()
    unit = np.stack(volume.unit_vectors())
    centre = volume.map_indices_to_reference(np.array([[2.5, 3.5, 4.5]]))[0]
    in_plane = _rotation(unit[0], 30.0)
    tilted = _rotation(unit[1] + unit[2], 12.0) @ in_plane
    for rotation in (in_plane, tilted):
        box = Box(centre, unit @ rotation.T, (3, 5, 5), (2.0, 0.6, 0.6))
        assert np.all(np.abs(box.to_source(volume, _grid(box.shape)) - [2.5, 3.5, 4.5]) < [2.5, 3.5, 4.5])  # fully inside
        values, coverage = sample(volume, [box])
        expected = _ramp(box.to_patient(_grid(box.shape))).reshape(box.shape)
        assert coverage.tolist() == [1.0]
        assert np.allclose(values[0].numpy(), expected, atol=2e-3), np.abs(values[0].numpy() - expected).max()


def test_a_box_partly_outside_is_zero_there_with_fractional_coverage() -> None:
    """A box on the volume grid shifted by 3 slices and 4 columns keeps the overlapping values,
    is zero elsewhere, and reports the overlap fraction as coverage; one wholly outside is all zero."""
    volume = _volume(np.random.default_rng(2).uniform(1, 2, SHAPE).astype(np.float32))
    own = _own_box(volume)
    shift = own.to_patient(np.array([3.0, 0.0, 4.0]))[0] - own.to_patient(np.zeros(3))[0]
    shifted = Box(own.centre + shift, own.axes, own.shape, own.spacing)
    far = Box(own.centre + 10 * shift, own.axes, own.shape, own.spacing)
    values, coverage = sample(volume, [shifted, far])
    got = values[0].numpy()
    assert np.allclose(got[:3, :, :6], volume.array[3:, :, 4:], atol=1e-4)
    outside = np.ones(SHAPE, dtype=bool)
    outside[:3, :, :6] = False
    assert np.allclose(got[outside], 0.0, atol=1e-4)
    assert np.allclose(coverage, [3 / 6 * 6 / 10, 0.0])
    assert np.allclose(values[1].numpy(), 0.0)


def test_several_boxes_in_one_call_equal_one_call_each() -> None:
    """Sampling boxes together gives each box what sampling it alone gives, in order."""
    volume = _volume()
    unit = np.stack(volume.unit_vectors())
    centre = volume.map_indices_to_reference(np.array([[2.5, 3.5, 4.5]]))[0]
    boxes = [
        Box(centre + offset, unit @ _rotation(axis, angle).T, (4, 6, 5), (1.5, 0.5, 0.8))
        for offset, axis, angle in (((0.0, 0.0, 0.0), unit[0], 0.0), ((1.0, -2.0, 0.5), unit[0], 30.0), ((-3.0, 1.0, 2.0), [1.0, 1.0, 0.0], -20.0), ((20.0, 0.0, 0.0), unit[2], 10.0))
    ]
    values, coverage = sample(volume, boxes)
    assert values.shape == (4, 4, 6, 5) and coverage.shape == (4,)
    for i, box in enumerate(boxes):
        alone, alone_coverage = sample(volume, [box])
        assert torch.allclose(values[i], alone[0], atol=1e-6)
        assert coverage[i] == alone_coverage[0]
    assert len({round(float(c), 6) for c in coverage}) > 1  # the boxes really differ
    assert not torch.allclose(values[0], values[1])


def test_box_and_sample_reject_bad_input() -> None:
    """Axes that are not orthonormal rows, non-positive sizes, an empty box list and boxes of
    different shapes in one call are refused."""
    centre = np.zeros(3)
    with pytest.raises(ValueError, match="orthonormal"):
        Box(centre, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 1.0]]), (2, 2, 2), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="orthonormal"):
        Box(centre, 2 * np.eye(3), (2, 2, 2), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="orthonormal"):
        Box(centre, np.eye(3)[:2], (2, 2, 2), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        Box(centre, np.eye(3), (2, 2, 2), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        Box(centre, np.eye(3), (2, 2, 2), (1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        Box(centre, np.eye(3), (2, 0, 2), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="centre"):
        Box(np.zeros(2), np.eye(3), (2, 2, 2), (1.0, 1.0, 1.0))
    volume = _volume()
    with pytest.raises(ValueError, match="at least one box"):
        sample(volume, [])
    a = Box(centre, np.eye(3), (2, 2, 2), (1.0, 1.0, 1.0))
    b = Box(centre, np.eye(3), (2, 3, 2), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="share one shape"):
        sample(volume, [a, b])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_on_cuda_matches_cpu() -> None:
    """On a GPU the samples (left there) and the coverage equal the CPU's."""
    volume = _volume()
    unit = np.stack(volume.unit_vectors())
    centre = volume.map_indices_to_reference(np.array([[2.5, 3.5, 4.5]]))[0]
    boxes = [Box(centre + offset, unit @ _rotation(unit[0], 25.0).T, (4, 6, 5), (1.5, 0.5, 0.8)) for offset in (np.zeros(3), np.array([9.0, 0.0, 0.0]))]
    cpu, cpu_coverage = sample(volume, boxes)
    gpu, gpu_coverage = sample(volume, boxes, device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    assert np.allclose(gpu_coverage, cpu_coverage)
