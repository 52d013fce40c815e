"""Evaluation metrics of the grader: AUROC, the RSNA 2024 Kaggle metric, calibration and figures.

Conventions: ``labels`` are grade indices into ``GRADES`` (0 normal_mild, 1 moderate, 2 severe)
with -1 for a missing label, which every function ignores; ``probs`` are (N, 3) rows in
``GRADES`` order and ``logits`` the matching (N, 3) pre-softmax scores.

- AUROC (the paper's Tables 2 and 3) is one-vs-rest per grade; the macro value averages the
  grades that have both positive and negative labelled rows (nan if none), which with all three
  grades present is sklearn's ``roc_auc_score(multi_class="ovr", average="macro")``.
- The Kaggle metric follows the public "rsna-lumbar-metric" notebook: sample weights 1/2/4 by
  grade, left and right pooled per condition, plus an any-severe-spinal term per study.
- ECE is the top-label expected calibration error over equal-width confidence bins (Guo et al.
  2017); temperature scaling fits one scalar T on validation logits.
- Figures are PNGs drawn with Pillow: ROC curves like the paper's Fig. 5 and a reliability
  diagram.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import log_loss, roc_auc_score, roc_curve

from models.data.pathology import CONDITIONS, GRADES

__all__ = [
    "CONDITION_ABBREVIATIONS",
    "GRADE_WEIGHTS",
    "MISSING",
    "PALETTE",
    "apply_temperature",
    "class_aurocs",
    "competition_log_loss",
    "expected_calibration_error",
    "fit_temperature",
    "macro_auroc",
    "markdown_table",
    "reliability_png",
    "roc_png",
]

MISSING = -1
GRADE_WEIGHTS = np.array([1.0, 2.0, 4.0])  # Kaggle sample weight of normal_mild, moderate, severe
CONDITION_ABBREVIATIONS: dict[str, str] = {
    "spinal_canal_stenosis": "SCS",
    "left_neural_foraminal_narrowing": "L-NFN",
    "right_neural_foraminal_narrowing": "R-NFN",
    "left_subarticular_stenosis": "L-SS",
    "right_subarticular_stenosis": "R-SS",
}
_KAGGLE_GROUPS = ("spinal", "foraminal", "subarticular")
_SPINAL = "spinal_canal_stenosis"

FONT = ImageFont.load_default(size=14)
TITLE_FONT = ImageFont.load_default(size=17)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


def _labelled(labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) and per-row ``values`` (N, 3) restricted to rows with a label (not -1)."""
    labels = np.asarray(labels)
    values = np.asarray(values, dtype=float)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {labels.shape}")
    if values.shape != (len(labels), len(GRADES)):
        raise ValueError(f"probabilities/logits must have shape ({len(labels)}, {len(GRADES)}), got {values.shape}")
    if np.any((labels < MISSING) | (labels >= len(GRADES))):
        raise ValueError(f"labels must be grade indices 0..{len(GRADES) - 1} or {MISSING}")
    keep = labels != MISSING
    return labels[keep].astype(int), values[keep]


def _binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of ``scores`` for boolean ``positive`` (N,); nan unless both classes occur."""
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, scores))


def class_aurocs(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """One-vs-rest AUROC of each grade (the paper's Table 3), keyed by grade name.

    labels (N,), -1 ignored; probs (N, 3). A grade with no positive or no negative labelled row
    gets nan.
    """
    y, p = _labelled(labels, probs)
    return {grade: _binary_auroc(y == k, p[:, k]) for k, grade in enumerate(GRADES)}


def macro_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC (the paper's Table 2): the mean of ``class_aurocs`` over the
    grades that are defined (both positives and negatives present); nan if none is."""
    defined = [v for v in class_aurocs(labels, probs).values() if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _normalised(probs: np.ndarray, name: str) -> np.ndarray:
    """Rows of ``probs`` (N, 3) scaled to sum to 1 (as the Kaggle metric's log loss did)."""
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return probs / probs.sum(axis=1, keepdims=True)


def _kaggle_group(condition: str) -> str:
    """The Kaggle metric's group of a condition: spinal, foraminal or subarticular."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    return next(group for group in _KAGGLE_GROUPS if group in condition)


def _any_severe_loss(labels: np.ndarray, probs: np.ndarray, study_ids: np.ndarray) -> float:
    """Binary log loss of max-over-levels P(severe) against "any level severe", per study.

    labels (N,) spinal canal grades, -1 not scored; probs (N, 3); study_ids (N,). Each study is
    weighted by the largest grade weight of its labelled levels (the public metric's
    ``groupby('study_id')['sample_weight'].max()``): 4 if any severe, 2 if the worst is
    moderate, 1 otherwise. nan without labelled rows.
    """
    y, p = _labelled(labels, probs)
    if len(y) == 0:
        return math.nan
    p = _normalised(p, "probs['spinal_canal_stenosis']")
    _, study = np.unique(study_ids[np.asarray(labels) != MISSING], return_inverse=True)
    n = int(study.max()) + 1
    target, weight, predicted = np.zeros(n), np.zeros(n), np.zeros(n)
    np.maximum.at(target, study, (y == 2).astype(float))
    np.maximum.at(weight, study, GRADE_WEIGHTS[y])
    np.maximum.at(predicted, study, p[:, 2])
    return float(log_loss(target, predicted, sample_weight=weight, labels=[0, 1]))


def competition_log_loss(
    labels: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray], study_ids: np.ndarray
) -> dict[str, float]:
    """The RSNA 2024 Kaggle metric (lower is better) and its four terms.

    labels[condition] (N,) grade indices, -1 not scored; probs[condition] (N, 3); study_ids (N,):
    row i of every condition is the same (study, level). Terms: 'spinal', 'foraminal' and
    'subarticular' are multiclass log losses with sample weights 1/2/4 by true grade (left and
    right pooled, probability rows re-normalised to sum 1); 'any_severe_spinal' is described in
    ``_any_severe_loss``; 'score' is the mean of the four (any_severe_scalar 1.0). A term with no
    labelled row is nan, and then so is the score.
    """
    study_ids = np.asarray(study_ids)
    if labels.keys() != probs.keys():
        raise ValueError("labels and probs must have the same conditions")
    empty = (np.zeros(0, dtype=int), np.zeros((0, len(GRADES))))
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {group: [empty] for group in _KAGGLE_GROUPS}
    for condition in labels:
        if len(labels[condition]) != len(study_ids):
            raise ValueError(f"labels[{condition!r}] and study_ids differ in length")
        y, p = _labelled(labels[condition], probs[condition])
        pooled[_kaggle_group(condition)].append((y, _normalised(p, f"probs[{condition!r}]")))
    terms: dict[str, float] = {}
    for group, parts in pooled.items():
        y = np.concatenate([part[0] for part in parts])
        p = np.concatenate([part[1] for part in parts])
        weighted = log_loss(y, p, sample_weight=GRADE_WEIGHTS[y], labels=[0, 1, 2]) if len(y) else math.nan
        terms[group] = float(weighted)
    terms["any_severe_spinal"] = (
        _any_severe_loss(labels[_SPINAL], probs[_SPINAL], study_ids) if _SPINAL in labels else math.nan
    )
    terms["score"] = float(np.mean(list(terms.values())))
    return terms


def _bin_stats(labels: np.ndarray, probs: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width top-label confidence bin ((k/bins, (k+1)/bins], the first one closed):
    labelled row count, mean confidence and accuracy (nan for empty bins), each (bins,)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y, p = _labelled(labels, probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(float)
    filled = count > 0

    def mean(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(index, weights=values, minlength=bins)
        return np.divide(sums, count, out=np.full(bins, math.nan), where=filled)

    return count, mean(confidence), mean(correct)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (rows in bin / N) times
    |accuracy - mean confidence| (Guo et al. 2017). labels (N,), -1 ignored; probs (N, 3);
    nan without labelled rows."""
    count, confidence, accuracy = _bin_stats(labels, probs, bins)
    if count.sum() == 0:
        return math.nan
    filled = count > 0
    return float(np.sum(count[filled] * np.abs(accuracy[filled] - confidence[filled])) / count.sum())


def _mean_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under softmax(logits / T), logits (N, C)."""
    log_probs = log_softmax(logits / temperature, axis=1)
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The scalar T > 0 minimising the mean NLL of softmax(logits / T) on labelled rows.

    logits (N, 3), labels (N,), -1 ignored. The NLL is convex in 1/T, so a bounded Brent search
    over log T in [log 0.01, log 100] finds the optimum.
    """
    y, z = _labelled(labels, logits)
    if len(y) == 0:
        raise ValueError("labels has no labelled rows to fit a temperature on")
    result = minimize_scalar(
        lambda log_t: _mean_nll(z, y, math.exp(log_t)),
        bounds=(math.log(1e-2), math.log(1e2)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return math.exp(float(result.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities softmax(logits / T) over the last axis, e.g. (N, 3) -> (N, 3)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")
    return np.asarray(softmax(np.asarray(logits, dtype=float) / temperature, axis=-1))


@dataclass(frozen=True)
class _Frame:
    """Pixel box of a unit-square plot; ``xy`` maps data (x right, y up) to pixels."""

    left: int
    top: int
    right: int
    bottom: int

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return self.left + x * (self.right - self.left), self.bottom - y * (self.bottom - self.top)


def _canvas(size: int, title: str, xlabel: str, ylabel: str) -> tuple[Image.Image, ImageDraw.ImageDraw, _Frame]:
    """A white ``size`` x ``size`` image with title, grid, ticks 0..1 and axis labels drawn."""
    if size < 320:
        raise ValueError(f"size must be >= 320 pixels, got {size}")
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image, "RGBA")
    frame = _Frame(left=80, top=56, right=size - 24, bottom=size - 64)
    draw.text((size / 2, 26), title, fill="black", font=TITLE_FONT, anchor="mm")
    for tick in np.linspace(0, 1, 6):
        x, y = frame.xy(tick, tick)
        draw.line([(x, frame.top), (x, frame.bottom)], fill=(228, 228, 228))
        draw.line([(frame.left, y), (frame.right, y)], fill=(228, 228, 228))
        draw.line([(x, frame.bottom), (x, frame.bottom + 5)], fill="black")
        draw.line([(frame.left - 5, y), (frame.left, y)], fill="black")
        draw.text((x, frame.bottom + 8), f"{tick:.1f}", fill="black", font=FONT, anchor="mt")
        draw.text((frame.left - 8, y), f"{tick:.1f}", fill="black", font=FONT, anchor="rm")
    draw.rectangle([frame.left, frame.top, frame.right, frame.bottom], outline="black")
    draw.text(((frame.left + frame.right) / 2, size - 20), xlabel, fill="black", font=FONT, anchor="mm")
    label = Image.new("L", (int(draw.textlength(ylabel, font=FONT)) + 4, 20), 0)
    ImageDraw.Draw(label).text((2, 10), ylabel, fill=255, font=FONT, anchor="lm")
    label = label.rotate(90, expand=True)
    image.paste((0, 0, 0), (16, (frame.top + frame.bottom - label.height) // 2), label)
    return image, draw, frame


def _dashed_diagonal(draw: ImageDraw.ImageDraw, frame: _Frame, dash: float = 0.02) -> None:
    """The y = x line, dashed grey."""
    for start in np.arange(0, 1, 2 * dash):
        end = min(start + dash, 1.0)
        draw.line([frame.xy(start, start), frame.xy(end, end)], fill=(110, 110, 110), width=2)


def _legend(draw: ImageDraw.ImageDraw, entries: Sequence[tuple[str, tuple[int, ...]]], corner: tuple[float, float], anchor: str) -> None:
    """A boxed legend of (text, colour) line swatches; ``corner`` is its bottom-right ("br") or
    top-left ("tl") pixel."""
    row, swatch = 20, 26
    width = 16 + swatch + max(int(draw.textlength(text, font=FONT)) for text, _ in entries)
    height = 8 + row * len(entries)
    left, top = (corner[0] - width, corner[1] - height) if anchor == "br" else corner
    draw.rectangle([left, top, left + width, top + height], fill=(255, 255, 255, 230), outline=(150, 150, 150))
    for i, (text, colour) in enumerate(entries):
        y = top + 4 + row * i + row / 2
        draw.line([(left + 6, y), (left + 6 + swatch, y)], fill=colour, width=4)
        draw.text((left + 12 + swatch, y), text, fill="black", font=FONT, anchor="lm")


def _format(value: str | float | None, digits: int) -> str:
    """A table cell: floats with ``digits`` decimals, None and nan as "-", others as str."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def roc_png(
    path: Path | str,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    positive: int = 2,
    size: int = 640,
) -> None:
    """Write ROC curves of one grade (default severe), one per entry, like the paper's Fig. 5.

    curves maps a name (e.g. a condition) to (labels (N,) grade indices, -1 ignored; scores (N,)
    the predicted probability of grade ``positive``). The legend gives each curve's AUROC ("-"
    and no curve when the labels lack positives or negatives).
    """
    image, draw, frame = _canvas(size, title, "False positive rate (1 - specificity)", "True positive rate (sensitivity)")
    _dashed_diagonal(draw, frame)
    entries: list[tuple[str, tuple[int, ...]]] = []
    for i, (name, (labels, scores)) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        y = np.asarray(labels)
        keep = y != MISSING
        is_positive, s = y[keep] == positive, np.asarray(scores, dtype=float)[keep]
        auroc = _binary_auroc(is_positive, s)
        if not math.isnan(auroc):
            fpr, tpr, _ = roc_curve(is_positive, s)
            draw.line([frame.xy(f, t) for f, t in zip(fpr, tpr)], fill=colour, width=3, joint="curve")
        entries.append((f"{name} (AUROC {_format(auroc, 3)})", colour))
    if entries:
        _legend(draw, entries, (frame.right - 8, frame.bottom - 8), "br")
    image.save(path, format="PNG")


def reliability_png(
    path: Path | str,
    labels: np.ndarray,
    probs: np.ndarray,
    title: str,
    bins: int = 10,
    size: int = 640,
) -> None:
    """Write a reliability diagram: per equal-width confidence bin, the accuracy of the top-label
    prediction as a bar, the gap to the bin's mean confidence shaded red, and the diagonal.

    labels (N,), -1 ignored; probs (N, 3). The title gets the ECE over the same ``bins``.
    """
    count, confidence, accuracy = _bin_stats(labels, probs, bins)
    ece = expected_calibration_error(labels, probs, bins)
    image, draw, frame = _canvas(size, f"{title} (ECE {_format(ece, 3)})", "Confidence (top-label probability)", "Accuracy")
    for k in np.flatnonzero(count > 0):
        x0, x1 = k / bins, (k + 1) / bins
        left, acc_y = frame.xy(x0, accuracy[k])
        right, bottom = frame.xy(x1, 0.0)
        draw.rectangle([left, acc_y, right, bottom], fill=PALETTE[0], outline=(20, 60, 110))
        conf_y = frame.xy(x0, confidence[k])[1]
        draw.rectangle([left, min(acc_y, conf_y), right, max(acc_y, conf_y)], fill=(214, 39, 40, 110), outline=(214, 39, 40))
    _dashed_diagonal(draw, frame)
    entries = [("Accuracy", PALETTE[0]), ("Gap to mean confidence", (214, 39, 40)), ("Perfect calibration", (110, 110, 110))]
    _legend(draw, entries, (frame.left + 8, frame.top + 8), "tl")
    image.save(path, format="PNG")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str | float | None]], digits: int = 3) -> str:
    """A Markdown table laid out like the paper's Tables 2 and 3: floats with ``digits``
    decimals, None and nan as "-", the first column left-aligned and the others right-aligned."""
    cells = [list(header)]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"rows[{i}] has {len(row)} cells, header has {len(header)}")
        cells.append([_format(value, digits) for value in row])
    widths = [max(3, *(len(line[j]) for line in cells)) for j in range(len(header))]

    def line(values: Sequence[str]) -> str:
        padded = [v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(values, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = [(":" + "-" * (w - 1)) if j == 0 else ("-" * (w - 1) + ":") for j, w in enumerate(widths)]
    return "\n".join([line(cells[0]), line(rule), *(line(c) for c in cells[1:])])
