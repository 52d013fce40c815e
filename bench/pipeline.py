"""Time from a study's files to its disc volumes: volumes + detection + extraction, per study.

Run it from the repository root::

    .venv/bin/python -m bench.pipeline                 # or: make bench-pipeline
    .venv/bin/python -m bench.pipeline --studies 1 --runs 1 --json bench/out/pipeline.json

The load is phantom studies (default acquisition: sagittal T1, T2, STIR and an axial T2),
rendered once into ``bench/out/pipeline``. Each study is timed through three stages of the
pipeline the worker runs, on the CPU with the threads torch is given (``--threads``, 2 by
default, the machine this project targets):

- ``volumes``: ``load_series`` of every series (read, decode, stack, affine);
- ``detect``: the detector on every sagittal series, and the fusion;
- ``extract``: every 9x112x224 crop (sagittal and axial).

The peer, timed in the same run on the same files, is reading them with pydicom and decoding
their pixels (``dcmread`` + ``pixel_array``), the least any reader of the study must do; the
ratio says how many such reads the whole pipeline costs. The goal (issue 4) is under 2 s per
study for all three stages on 2 cores.
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

from models.data.phantom import generate
from models.detect import DEFAULT_WEIGHTS, Detector, fuse
from models.extract import SAGITTAL_ROLES, extract
from models.evaluate_detector import load_study

GOAL_S = 2.0


def _decode_only(study: Path) -> float:
    """Seconds to read and decode every DICOM file of a study with pydicom (the peer)."""
    started = time.perf_counter()
    for f in sorted(study.rglob("*.dcm")):
        pydicom.dcmread(f).pixel_array
    return time.perf_counter() - started


def _pipeline(study: Path, detector: Detector) -> dict[str, float]:
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
    return {"volumes": t1 - t0, "detect": t2 - t1, "extract": t3 - t2, "total": t3 - t0}


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
    _pipeline(studies[0], detector)  # warm-up: imports, allocator, file cache
    rows: list[dict[str, Any]] = []
    for study in studies:
        stages = [_pipeline(study, detector) for _ in range(args.runs)]
        peer = statistics.median(_decode_only(study) for _ in range(args.runs))
        median = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
        rows.append({"study": study.name, **{k: round(v, 3) for k, v in median.items()}, "decode_only": round(peer, 3), "vs_decode": round(median["total"] / peer, 2)})
    table = Table("study", "volumes s", "detect s", "extract s", "total s", "pydicom decode s", "total / decode", title=f"pipeline per study, {args.threads} threads (goal: total < {GOAL_S} s)")
    for r in rows:
        table.add_row(r["study"].removeprefix("study_"), *(f"{r[k]:.3f}" for k in ("volumes", "detect", "extract", "total", "decode_only")), f"{r['vs_decode']:.2f}")
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "goal_s": GOAL_S, "results": rows}, indent=1))
    return 0 if all(r["total"] < GOAL_S for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
