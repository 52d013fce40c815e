"""Grading with shipped weights: load once, check the hash against the card, grade a study's
discs in one batch with calibrated probabilities (fp32 on the CPU, bf16 autocast on CUDA).

The weights file carries its architecture, training configuration and per-condition
temperatures as safetensors metadata; its model card (same name, ``.md``) carries its SHA-256.
Weights whose hash is not on their card are refused: a file swapped or corrupted on disk must
not grade patients' studies under another model's name. Weights trained on crops of another
``CROPS_VERSION`` are refused too: they would grade inputs unlike the ones they learnt from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from models.data.pathology import LEVELS
from models.extract import CROPS_VERSION, Crop, disc_slots
from models.grader import GRADES, Grader, GraderConfig, prepare_inputs
from models.train_grader import TrainConfig

__all__ = ["DEFAULT_GRADER", "GraderModel", "WeightsMismatch"]

DEFAULT_GRADER = Path(__file__).parent / "weights" / "grader.safetensors"


class WeightsMismatch(RuntimeError):
    """Weights whose hash is not the one their model card records, trained on other crops, or
    (to start training from) of another architecture or test split."""


@dataclass
class GraderModel:
    """A loaded grader with its configuration, temperatures and weights hash."""

    model: Grader
    train_config: TrainConfig
    temperatures: dict[str, float]
    sha256: str
    device: torch.device
    metadata: dict[str, str]
    bf16: bool = False  # bf16 autocast, as in training's validation; on by default on CUDA

    @classmethod
    def load(cls, path: Path = DEFAULT_GRADER, device: str = "cpu", verify: bool = True) -> GraderModel:
        """Load fp16 weights written by ``spine-node train``; refuse them if the card disagrees."""
        if not path.exists():
            raise FileNotFoundError(f"grader weights not found at {path}; run `spine-node train`")
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        card = path.with_suffix(".md")
        if verify and (not card.exists() or sha not in card.read_text()):
            raise WeightsMismatch(f"{path.name}: its SHA-256 {sha[:12]}... is not on its model card {card.name}")
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            trained_on = int(meta.get("crops_version", "1"))
            if trained_on != CROPS_VERSION:
                raise WeightsMismatch(f"{path.name} was trained on crops of version {trained_on}; this extraction makes version {CROPS_VERSION}: retrain it")
            state = {k: f.get_tensor(k) for k in f.keys()}
        model = Grader(GraderConfig(**json.loads(meta["grader_config"])))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        config = json.loads(meta["train_config"])
        train = TrainConfig(**{**config, "size": tuple(config["size"]), "slots": tuple(config["slots"]), "conditions": tuple(config["conditions"])})
        dev = torch.device(device)
        return cls(model.to(dev).eval(), train, json.loads(meta.get("temperatures", "{}")), sha, dev, meta, bf16=dev.type == "cuda")

    @torch.inference_mode()
    def probabilities(self, volumes: np.ndarray, present: np.ndarray, levels: Sequence[int]) -> dict[str, np.ndarray]:
        """Calibrated probabilities per condition, (discs, 3), for slot volumes (discs, 3, S, H, W)."""
        inputs = prepare_inputs(volumes, present, np.asarray(levels), self.train_config.slots, self.train_config.size, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(**inputs)
        return {c: torch.softmax(out[c].float() / self.temperatures.get(c, 1.0), dim=1).cpu().numpy() for c in self.train_config.conditions}

    def grade(self, crops: Sequence[Crop], levels: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per level and condition: the grade and its probabilities, all levels in one batch;
        levels without a volume of the slots the model reads are left out."""
        volumes, present = disc_slots(crops, levels)
        graded = np.asarray(present[:, list(self.train_config.slots)].any(axis=1), dtype=bool)
        levels = [lv for lv, ok in zip(levels, graded.tolist()) if ok]
        if not levels:
            return {}
        volumes, present = volumes[graded], present[graded]
        probs = self.probabilities(volumes, present, [LEVELS.index(lv) for lv in levels])
        return {
            lv: {c: {"grade": GRADES[int(np.argmax(p[i]))], "probabilities": {g: round(float(p[i, j]), 4) for j, g in enumerate(GRADES)}} for c, p in probs.items()}
            for i, lv in enumerate(levels)
        }

