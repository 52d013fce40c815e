"""Stenosis pathology of the phantom: latent severities, measurements and grades.

Modelling choices:
- Every (level, condition) has a standard-normal latent severity. Latents of one level are
  correlated (canal and both subarticular recesses share disc bulge and facet/ligamentum
  hypertrophy; left and right alike but not identical; foramina weakly tied to the rest), and a
  study-wide factor ties adjacent levels (reference section 5.3).
- Grade thresholds on each latent come from the RSNA 2024 per-level grade rates (reference
  section 5.1), so the expected rates match by construction.
- The latent is mapped monotonically to a clinical measurement whose thresholds define the
  grade (reference section 2, phantom mapping [U]): dural sac cross-sectional area (mm^2,
  moderate < 100, severe < 70), lateral recess depth (mm, moderate < 4, severe < 2) and
  transverse perineural foraminal fat (mm, moderate < 1.5, severe < 0: root deformed).
  The anatomy is then built so that the rendered geometry has exactly that measurement.
- A little label noise: with probability ``label_noise`` the recorded grade moves one step
  (what an annotator might say); the noise-free grade is kept beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVELS: tuple[str, ...] = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
GRADES: tuple[str, ...] = ("normal_mild", "moderate", "severe")

# RSNA 2024 train.csv counts (normal/mild, moderate, severe) per condition and level (ref. 5.1).
RSNA_COUNTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "spinal_canal_stenosis": ((1886, 67, 21), (1770, 151, 53), (1622, 230, 122), (1482, 237, 255), (1904, 51, 19)),
    "left_neural_foraminal_narrowing": ((1908, 63, 2), (1791, 171, 11), (1522, 411, 40), (1204, 629, 140), (1247, 520, 206)),
    "right_neural_foraminal_narrowing": ((1891, 63, 13), (1793, 168, 6), (1512, 414, 41), (1208, 629, 130), (1281, 496, 190)),
    "left_subarticular_stenosis": ((1690, 93, 28), (1555, 255, 83), (1324, 454, 194), (887, 624, 461), (1408, 409, 147)),
    "right_subarticular_stenosis": ((1680, 110, 24), (1577, 243, 73), (1322, 454, 197), (891, 622, 460), (1399, 396, 173)),
}

# Within-level latent correlation (order of CONDITIONS), chosen so that grade co-occurrence is
# close to reference 5.3 (SCS->SS strong, L/R SS 0.56, L/R NFN 0.42, NFN weakly tied).
_WITHIN = np.array(
    [
        [1.00, 0.45, 0.45, 0.80, 0.80],
        [0.45, 1.00, 0.62, 0.60, 0.48],
        [0.45, 0.62, 1.00, 0.48, 0.60],
        [0.80, 0.60, 0.48, 1.00, 0.84],
        [0.80, 0.48, 0.60, 0.84, 1.00],
    ]
)
_STUDY_SHARE = 0.22  # latent variance shared by all levels of a study (adjacent-level rho ~0.3)


@dataclass(frozen=True)
class Measure:
    """How a condition's measurement maps to grades: nominal, thresholds and floor (units)."""

    name: str
    unit: str
    moderate_below: float
    severe_below: float
    floor: float


MEASURES: dict[str, Measure] = {
    "spinal_canal_stenosis": Measure("dural_sac_area", "mm2", 100.0, 70.0, 25.0),
    "neural_foraminal_narrowing": Measure("perineural_fat", "mm", 1.5, 0.0, -1.5),
    "subarticular_stenosis": Measure("lateral_recess_depth", "mm", 4.0, 2.0, 0.5),
}


def measure_for(condition: str) -> Measure:
    """The measurement that grades ``condition`` (side-less key lookup)."""
    key = condition.removeprefix("left_").removeprefix("right_")
    return MEASURES[key]


@dataclass
class ConditionTruth:
    """Truth of one condition at one level: measurement (units of its Measure) and grades."""

    measurement: float
    nominal: float
    grade_measured: str
    grade: str
    latent: float


def _norm_ppf(p: np.ndarray) -> np.ndarray:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9)."""
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01, -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1 - 1e-12)
    q = np.where(p < 0.5, p, 1 - p)
    r = np.sqrt(-2 * np.log(q))
    num = ((((c[0] * r + c[1]) * r + c[2]) * r + c[3]) * r + c[4]) * r + c[5]
    den = (((d[0] * r + d[1]) * r + d[2]) * r + d[3]) * r + 1
    tail = num / den
    central_q = p - 0.5
    rr = central_q * central_q
    central = (((((a[0] * rr + a[1]) * rr + a[2]) * rr + a[3]) * rr + a[4]) * rr + a[5]) * central_q / (
        ((((b[0] * rr + b[1]) * rr + b[2]) * rr + b[3]) * rr + b[4]) * rr + 1
    )
    return np.where(np.abs(central_q) <= 0.47575, central, np.where(p < 0.5, tail, -tail))


def _norm_cdf(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def rsna_rates(condition: str, level: str) -> tuple[float, float, float]:
    """RSNA 2024 fractions (normal_mild, moderate, severe) of ``condition`` at ``level``."""
    counts = RSNA_COUNTS[condition][LEVELS.index(level)]
    total = sum(counts)
    return counts[0] / total, counts[1] / total, counts[2] / total


def thresholds(condition: str, level: str) -> tuple[float, float]:
    """Latent thresholds (moderate, severe) that give the RSNA rates for a standard normal."""
    _, moderate, severe = rsna_rates(condition, level)
    t = _norm_ppf(np.array([1 - moderate - severe, 1 - severe]))
    return float(t[0]), float(t[1])


def sample_latents(rng: np.random.Generator) -> np.ndarray:
    """Correlated standard-normal latent severities, shape (levels, conditions)."""
    chol = np.linalg.cholesky(_WITHIN)
    per_level = rng.standard_normal((len(LEVELS), len(CONDITIONS))) @ chol.T
    study = rng.standard_normal(len(CONDITIONS)) @ chol.T
    return math.sqrt(_STUDY_SHARE) * study[None, :] + math.sqrt(1 - _STUDY_SHARE) * per_level


def grade_of(measure: Measure, value: float) -> str:
    """Grade of a measurement by the measure's thresholds."""
    if value < measure.severe_below:
        return "severe"
    if value < measure.moderate_below:
        return "moderate"
    return "normal_mild"


def latent_to_measurement(latent: float, t_mod: float, t_sev: float, measure: Measure, nominal: float) -> float:
    """Map a latent to its measurement, monotone decreasing, bands meeting at the thresholds."""
    p, p_mod, p_sev = _norm_cdf(latent), _norm_cdf(t_mod), _norm_cdf(t_sev)
    if latent < t_mod:
        u = p / max(p_mod, 1e-9)
        return nominal - (nominal - measure.moderate_below) * u**3
    if latent < t_sev:
        u = (p - p_mod) / max(p_sev - p_mod, 1e-9)
        return measure.moderate_below - (measure.moderate_below - measure.severe_below) * u
    u = (p - p_sev) / max(1 - p_sev, 1e-9)
    return measure.severe_below - (measure.severe_below - measure.floor) * u


def _noisy(grade: str, rng: np.random.Generator, label_noise: float) -> str:
    """The grade an annotator records: one step off with probability ``label_noise``."""
    if rng.random() >= label_noise:
        return grade
    i = GRADES.index(grade)
    step = rng.choice([-1, 1]) if 0 < i < 2 else (1 if i == 0 else -1)
    return GRADES[i + step]


def sample_pathology(
    rng: np.random.Generator, nominals: dict[str, dict[str, float]], label_noise: float = 0.03
) -> dict[str, dict[str, ConditionTruth]]:
    """Truth of every condition at every level; ``nominals[level][condition]`` is the healthy value."""
    latents = sample_latents(rng)
    out: dict[str, dict[str, ConditionTruth]] = {}
    for li, level in enumerate(LEVELS):
        out[level] = {}
        for ci, condition in enumerate(CONDITIONS):
            measure = measure_for(condition)
            t_mod, t_sev = thresholds(condition, level)
            nominal = max(nominals[level][condition], measure.moderate_below + 0.5)
            value = round(latent_to_measurement(float(latents[li, ci]), t_mod, t_sev, measure, nominal), 3)
            exact = grade_of(measure, value)
            out[level][condition] = ConditionTruth(
                measurement=value,
                nominal=round(nominal, 3),
                grade_measured=exact,
                grade=_noisy(exact, rng, label_noise),
                latent=float(latents[li, ci]),
            )
    return out
