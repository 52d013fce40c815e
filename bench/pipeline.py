"""Time from a study's files to its grades: volumes, detection, extraction and grading, per study.

Run it from the repository root::

    .venv/bin/python -m bench.pipeline                 # or: make bench-pipeline
    .venv/bin/python -m bench.pipeline --studies 1 --runs 1 --json bench/out/pipeline.json

The load is phantom studies (default acquisition: sagittal T1, T2, STIR and an axial T2),
rendered once into ``bench/out/pipeline``. Each study is timed through three stages of the
pipeline the worker runs, on the CPU with the threads torch is given (``--threads``, 2 by
default, the machine this project targets):

- ``volumes``: ``load_series`` of every series (read, decode, stack, affine);
- ``detect``: the detector on every sagittal series, and the fusion;
- ``extract``: every 9x112x224 crop (sagittal and axial);
- ``grade``: the shipped grader on every level in one batch (fp32), and, for the goal of the
  grader issue, the paper's configuration (ResNet18 of width 64, random weights) on the same
  5 levels x 3 volumes x 9 slices of 112x224 (``grade (paper)``, not part of ``total``).

The peer, timed in the same run on the same files, is reading them with pydicom and decoding
their pixels (``dcmread`` + ``pixel_array``), the least any reader of the study must do; the
ratio says how many such reads the whole pipeline costs. The goals: under 2 s per study for
volumes, detection and extraction (issue 4), and under 3 s for grading a study with the
paper's configuration (issue 5), on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pydicom
import torch
from rich.console import Console
from rich.table import Table

from bench.grader import paper_sized
from models.data.phantom import generate
from models.detect import DEFAULT_WEIGHTS, Detector, fuse
from models.extract import SAGITTAL_ROLES, extract
from models.grade import DEFAULT_GRADER, GraderModel
from models.evaluate_detector import load_study

GOAL_S = 2.0
GOAL_GRADE_S = 3.0


def _decode_only(study: Path) -> float:
    """Seconds to read and decode every DICOM file of a study with pydicom (the peer)."""
    started = time.perf_counter()
    for f in sorted(study.rglob("*.dcm")):
        pydicom.dcmread(f).pixel_array
    return time.perf_counter() - started


def _pipeline(study: Path, detector: Detector, grader: GraderModel, paper: GraderModel) -> dict[str, float]:
    """Seconds of each stage for one study."""
    t0 = time.perf_counter()
    _, volumes = load_study(study)
    t1 = time.perf_counter()
    detections = [detector.detect(v) for r in SAGITTAL_ROLES for v in volumes.get(r, ())]
    discs, _ = fuse(detections)
    t2 = time.perf_counter()
    crops, _ = extract(volumes, discs)
    t3 = time.perf_counter()
    if len(crops) < len(discs):
        raise RuntimeError(f"{study.name}: only {len(crops)} crops for {len(discs)} discs")
    grader.grade(crops, list(discs))
    t4 = time.perf_counter()
    paper.grade(crops, list(discs))
    t5 = time.perf_counter()
    return {"volumes": t1 - t0, "detect": t2 - t1, "extract": t3 - t2, "grade": t4 - t3, "total": t4 - t0, "grade_paper": t5 - t4}


def main() -> int:
    """Render (once), time and print the table; exit 1 if the goal is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per study (median kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path("bench/out/pipeline")
    studies = sorted(out.glob("study_*"))[: args.studies]
    if len(studies) < args.studies:
        studies = generate(out, args.studies, seed=4040, progress=False)
    detector = Detector.load(DEFAULT_WEIGHTS)
    grader = GraderModel.load(DEFAULT_GRADER)
    paper = paper_sized(grader)
    _pipeline(studies[0], detector, grader, paper)  # warm-up: imports, allocator, file cache
    rows: list[dict[str, Any]] = []
    for study in studies:
        stages = [_pipeline(study, detector, grader, paper) for _ in range(args.runs)]
        peer = statistics.median(_decode_only(study) for _ in range(args.runs))
        median = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
        rows.append({"study": study.name, **{k: round(v, 3) for k, v in median.items()}, "decode_only": round(peer, 3), "vs_decode": round(median["total"] / peer, 2)})
    columns = ("volumes", "detect", "extract", "grade", "total", "decode_only", "grade_paper")
    table = Table("study", "volumes s", "detect s", "extract s", "grade s", "total s", "pydicom decode s", "total / decode", "grade (paper) s",
                  title=f"pipeline per study, {args.threads} threads, fp32 (goals: volumes+detect+extract < {GOAL_S} s, grade (paper) < {GOAL_GRADE_S} s)")
    for r in rows:
        table.add_row(r["study"].removeprefix("study_"), *(f"{r[k]:.3f}" for k in columns[:6]), f"{r['vs_decode']:.2f}", f"{r['grade_paper']:.3f}")
    Console(width=160).print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "goal_s": GOAL_S, "goal_grade_s": GOAL_GRADE_S, "results": rows}, indent=1))
    return 0 if all(r["total"] - r["grade"] < GOAL_S and r["grade_paper"] < GOAL_GRADE_S for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
