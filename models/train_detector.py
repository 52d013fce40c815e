"""Training the IVD detector (``spine-node train-detector``) on phantoms and RSNA-format data.

Training examples are drawn on the fly: a sagittal series, a slice (mostly near the mid-sagittal
plane), and a canonical box around it jittered by the augmentations (in-plane shift up to 20 mm,
rotation up to 15 degrees, scale 0.85-1.15, intensity gain and gamma), sampled by the same
sampler that inference uses. Targets come from disc centres in patient space: a Gaussian per
level (3 pixels in plane, 6 mm across slices), and where known (phantoms) the disc normal and
depth under each Gaussian. RSNA-format data give the canal point of each level on sagittal
T2/STIR (``Spinal Canal Stenosis`` rows), so a detector trained on them finds that point.

Phantom studies are rendered with domain randomisation for every other study (random tissue
contrast, noise, matrices and artefacts), so the weights do not learn one contrast.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from safetensors.torch import save_file

from models.data.pathology import LEVELS
from models.data.phantom import PhantomOptions, generate_study
from models.detect import canonical_box, normalise
from models.detector_net import DEPTH_SCALE, INPUT_SIZE, INPUT_SPACING, LEVEL_COUNT, DiscNet
from models.sampler import Box, sample
from models.volumes import SeriesVolume, load_series

LOGGER = logging.getLogger(__name__)
__all__ = ["TrainSeries", "TrainConfig", "phantom_series", "rsna_series", "train", "save_weights"]

SIGMA_PX = 3.0
SIGMA_SLICE_MM = 6.0
SAG_ROLES = ("T1_SAG", "T2_SAG", "STIR_SAG")


@dataclass(frozen=True)
class Target:
    """A level's truth: centre, and (phantoms only) the cranial disc normal and AP depth."""

    centre: np.ndarray
    normal: np.ndarray | None
    depth_mm: float | None


@dataclass(frozen=True)
class TrainSeries:
    """One sagittal volume with its per-level targets and its intensity scale."""

    volume: SeriesVolume
    targets: dict[str, Target]
    scale: float


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run."""

    steps: int = 1200
    batch: int = 16
    lr: float = 2e-3
    seed: int = 0
    mid_fraction: float = 0.75


def _render(args: tuple[Path, int, int, bool]) -> Path:
    """Render one phantom study without its axial series (worker process)."""
    out, seed, index, randomize = args
    return generate_study(out, seed, index, PhantomOptions(omit=("T2_AX",), randomize=randomize))


def phantom_series(out: Path, studies: int, seed: int, workers: int = 2) -> list[TrainSeries]:
    """Render ``studies`` phantoms under ``out`` (every other one randomised) and load their sagittal series."""
    jobs = [(out, seed, i, i % 2 == 1) for i in range(studies)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        dirs = list(pool.map(_render, jobs))
    series = []
    for d in dirs:
        truth = json.loads((d / "truth.json").read_text())
        targets = {
            lv: Target(np.array(t["center"]), np.array(t["plane"]["normal"]), float(t["disc_depth_mm"]))
            for lv, t in truth["levels"].items()
        }
        for s in truth["series"]:
            if s["role"] in SAG_ROLES:
                vol = load_series(sorted((d / s["folder"]).glob("*.dcm")))[0][0]
                series.append(TrainSeries(vol, targets, normalise(vol.volume.array)))
    return series


def rsna_series(root: Path) -> list[TrainSeries]:
    """Sagittal T2/STIR series of an RSNA 2024 layout with their canal points as level targets."""
    from models.data.rsna_reader import read_level_points

    out = []
    for item in read_level_points(root, "spinal_canal_stenosis", "Sagittal T2/STIR"):
        vols, _ = load_series(sorted(item.series_dir.glob("*.dcm")))
        targets = {lv: Target(p, None, None) for lv, p in item.points.items()}
        out.append(TrainSeries(vols[0], targets, normalise(vols[0].volume.array)))
    return out


def _rotate(v: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation of v about a unit axis."""
    a = math.radians(degrees)
    return v * math.cos(a) + np.cross(axis, v) * math.sin(a) + axis * (axis @ v) * (1 - math.cos(a))


def example(series: TrainSeries, rng: np.random.Generator, mid_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One augmented 2.5D input (3, H, W) and its targets: heatmaps, normal, depth, regression mask."""
    full = canonical_box(series.volume)
    n = full.shape[0]
    mid = np.mean([t.centre for t in series.targets.values()], axis=0)
    k_mid = int(round(float(full.to_voxels(mid[None])[0, 0])))
    k = int(np.clip(k_mid + rng.integers(-2, 3), 0, n - 1)) if rng.random() < mid_fraction else int(rng.integers(0, n))
    slice_axis, row_axis = full.axes[0], full.axes[1]
    row_axis = _rotate(row_axis, slice_axis, float(rng.uniform(-15, 15)))
    spacing = INPUT_SPACING * float(rng.uniform(0.85, 1.15))
    centre = full.to_patient(np.array([[k, (INPUT_SIZE - 1) / 2, (INPUT_SIZE - 1) / 2]]))[0]
    col_axis = np.cross(slice_axis, row_axis)
    centre = centre + rng.uniform(-20, 20) * row_axis + rng.uniform(-20, 20) * col_axis
    box = Box.around(centre, slice_axis, row_axis, (3, INPUT_SIZE, INPUT_SIZE), (full.spacing[0], spacing, spacing))
    pixels, _ = sample(series.volume.volume, [box])
    x = (pixels[0] / series.scale).clamp(0, 2)
    x = (x * float(rng.uniform(0.8, 1.25))).clamp(0, 2) ** float(rng.uniform(0.75, 1.35))
    heat = np.zeros((LEVEL_COUNT, INPUT_SIZE, INPUT_SIZE), np.float32)
    normal = np.zeros((2, INPUT_SIZE, INPUT_SIZE), np.float32)
    depth = np.zeros((1, INPUT_SIZE, INPUT_SIZE), np.float32)
    mask = np.zeros((1, INPUT_SIZE, INPUT_SIZE), np.float32)
    rr, cc = np.mgrid[0:INPUT_SIZE, 0:INPUT_SIZE]
    for i, level in enumerate(LEVELS[:LEVEL_COUNT]):
        t = series.targets.get(level)
        if t is None:
            continue
        kz, r, c = box.to_voxels(t.centre[None])[0]
        across = (kz - 1) * full.spacing[0]
        g = math.exp(-(across**2) / (2 * SIGMA_SLICE_MM**2)) * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * SIGMA_PX**2))
        heat[i] = np.maximum(heat[i], g)
        if t.normal is not None and t.depth_mm is not None:
            near = g > 0.1
            n_img = np.array([t.normal @ box.axes[1], t.normal @ box.axes[2]])
            n_img = n_img / (np.linalg.norm(n_img) or 1.0)
            if n_img[0] > 0:
                n_img = -n_img
            normal[:, near] = n_img[:, None]
            depth[0, near] = t.depth_mm / DEPTH_SCALE
            mask[0, near] = 1.0
    return x, torch.from_numpy(heat), torch.from_numpy(normal), torch.from_numpy(depth), torch.from_numpy(mask)


def loss_terms(out: torch.Tensor, heat: torch.Tensor, normal: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weighted heatmap BCE (positives up-weighted) and masked normal/depth regression losses."""
    logits = out[:, :LEVEL_COUNT]
    positives = heat.sum().clamp(min=1.0)
    hm = torch.nn.functional.binary_cross_entropy_with_logits(logits, heat, reduction="sum") / positives
    m = mask.expand(-1, 2, -1, -1)
    denom = mask.sum().clamp(min=1.0)
    nl = ((out[:, LEVEL_COUNT : LEVEL_COUNT + 2] - normal) ** 2 * m).sum() / denom
    dl = ((out[:, LEVEL_COUNT + 2 :] - depth).abs() * mask).sum() / denom
    return {"heatmap": hm, "normal": nl, "depth": dl}


def train(series: Sequence[TrainSeries], config: TrainConfig, progress: bool = True) -> DiscNet:
    """Train a DiscNet from scratch with AdamW and a one-cycle cosine schedule."""
    if not series:
        raise ValueError("no training series")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = DiscNet()
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    started = time.monotonic()
    with Progress(disable=not progress, console=Console(stderr=True)) as bar:
        task = bar.add_task("training the detector", total=config.steps)
        for step in range(config.steps):
            batch = [example(series[int(rng.integers(len(series)))], rng, config.mid_fraction) for _ in range(config.batch)]
            x, heat, normal, depth, mask = (torch.stack(t) for t in zip(*batch))
            terms = loss_terms(net(x), heat, normal, depth, mask)
            loss = terms["heatmap"] + 0.5 * terms["normal"] + 0.5 * terms["depth"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(task, advance=1)
            if step % 100 == 0 or step == config.steps - 1:
                LOGGER.info("detector training", extra={"step": step, "seconds": round(time.monotonic() - started), **{k: round(float(v.detach()), 4) for k, v in terms.items()}})
    return net.eval()


def save_weights(net: DiscNet, path: Path, metadata: dict[str, str]) -> None:
    """fp16 safetensors, with the network widths and the training facts as metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"widths": ",".join(map(str, net.widths)), **metadata})
