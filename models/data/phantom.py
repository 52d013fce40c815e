"""Synthetic lumbar spine MRI studies with ground truth (issue 3): ``generate`` writes them.

A study is sagittal T1, T2 and STIR sharing one prescription, and an axial T2 (one stack, or
one stack per disc inside the series), rendered from the anatomy of ``anatomy.py`` with the
pathology of ``pathology.py``, written as DICOM by ``dicomwrite.py``, plus ``truth.json`` (the
shape of DESIGN.md's grading result: per level the IVD centre and disc plane in patient LPS mm,
and per condition the grade, the measurement behind it and the annotation points).

Each study draws from its own generators seeded by (seed, study index): anatomy and pathology
from one, acquisition and headers from another, so ``generate_truth`` reproduces the truth of
``generate`` without rendering, and any study can be regenerated alone.

Domain randomisation (``randomize=True``), in the spirit of SynthSeg: random intensity per tissue
and per series instead of the relaxation physics, random matrices, noise level, coil falloff and
a motion ghost along the phase-encoding direction.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track

from models.data import dicomwrite, enhanced, geometry
from models.data.contact_sheet import write_contact_sheet
from models.data.anatomy import ROOT_RADIUS, Spine, sample_spine
from models.data.pathology import CONDITIONS, LEVELS, measure_for
from models.data.render import Stack, render_stack, signal_table
from models.data.rsna import write_rsna
from models.data.tissues import Weighting, random_signals, sample_sequence, tissue_signals

LOGGER = logging.getLogger(__name__)
ROLES: tuple[str, ...] = ("T1_SAG", "T2_SAG", "STIR_SAG", "T2_AX")
__all__ = ["generate", "generate_study", "generate_truth", "write_contact_sheet", "PhantomOptions", "ROLES"]
_WEIGHTING = {"T1_SAG": Weighting.T1, "T2_SAG": Weighting.T2, "STIR_SAG": Weighting.STIR, "T2_AX": Weighting.T2}


@dataclass(frozen=True)
class PhantomOptions:
    """Per-run options of the phantom; all studies of a run share them."""

    enhanced: bool = False
    compression: str | None = None
    reverse_order: bool = False
    omit: tuple[str, ...] = ()
    axial: str = "random"
    randomize: bool = False
    sag_matrix: int = 320
    ax_matrix: int = 288
    subslices: int = 1
    label_noise: float = 0.03

    def __post_init__(self) -> None:
        if self.compression not in (None, *dicomwrite.COMPRESSIONS):
            raise ValueError(f"compression must be one of {sorted(dicomwrite.COMPRESSIONS)} or None, not {self.compression!r}")
        if self.axial not in ("random", "multi", "single"):
            raise ValueError(f"axial must be 'random', 'multi' or 'single', not {self.axial!r}")
        unknown = set(self.omit) - set(ROLES)
        if unknown:
            raise ValueError(f"omit: unknown roles {sorted(unknown)}; roles are {ROLES}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError("label_noise must be within [0, 1]")


def _options(options: dict) -> PhantomOptions:
    """PhantomOptions from keyword arguments (omit may be a comma-separated string)."""
    known = {f.name for f in fields(PhantomOptions)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown phantom options: {sorted(unknown)}")
    if isinstance(options.get("omit"), str):
        options = {**options, "omit": tuple(r for r in options["omit"].split(",") if r)}
    return PhantomOptions(**{**options, "omit": tuple(options.get("omit", ()))})


def _spine(seed: int, index: int, label_noise: float) -> Spine:
    """The anatomy and pathology of study ``index`` of a run with ``seed``."""
    return sample_spine(np.random.default_rng([seed, index, 0]), label_noise)


def _points(sp: Spine, level: str) -> dict[str, list[float]]:
    """Annotation point of each condition at ``level`` (patient LPS, mm), RSNA style."""
    lv = sp.level(level)
    out = {"spinal_canal_stenosis": sp.point(lv.s_centre, lv.sac_v, 0.0)}
    for side in (lv.left, lv.right):
        name = "left" if side.sign > 0 else "right"
        out[f"{name}_neural_foraminal_narrowing"] = sp.point(side.root_s, side.root_v, side.sign * side.foramen_x)
        front = side.sap_front_recess - side.recess_depth
        out[f"{name}_subarticular_stenosis"] = sp.point(lv.s_centre, front + side.recess_depth / 2, side.sign * side.recess_x)
    return {k: [round(float(c), 3) for c in v] for k, v in out.items()}


def truth_levels(sp: Spine) -> dict[str, dict]:
    """Per level: IVD centre, disc plane, conditions with grades and measurements (patient mm)."""
    levels = {}
    for level in LEVELS:
        lv = sp.level(level)
        normal = sp.tangent(lv.s_centre)
        posterior = np.array([0.0, normal[2], -normal[1]])
        points = _points(sp, level)
        conditions = {}
        for condition in CONDITIONS:
            t = sp.truth[level][condition]
            m = measure_for(condition)
            severity = (t.nominal - t.measurement) / (t.nominal - m.floor)
            conditions[condition] = {
                "grade": t.grade, "grade_measured": t.grade_measured, "severity": round(float(np.clip(severity, 0, 1)), 4),
                "measurement": {"name": m.name, "value": t.measurement, "unit": m.unit, "nominal": t.nominal},
                "point": points[condition],
            }
        levels[level] = {
            "center": [round(float(c), 3) for c in sp.point(lv.s_centre)],
            "plane": {"normal": [round(float(c), 6) for c in normal], "posterior": [round(float(c), 6) for c in posterior], "left": [1.0, 0.0, 0.0]},
            "disc_height_mm": round(lv.height, 3),
            "disc_depth_mm": round(lv.depth, 3),
            "conditions": conditions,
        }
    return levels


def generate_truth(seed: int, index: int, label_noise: float = 0.03) -> dict:
    """Truth of study ``index`` (levels only, no series) without rendering; same as generate's."""
    sp = _spine(seed, index, label_noise)
    return {"seed": seed, "index": index, "levels": truth_levels(sp)}


def _folder_name(number: int, description: str) -> str:
    """Series folder: series number and a file-system-safe description."""
    return f"{number:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', description).strip('_')}"


def _images(sp: Spine, stacks: list[Stack], roles: list[str], tables: list[np.ndarray], rng: np.random.Generator, opts: PhantomOptions) -> list[list[np.ndarray]]:
    """Rendered images per role: one (slices, rows, cols) array per stack."""
    noise = float(rng.uniform(0.01, 0.08) if opts.randomize else rng.uniform(0.012, 0.03))
    falloff = float(rng.uniform(60, 400) if opts.randomize else rng.uniform(120, 250))
    per_role: list[list[np.ndarray]] = [[] for _ in roles]
    table = np.concatenate(tables)
    for stack in stacks:
        img, _ = render_stack(sp, stack, table, rng, noise, falloff, opts.subslices)
        for r in range(len(roles)):
            im = img[r]
            if opts.randomize and rng.random() < 0.5:
                axis = 2 if roles[r] != "T2_AX" else 1
                im = im + rng.uniform(0.03, 0.15) * np.roll(im, int(rng.integers(8, im.shape[axis] // 3)), axis=axis)
            per_role[r].append(im)
    return per_role


def _table(sp: Spine, seq, rng: np.random.Generator, randomize: bool) -> np.ndarray:
    """Signal table (1, ids) of one series' contrast."""
    nuclei = np.array([lv.nucleus_t2_scale for lv in sp.levels])
    tissues, nucl = random_signals(rng, len(nuclei)) if randomize else tissue_signals(seq, sp.marrow_fat, nuclei)
    return signal_table(tissues[None], nucl[None])


def generate_study(out: Path, seed: int, index: int, opts: PhantomOptions) -> Path:
    """Render and write study ``index``: series folders plus truth.json; returns the study folder."""
    sp = _spine(seed, index, opts.label_noise)
    rng = np.random.default_rng([seed, index, 1])
    header = dicomwrite.study_header(rng, seed, index, sp.field_strength, sp.age)
    sag_matrix = int(rng.choice([256, 320, 384, 448, 512])) if opts.randomize else opts.sag_matrix
    ax_matrix = int(rng.choice([256, 320, 384, 448])) if opts.randomize else opts.ax_matrix
    sag = geometry.sagittal_stack(sp, rng, sag_matrix)
    multi = rng.random() < 0.6 if opts.axial == "random" else opts.axial == "multi"
    axial = geometry.axial_stacks(sp, rng, multi, ax_matrix)
    sag_roles = ["T1_SAG", "T2_SAG", "STIR_SAG"]
    rng.shuffle(sag_roles)
    order = [*sag_roles, "T2_AX"]
    seqs = {r: sample_sequence(rng, _WEIGHTING[r], sp.field_strength, axial=r == "T2_AX") for r in order}
    tables = {r: _table(sp, seqs[r], rng, opts.randomize) for r in order}
    vocab = dicomwrite.VENDORS[header.vendor]["descriptions"]
    study_dir = out / f"study_{index:04d}"
    kept = [r for r in order if r not in opts.omit]
    images: dict[str, list[np.ndarray]] = {}
    sag_kept = [r for r in sag_roles if r in kept]
    if sag_kept:
        images.update(zip(sag_kept, _images(sp, [sag], sag_kept, [tables[r] for r in sag_kept], rng, opts)))
    if "T2_AX" in kept:
        images["T2_AX"] = _images(sp, axial, ["T2_AX"], [tables["T2_AX"]], rng, opts)[0]
    series_truth = []
    for number, role in enumerate(order, start=2):
        if role not in kept:
            continue
        info = dicomwrite.SeriesInfo(
            role=role, number=number, description=str(rng.choice(vocab[role])), sequence=seqs[role],
            stacks=tuple([sag] if role != "T2_AX" else axial), series_instance_uid=dicomwrite.uid(header.uid_root, role, number),
        )
        pixels, centre, width = dicomwrite.to_pixels(images[role], rng)
        folder = study_dir / _folder_name(number, info.description)
        write = enhanced.write_enhanced if opts.enhanced else dicomwrite.write_series
        paths = write(folder, header, info, pixels, (centre, width), opts.reverse_order, opts.compression)
        series_truth.append({
            "series_instance_uid": info.series_instance_uid, "role": role, "series_number": number,
            "series_description": info.description, "folder": folder.name, "files": len(paths),
            "stacks": len(info.stacks), "weighting": _WEIGHTING[role].name,
        })
    truth = {
        "study_instance_uid": header.study_instance_uid, "seed": seed, "index": index,
        "manufacturer": dicomwrite.VENDORS[header.vendor]["manufacturer"], "field_strength": sp.field_strength,
        "axial_stacks": "multi" if multi else "single", "series": series_truth, "levels": truth_levels(sp),
        "options": asdict(opts),
        "root_radius_mm": ROOT_RADIUS,
    }
    (study_dir / "truth.json").write_text(json.dumps(truth, indent=1))
    LOGGER.info("phantom study written", extra={"study_instance_uid": header.study_instance_uid})
    return study_dir


def generate(out: Path, studies: int, seed: int, rsna: bool = False, progress: bool = True, **options) -> list[Path]:
    """Write ``studies`` phantom studies under ``out``; ``rsna`` adds the RSNA 2024 layout.

    Options: enhanced (bool, Enhanced MR multi-frame), compression ('jpeg2000' | 'jpeg-ls' | 'rle' |
    'jpeg-lossless' | None),
    reverse_order (bool), omit (roles), axial ('random' | 'multi' | 'single'), randomize (bool),
    sag_matrix, ax_matrix (reconstruction matrices), subslices (through-plane samples),
    label_noise (probability of a one-step grade error in the recorded grade).
    """
    if studies < 1:
        raise ValueError("studies must be at least 1")
    opts = _options(options)
    if rsna and opts.enhanced:
        raise ValueError("the RSNA layout holds one file per instance: rsna and enhanced exclude each other")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    indices = range(studies)
    iterator = track(indices, description="phantom studies", console=Console(stderr=True)) if progress else indices
    dirs = [generate_study(out, seed, i, opts) for i in iterator]
    if rsna:
        write_rsna(out / "rsna", dirs)
    return dirs
