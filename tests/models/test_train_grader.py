"""Training the grader: the paper's schedule, loss weights and augmentations, model selection,
resumable checkpoints, and ``spine-node train`` / ``evaluate`` end to end on phantom data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from models.data.discs import DiscSet
from models.data.pathology import CONDITIONS
from models.data.phantom import generate
from models.extract import CROP_SHAPE, CROPS_VERSION
from models.evaluate_grader import evaluate_logits
from models.grade import GraderModel, WeightsMismatch
from models.grader import GraderConfig
from models.metrics import PALETTE
from models.train_grader import MAX_SHIFT, TrainConfig, affine, class_weights, flip, learning_rate, shift_slices, slice_shifts, train_grader, usable

TINY = GraderConfig(width=8)


def synthetic(n: int, seed: int) -> DiscSet:
    """Discs whose spinal canal grade is written as the brightness of the T2 sagittal volume
    (learnable), other conditions random, some labels missing, some axial volumes absent."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (n, len(CONDITIONS))).astype(np.int8)
    labels[rng.random((n, len(CONDITIONS))) < 0.1] = -1
    labels[:, 0] = np.arange(n) % 3
    volumes = rng.random((n, 3, *CROP_SHAPE), dtype=np.float32) * 0.1
    volumes[:, 1] += (labels[:, 0].astype(np.float32) * 0.3)[:, None, None, None]
    present = np.ones((n, 3), bool)
    present[::4, 2] = False
    volumes[~present] = 0
    return DiscSet(volumes.astype(np.float16), present, labels, np.arange(n) % 5, np.array([f"s{i // 5}" for i in range(n)]))


def test_schedule_warms_up_then_restarts_cosine() -> None:
    """1e-6 -> 1e-5 over the warm-up, then cosine from the top, restarting every period."""
    c = TrainConfig()
    assert learning_rate(0, c) == pytest.approx(1e-6)
    assert learning_rate(5, c) == pytest.approx(5.5e-6)
    assert learning_rate(10, c) == pytest.approx(1e-5)
    assert learning_rate(25, c) == pytest.approx(5.5e-6)
    assert learning_rate(40, c) == pytest.approx(1e-5)
    assert learning_rate(39, c) < learning_rate(38, c)


def test_class_weights_are_inverse_frequencies() -> None:
    """Weights n / (k * count) per grade seen, 1 for grades never seen, -1 ignored."""
    labels = np.array([[0]] * 8 + [[1]] * 2 + [[-1]] * 5)
    assert class_weights(labels)[0].tolist() == pytest.approx([0.625, 2.5, 1.0])


def test_flip_mirrors_axial_reverses_sagittal_and_swaps_sides() -> None:
    """Flipped samples: axial slices mirrored left-right, sagittal slice order reversed, left and
    right labels exchanged; unflipped samples untouched."""
    vol = torch.arange(2 * 2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 2, 3, 2, 4)
    labels = torch.tensor([[0, 1, 2, 0, 1]] * 2)
    batch = {"volumes": vol, "views": torch.tensor([[0, 1]] * 2), "labels": labels}
    out = flip(batch, torch.tensor([True, False]))
    assert torch.equal(out["volumes"][0, 0], vol[0, 0].flip(0))
    assert torch.equal(out["volumes"][0, 1], vol[0, 1].flip(-1))
    assert torch.equal(out["volumes"][1], vol[1])
    assert out["labels"][0].tolist() == [0, 2, 1, 1, 0] and out["labels"][1].tolist() == [0, 1, 2, 0, 1]


def test_slice_shift_and_affine() -> None:
    """A shift of +1 moves every slice one place with zeros coming in; the identity affine
    changes nothing and a translation moves content by whole pixels."""
    vol = torch.rand(1, 1, 9, 16, 32)
    shifted = shift_slices(vol, torch.tensor([1]))
    assert torch.equal(shifted[0, 0, 1:], vol[0, 0, :-1]) and shifted[0, 0, 0].abs().sum() == 0
    one = torch.ones(1)
    assert torch.allclose(affine(vol, 0 * one, one, 0 * one, 0 * one), vol, atol=1e-5)
    moved = affine(vol, 0 * one, one, 2 * one, 0 * one)
    assert torch.allclose(moved[..., :-2], vol[..., 2:], atol=1e-5) and moved[..., -2:].abs().sum() == 0


def test_slice_shifts_stay_within_two_native_slices_per_slot() -> None:
    """T1 sagittal volumes (slices about 1.5 native apart) shift by -1..1, the others by -2..2,
    every value of the range drawn."""
    generator = torch.Generator().manual_seed(0)
    shifts = slice_shifts(2000, (0, 1, 2), generator, torch.device("cpu")).reshape(2000, 3)
    assert MAX_SHIFT == (1, 2, 2)
    for slot, limit in enumerate(MAX_SHIFT):
        assert set(shifts[:, slot].tolist()) == set(range(-limit, limit + 1)), slot
    only_axial = slice_shifts(500, (2,), generator, torch.device("cpu"))
    assert only_axial.shape == (500,) and set(only_axial.tolist()) == {-2, -1, 0, 1, 2}


def test_training_learns_selects_and_resumes(tmp_path: Path) -> None:
    """On a learnable toy task the selected model beats chance on spinal canal stenosis; a run
    stopped after three epochs and resumed ends exactly like an uninterrupted one."""
    torch.set_num_threads(1)
    train, val = synthetic(120, 1), synthetic(30, 2)
    config = TrainConfig(epochs=5, batch=10, lr_max=3e-3, lr_min=1e-4, warmup=1, restart=5, size=(32, 64))
    straight = train_grader(train, val, TINY, config, tmp_path / "a", progress=False)
    assert len(straight.history) == 5 and 0 <= straight.selected_epoch < 5
    assert max(h["val_auroc_spinal_canal_stenosis"] for h in straight.history) > 0.8
    train_grader(train, val, TINY, dataclasses.replace(config, epochs=3), tmp_path / "b", progress=False)
    resumed = train_grader(train, val, TINY, config, tmp_path / "b", resume=True, progress=False)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-5)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grader trained for one epoch by the command line on six phantom studies, at a slice size
    other than the preset's."""
    base = tmp_path_factory.mktemp("train")
    generate(base / "data", 6, 31, rsna=True, progress=False)
    out = base / "weights" / "grader.safetensors"
    result = subprocess.run([sys.executable, "-m", "node.cli", "train", "--data", str(base / "data" / "rsna"), "--cache", str(base / "cache"),
                             "--workdir", str(base / "work"), "--out", str(out), "--preset", "cpu", "--epochs", "1", "--restart", "1", "--size", "48x96", "--workers", "1", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_train_command_writes_weights_card_report_and_figures(trained: Path) -> None:
    """fp16 weights whose hash is on their card, a test report with every Table 2 condition, the
    ROC and reliability figures, and the not-for-diagnostic-use line; the preset's width, the
    overridden slice size, both on the card."""
    grader = GraderModel.load(trained)
    assert grader.model.config.width == 16 and grader.train_config.size == (48, 96)
    card = trained.with_suffix(".md").read_text()
    assert "slices resized to 48x96" in card and "restarts every 1 epochs" in card
    assert grader.sha256 in card and "Not for diagnostic use" in card and "synthetic phantoms" in card and "| SCS | L-NFN |" in card.replace("model ", "")
    report = json.loads((trained.parent / "grader-report.json").read_text())
    assert set(report["conditions"]) == set(CONDITIONS)
    assert set(report["competition_log_loss"]) >= {"spinal", "foraminal", "subarticular", "any_severe_spinal", "score"}
    assert all(0 < t["temperature"] <= 100 for t in report["conditions"].values())
    figures = {p.name for p in (trained.parent / "grader-figures").iterdir()}
    assert "roc_severe.png" in figures and "reliability_spinal_canal_stenosis.png" in figures


@pytest.mark.parametrize("size", ["112", "12x3", "axb"])
def test_a_bad_slice_size_is_refused_by_name(size: str, tmp_path: Path) -> None:
    """``--size`` must be HxW with both sides at least 16 pixels; anything else stops at once."""
    result = subprocess.run([sys.executable, "-m", "node.cli", "train", "--data", str(tmp_path), "--size", size],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "argument --size" in result.stderr


@pytest.mark.parametrize("option", ["--epochs", "--restart", "--batch"])
def test_a_count_below_one_is_refused_by_name(option: str, tmp_path: Path) -> None:
    """Epochs, restart period and batch size are counts: 0 (a division by zero in the schedule
    for ``--restart``) stops at once, naming the option."""
    result = subprocess.run([sys.executable, "-m", "node.cli", "train", "--data", str(tmp_path), option, "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"argument {option}" in result.stderr


def test_weights_not_on_their_card_are_refused(trained: Path, tmp_path: Path) -> None:
    """A weights file changed after training no longer matches its card and is not loaded."""
    copy = tmp_path / "grader.safetensors"
    data = bytearray(trained.read_bytes())
    data[-1] ^= 0x01
    copy.write_bytes(bytes(data))
    copy.with_suffix(".md").write_text(trained.with_suffix(".md").read_text())
    with pytest.raises(WeightsMismatch):
        GraderModel.load(copy)


def test_weights_trained_on_other_crops_are_refused(trained: Path, tmp_path: Path) -> None:
    """Weights whose metadata names another crops version (or none: they predate it) would grade
    inputs unlike their training data, and are not loaded, even with a matching card."""
    with safe_open(str(trained), "pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["crops_version"] == str(CROPS_VERSION)
    for version in ("1", None):
        copy = tmp_path / "grader.safetensors"
        save_file(state, str(copy), metadata={k: v for k, v in meta.items() if k != "crops_version"} | ({"crops_version": version} if version else {}))
        copy.with_suffix(".md").write_text(hashlib.sha256(copy.read_bytes()).hexdigest())
        with pytest.raises(WeightsMismatch, match="crops of version 1"):
            GraderModel.load(copy)


def test_evaluate_command_prints_the_papers_tables(trained: Path) -> None:
    """Table 2 (macro AUROC per condition) and Table 3 (per grade) as Markdown."""
    result = subprocess.run([sys.executable, "-m", "node.cli", "evaluate", "--cache", str(trained.parents[1] / "cache"), "--weights", str(trained)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Table 2" in result.stdout and "Table 3" in result.stdout and "| severe" in result.stdout.replace("severe |", "| severe")


def _train_from(trained: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``spine-node train --init`` with the fixture's data and cache, one epoch, into ``out``."""
    base = trained.parents[1]
    return subprocess.run([sys.executable, "-m", "node.cli", "train", "--data", str(base / "data" / "rsna"), "--cache", str(base / "cache"),
                           "--workdir", str(out.parent / "work"), "--out", str(out), "--epochs", "1", "--restart", "1", "--size", "48x96",
                           "--workers", "1", "--device", "cpu", "--init", str(trained), *options], capture_output=True, text=True, timeout=600)


def test_training_can_start_from_earlier_weights(trained: Path, tmp_path: Path) -> None:
    """``--init``: another cycle from weights of the same architecture and test split, named on
    the new card by their hash; other weights are refused before any training (another
    architecture even before the disc cache is built)."""
    result = _train_from(trained, tmp_path / "a" / "grader.safetensors", "--preset", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    card = (tmp_path / "a" / "grader.md").read_text()
    assert f"Initialised from: weights sha256 `{GraderModel.load(trained).sha256}` (1 epochs" in card
    assert "Initialised from: a random initialisation" in trained.with_suffix(".md").read_text()
    for options, why in ((("--preset", "paper", "--cache", str(tmp_path / "none")), "pick the same preset"), (("--preset", "cpu", "--seed", "5"), "another test split")):
        refused = _train_from(trained, tmp_path / "b" / "grader.safetensors", *options)
        assert refused.returncode == 2 and why in refused.stderr and not (tmp_path / "b" / "grader.safetensors").exists()
    assert not (tmp_path / "none").exists()


def test_resume_refuses_another_configuration(tmp_path: Path) -> None:
    """A checkpoint is only continued with the configuration and split it was trained with."""
    torch.set_num_threads(1)
    train, val = synthetic(20, 1), synthetic(10, 2)
    config = TrainConfig(epochs=1, batch=10, size=(32, 64))
    train_grader(train, val, TINY, config, tmp_path, progress=False)
    with pytest.raises(ValueError, match="another configuration or split"):
        train_grader(train, val, TINY, dataclasses.replace(config, seed=1), tmp_path, resume=True, progress=False)


def test_levels_without_the_models_inputs_are_left_out_of_training() -> None:
    """A level whose used volumes are all absent (the detector missed it) is not a training row."""
    data = synthetic(10, 3)
    data.present[0] = False
    data.present[1, :2] = False
    assert len(usable(data, (0, 1, 2))) == 9
    assert len(usable(data, (0, 1))) == 8


def test_report_draws_a_severe_roc_curve_per_condition(tmp_path: Path) -> None:
    """The test report's ROC figure holds one coloured curve per condition that has severe cases,
    and its AUROCs agree with the report's per-grade values."""
    data = synthetic(60, 4)
    rng = np.random.default_rng(0)
    logits = {c: rng.normal(size=(60, 3)) + 2 * np.eye(3)[np.clip(data.labels[:, i], 0, 2)] for i, c in enumerate(CONDITIONS)}
    report = evaluate_logits(logits, data, {c: 1.0 for c in CONDITIONS}, tmp_path)
    image = np.asarray(Image.open(tmp_path / "roc_severe.png").convert("RGB")).reshape(-1, 3)
    colours = set(PALETTE[: len(CONDITIONS)])
    drawn = {tuple(p) for p in np.unique(image, axis=0)}
    assert colours <= drawn
    assert all(r["class_auroc"]["severe"] > 0.8 for r in report["conditions"].values())
