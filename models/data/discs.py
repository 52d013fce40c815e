"""The grader's data: disc volumes of an RSNA 2024 layout, cached once per study, and their splits.

Extraction (detection, fusion, cropping: ``models.analysis``) costs seconds per study, training
reads every disc many times, so ``build_cache`` runs it once and writes ``<cache>/<study_id>.npz``:

- ``volumes`` float16 (5, 3, 9, 112, 224): levels L1-L2..L5-S1 x slots (0 sagittal T1,
  1 sagittal T2/STIR, 2 axial T2) x the crop (slices, rows, cols) in [0, 1]; zeros where absent;
- ``present`` bool (5, 3): which slots hold a crop;
- ``labels`` int8 (5, 5): level x condition (order ``CONDITIONS``), grade index into ``GRADES``
  (0 normal/mild, 1 moderate, 2 severe), -1 where train.csv is empty or lacks the study;
- ``study_id`` and ``warnings`` (JSON list of the pipeline's warnings).

Roles come from ``train_series_descriptions.csv``: "Sagittal T1" -> T1_SAG, "Sagittal T2/STIR" ->
T2_SAG (T2 and STIR alike), "Axial T2" -> T2_AX; every series of a description goes under its
role, in the CSV's row order. When several crops could fill a slot (a T2 and a STIR series both
as T2_SAG, or several stacks of one series), the first series' first stack wins: it is also the
one that leads the disc fusion. Existing files are skipped, so a build resumes; each file is
written to a temporary name and renamed. Studies that yield no crop at all are listed with the
reason in ``<cache>/failed.json`` and retried by the next build. ``<cache>/crops.json`` records
the extraction's ``CROPS_VERSION``: a cache of other crops is refused, never mixed or trained on.

``split_studies`` splits studies (patients, in RSNA) into train/validation/test in the
proportions of the paper's 1552/194/194, stratified on ten per-study labels (any moderate and any
severe level, per condition) with Sechidis et al.'s iterative stratification (iterstrat).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit
from rich.console import Console
from rich.progress import Progress

from models.analysis import analyse_volumes
from models.data.pathology import CONDITIONS, GRADES, LEVELS
from models.data.rsna_reader import DESCRIPTIONS_CSV, IMAGES_DIR, _id, _read_csv, natural_key
from models.detect import Detector
from models.extract import CROP_SHAPE, CROPS_VERSION, disc_slots
from models.volumes import SeriesVolume, VolumeError, load_series

LOGGER = logging.getLogger(__name__)
__all__ = ["SLOTS", "DiscSet", "StaleCache", "build_cache", "load_cache", "read_labels", "split_studies"]

TRAIN_CSV = "train.csv"
FAILED_JSON = "failed.json"
STAMP_JSON = "crops.json"
SLOTS: tuple[str, ...] = ("T1_SAG", "T2_SAG", "T2_AX")
ROLE_OF_DESCRIPTION = {"Sagittal T1": "T1_SAG", "Sagittal T2/STIR": "T2_SAG", "Axial T2": "T2_AX"}
PAPER_SIZES = (1552, 194, 194)


@dataclass(frozen=True)
class _Job:
    """One study to extract: its series (id, role, folder), labels (5, 5) and destination."""

    study_id: str
    series: tuple[tuple[str, str, Path], ...]
    labels: np.ndarray
    path: Path


@dataclass(frozen=True)
class _Outcome:
    """A study's result: the written file, or the reason nothing was written."""

    study_id: str
    path: Path | None
    reason: str = ""


@dataclass(frozen=True)
class DiscSet:
    """Cached discs as stacked arrays, one row per (study, level)."""

    volumes: np.ndarray  # float16 (N, 3, 9, 112, 224), slots as SLOTS
    present: np.ndarray  # bool (N, 3)
    labels: np.ndarray  # int8 (N, 5): grade index per condition, -1 missing
    levels: np.ndarray  # int64 (N,): index into LEVELS
    study_ids: np.ndarray  # str (N,)

    def __post_init__(self) -> None:
        """Check that every array has one row per disc and the documented shape."""
        n = len(self.study_ids)
        expected = {"volumes": (n, len(SLOTS), *CROP_SHAPE), "present": (n, len(SLOTS)), "labels": (n, len(CONDITIONS)), "levels": (n,)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}; expected {shape}")

    def __len__(self) -> int:
        """Number of discs."""
        return len(self.study_ids)

    def select(self, study_ids: Sequence[str]) -> DiscSet:
        """The rows of these studies, in the set's order; ValueError names ids that are absent."""
        wanted = np.asarray([str(s) for s in study_ids])
        absent = sorted(set(wanted) - set(self.study_ids))
        if absent:
            raise ValueError(f"study_ids not in the set: {absent[:5]}{' ...' if len(absent) > 5 else ''}")
        return self.select_rows(np.flatnonzero(np.isin(self.study_ids, wanted)))

    def select_rows(self, rows: np.ndarray) -> DiscSet:
        """These rows (indices), in the given order."""
        return replace(self, volumes=self.volumes[rows], present=self.present[rows], labels=self.labels[rows], levels=self.levels[rows], study_ids=self.study_ids[rows])


def read_labels(root: Path) -> dict[str, np.ndarray]:
    """Grades of train.csv per study: int8 (5 levels, 5 conditions), -1 where a cell is empty."""
    columns = {(lv, c): f"{c}_{lv.lower().replace('-', '_')}" for lv in LEVELS for c in CONDITIONS}
    grades = {"": -1, **{g.replace("_", "/"): i for i, g in enumerate(GRADES)}}
    out = {}
    for line, row in enumerate(_read_csv(Path(root) / TRAIN_CSV, ("study_id", *columns.values())), start=2):
        labels = np.full((len(LEVELS), len(CONDITIONS)), -1, np.int8)
        for (lv, c), column in columns.items():
            text = row[column].lower()
            if text not in grades:
                raise ValueError(f"{TRAIN_CSV} line {line}, {column}: unknown grade {row[column]!r}")
            labels[LEVELS.index(lv), CONDITIONS.index(c)] = grades[text]
        out[_id(row["study_id"])] = labels
    return out


def _jobs(root: Path, cache: Path) -> list[_Job]:
    """Every study of the layout (natural order of study ids) with its series and labels."""
    labels = read_labels(root)
    series: dict[str, list[tuple[str, str, Path]]] = {}
    for row in _read_csv(root / DESCRIPTIONS_CSV, ("study_id", "series_id", "series_description")):
        study_id, series_id = _id(row["study_id"]), _id(row["series_id"])
        role = ROLE_OF_DESCRIPTION.get(row["series_description"])
        if role is None:
            LOGGER.warning("study %s series %s: description not used by the grader", study_id, series_id, extra={"study_id": study_id})
            continue
        series.setdefault(study_id, []).append((series_id, role, root / IMAGES_DIR / study_id / series_id))
    missing = np.full((len(LEVELS), len(CONDITIONS)), -1, np.int8)
    return [
        _Job(study_id, tuple(series[study_id]), labels.get(study_id, missing), cache / f"{study_id}.npz")
        for study_id in sorted(series, key=natural_key)
    ]


def _volumes(job: _Job) -> tuple[dict[str, list[SeriesVolume]], list[str]]:
    """Volumes of a study's series by role, and why series or stacks were left out."""
    volumes: dict[str, list[SeriesVolume]] = {}
    warnings = []
    for series_id, role, folder in job.series:
        try:
            vols, skipped = load_series(sorted(folder.glob("*.dcm"), key=lambda p: natural_key(p.name)))
        except Exception as exc:  # noqa: BLE001 - an unreadable series is left out, the study goes on
            warnings.append(f"{role} series {series_id} left out ({type(exc).__name__}: {exc})")
            continue
        volumes.setdefault(role, []).extend(vols)
        warnings.extend(f"{role} series {series_id}: {s}" for s in skipped)
    if not volumes:
        raise VolumeError(f"no series forms a volume: {'; '.join(warnings)}")
    return volumes, warnings


def _arrays(job: _Job, detector: Detector) -> dict[str, np.ndarray]:
    """The npz arrays of one study: the pipeline once, each slot filled by its first crop."""
    volumes, warnings = _volumes(job)
    analysis = analyse_volumes(volumes, detector)
    stacked, present = disc_slots(analysis.crops, LEVELS)
    if not present.any():
        raise VolumeError(f"no disc volume extracted: {'; '.join(warnings + analysis.warnings)}")
    return {
        "volumes": stacked.astype(np.float16), "present": present, "labels": job.labels,
        "study_id": np.array(job.study_id), "warnings": np.array(json.dumps(warnings + analysis.warnings)),
    }


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an npz atomically: a temporary file in the same folder, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs confuse **kwds with allow_pickle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build(job: _Job, detector: Detector) -> _Outcome:
    """Extract and write one study; any failure becomes the outcome's reason."""
    try:
        _write(job.path, _arrays(job, detector))
    except Exception as exc:  # noqa: BLE001 - one study's failure must not end the build
        return _Outcome(job.study_id, None, f"{type(exc).__name__}: {exc}")
    return _Outcome(job.study_id, job.path)


def _single_thread() -> None:
    """Worker start-up: one torch thread per process, the pool gives the parallelism."""
    torch.set_num_threads(1)


def _outcomes(todo: Sequence[_Job], detector: Detector, workers: int) -> Iterator[_Outcome]:
    """Outcomes as studies finish: in this process, or in a pool of spawned processes."""
    if workers == 1:
        yield from (_build(j, detector) for j in todo)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_single_thread)
    try:
        yield from (f.result() for f in as_completed([pool.submit(_build, j, detector) for j in todo]))
    finally:
        pool.shutdown(cancel_futures=True)


class StaleCache(ValueError):
    """A disc cache written by another version of the extraction."""


def _check_stamp(cache: Path) -> None:
    """Refuse a cache whose crops are not this extraction's (unstamped caches predate version 2)."""
    stamp = cache / STAMP_JSON
    found = json.loads(stamp.read_text())["crops_version"] if stamp.exists() else 1
    if found != CROPS_VERSION:
        raise StaleCache(f"{cache} holds crops of version {found}; this extraction makes version {CROPS_VERSION}: remove it or pass another --cache")


def build_cache(root: Path, cache: Path, detector: Detector, workers: int = 2, progress: bool = True) -> list[Path]:
    """Cache the disc volumes of every study of an RSNA layout; returns the npz of every cached study.

    Studies already cached are skipped; failures are logged (study id only), listed in
    ``<cache>/failed.json`` ({study_id: reason}) and left out of the result. With ``workers`` > 1
    studies run in spawned processes, each with its own copy of ``detector`` and one torch thread.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    root, cache = Path(root), Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    if not any(cache.glob("*.npz")):
        (cache / STAMP_JSON).write_text(json.dumps({"crops_version": CROPS_VERSION}))
    _check_stamp(cache)
    jobs = _jobs(root, cache)
    todo = [j for j in jobs if not j.path.exists()]
    failed: dict[str, str] = {}
    with Progress(disable=not progress, console=Console(stderr=True)) as bar:
        task = bar.add_task("caching disc volumes", total=len(todo))
        for outcome in _outcomes(todo, detector, workers):
            if outcome.path is None:
                failed[outcome.study_id] = outcome.reason
                LOGGER.warning("study %s skipped: %s", outcome.study_id, outcome.reason.split(":")[0], extra={"study_id": outcome.study_id})
            bar.update(task, advance=1)
    (cache / FAILED_JSON).write_text(json.dumps(failed, indent=1))
    return [j.path for j in jobs if j.path.exists()]


def load_cache(cache: Path, study_ids: Sequence[str] | None = None) -> DiscSet:
    """All levels of the cached studies (all of them, in natural order, when ``study_ids`` is None)."""
    cache = Path(cache)
    _check_stamp(cache)
    paths = [cache / f"{s}.npz" for s in study_ids] if study_ids is not None else sorted(cache.glob("*.npz"), key=lambda p: natural_key(p.stem))
    n = len(paths) * len(LEVELS)
    volumes = np.zeros((n, len(SLOTS), *CROP_SHAPE), np.float16)
    present = np.zeros((n, len(SLOTS)), bool)
    labels = np.zeros((n, len(CONDITIONS)), np.int8)
    ids = []
    for i, path in enumerate(paths):
        rows = slice(i * len(LEVELS), (i + 1) * len(LEVELS))
        with np.load(path) as f:
            volumes[rows], present[rows], labels[rows] = f["volumes"], f["present"], f["labels"]
            ids.extend([str(f["study_id"])] * len(LEVELS))
    levels = np.tile(np.arange(len(LEVELS), dtype=np.int64), len(paths))
    return DiscSet(volumes, present, labels, levels, np.array(ids, dtype=str))


def _scaled(n: int, sizes: Sequence[int]) -> list[int]:
    """``n`` split in the proportions of ``sizes`` (largest remainders), every part at least 1."""
    raw = np.asarray(sizes, float) * n / sum(sizes)
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero(counts == 0):
        counts[i] += 1
        counts[np.argmax(counts)] -= 1
    return [int(c) for c in counts]


def _stratified(indices: np.ndarray, y: np.ndarray, n_second: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into two parts, the second of exactly ``n_second``, stratified on ``y``.

    iterstrat favours stratification over sizes; studies with the fewest positive labels are
    then moved, so that the sizes are exact and rare labels stay where they were put."""
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_second, random_state=seed)
    first, second = (list(indices[part]) for part in next(splitter.split(np.zeros(len(indices)), y[indices])))
    source, target = (second, first) if len(second) > n_second else (first, second)
    for _ in range(abs(len(second) - n_second)):
        study = min(source, key=lambda i: int(y[i].sum()))
        source.remove(study)
        target.append(study)
    return np.sort(first), np.sort(second)


def split_studies(study_ids: Sequence[str], labels: np.ndarray, sizes: Sequence[int] = PAPER_SIZES, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Train, validation and test study ids in the proportions of ``sizes``, multi-label stratified.

    ``labels`` is (studies, 5 levels, 5 conditions) of grade indices (-1 missing); each study is
    stratified on any moderate and any severe level per condition (10 binary labels). Needs at
    least 3 studies; every part is non-empty and the result depends only on the inputs and seed.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(study_ids), len(LEVELS), len(CONDITIONS)):
        raise ValueError(f"labels has shape {labels.shape}; expected ({len(study_ids)}, {len(LEVELS)}, {len(CONDITIONS)})")
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"sizes must be three positive numbers, got {tuple(sizes)}")
    if len(study_ids) < 3:
        raise ValueError(f"study_ids: at least 3 studies are needed to split, got {len(study_ids)}")
    y = np.concatenate([(labels == 1).any(axis=1), (labels == 2).any(axis=1)], axis=1)
    _, n_val, n_test = _scaled(len(study_ids), sizes)
    train, rest = _stratified(np.arange(len(study_ids)), y, n_val + n_test, seed)
    val, test = _stratified(rest, y, n_test, seed)
    ids = [str(s) for s in study_ids]
    return [ids[i] for i in train], [ids[i] for i in val], [ids[i] for i in test]
