"""Grading throughput: studies per second when whole studies (5 levels x 3 volumes x 9 slices)
are graded together, through the node's own call (``GraderModel.probabilities``).

Run it from the repository root::

    .venv/bin/python -m bench.grader                     # or: make bench-grader (CUDA when present)
    .venv/bin/python -m bench.grader --device cpu --batches 1,2 --runs 2 --json bench/out/grader.json

The model is the paper's configuration (ResNet18 of width 64 on 112x224 slices; random
weights, since speed does not depend on them), or the shipped weights with ``--shipped``. The
inputs are random volumes of the right shape, so no study needs rendering. Each batch size
(in studies) is timed in bf16 autocast, as the node grades on a GPU, and in fp32, the peer in
the same run: their ratio is what bf16 buys. On the CPU, bf16 is skipped (the node grades in
fp32 there) and ``--threads`` sets torch's threads. The sweep stops at the first batch that
does not fit in the device's memory. The grader issue asks for batch 1 and the best batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from models.data.pathology import LEVELS
from models.extract import CROP_SHAPE
from models.grade import DEFAULT_GRADER, GraderModel
from models.grader import Grader, GraderConfig


def paper_sized(grader: GraderModel) -> GraderModel:
    """``grader`` with the paper's configuration in place of its network (random weights: speed
    does not depend on them), reading all three volumes at 112x224."""
    model = Grader(GraderConfig()).to(grader.device).eval()
    return dataclasses.replace(grader, model=model, train_config=dataclasses.replace(grader.train_config, size=(112, 224), slots=(0, 1, 2)))


def _studies_per_s(grader: GraderModel, studies: int, runs: int, seed: int = 0) -> float:
    """Studies per second for ``runs`` calls on ``studies`` random studies at once, after a warm-up."""
    rng = np.random.default_rng(seed)
    discs = studies * len(LEVELS)
    volumes = rng.random((discs, 3, *CROP_SHAPE), dtype=np.float32).astype(np.float16)
    present = np.ones((discs, 3), bool)
    levels = list(range(len(LEVELS))) * studies
    grader.probabilities(volumes, present, levels)  # warm-up: kernels, allocator
    sync = torch.cuda.synchronize if grader.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(runs):
        grader.probabilities(volumes, present, levels)
    sync()
    return studies * runs / (time.perf_counter() - started)


def _sweep(grader: GraderModel, batches: list[int], runs: int) -> list[dict[str, Any]]:
    """One row per batch size that fits: studies/s in fp32 and, on CUDA, in bf16."""
    precisions = {"fp32": dataclasses.replace(grader, bf16=False)}
    if grader.device.type == "cuda":
        precisions["bf16"] = dataclasses.replace(grader, bf16=True)
    rows = []
    for studies in batches:
        try:
            row: dict[str, Any] = {"studies": studies, **{p: round(_studies_per_s(g, studies, runs), 3) for p, g in precisions.items()}}
        except torch.OutOfMemoryError:
            break
        if "bf16" in row:
            row["bf16_vs_fp32"] = round(row["bf16"] / row["fp32"], 2)
        rows.append(row)
    return rows


def main() -> int:
    """Time the sweep and print the table (best batch marked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64", help="batch sizes in studies, comma separated")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per batch size and precision")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--shipped", action="store_true", help="the shipped weights instead of the paper's configuration")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grader = GraderModel.load(DEFAULT_GRADER, args.device)
    if not args.shipped:
        grader = paper_sized(grader)
    rows = _sweep(grader, [int(b) for b in args.batches.split(",")], args.runs)
    if not rows:
        print(f"not even a batch of {args.batches.split(',')[0]} studies fits on {args.device}")
        return 1
    key = "bf16" if grader.device.type == "cuda" else "fp32"
    best = max(rows, key=lambda r: r[key])["studies"]
    name = "shipped" if args.shipped else "paper's configuration"
    table = Table("studies per batch", "fp32 studies/s", *(("bf16 studies/s", "bf16 / fp32") if key == "bf16" else ()),
                  title=f"grading throughput, {name}, {args.device}" + (f", {args.threads} threads" if key == "fp32" else ""))
    for r in rows:
        table.add_row(f"{r['studies']}{' (best)' if r['studies'] == best else ''}", f"{r['fp32']:.2f}", *((f"{r['bf16']:.2f}", f"{r['bf16_vs_fp32']:.2f}") if key == "bf16" else ()))
    Console(width=120).print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "model": name, "best_batch": best, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
