"""``spine-node train-detector`` end to end on a tiny budget: weights, model card, RSNA input.

Only the plumbing is checked here (a few steps cannot learn anything); what the shipped weights
score is checked in test_detect.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from models.data.phantom import generate
from models.detect import Detector


def train(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "node.cli", "train-detector", *map(str, args)], capture_output=True, text=True, timeout=600)


def test_training_writes_fp16_weights_and_a_model_card(tmp_path: Path) -> None:
    """Weights load back as a Detector, are fp16, carry what they were trained on, and the card
    beside them says it and holds the held-out scores."""
    out = tmp_path / "detector.safetensors"
    result = train("--out", out, "--workdir", tmp_path / "work", "--studies", "2", "--seed", "3", "--steps", "2", "--batch", "2", "--eval-studies", "1", "--eval-seed", "4")
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert meta["trained_on"].startswith("2 phantom studies (seed 3")
    card = out.with_suffix(".md").read_text()
    assert "2 phantom studies (seed 3" in card and "1 studies of seed 4" in card
    scores = json.loads(card.split("```json\n")[1].split("```")[0])
    assert scores["studies"] == 1
    assert Detector.load(out).sha256 in card

    evaluated = subprocess.run([sys.executable, "-m", "node.cli", "evaluate-detector", "--detector", str(out), "--studies", "1", "--seed", "8", "--twins", "0",
                                "--workdir", str(tmp_path / "eval")], capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["seed"] == 8 and report["studies"] == 1 and "centre_error_mm" in report


def test_training_refuses_to_evaluate_on_its_own_seed(tmp_path: Path) -> None:
    """Held-out means held out: the same seed for training and evaluation is an error."""
    result = train("--out", tmp_path / "w.safetensors", "--workdir", tmp_path, "--studies", "1", "--seed", "5", "--eval-seed", "5", "--steps", "1")
    assert result.returncode != 0 and "must differ" in result.stderr


def test_training_from_an_rsna_layout(tmp_path: Path) -> None:
    """RSNA-format coordinates (here the phantom's own RSNA export) are enough to train on."""
    generate(tmp_path / "data", 1, 6, rsna=True, progress=False, omit="STIR_SAG")
    out = tmp_path / "rsna.safetensors"
    result = train("--out", out, "--workdir", tmp_path / "work", "--studies", "0", "--rsna", tmp_path / "data" / "rsna", "--steps", "2", "--batch", "2", "--eval-studies", "0")
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), "pt") as f:
        assert "1 RSNA-format series" in f.metadata()["trained_on"]
