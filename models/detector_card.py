"""``spine-node train-detector``: train, save fp16 weights, evaluate on held-out phantoms, and
write the model card beside the weights (what it was trained on, how, and what it scored)."""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch

from models.data.phantom import generate
from models.detect import Detector, weights_sha256
from models.evaluate_detector import evaluate
from models.train_detector import TrainConfig, phantom_series, rsna_series, save_weights, train

__all__ = ["train_and_card"]


def train_and_card(out: Path, workdir: Path, studies: int, seed: int, rsna: Path | None, steps: int, batch: int, eval_studies: int, eval_seed: int) -> Path:
    """Train the detector, write ``out`` and ``out`` with suffix .md (the model card); returns ``out``."""
    if eval_seed == seed:
        raise ValueError("the evaluation seed must differ from the training seed")
    started = time.monotonic()
    series = phantom_series(workdir / f"phantom-seed{seed}", studies, seed) if studies else []
    rsna_count = 0
    if rsna:
        extra = rsna_series(rsna)
        rsna_count = len(extra)
        series += extra
    config = TrainConfig(steps=steps, batch=batch, seed=seed)
    net = train(series, config)
    facts = {
        "trained_on": f"{studies} phantom studies (seed {seed}, every other one domain-randomised), {len(series)} sagittal series" + (f", {rsna_count} RSNA-format series" if rsna else ""),
        "steps": str(steps), "batch": str(batch), "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "train_seconds": str(round(time.monotonic() - started)), "torch": torch.__version__,
    }
    save_weights(net, out, facts)
    scores: dict[str, object] = {}
    if eval_studies:
        dirs = generate(workdir / f"held-out-seed{eval_seed}", eval_studies, eval_seed, progress=False)
        scores = evaluate(dirs, Detector.load(out))
    _write_card(out, facts, scores, eval_studies, eval_seed)
    return out


def _write_card(out: Path, facts: dict[str, str], scores: dict[str, object], eval_studies: int, eval_seed: int) -> None:
    """The model card (Markdown) beside the weights."""
    size_kib = out.stat().st_size / 1024
    card = f"""# Disc detector (IVD centres, disc planes, levels L1-L2..L5-S1)

Research use only, not for diagnostic use: trained on synthetic phantoms, not on patients.

- Weights: `{out.name}`, fp16 safetensors, {size_kib:.0f} KiB, sha256 `{weights_sha256(out)}`
- Network: `models.detector_net.DiscNet`, a 2.5D U-Net on three adjacent sagittal slices at
  2.5 mm per pixel (128 x 128), one heatmap per level plus the disc normal and depth.
- Trained on: {facts['trained_on']}.
- Training: {facts['steps']} AdamW steps of {facts['batch']} slices, one-cycle cosine schedule, on
  {platform.machine()} CPU in {facts['train_seconds']} s, torch {facts['torch']}, {facts['created']}.
- Produced by: `spine-node train-detector` (see README); the same command reproduces it, up to
  floating-point differences between machines and thread counts.

## Scores on held-out phantoms

{eval_studies} studies of seed {eval_seed} (never a training seed), default acquisition options,
measured by `spine-node evaluate-detector`:

```json
{json.dumps(scores, indent=1)}
```

Goals (issue 4): centre error median under 2 mm and 95th percentile under 4 mm, all five levels
right in every study. Scores on real MRI are unknown: phantoms lack many things real spines
have (see models/data/anatomy.py), so train on real data (`--rsna`) before trusting it there.
"""
    out.with_suffix(".md").write_text(card)
