"""Metrics (models.metrics): AUROC against sklearn and hand-computed values, the Kaggle metric on
a hand-computed example, calibration on synthetic data with known answers, and the figures
written and read back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import log_loss, roc_auc_score

from models.data.pathology import CONDITIONS
from models.metrics import (
    CONDITION_ABBREVIATIONS,
    PALETTE,
    apply_temperature,
    class_aurocs,
    competition_log_loss,
    expected_calibration_error,
    fit_temperature,
    macro_auroc,
    markdown_table,
    reliability_png,
    roc_png,
)


def _draw_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One label per row drawn from that row's probabilities (N, 3)."""
    return (rng.random((len(probs), 1)) > np.cumsum(probs, axis=1)).sum(axis=1)


def _random_case(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (n, 3) and labels drawn from them: an informative, calibrated predictor."""
    probs = rng.dirichlet([0.5, 0.5, 0.5], size=n)
    return _draw_labels(rng, probs), probs


# --- AUROC -----------------------------------------------------------------------------------


def test_macro_auroc_equals_sklearn_ovr_macro() -> None:
    labels, probs = _random_case(np.random.default_rng(0), 500)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert macro_auroc(labels, probs) == pytest.approx(expected, abs=1e-12)


def test_macro_auroc_is_one_for_perfect_and_half_for_random_predictions() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=20_000)
    perfect = np.eye(3)[labels] * 0.8 + 0.2 / 3
    assert macro_auroc(labels, perfect) == 1.0
    assert macro_auroc(labels, rng.dirichlet([1, 1, 1], size=len(labels))) == pytest.approx(0.5, abs=0.02)


def test_missing_labels_are_ignored() -> None:
    rng = np.random.default_rng(2)
    labels, probs = _random_case(rng, 300)
    padded_labels = np.concatenate([labels, np.full(50, -1)])
    padded = np.concatenate([probs, rng.dirichlet([1, 1, 1], size=50)])
    changed = padded.copy()
    changed[-50:] = rng.dirichlet([1, 1, 1], size=50)
    assert macro_auroc(padded_labels, padded) == macro_auroc(padded_labels, changed) == macro_auroc(labels, probs)
    assert class_aurocs(padded_labels, padded) == class_aurocs(padded_labels, changed) == class_aurocs(labels, probs)


def test_class_aurocs_match_a_hand_computed_example() -> None:
    labels = np.array([0, 0, 1, 2, -1])
    probs = np.array([[0.6, 0.3, 0.1], [0.3, 0.4, 0.3], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    # normal_mild: positives 0.6, 0.3 vs negatives 0.5, 0.2 -> 3 of 4 pairs ordered.
    # moderate: positive 0.4 vs negatives 0.3, 0.4 (tie, half), 0.3 -> 2.5 of 3.
    # severe: positive 0.5 vs negatives 0.1, 0.3, 0.1 -> 3 of 3.
    aurocs = class_aurocs(labels, probs)
    assert aurocs == pytest.approx({"normal_mild": 0.75, "moderate": 2.5 / 3, "severe": 1.0})
    assert macro_auroc(labels, probs) == pytest.approx((0.75 + 2.5 / 3 + 1.0) / 3)


def test_absent_grades_are_left_out_of_the_macro_average() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.7, 0.2, 0.1]])
    aurocs = class_aurocs(labels, probs)
    assert math.isnan(aurocs["severe"])
    assert macro_auroc(labels, probs) == pytest.approx((aurocs["normal_mild"] + aurocs["moderate"]) / 2)
    assert math.isnan(macro_auroc(np.array([0, 0, -1]), probs[:3]))


def test_bad_shapes_and_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        macro_auroc(np.array([0, 1]), np.ones((3, 3)) / 3)
    with pytest.raises(ValueError, match="grade indices"):
        macro_auroc(np.array([0, 3]), np.ones((2, 3)) / 3)


# --- Kaggle metric ---------------------------------------------------------------------------


def _kaggle_example() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Three rows: study 1 (two levels) and study 2 (one level); -1 marks missing labels."""
    labels = {
        "spinal_canal_stenosis": np.array([0, 2, 1]),
        "left_neural_foraminal_narrowing": np.array([0, -1, 2]),
        "right_neural_foraminal_narrowing": np.array([1, 0, -1]),
        "left_subarticular_stenosis": np.array([2, 2, 0]),
        "right_subarticular_stenosis": np.array([-1, -1, -1]),
    }
    probs = {
        "spinal_canal_stenosis": np.array([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]]),
        "left_neural_foraminal_narrowing": np.array([[0.6, 0.3, 0.1], [0.01, 0.01, 0.98], [0.2, 0.2, 0.6]]),
        "right_neural_foraminal_narrowing": np.array([[0.3, 0.5, 0.2], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]]),
        # first row does not sum to 1: re-normalised to (0.25, 0.25, 0.5)
        "left_subarticular_stenosis": np.array([[1.0, 1.0, 2.0], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]),
        "right_subarticular_stenosis": np.array([[0.2, 0.2, 0.6]] * 3),
    }
    return labels, probs, np.array([1, 1, 2])


def test_competition_log_loss_matches_a_hand_computed_example() -> None:
    labels, probs, study_ids = _kaggle_example()
    ln = math.log
    # weights 1/2/4 by true grade; loss = -sum(w * ln p_true) / sum(w)
    spinal = -(1 * ln(0.7) + 4 * ln(0.5) + 2 * ln(0.4)) / 7  # 0.70884
    foraminal = -(1 * ln(0.6) + 4 * ln(0.6) + 2 * ln(0.5) + 1 * ln(0.9)) / 8  # 0.50572
    subarticular = -(4 * ln(0.5) + 4 * ln(0.8) + 1 * ln(0.8)) / 9  # 0.43204
    # study 1: severe at L2, P = max(0.1, 0.5), weight 4; study 2: worst moderate, P = 0.1, weight 2
    any_severe = -(4 * ln(0.5) + 2 * ln(1 - 0.1)) / 6  # 0.49722
    result = competition_log_loss(labels, probs, study_ids)
    assert result == pytest.approx({
        "spinal": spinal,
        "foraminal": foraminal,
        "subarticular": subarticular,
        "any_severe_spinal": any_severe,
        "score": (spinal + foraminal + subarticular + any_severe) / 4,
    })
    assert result["score"] == pytest.approx(0.53595, abs=1e-5)


def test_competition_log_loss_drops_missing_labels() -> None:
    labels, probs, study_ids = _kaggle_example()
    changed = {c: p.copy() for c, p in probs.items()}
    changed["left_neural_foraminal_narrowing"][1] = [0.98, 0.01, 0.01]
    changed["right_subarticular_stenosis"][:] = [0.98, 0.01, 0.01]
    assert competition_log_loss(labels, changed, study_ids) == competition_log_loss(labels, probs, study_ids)
    # without study 2's spinal label, study 2 leaves the any-severe term too
    labels["spinal_canal_stenosis"] = np.array([0, 2, -1])
    result = competition_log_loss(labels, probs, study_ids)
    assert result["any_severe_spinal"] == pytest.approx(-math.log(0.5))
    assert result["spinal"] == pytest.approx(-(math.log(0.7) + 4 * math.log(0.5)) / 5)


def test_competition_log_loss_on_random_data_agrees_with_sklearn_per_group() -> None:
    rng = np.random.default_rng(3)
    n = 200
    labels, probs = {}, {}
    for condition in CONDITIONS:
        labels[condition], probs[condition] = _random_case(rng, n)
        labels[condition][rng.random(n) < 0.1] = -1
    result = competition_log_loss(labels, probs, np.repeat(np.arange(n // 5), 5))
    left, right = labels["left_subarticular_stenosis"], labels["right_subarticular_stenosis"]
    y = np.concatenate([left[left >= 0], right[right >= 0]])
    p = np.concatenate([probs["left_subarticular_stenosis"][left >= 0], probs["right_subarticular_stenosis"][right >= 0]])
    assert result["subarticular"] == pytest.approx(log_loss(y, p, sample_weight=np.array([1.0, 2.0, 4.0])[y]))
    assert result["score"] == pytest.approx(np.mean([result[k] for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal")]))


# --- Calibration -----------------------------------------------------------------------------


def test_ece_is_small_for_calibrated_and_large_for_overconfident_predictions() -> None:
    rng = np.random.default_rng(4)
    labels, probs = _random_case(rng, 200_000)
    assert expected_calibration_error(labels, probs) < 0.02
    overconfident = apply_temperature(np.log(probs), 0.25)
    assert expected_calibration_error(labels, overconfident) > 0.15


def test_ece_of_a_hand_computed_example() -> None:
    # one bin: confidence 0.9, accuracy 1/2 -> 0.4; the missing row is ignored
    labels = np.array([0, 1, -1])
    probs = np.array([[0.9, 0.05, 0.05]] * 3)
    assert expected_calibration_error(labels, probs) == pytest.approx(0.4)


def test_temperature_fit_recovers_a_known_temperature_and_lowers_nll() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=4.0, size=(20_000, 3))
    labels = _draw_labels(rng, apply_temperature(logits, 2.0))
    labels_with_missing = np.concatenate([labels, np.full(100, -1)])
    logits_with_missing = np.concatenate([logits, rng.normal(scale=50.0, size=(100, 3))])
    temperature = fit_temperature(logits_with_missing, labels_with_missing)
    assert temperature == pytest.approx(2.0, rel=0.1)
    assert temperature == pytest.approx(fit_temperature(logits, labels))
    before = log_loss(labels, apply_temperature(logits, 1.0))
    after = log_loss(labels, apply_temperature(logits, temperature))
    assert after < before - 0.05


def test_apply_temperature_is_a_softmax_and_rejects_bad_temperatures() -> None:
    logits = np.array([[0.0, math.log(2.0), math.log(5.0)]])
    assert apply_temperature(logits, 1.0) == pytest.approx(np.array([[1 / 8, 2 / 8, 5 / 8]]))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


# --- Figures and tables ----------------------------------------------------------------------


def _colours(path: Path) -> set[tuple[int, ...]]:
    """The distinct RGB colours of a PNG (read back from disk)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in colour) for colour in np.unique(pixels, axis=0)}


def test_roc_png_draws_one_coloured_curve_per_condition(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    curves = {}
    for condition in CONDITIONS:
        labels, probs = _random_case(rng, 400)
        labels[:10] = -1
        curves[CONDITION_ABBREVIATIONS[condition]] = (labels, probs[:, 2])
    path = tmp_path / "roc.png"
    roc_png(path, curves, "Severe vs rest")
    with Image.open(path) as image:
        assert image.size == (640, 640)
    colours = _colours(path)
    assert len(colours) > 20
    assert set(PALETTE[: len(CONDITIONS)]) <= colours


def test_reliability_png_draws_bars_and_diagonal(tmp_path: Path) -> None:
    labels, probs = _random_case(np.random.default_rng(7), 2000)
    path = tmp_path / "reliability.png"
    reliability_png(path, labels, probs, "Spinal canal stenosis", size=480)
    with Image.open(path) as image:
        assert image.size == (480, 480)
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels != 255).any(axis=2).mean() > 0.05
    assert PALETTE[0] in _colours(path) and len(_colours(path)) > 20


def test_markdown_table_lays_out_table_2() -> None:
    header = ["Model", *CONDITION_ABBREVIATIONS.values()]
    rows: list[list[str | float | None]] = [
        ["Park et al. 2025", 0.961, 0.886, 0.875, 0.904, 0.909],
        ["Sagittal only", 0.95, None, math.nan, 0.9004, 1],
    ]
    assert markdown_table(header, rows).splitlines() == [
        "| Model            |   SCS | L-NFN | R-NFN |  L-SS |  R-SS |",
        "| :--------------- | ----: | ----: | ----: | ----: | ----: |",
        "| Park et al. 2025 | 0.961 | 0.886 | 0.875 | 0.904 | 0.909 |",
        "| Sagittal only    | 0.950 |     - |     - | 0.900 |     1 |",
    ]
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        markdown_table(header, [["too short"]])
