"""Training the grader as the paper does (sections 2.1 and 4.2): ``spine-node train``.

Loss: cross-entropy per condition with class weights inversely proportional to the training
set's class frequencies (missing labels ignored), averaged over the five conditions, plus the
auxiliary level loss; total 0.8 / 0.2.

Schedule: AdamW; the learning rate warms linearly from ``lr_min`` (1e-6) to ``lr_max`` (1e-5)
over ``warmup`` iterations, then follows cosine annealing with warm restarts every ``restart``
iterations. We read the paper's "iterations" as epochs: 10 warm-up steps and restarts every 30
optimiser steps would restart hundreds of times in one of its 200 epochs.

Augmentations, on the device and for the whole batch at once: every volume shifted by up to 2
slices (T1 sagittal volumes by up to 1: their slices are about 1.5 native slices apart, see
``models.extract``, so one of theirs is the paper's two native ones), each sample flipped with
probability 0.5 (axial slices mirrored left-right, sagittal slice order reversed) with left and
right labels swapped, an intensity offset in [-0.1, 0.1], and a random affine per volume:
translation up to 22 px horizontally and 12 px vertically (of 224x112 slices, scaled with the
slice size), scale 0.9-1.1, rotation -20..20 degrees.

Model selection: "the highest macro-averaged AUROC achieved over 10 consecutive validation
epochs" is read as the highest mean, over a window of the 10 latest epochs, of the validation
macro AUROC averaged over the five conditions; the weights kept are those of the epoch that
closes the best full window (a run shorter than 10 epochs compares windows of all its epochs
so far only at its end; until a window is full, the latest epoch is kept).

bf16 autocast and channels-last are used on CUDA; a checkpoint after every epoch makes a run
resumable; seeds are set for Python, NumPy and torch.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from models.data.discs import DiscSet
from models.data.pathology import CONDITIONS
from models.grader import Grader, GraderConfig, prepare_inputs
from models.metrics import macro_auroc

LOGGER = logging.getLogger(__name__)
__all__ = ["TrainConfig", "Trained", "class_weights", "predict", "save_grader", "train_grader", "usable"]

SWAP = {c: c.replace("left", "right") if "left" in c else c.replace("right", "left") for c in CONDITIONS}
SELECTION_WINDOW = 10
# Largest slice shift per input slot (T1 sagittal, T2/STIR sagittal, T2 axial): two native slices.
MAX_SHIFT = (1, 2, 2)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults are the paper's."""

    epochs: int = 200
    batch: int = 8
    lr_max: float = 1e-5
    lr_min: float = 1e-6
    warmup: int = 10
    restart: int = 30
    weight_decay: float = 1e-2
    seed: int = 0
    size: tuple[int, int] = (112, 224)
    slots: tuple[int, ...] = (0, 1, 2)
    conditions: tuple[str, ...] = CONDITIONS
    augment: bool = True


@dataclass
class Trained:
    """The selected model and the per-epoch history of losses and validation AUROCs."""

    model: Grader
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_epoch: int = -1


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CUDA included) from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def learning_rate(epoch: int, config: TrainConfig) -> float:
    """Linear warm-up from lr_min to lr_max, then cosine annealing restarting every ``restart`` epochs."""
    if epoch < config.warmup:
        return config.lr_min + (config.lr_max - config.lr_min) * epoch / max(config.warmup, 1)
    t = (epoch - config.warmup) % config.restart
    return config.lr_min + 0.5 * (config.lr_max - config.lr_min) * (1 + math.cos(math.pi * t / config.restart))


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """(conditions, 3) weights inversely proportional to each grade's frequency (labels (N, C), -1 ignored);
    normalised so that a uniform distribution gives weight 1."""
    out = np.ones((labels.shape[1], 3), np.float32)
    for c in range(labels.shape[1]):
        counts = np.bincount(labels[:, c][labels[:, c] >= 0], minlength=3).astype(np.float32)
        seen = counts > 0
        out[c, seen] = counts[seen].sum() / (seen.sum() * counts[seen])
    return torch.from_numpy(out)


def usable(data: DiscSet, slots: Sequence[int]) -> DiscSet:
    """The rows that have at least one of the used slots (a level the detector missed has none)."""
    keep = data.present[:, list(slots)].any(axis=1)
    return data if keep.all() else data.select_rows(np.flatnonzero(keep))


def _batch(data: DiscSet, rows: np.ndarray, config: TrainConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs and labels of some rows (see ``prepare_inputs``)."""
    inputs = prepare_inputs(data.volumes[rows], data.present[rows], data.levels[rows], config.slots, config.size, device)
    return {**inputs, "labels": torch.from_numpy(data.labels[rows].astype(np.int64)).to(device)}


def flip(batch: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flip the samples in ``mask``: axial slices mirrored left-right, sagittal slice order
    reversed, and left and right labels swapped."""
    vol, labels = batch["volumes"], batch["labels"]
    axial = (batch["views"] == 1)[:, :, None, None, None]
    mirrored = torch.where(axial, vol.flip(-1), vol.flip(2))
    swapped = labels[:, [CONDITIONS.index(SWAP[c]) for c in CONDITIONS]]
    return {**batch, "volumes": torch.where(mask[:, None, None, None, None], mirrored, vol), "labels": torch.where(mask[:, None], swapped, labels)}


def shift_slices(vol: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Move each volume's slices by ``shift`` (one integer per volume), zeros coming in."""
    b, m, s, h, w = vol.shape
    idx = torch.arange(s, device=vol.device)[None] - shift.reshape(-1, 1)
    valid = ((idx >= 0) & (idx < s))[:, :, None, None]
    flat = torch.gather(vol.reshape(b * m, s, h, w), 1, idx.clamp(0, s - 1)[:, :, None, None].expand(-1, -1, h, w))
    return (flat * valid).reshape(b, m, s, h, w)


def affine(vol: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Rotate (radians), scale and translate (pixels) every slice of each volume, one draw per volume."""
    b, m, s, h, w = vol.shape
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin * h / w, tx * 2 / w], 1), torch.stack([sin * w / h, cos, ty * 2 / h], 1)], 1)
    grid = F.affine_grid(theta, [b * m, s, h, w], align_corners=False)
    return F.grid_sample(vol.reshape(b * m, s, h, w), grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(b, m, s, h, w)


def slice_shifts(b: int, slots: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Per volume of a batch of ``b`` samples, a shift drawn uniformly from -MAX_SHIFT..MAX_SHIFT of its slot."""
    limit = torch.tensor([MAX_SHIFT[s] for s in slots], device=device).repeat(b)
    return (torch.rand(len(limit), generator=generator, device=device) * (2 * limit + 1)).floor().long() - limit


def augment(batch: dict[str, torch.Tensor], generator: torch.Generator, slots: Sequence[int]) -> dict[str, torch.Tensor]:
    """The paper's augmentations: flip per sample; slice shift, affine and intensity offset per
    volume (``slots``: the input slot of each of the batch's volumes)."""
    b, m = batch["volumes"].shape[:2]
    dev = batch["volumes"].device

    def uniform(lo: float, hi: float, n: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=dev)

    batch = flip(batch, uniform(0, 1, b) < 0.5)
    vol = shift_slices(batch["volumes"], slice_shifts(b, slots, generator, dev))
    h, w = vol.shape[-2:]
    # the paper's 22 and 12 pixels are of 224x112 slices: scaled to the slices' actual size
    vol = affine(vol, uniform(-20, 20, b * m) * math.pi / 180, uniform(0.9, 1.1, b * m), uniform(-22, 22, b * m) * w / 224, uniform(-12, 12, b * m) * h / 112)
    vol = (vol + uniform(-0.1, 0.1, b * m).reshape(b, m, 1, 1, 1)).clamp(0, 1.1)
    return {**batch, "volumes": vol}


def _loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], weights: torch.Tensor, conditions: Sequence[str]) -> torch.Tensor:
    """0.8 x mean of the weighted per-condition cross-entropies + 0.2 x level cross-entropy."""
    terms = []
    for name in conditions:
        c = CONDITIONS.index(name)
        target = batch["labels"][:, c]
        if (target >= 0).any():
            terms.append(F.cross_entropy(out[name].float(), target, weight=weights[c], ignore_index=-1))
    main = torch.stack(terms).mean() if terms else out["level"].sum() * 0
    return 0.8 * main + 0.2 * F.cross_entropy(out["level"].float(), batch["levels"])


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict(model: Grader, data: DiscSet, config: TrainConfig, device: torch.device, batch: int = 16) -> dict[str, np.ndarray]:
    """Logits of every row, per head (conditions and level), in row order; every row must have
    one of the used slots (``usable``)."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(data.levels), batch):
        rows = np.arange(start, min(start + batch, len(data.levels)))
        b = _batch(data, rows, config, device)
        with _autocast(device):
            logits = model(b["volumes"], b["present"], b["views"], b["levels"])
        for k, v in logits.items():
            out.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def validation_auroc(logits: dict[str, np.ndarray], data: DiscSet, conditions: Sequence[str]) -> dict[str, float]:
    """Macro one-vs-rest AUROC per condition, and their mean under "mean"."""
    scores = {}
    for name in conditions:
        probs = torch.softmax(torch.from_numpy(logits[name]), dim=1).numpy()
        scores[name] = float(macro_auroc(data.labels[:, CONDITIONS.index(name)], probs))
    finite = [v for v in scores.values() if not math.isnan(v)]
    scores["mean"] = float(np.mean(finite)) if finite else float("nan")
    return scores


def train_grader(train: DiscSet, val: DiscSet, model_config: GraderConfig, config: TrainConfig, out: Path, device: str = "cpu", resume: bool = False, progress: bool = True,
                 init: tuple[str, dict[str, torch.Tensor]] | None = None) -> Trained:
    """Train from scratch, or from ``init`` (a weights hash and its state dict: another warm
    restart of an earlier run), or resume ``out/last.pt``; select by the windowed validation AUROC."""
    dev = torch.device(device)
    train, val = usable(train, config.slots), usable(val, config.slots)
    seed_everything(config.seed)
    model = Grader(model_config)
    if init is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in init[1].items()})
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr_min, weight_decay=config.weight_decay)
    weights = class_weights(train.labels).to(dev)
    generator = torch.Generator(device=dev).manual_seed(config.seed)
    order_rng = np.random.default_rng(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    trained = Trained(model)
    best_window = -math.inf
    start = 0
    last = out / "last.pt"
    # what a resumed run must share with its checkpoint (more epochs may be asked for)
    identity = {"config": json.dumps({k: v for k, v in asdict(config).items() if k != "epochs"}), "model": json.dumps(asdict(model_config)), "train_ids": sorted(set(train.study_ids.tolist())), "val_ids": sorted(set(val.study_ids.tolist())), "init": init[0] if init else None}
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        if state.get("identity") != identity:
            raise ValueError(f"{last} was trained with another configuration or split; start afresh without --resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        order_rng.bit_generator.state = state["order_rng"]
        torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        trained.history, trained.selected_epoch, best_window, start = state["history"], state["selected_epoch"], state["best_window"], state["epoch"] + 1
    else:
        (out / "selected.pt").unlink(missing_ok=True)
    steps = math.ceil(len(train.levels) / config.batch)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}  val AUROC {task.fields[auroc]}"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("training the grader", total=config.epochs * steps, completed=start * steps, loss=float("nan"), auroc="-")
        for epoch in range(start, config.epochs):
            for group in opt.param_groups:
                group["lr"] = learning_rate(epoch, config)
            model.train()
            perm = order_rng.permutation(len(train.levels))
            losses = []
            for i in range(steps):
                batch = _batch(train, np.sort(perm[i * config.batch : (i + 1) * config.batch]), config, dev)
                if config.augment:
                    batch = augment(batch, generator, config.slots)
                with _autocast(dev):
                    logits = model(batch["volumes"], batch["present"], batch["views"], batch["levels"])
                loss = _loss(logits, batch, weights, config.conditions)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                bar.update(task, advance=1, loss=float(np.mean(losses[-20:])))
            scores = validation_auroc(predict(model, val, config, dev), val, config.conditions)
            trained.history.append({"epoch": epoch, "lr": learning_rate(epoch, config), "loss": float(np.mean(losses)), **{f"val_auroc_{k}": v for k, v in scores.items()}})
            window = [h["val_auroc_mean"] for h in trained.history[-SELECTION_WINDOW:]]
            windowed = float(np.nanmean(window)) if not np.isnan(window).all() else -1.0
            full = len(trained.history) >= min(SELECTION_WINDOW, config.epochs)
            if (full and windowed > best_window) or not (out / "selected.pt").exists():
                best_window, trained.selected_epoch = (windowed if full else best_window), epoch
                torch.save(model.state_dict(), out / "selected.pt")
            bar.update(task, auroc=f"{scores['mean']:.3f}")
            LOGGER.info("grader epoch", extra={"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "val_auroc": round(scores["mean"], 4), "window": round(windowed, 4)})
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": generator.get_state(), "order_rng": order_rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if dev.type == "cuda" else None, "identity": identity, "history": trained.history, "selected_epoch": trained.selected_epoch, "best_window": best_window, "epoch": epoch}, out / "last.pt.tmp")
            (out / "last.pt.tmp").replace(last)
    model.load_state_dict(torch.load(out / "selected.pt", map_location=dev))
    return trained


def save_grader(model: Grader, path: Path, metadata: dict[str, str]) -> None:
    """fp16 safetensors with the architecture's config as metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"grader_config": json.dumps(asdict(model.config)), **metadata})
