"""The grader's disc cache and splits: phantom studies in the RSNA layout, the shipped detector.

Labels are checked against train.csv (mapped here independently of the module) and against the
phantom's truth; resuming, a missing axial series, an empty train.csv cell, an unusable study and
the stratified split are each pinned.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.data.discs import StaleCache, build_cache, load_cache, split_studies
from models.data.pathology import CONDITIONS, GRADES, LEVELS
from models.data.phantom import generate
from models.data.rsna import numeric_id
from models.detect import Detector
from models.extract import CROPS_VERSION

SEED = 31
TEXT_GRADE = {"Normal/Mild": 0, "Moderate": 1, "Severe": 2, "": -1}
EMPTIED = "left_subarticular_stenosis_l1_l2"
BROKEN_STUDY = "123456789"


def column(condition: str, level: str) -> str:
    """train.csv column of a condition at a level."""
    return f"{condition}_{level.lower().replace('-', '_')}"


def read_train_csv(root: Path) -> dict[str, dict[str, str]]:
    """train.csv rows by study id."""
    with (root / "train.csv").open(newline="") as f:
        return {row["study_id"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def detector() -> Detector:
    """The shipped detector."""
    return Detector.load()


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, detector: Detector) -> tuple[Path, Path, list[Path]]:
    """Three complete phantom studies in the RSNA layout, cached by two worker processes."""
    base = tmp_path_factory.mktemp("discs")
    generate(base, 3, SEED, rsna=True, progress=False)
    return base, base / "cache", build_cache(base / "rsna", base / "cache", detector, workers=2, progress=False)


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory, detector: Detector) -> tuple[Path, Path, list[Path]]:
    """A study without its axial series and with one empty train.csv cell, plus a study without images."""
    base = tmp_path_factory.mktemp("discs_partial")
    generate(base, 1, SEED + 1, rsna=True, progress=False, omit="T2_AX")
    root = base / "rsna"
    with (root / "train.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    rows[1][rows[0].index(EMPTIED)] = ""
    with (root / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with (root / "train_series_descriptions.csv").open("a", newline="") as f:
        csv.writer(f).writerow([BROKEN_STUDY, "987654321", "Sagittal T1"])
    return base, base / "cache", build_cache(root, base / "cache", detector, workers=1, progress=False)


def test_one_npz_per_study_with_documented_arrays(full: tuple[Path, Path, list[Path]]) -> None:
    """Shapes and dtypes as documented; a complete study fills every slot with a crop in [0, 1]."""
    base, cache, paths = full
    ids = {str(numeric_id(json.loads((base / f"study_{i:04d}" / "truth.json").read_text())["study_instance_uid"])) for i in range(3)}
    assert sorted(p.name for p in paths) == sorted(f"{s}.npz" for s in ids)
    assert json.loads((cache / "failed.json").read_text()) == {}
    for path in paths:
        with np.load(path) as f:
            assert f["volumes"].dtype == np.float16 and f["volumes"].shape == (5, 3, 9, 112, 224)
            assert f["present"].dtype == bool and f["present"].shape == (5, 3)
            assert f["labels"].dtype == np.int8 and f["labels"].shape == (5, 5)
            assert str(f["study_id"]) == path.stem
            assert isinstance(json.loads(str(f["warnings"])), list)
            assert f["present"].all()
            volumes = f["volumes"].astype(np.float32)
            assert volumes.min() >= 0.0 and volumes.max() <= 1.0
            assert (volumes.reshape(15, -1).max(axis=1) > 0.5).all()


def test_labels_match_train_csv_and_truth(full: tuple[Path, Path, list[Path]]) -> None:
    """Grade indices equal train.csv's text grades and the phantom's recorded grades."""
    base, cache, _ = full
    rows = read_train_csv(base / "rsna")
    for i in range(3):
        truth = json.loads((base / f"study_{i:04d}" / "truth.json").read_text())
        study_id = str(numeric_id(truth["study_instance_uid"]))
        with np.load(cache / f"{study_id}.npz") as f:
            labels = f["labels"]
        for li, level in enumerate(LEVELS):
            for ci, condition in enumerate(CONDITIONS):
                assert labels[li, ci] == TEXT_GRADE[rows[study_id][column(condition, level)]]
                assert labels[li, ci] == GRADES.index(truth["levels"][level]["conditions"][condition]["grade"])


def test_build_resumes_and_rebuilds_a_deleted_study(full: tuple[Path, Path, list[Path]], detector: Detector) -> None:
    """Cached studies are not touched again; a deleted one is extracted anew, to the same arrays."""
    base, cache, paths = full
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    assert build_cache(base / "rsna", cache, detector, workers=1, progress=False) == paths
    assert {p: p.stat().st_mtime_ns for p in paths} == mtimes
    with np.load(paths[0]) as f:
        before = {k: f[k] for k in f.files}
    paths[0].unlink()
    assert build_cache(base / "rsna", cache, detector, workers=1, progress=False) == paths
    assert {p: p.stat().st_mtime_ns for p in paths[1:]} == {p: mtimes[p] for p in paths[1:]}
    with np.load(paths[0]) as f:
        assert (f["present"] == before["present"]).all() and (f["labels"] == before["labels"]).all()
        # float16 crops may differ by one unit in the last place between thread counts
        np.testing.assert_allclose(f["volumes"].astype(np.float32), before["volumes"].astype(np.float32), atol=2e-3)
    assert not list(cache.glob("*.tmp"))


def test_missing_axial_series_and_empty_cell(partial: tuple[Path, Path, list[Path]]) -> None:
    """No T2_AX: the axial slot is absent and zero; an empty train.csv cell becomes -1."""
    _, _, paths = partial
    assert len(paths) == 1
    with np.load(paths[0]) as f:
        assert f["present"][:, :2].all() and not f["present"][:, 2].any()
        assert not f["volumes"][:, 2].any()
        labels = f["labels"]
        assert any("T2_AX" in w for w in json.loads(str(f["warnings"])))
    assert labels[LEVELS.index("L1-L2"), CONDITIONS.index("left_subarticular_stenosis")] == -1
    assert (np.delete(labels.ravel(), LEVELS.index("L1-L2") * 5 + CONDITIONS.index("left_subarticular_stenosis")) >= 0).all()


def test_a_study_without_volumes_is_skipped_and_reported(partial: tuple[Path, Path, list[Path]], detector: Detector, caplog: pytest.LogCaptureFixture) -> None:
    """A study whose only series has no images is left out, listed in failed.json, retried and logged by id."""
    base, cache, paths = partial
    assert BROKEN_STUDY not in {p.stem for p in paths}
    with caplog.at_level(logging.WARNING, logger="models.data.discs"):
        assert build_cache(base / "rsna", cache, detector, workers=1, progress=False) == paths
    assert not (cache / f"{BROKEN_STUDY}.npz").exists()
    failed = json.loads((cache / "failed.json").read_text())
    assert list(failed) == [BROKEN_STUDY] and "VolumeError" in failed[BROKEN_STUDY]
    assert [r.getMessage() for r in caplog.records] == [f"study {BROKEN_STUDY} skipped: VolumeError"]


def test_a_cache_of_other_crops_is_refused(full: tuple[Path, Path, list[Path]], detector: Detector, tmp_path: Path) -> None:
    """A cache records its crops version; one without the stamp (older) or with another is refused
    by both the build and the loader, so stale crops are never mixed with new ones or trained on."""
    base, cache, paths = full
    assert json.loads((cache / "crops.json").read_text()) == {"crops_version": CROPS_VERSION}
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(paths[0], stale / paths[0].name)
    for stamp in (None, {"crops_version": CROPS_VERSION - 1}):
        if stamp:
            (stale / "crops.json").write_text(json.dumps(stamp))
        with pytest.raises(StaleCache, match=f"version {CROPS_VERSION - 1}; this extraction makes version {CROPS_VERSION}"):
            build_cache(base / "rsna", stale, detector, workers=1, progress=False)
        with pytest.raises(StaleCache):
            load_cache(stale)
    assert sorted(p.name for p in stale.iterdir()) == sorted([paths[0].name, "crops.json"]), "nothing was written"


def test_load_cache_stacks_every_level_and_selects(full: tuple[Path, Path, list[Path]]) -> None:
    """Five rows per study, levels 0..4 in order, arrays equal to the npz; select keeps one study."""
    _, cache, paths = full
    discs = load_cache(cache)
    assert len(discs) == 15
    assert discs.volumes.shape == (15, 3, 9, 112, 224) and discs.volumes.dtype == np.float16
    assert discs.levels.dtype == np.int64 and discs.levels.tolist() == [0, 1, 2, 3, 4] * 3
    assert discs.present.shape == (15, 3) and discs.labels.shape == (15, 5) and discs.labels.dtype == np.int8
    study = paths[1].stem
    one = discs.select([study])
    assert len(one) == 5 and set(one.study_ids) == {study}
    with np.load(paths[1]) as f:
        assert (one.volumes == f["volumes"]).all() and (one.labels == f["labels"]).all()
    assert load_cache(cache, [study]).study_ids.tolist() == [study] * 5
    with pytest.raises(ValueError, match="not in the set"):
        discs.select(["1"])


def synthetic_labels(n: int, seed: int) -> np.ndarray:
    """Grades (n, 5, 5) with rare severe conditions, as in RSNA."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.002, 0.08, (1, 1, 5))
    draw = rng.random((n, 5, 5))
    return np.where(draw < p, 2, np.where(draw < 3 * p, 1, 0)).astype(np.int8)


def test_split_is_patient_level_proportional_stratified_and_deterministic() -> None:
    """Disjoint splits of every id, 160/20/20 of 200, each label in proportion, fixed by the seed.

    Every label sits in every split where its proportional share there is at least one study
    (10 positives of 200); no stratification can do better for rarer ones."""
    ids = [f"s{i}" for i in range(200)]
    labels = synthetic_labels(200, 0)
    train, val, test = split_studies(ids, labels, seed=3)
    assert sorted(train + val + test) == sorted(ids)
    assert [len(train), len(val), len(test)] == [160, 20, 20]
    y = np.concatenate([(labels == 1).any(axis=1), (labels == 2).any(axis=1)], axis=1)
    index = {s: i for i, s in enumerate(ids)}
    counts = np.array([y[[index[s] for s in part]].sum(axis=0) for part in (train, val, test)])
    assert np.abs(counts - np.outer([0.8, 0.1, 0.1], y.sum(axis=0))).max() <= 2
    assert (counts[:, y.sum(axis=0) >= 10] > 0).all()
    assert split_studies(ids, labels, seed=3) == (train, val, test)
    assert split_studies(ids, labels, seed=4) != (train, val, test)


def test_split_of_few_studies_leaves_no_part_empty() -> None:
    """Three studies give one per part; fewer cannot be split."""
    parts = split_studies(["a", "b", "c"], synthetic_labels(3, 1))
    assert sorted(len(p) for p in parts) == [1, 1, 1]
    for n in range(4, 30):
        assert all(split_studies([str(i) for i in range(n)], synthetic_labels(n, n), seed=n))
    with pytest.raises(ValueError, match="study_ids"):
        split_studies(["a", "b"], synthetic_labels(2, 1))
