"""The grader measured the way the paper reports it (section 5), plus calibration.

For a trained model and a test split: per condition the macro one-vs-rest AUROC (a Table 2
row) and the class-specific AUROCs (Table 3), the RSNA 2024 competition's weighted log loss,
ROC curves of the severe class (Fig. 5), and calibration: the expected calibration error before
and after temperature scaling, one temperature per condition fitted on the validation split
(the paper reports poorly calibrated probabilities; the node ships calibrated ones), with
reliability diagrams. Output: a JSON-able report and Markdown tables laid out like the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.data.discs import DiscSet
from models.data.pathology import CONDITIONS
from models.grader import GRADES
from models.metrics import (
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

__all__ = ["TABLE2_COLUMNS", "evaluate_logits", "fit_temperatures", "table2", "table3"]

TABLE2_COLUMNS = ("SCS", "L-NFN", "R-NFN", "L-SS", "R-SS")


def fit_temperatures(logits: Mapping[str, np.ndarray], data: DiscSet, conditions: Sequence[str] = CONDITIONS) -> dict[str, float]:
    """One temperature per condition, fitted on (validation) logits and labels; 1 for a condition
    without any validation label."""
    out = {}
    for c in conditions:
        labels = data.labels[:, CONDITIONS.index(c)]
        out[c] = float(fit_temperature(logits[c], labels)) if (labels >= 0).any() else 1.0
    return out


def evaluate_logits(logits: Mapping[str, np.ndarray], data: DiscSet, temperatures: Mapping[str, float], figures: Path | None = None, conditions: Sequence[str] = CONDITIONS) -> dict[str, Any]:
    """The report of one model on one split (``figures``: where the ROC and reliability PNGs go)."""
    report: dict[str, Any] = {"discs": int(len(data.levels)), "studies": int(len(set(data.study_ids))), "conditions": {}}
    calibrated: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for c in conditions:
        y = data.labels[:, CONDITIONS.index(c)].astype(np.int64)
        raw[c] = apply_temperature(logits[c], 1.0)
        calibrated[c] = apply_temperature(logits[c], temperatures.get(c, 1.0))
        labels[c] = y
        report["conditions"][c] = {
            "macro_auroc": _finite(macro_auroc(y, calibrated[c])),
            "class_auroc": {k: _finite(v) for k, v in class_aurocs(y, calibrated[c]).items()},
            "ece_raw": _finite(expected_calibration_error(y, raw[c])),
            "ece_calibrated": _finite(expected_calibration_error(y, calibrated[c])),
            "temperature": round(float(temperatures.get(c, 1.0)), 4),
            "counts": {g: int((y == i).sum()) for i, g in enumerate(GRADES)},
        }
    if set(conditions) == set(CONDITIONS):
        report["competition_log_loss"] = {k: _finite(v) for k, v in competition_log_loss(labels, calibrated, np.asarray(data.study_ids)).items()}
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        roc_png(figures / "roc_severe.png", {c: (labels[c], calibrated[c][:, 2]) for c in conditions if (labels[c] == 2).any()}, "ROC, severe vs rest (test split)")
        for c in conditions:
            reliability_png(figures / f"reliability_{c}.png", labels[c], calibrated[c], f"{c}, temperature-scaled")
    return report


def _finite(value: float) -> float | None:
    """Rounded float, None for NaN (JSON has no NaN)."""
    return None if value is None or math.isnan(value) else round(float(value), 4)


def table2(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Table 2: macro AUROC per condition, one row per model variant."""
    body = [[name, *(r["conditions"].get(c, {}).get("macro_auroc") for c in CONDITIONS)] for name, r in rows.items()]
    return markdown_table(["model", *TABLE2_COLUMNS], body)


def table3(report: Mapping[str, Any]) -> str:
    """Table 3: class-specific AUROC per condition of one model."""
    body = [[c, *(report["conditions"][c]["class_auroc"].get(g) for g in GRADES)] for c in CONDITIONS if c in report["conditions"]]
    return markdown_table(["condition", *GRADES], body)
