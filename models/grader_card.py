"""``spine-node train`` and ``spine-node evaluate`` for the grader: data -> cache -> split ->
training -> temperatures -> fp16 weights -> test report -> model card beside the weights.

Presets: ``paper`` is the paper's configuration (ResNet18 of width 64, 512-d embeddings, 9 slices
of 112x224, AdamW 1e-6 -> 1e-5, 200 epochs) and the default. ``cpu`` is the same architecture
made small enough to train on two CPU cores in minutes (width 16, so 128-d embeddings; slices
resized to 56x112; a learning rate 100 times higher with a shorter warm-up and restart period,
because a few epochs from scratch at 1e-5 learn nothing); the shipped weights use it and their
card says so.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data.discs import SLOTS, DiscSet, build_cache, load_cache, split_studies
from models.detect import DEFAULT_WEIGHTS, Detector
from models.extract import CROPS_VERSION
from models.evaluate_grader import evaluate_logits, fit_temperatures, table2, table3
from models.grade import GraderModel, WeightsMismatch
from models.grader import Grader, GraderConfig
from models.train_grader import TrainConfig, predict, save_grader, train_grader, usable

__all__ = ["PRESETS", "split_of", "train_and_card"]

PRESETS: dict[str, tuple[GraderConfig, TrainConfig]] = {
    "paper": (GraderConfig(), TrainConfig()),
    "cpu": (GraderConfig(width=16), TrainConfig(epochs=20, batch=16, lr_max=1e-3, lr_min=1e-5, warmup=1, restart=20, size=(56, 112))),
}
SLOT_NAMES = {role: i for i, role in enumerate(SLOTS)}


def split_of(data: DiscSet, seed: int) -> tuple[list[str], list[str], list[str]]:
    """The patient-level split of a cache (deterministic for a seed)."""
    ids = sorted(set(data.study_ids))
    per_study = np.stack([data.labels[np.asarray(data.study_ids) == s][:5] for s in ids])
    return split_studies(ids, per_study, seed=seed)


def train_and_card(data_dir: Path, cache: Path, workdir: Path, out: Path, preset: str, overrides: dict[str, Any], model_overrides: dict[str, Any], device: str = "cpu", resume: bool = False, workers: int = 2, command: str = "", init: Path | None = None) -> Path:
    """Train a grader on an RSNA-layout folder and write ``out`` (weights), its card, test
    report, figures and training history beside it; checkpoints go to ``workdir``. ``init``:
    weights to start from (same architecture and test split) instead of a random initialisation."""
    model_config, train_config = PRESETS[preset]
    model_config = dataclasses.replace(model_config, **model_overrides)
    train_config = dataclasses.replace(train_config, **overrides)
    started = time.monotonic()
    start = _initial_weights(init, model_config) if init else None  # refused before a long cache build
    build_cache(data_dir, cache, Detector.load(DEFAULT_WEIGHTS), workers=workers)
    data = load_cache(cache)
    train_ids, val_ids, test_ids = split_of(data, train_config.seed)
    train, val, test = (usable(data.select(ids), train_config.slots) for ids in (train_ids, val_ids, test_ids))
    del data
    dev = torch.device(device)
    test_sha = hashlib.sha256(",".join(sorted(test_ids)).encode()).hexdigest()
    if start and start.metadata.get("test_ids_sha256") != test_sha:
        raise WeightsMismatch(f"{init} was trained with another test split: starting from it would score studies it may have learnt from")
    trained = train_grader(train, val, model_config, train_config, workdir / out.stem, device, resume=resume, init=(start.sha256, start.model.state_dict()) if start else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.stem}-history.json").write_text(json.dumps(trained.history, indent=1))
    temperatures = fit_temperatures(predict(trained.model, val, train_config, dev), val, train_config.conditions)
    facts = {
        "trained_on": f"{len(train_ids)} studies ({len(train.levels)} discs) of {_provenance(data_dir)}; validation {len(val_ids)}, test {len(test_ids)} studies (patient-level stratified split, seed {train_config.seed})",
        "preset": preset, "train_config": json.dumps(asdict(train_config)), "temperatures": json.dumps(temperatures),
        "selected_epoch": str(trained.selected_epoch), "train_seconds": str(round(time.monotonic() - started)), "device": dev.type,
        "test_ids_sha256": test_sha, "command": command,
        "initialised_from": f"weights sha256 `{start.sha256}` ({start.train_config.epochs} epochs, selected epoch {start.metadata.get('selected_epoch')}, {start.metadata.get('command') or 'command on their card in the git history'})" if start else "a random initialisation",
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "torch": torch.__version__,
        "crops_version": str(CROPS_VERSION),
    }
    save_grader(trained.model, out, facts)
    shipped = GraderModel.load(out, device, verify=False)  # measure the fp16 weights as written
    report = evaluate_logits(predict(shipped.model, test, train_config, dev), test, temperatures, out.parent / f"{out.stem}-figures", train_config.conditions)
    (out.parent / f"{out.stem}-report.json").write_text(json.dumps(report, indent=1))
    _write_card(out, facts, report, trained.history, command, model_config, train_config)
    return out


def _initial_weights(path: Path, model: GraderConfig) -> GraderModel:
    """Weights to continue from: their card must vouch for them and their architecture must be
    this run's (their test split is checked once the run's split is known)."""
    start = GraderModel.load(path)
    if start.model.config != model:
        raise WeightsMismatch(f"{path} is a {start.model.config}; this run trains a {model}: pick the same preset and options")
    return start


def _provenance(data_dir: Path) -> str:
    """What the data are: the phantom's RSNA export (its seed from a truth.json) or an RSNA layout."""
    truth = data_dir.parent / "study_0000" / "truth.json"
    if truth.exists():
        seed = json.loads(truth.read_text()).get("seed")
        return f"synthetic phantoms (`spine-node phantom --seed {seed} --rsna`, RSNA layout at `{data_dir}`)"
    return f"the RSNA 2024 layout at `{data_dir}`"


def _write_card(out: Path, facts: dict[str, str], report: dict[str, Any], history: list[dict[str, Any]], command: str, model: GraderConfig, train: TrainConfig) -> None:
    """The grader's model card (Markdown) beside its weights."""
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    params = Grader(model).parameter_count()
    card = f"""# Stenosis grader (five conditions x three grades per disc level)

**Research use only. Not for diagnostic use.** Validate it on your own data before trusting a
grade: the scores below are those of its own test split only.

- Weights: `{out.name}`, fp16 safetensors, {out.stat().st_size / 2**20:.1f} MiB, sha256 `{sha}`
  (the node refuses weights whose hash is not on their card)
- Architecture: the paper's (models/grader.py): ResNet18 slice encoder of width {model.width}
  ({8 * model.width}-d slice embeddings), slice/view/level embeddings, CLS token,
  {model.layers} transformer layers with {model.heads} heads, six linear heads; {params:,} parameters;
  aggregation `{model.aggregate}`.
- Preset `{facts['preset']}`: slices resized to {train.size[0]}x{train.size[1]}, input slots {list(train.slots)}
  (0 T1 sagittal, 1 T2/STIR sagittal, 2 T2 axial), {train.epochs} epochs of batch {train.batch},
  AdamW {train.lr_min:g} -> {train.lr_max:g}, warm-up {train.warmup}, restarts every {train.restart} epochs, seed {train.seed}.
- Trained on: {facts['trained_on']}.
- Crops: version {facts['crops_version']} of `models/extract.py` (its docstring says how they are cut);
  the node refuses these weights beside an extraction of another version.
- Initialised from: {facts['initialised_from']}.
- Selected epoch: {facts['selected_epoch']} (best mean validation macro AUROC over 10 consecutive epochs);
  trained in {facts['train_seconds']} s on {facts['device'].upper()}, torch {facts['torch']}, {facts['created']}.
- Temperatures (fitted on validation, applied at inference): {facts['temperatures']}
- Command: `{command}`

## Test split ({report['studies']} studies, {report['discs']} discs)

Macro one-vs-rest AUROC per condition (Table 2 layout):

{table2({"this model": report})}

Class-specific AUROC (Table 3 layout):

{table3(report)}

Calibration (expected calibration error, top label) before and after temperature scaling:
{', '.join(f"{c} {r['ece_raw']} -> {r['ece_calibrated']}" for c, r in report['conditions'].items())}.

Competition weighted log loss: `{json.dumps(report.get('competition_log_loss'))}`.

Figures: `{out.stem}-figures/` (ROC of the severe class, reliability diagrams). Training history:
`{out.stem}-history.json` ({len(history)} epochs). Full report: `{out.stem}-report.json`.
"""
    out.with_suffix(".md").write_text(card)


def evaluate_weights(cache: Path, weights: list[Path]) -> tuple[dict[str, Any], str]:
    """Reports and the paper's tables for graders trained from one cache, each on its own test split."""
    data = load_cache(cache)
    reports: dict[str, Any] = {}
    for path in weights:
        grader = GraderModel.load(path)
        _, _, test_ids = split_of(data, grader.train_config.seed)
        if hashlib.sha256(",".join(sorted(test_ids)).encode()).hexdigest() != grader.metadata.get("test_ids_sha256"):
            raise ValueError(f"{path.name} was not trained from this cache as it is now: its test split would differ")
        test = usable(data.select(test_ids), grader.train_config.slots)
        name = f"{path.stem} ({'+'.join(k for k, v in SLOT_NAMES.items() if v in grader.train_config.slots)}, {grader.model.config.aggregate})"
        reports[name] = evaluate_logits(predict(grader.model, test, grader.train_config, grader.device), test, grader.temperatures, None, grader.train_config.conditions)
    tables = "Table 2: macro AUROC per condition\n\n" + table2(reports)
    for name, report in reports.items():
        tables += f"\n\nTable 3: class-specific AUROC, {name}\n\n" + table3(report)
    return reports, tables + "\n"
