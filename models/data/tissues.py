"""Tissues, MR sequences and their signal for the phantom (reference sections 3 and 4).

Modelling choices:
- Signal is the steady-state spin-echo equation S = PD (1 - exp(-TR/T1)) exp(-TE/T2) for T1/T2
  TSE, and the inversion-recovery magnitude S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)
  for STIR, with TI set to null fat (TI = ln2 * T1_fat, jittered).
- Relaxation times are the 1.5 T values of reference 3.2; at 3 T T1 is 21 % longer.
- Fat on TSE is brighter than its mono-exponential T2 predicts (J-coupling): an effective T2 of
  120 ms stands for it. Marrow is a fat/water mixture with the subject's fat fraction.
- Cortical bone, ligaments and flowing blood have (almost) no signal.
- Domain randomisation replaces the physics by random per-tissue intensities (SynthSeg style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """Tissue labels painted by the renderer."""

    AIR = 0
    FAT = 1
    SOFT = 2
    MUSCLE = 3
    VESSEL = 4
    CORTEX = 5
    MARROW = 6
    ANNULUS = 7
    NUCLEUS = 8
    CSF = 9
    NERVE = 10
    CORD = 11
    LIGAMENT = 12
    JOINT = 13


# Proton density (relative), T1 and T2 at 1.5 T (ms); reference 3.2 (some [U]).
_RELAXATION: dict[Tissue, tuple[float, float, float]] = {
    Tissue.AIR: (0.0, 1000.0, 1.0),
    Tissue.FAT: (95.0, 343.0, 120.0),
    Tissue.SOFT: (80.0, 800.0, 55.0),
    Tissue.MUSCLE: (75.0, 900.0, 35.0),
    Tissue.VESSEL: (4.0, 1200.0, 50.0),
    Tissue.CORTEX: (4.0, 1000.0, 1.0),
    Tissue.MARROW: (91.0, 900.0, 40.0),
    Tissue.ANNULUS: (65.0, 900.0, 40.0),
    Tissue.NUCLEUS: (80.0, 1100.0, 130.0),
    Tissue.CSF: (100.0, 4000.0, 2000.0),
    Tissue.NERVE: (70.0, 1000.0, 70.0),
    Tissue.CORD: (65.0, 800.0, 80.0),
    Tissue.LIGAMENT: (55.0, 800.0, 30.0),
    Tissue.JOINT: (90.0, 3000.0, 800.0),
}


class Weighting(IntEnum):
    """Contrast of a series."""

    T1 = 1
    T2 = 2
    STIR = 3


@dataclass(frozen=True)
class Sequence:
    """Timing of one TSE/STIR acquisition (ms) and its field strength (T)."""

    weighting: Weighting
    tr: float
    te: float
    ti: float | None
    echo_train: int
    field_strength: float
    flip_angle: float


def sample_sequence(rng: np.random.Generator, weighting: Weighting, field_strength: float, axial: bool = False) -> Sequence:
    """Timing drawn from the protocol ranges of reference section 4."""
    t1_scale = 1.21 if field_strength >= 3.0 else 1.0
    if weighting is Weighting.T1:
        tr = rng.uniform(400, 700) * (1.1 if field_strength >= 3 else 1.0)
        return Sequence(weighting, round(tr), round(rng.uniform(8, 15), 1), None, int(rng.integers(2, 6)), field_strength, 90.0)
    if weighting is Weighting.T2:
        return Sequence(
            weighting, round(rng.uniform(3000, 4500) if axial else rng.uniform(2500, 4500)),
            round(rng.uniform(90, 120), 1), None, int(rng.integers(15, 26)), field_strength, 90.0,
        )
    ti = math.log(2) * _RELAXATION[Tissue.FAT][1] * t1_scale * rng.uniform(0.95, 1.05)
    return Sequence(weighting, round(rng.uniform(3000, 5000)), round(rng.uniform(30, 70), 1), round(ti), int(rng.integers(7, 16)), field_strength, 90.0)


def _signal(pd: float, t1: float, t2: float, seq: Sequence) -> float:
    """Magnitude signal of one tissue (arbitrary units)."""
    decay = math.exp(-seq.te / t2)
    if seq.weighting is Weighting.STIR and seq.ti is not None:
        return pd * abs(1 - 2 * math.exp(-seq.ti / t1) + math.exp(-seq.tr / t1)) * decay
    return pd * (1 - math.exp(-seq.tr / t1)) * decay


def tissue_signals(seq: Sequence, marrow_fat: float, nucleus_t2_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signal per Tissue (len(Tissue),) and per disc nucleus (len(scales),) for ``seq``."""
    t1_scale = 1.21 if seq.field_strength >= 3.0 else 1.0
    out = np.zeros(len(Tissue), dtype=np.float32)
    for tissue, (pd, t1, t2) in _RELAXATION.items():
        out[tissue] = _signal(pd, t1 * t1_scale, t2, seq)
    fat = out[Tissue.FAT]
    water = _signal(91.0, 900.0 * t1_scale, 40.0, seq)
    out[Tissue.MARROW] = marrow_fat * fat + (1 - marrow_fat) * water
    pd, t1, t2 = _RELAXATION[Tissue.NUCLEUS]
    nucleus = np.array(
        [_signal(pd * (0.6 + 0.4 * k), t1 * t1_scale * (0.5 + 0.5 * k), max(t2 * k, 45.0), seq) for k in nucleus_t2_scales],
        dtype=np.float32,
    )
    return out, nucleus


def random_signals(rng: np.random.Generator, n_nuclei: int) -> tuple[np.ndarray, np.ndarray]:
    """Domain randomisation: uniform random intensity per tissue and nucleus (air stays dark)."""
    out = rng.uniform(0.0, 100.0, len(Tissue)).astype(np.float32)
    out[Tissue.AIR] = 0.0
    return out, rng.uniform(0.0, 100.0, n_nuclei).astype(np.float32)
