"""Lumbar spine anatomy of the phantom, in patient space (DICOM LPS, mm).

What the phantom models: vertebral bodies T10..S3 (cortical shell, fatty marrow, concave
endplates), discs T11-T12..L5-S1 (annulus, nucleus whose T2 and height fall with degeneration,
anterior-taller wedge), a lordotic centreline, the dural sac with CSF, cauda equina roots lying
dependent (posterior, the patient is supine) and the conus above L1-L2, epidural fat, ligamentum
flavum, pedicles, laminae, spinous and transverse processes, facet joints (superior articular
process, joint fluid line), lateral recesses with the traversing roots, neural foramina with the
exiting roots and ganglia on both sides, psoas and paraspinal muscles, aorta and IVC (flow
voids), abdomen and subcutaneous fat. Per subject: size, lordosis, sacral slope, disc heights,
canal size, fat thickness and position in the field of view.

What it does not model: scoliosis and vertebral rotation, spondylolisthesis, fractures, Modic
changes, endplate or facet osteophytes beyond the disc-osteophyte bulge, cysts, tumours, the
kidneys, bowel contents, and any anatomy outside T10..S3.

Modelling choices:
- Everything spinal is defined in "straightened" coordinates (s, v, x): s is arc length along a
  smooth centreline through the body/disc centres (mm, 0 at the S1 superior endplate, cranial
  positive), v the posterior distance from it in the sagittal plane (mm) and x the distance to
  the left of the mid-sagittal plane (mm, LPS +x). The centreline lies in a sagittal plane; its
  tangent angle follows the segmental lordosis of reference 1.3 (standing weights, scaled to a
  supine total), spread with a 10 mm Gaussian so the map to patient space never folds within
  the posterior elements. Discs get an explicit extra wedge so anterior/posterior heights follow
  reference 1.2.
- Dimensions per level come from reference 1.1-1.5 ([U] values where only ranges exist), scaled by
  one subject size factor with small per-level jitter.
- Pathology (``pathology.py``) sets measurements; this module places disc bulges, ligamentum
  flavum, superior articular processes and the roots so the geometry has exactly those values at
  the disc mid-plane, fading over about one disc height above and below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.data.pathology import CONDITIONS, LEVELS, ConditionTruth, sample_pathology

VERTEBRAE: tuple[str, ...] = ("S3", "S2", "S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10")
DISCS: tuple[str, ...] = ("S2-S3", "S1-S2", "L5-S1", "L4-L5", "L3-L4", "L2-L3", "L1-L2", "T12-L1", "T11-T12", "T10-T11")
# Height x AP depth x width (mm) per vertebra (reference 1.1; sacral and thoracic [U]).
_BODY = {
    "S3": (18, 22, 30), "S2": (22, 28, 38), "S1": (28, 33, 48), "L5": (28, 35, 50), "L4": (27, 35, 48),
    "L3": (27, 34, 46), "L2": (27, 33, 44), "L1": (26, 32, 42), "T12": (24, 30, 40), "T11": (23, 29, 38),
    "T10": (22, 28, 36),
}
# Mid disc height (mm), total disc wedge (deg) per disc (reference 1.2; upper discs [U]).
_DISC = {
    "S2-S3": (1.5, 0), "S1-S2": (2.5, 0), "L5-S1": (11.0, 16), "L4-L5": (12.0, 12), "L3-L4": (11.5, 8),
    "L2-L3": (10.5, 6), "L1-L2": (9.5, 4), "T12-L1": (7.5, 3), "T11-T12": (6.5, 2), "T10-T11": (6.0, 2),
}
# Standing segmental lordosis weights (reference 1.3), per disc; sacrum kyphotic (negative).
_LORDOSIS_WEIGHT = {
    "S2-S3": -8.0, "S1-S2": -8.0, "L5-S1": 32.4, "L4-L5": 16.8, "L3-L4": 11.7, "L2-L3": 7.6,
    "L1-L2": 4.1, "T12-L1": 3.6, "T11-T12": 0.0, "T10-T11": -2.0,
}
# Nominal dural sac half axes AP x LR at each disc (mm), tapering caudally (reference 1.4).
_SAC = {
    "S2-S3": (1.0, 1.5), "S1-S2": (3.5, 5.0), "L5-S1": (5.4, 8.2), "L4-L5": (6.0, 9.4), "L3-L4": (6.3, 9.8),
    "L2-L3": (6.6, 10.2), "L1-L2": (7.0, 10.5), "T12-L1": (7.2, 10.5), "T11-T12": (7.2, 10.0), "T10-T11": (7.0, 9.5),
}
# Interpedicular distance and pedicle width (mm) per vertebra (reference 1.5).
_PEDICLE = {
    "S3": (14, 8), "S2": (18, 10), "S1": (28, 14), "L5": (26.0, 12.2), "L4": (24.0, 10.5), "L3": (22.5, 9.5),
    "L2": (21.0, 8.2), "L1": (20.4, 7.4), "T12": (19.5, 7.0), "T11": (19.0, 6.8), "T10": (18.5, 6.5),
}
EPIDURAL_ANTERIOR = 1.0  # mm, nominal anterior epidural space at the disc
EPIDURAL_POSTERIOR = 3.0  # mm, nominal posterior epidural fat
LF_THICKNESS = 3.4  # mm, nominal ligamentum flavum (reference 1.5)
ROOT_RADIUS = 2.3  # mm, exiting root radius in the foramen (reference 1.4)
TRAVERSING_RADIUS = 1.8  # mm, traversing root in the lateral recess
SECTION_POWER = (2.5, 4.0)  # superellipse exponents of body/disc sections: anterior, posterior half
# Posterior concavity of the disc cross-section (fraction of its half depth), per disc [U]:
# kidney-shaped L1-L4 discs, a flat L5-S1 disc.
_DISC_CONCAVITY = {"L5-S1": 0.03, "S1-S2": 0.0, "S2-S3": 0.0}
ENDPLATE_CRANIAL = 1.5  # mm, central depth of a body's cranial endplate concavity (reference 1.1)
ENDPLATE_CAUDAL = 0.7  # mm, the same for the caudal endplate
BODY_CONCAVITY = 0.12  # posterior body concavity (basivertebral notch), fraction of half depth [U]
# Facet joint angle to the sagittal plane (deg) per disc [U]: more coronal caudally.
_FACET_ANGLE = {"L5-S1": 50.0, "L4-L5": 45.0, "L3-L4": 40.0, "L2-L3": 33.0, "L1-L2": 28.0}


@dataclass(frozen=True)
class Side:
    """One side of one disc level in straightened coordinates (mm); ``sign`` +1 left, -1 right."""

    sign: int
    recess_x: float
    recess_depth: float
    bulge_paracentral: float
    sap_front_recess: float
    foramen_x: float
    bulge_foraminal: float
    root_s: float
    root_v: float
    root_r_ap: float
    sap_front_foramen: float


@dataclass(frozen=True)
class Level:
    """One disc with its canal and foramina in straightened coordinates (mm)."""

    name: str
    s_centre: float
    height: float
    wedge: float
    depth: float
    width: float
    concavity: float
    facet_angle: float
    nucleus_t2_scale: float
    bulge_central: float
    lf_front: float
    lf_thickness: float
    sac_v: float
    sac_r_ap: float
    sac_r_lr: float
    sac_r_ap0: float
    sac_r_lr0: float
    left: Side
    right: Side


@dataclass(frozen=True)
class Vertebra:
    """One vertebra in straightened coordinates: body centre s, height, depth, width, arch (mm)."""

    name: str
    s_centre: float
    height: float
    depth: float
    width: float
    interpedicular: float
    pedicle_width: float
    lamina_front: float
    concavity: float


@dataclass(frozen=True)
class Torso:
    """Body outline in patient space (mm): skin ellipse, fat and muscle sizes."""

    half_width: float
    half_depth: float
    back_offset: float
    fat_back: float
    fat_side: float
    paraspinal_scale: float
    psoas_scale: float


@dataclass
class Spine:
    """A subject's spine: centreline tables (patient LPS, mm), vertebrae, discs, torso, truth."""

    x0: float
    s: np.ndarray
    centre: np.ndarray
    theta: np.ndarray
    vertebrae: tuple[Vertebra, ...]
    levels: tuple[Level, ...]
    torso: Torso
    conus_s: float
    sac_end_s: float
    truth: dict[str, dict[str, ConditionTruth]]
    field_strength: float
    marrow_fat: float
    age: float

    def level(self, name: str) -> Level:
        """The disc level called ``name`` ("L4-L5")."""
        return next(lv for lv in self.levels if lv.name == name)

    def point(self, s: float, v: float = 0.0, x: float = 0.0) -> np.ndarray:
        """Patient position (LPS, mm) of straightened coordinates (s, v, x) in mm."""
        theta = float(np.interp(s, self.s, self.theta))
        c = np.array([np.interp(s, self.s, self.centre[:, k]) for k in range(3)])
        normal = np.array([0.0, math.cos(theta), math.sin(theta)])
        return c + v * normal + np.array([x, 0.0, 0.0])

    def tangent(self, s: float) -> np.ndarray:
        """Unit cranial tangent of the centreline at arc length s (patient LPS)."""
        theta = float(np.interp(s, self.s, self.theta))
        return np.array([0.0, -math.sin(theta), math.cos(theta)])

    def straighten(self, y: np.ndarray, z: np.ndarray, iterations: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """Arc length s and posterior offset v (mm) of sagittal-plane points (y, z) in patient mm."""
        s = np.interp(z, self.centre[:, 2], self.s).astype(z.dtype)
        for _ in range(iterations):
            th, cy, cz = self._along(s)
            s = s + (-np.sin(th) * (y - cy) + np.cos(th) * (z - cz))
        th, cy, cz = self._along(s)
        return s, np.cos(th) * (y - cy) + np.sin(th) * (z - cz)

    def _along(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tangent angle (rad), centre y and z (mm) at arc lengths s: linear on the uniform table, in s's dtype."""
        dt = s.dtype.type
        u = np.clip((s - dt(self.s[0])) * dt(1.0 / (self.s[1] - self.s[0])), 0.0, len(self.s) - 1.0001)
        w, whole = np.modf(u)
        i = whole.astype(np.int32)
        out = []
        for table in (self.theta, self.centre[:, 1], self.centre[:, 2]):
            t0 = table.astype(s.dtype)
            out.append(np.take(t0, i) + np.take(np.diff(t0), i) * w)
        return out[0], out[1], out[2]


def _layout(rng: np.random.Generator, size: float, degeneration: np.ndarray) -> tuple[dict, dict]:
    """Arc-length positions: vertebra centres and disc (centre, height), s=0 at S1 top (mm)."""
    heights = {}
    for i, name in enumerate(DISCS):
        base = _DISC[name][0] * size * rng.uniform(0.9, 1.1)
        loss = 0.0
        if name in LEVELS:
            loss = 0.35 * degeneration[LEVELS.index(name)]
        heights[name] = base * (1.0 - loss)
    vert_h = {v: _BODY[v][0] * size * rng.uniform(0.95, 1.05) for v in VERTEBRAE}
    s_v: dict[str, float] = {}
    s_d: dict[str, float] = {}
    s = 0.0
    s_v["S1"] = -vert_h["S1"] / 2
    s_d["S1-S2"] = -vert_h["S1"] - heights["S1-S2"] / 2
    s_v["S2"] = -vert_h["S1"] - heights["S1-S2"] - vert_h["S2"] / 2
    s_d["S2-S3"] = s_v["S2"] - vert_h["S2"] / 2 - heights["S2-S3"] / 2
    s_v["S3"] = s_d["S2-S3"] - heights["S2-S3"] / 2 - vert_h["S3"] / 2
    for below, disc, above in zip(VERTEBRAE[2:-1], DISCS[2:], VERTEBRAE[3:]):
        s_d[disc] = s + heights[disc] / 2
        s += heights[disc]
        s_v[above] = s + vert_h[above] / 2
        s += vert_h[above]
    return {v: (s_v[v], vert_h[v]) for v in VERTEBRAE}, {d: (s_d[d], heights[d]) for d in DISCS}


def _centreline(
    rng: np.random.Generator, discs: dict, origin: np.ndarray, lordosis: float, sacral_slope: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampled centreline: arc length s, patient centre (N, 3) and tangent angle (rad)."""
    s = np.arange(-150.0, 260.0, 0.5)
    lumbar_weights = sum(max(_LORDOSIS_WEIGHT[d], 0.0) for d in DISCS[2:8])
    theta = np.zeros_like(s)
    for disc, (sc, _) in discs.items():
        weight = _LORDOSIS_WEIGHT[disc]
        angle = lordosis * weight / lumbar_weights if weight > 0 else weight * rng.uniform(0.8, 1.5)
        theta -= math.radians(angle) * 0.5 * (1 + np.vectorize(math.erf)((s - sc) / (10.0 * math.sqrt(2))))
    i0 = int(np.argmin(np.abs(s)))
    theta += math.radians(sacral_slope) - theta[i0]
    dy = -np.sin(theta) * 0.5
    dz = np.cos(theta) * 0.5
    y = np.cumsum(dy) - np.cumsum(dy)[i0]
    z = np.cumsum(dz) - np.cumsum(dz)[i0]
    centre = np.stack([np.full_like(s, origin[0]), y + origin[1], z + origin[2]], axis=1)
    return s, centre, theta


def _side(
    sign: int, level: str, truth: dict[str, ConditionTruth], sc: float, h: float, disc: tuple[float, float, float],
    vert_above: Vertebra, bulge_central: float,
) -> Side:
    """Place one side's recess, foramen, bulges, SAP and exiting root to match the truth (mm)."""
    side = "left" if sign > 0 else "right"
    recess_x = _SAC[level][1] + 1.5
    foramen_x = vert_above.interpedicular / 2 + vert_above.pedicle_width / 2
    recess = truth[f"{side}_subarticular_stenosis"]
    bulge_para = 0.4 * max(recess.nominal - recess.measurement, 0.0)
    fat = truth[f"{side}_neural_foraminal_narrowing"]
    loss = max(fat.nominal - fat.measurement, 0.0)
    bulge_for = 0.5 * loss
    front_recess = section_half(recess_x, disc[0] / 2, disc[1] / 2, disc[2]) + float(
        bulge_at(recess_x, bulge_central, bulge_para, recess_x, bulge_for, foramen_x)
    )
    root_s = sc + h / 2 + ROOT_RADIUS + 0.5
    front_foramen = section_half(foramen_x, vert_above.depth / 2, vert_above.width / 2, vert_above.concavity) + bulge_weight(
        root_s - sc, h
    ) * float(bulge_at(foramen_x, bulge_central, bulge_para, recess_x, bulge_for, foramen_x))
    c_ant = fat.nominal / 2 - 0.5 * loss
    width = 2 * ROOT_RADIUS + fat.measurement
    root_r_ap = ROOT_RADIUS if fat.measurement >= 0 else width / 2
    root_v = front_foramen + (max(c_ant, 0.0) + root_r_ap if fat.measurement >= 0 else width / 2)
    return Side(
        sign=sign, recess_x=recess_x, recess_depth=recess.measurement, bulge_paracentral=bulge_para,
        sap_front_recess=float(front_recess + recess.measurement), foramen_x=foramen_x, bulge_foraminal=bulge_for,
        root_s=root_s, root_v=float(root_v), root_r_ap=root_r_ap, sap_front_foramen=float(front_foramen + width),
    )


def concavity_at(x: np.ndarray | float, concavity: float | np.ndarray, half_width: float | np.ndarray) -> np.ndarray:
    """Anterior indent (mm) of a posterior border at lateral distance x (mm): Gaussian, 0.3 half width."""
    return concavity * np.exp(-((np.asarray(x) / (0.3 * np.asarray(half_width))) ** 2))


def section_half(x: np.ndarray | float, half_depth: float | np.ndarray, half_width: float | np.ndarray, concavity: float | np.ndarray = 0.0) -> np.ndarray:
    """Posterior half AP extent (mm) of a body/disc cross-section at lateral distance x (mm).

    The posterior half is a superellipse (SECTION_POWER[1]) indented by ``concavity`` mm at the
    midline: the kidney shape of lumbar bodies and discs.
    """
    r = np.minimum(np.abs(x) / half_width, 1.0)
    power = SECTION_POWER[1]
    return half_depth * (1.0 - r**power) ** (1.0 / power) - concavity_at(x, concavity, half_width)


def bulge_weight(ds: np.ndarray | float, height: float | np.ndarray) -> np.ndarray | float:
    """Weight of a disc bulge at distance ds (mm) from the disc mid-plane: 1 inside, fading 3.5 mm."""
    excess = np.maximum(np.abs(ds) - np.asarray(height) / 2, 0.0)
    return np.exp(-((excess / 3.5) ** 2))


def bulge_at(
    x: np.ndarray | float, central: np.ndarray | float, para: np.ndarray | float, recess_x: np.ndarray | float,
    foraminal: np.ndarray | float, foramen_x: np.ndarray | float,
) -> np.ndarray | float:
    """Posterior disc bulge (mm) at lateral distance |x| (mm) for one side's bulge amplitudes."""
    ax = np.abs(x)
    return (
        central * np.exp(-((ax / 7.0) ** 2))
        + para * np.exp(-(((ax - recess_x) / 4.0) ** 2))
        + foraminal * np.exp(-(((ax - foramen_x) / 5.0) ** 2))
    )


def _level(
    name: str, sc: float, h: float, wedge: float, disc: tuple[float, float, float], vert_above: Vertebra,
    truth: dict[str, ConditionTruth], size: float, degeneration: float,
) -> Level:
    """Place one level's sac, bulge and ligamentum flavum so the truth holds at the disc (mm)."""
    r_ap0, r_lr0 = (_SAC[name][0] * size, _SAC[name][1] * size)
    area0 = math.pi * r_ap0 * r_lr0
    scs = truth["spinal_canal_stenosis"]
    q = (scs.measurement / area0) ** (2.0 / 3.0) if scs.measurement > 0 else 0.05
    r_ap, r_lr = r_ap0 * q, r_lr0 * math.sqrt(q)
    fat_post = EPIDURAL_POSTERIOR * min(max(scs.measurement / 100.0, 0.3), 1.0)
    epi_ant = EPIDURAL_ANTERIOR * min(max((scs.measurement - 70.0) / 80.0, 0.0), 1.0)
    freed = 2 * (r_ap0 - r_ap) + (EPIDURAL_POSTERIOR - fat_post) + (EPIDURAL_ANTERIOR - epi_ant)
    bulge = 0.5 + 0.5 * freed
    sac_front = float(section_half(0.0, disc[0] / 2, disc[1] / 2, disc[2])) + bulge + epi_ant
    sac_v = sac_front + r_ap
    lf_front = sac_v + r_ap + fat_post
    lf = LF_THICKNESS + 0.5 * freed
    left = _side(1, name, truth, sc, h, disc, vert_above, bulge)
    right = _side(-1, name, truth, sc, h, disc, vert_above, bulge)
    return Level(
        name=name, s_centre=sc, height=h, wedge=wedge, depth=disc[0], width=disc[1], concavity=disc[2],
        facet_angle=math.radians(_FACET_ANGLE.get(name, 25.0)),
        nucleus_t2_scale=1.0 - 0.55 * degeneration, bulge_central=bulge, lf_front=lf_front, lf_thickness=lf,
        sac_v=sac_v, sac_r_ap=r_ap, sac_r_lr=r_lr, sac_r_ap0=r_ap0, sac_r_lr0=r_lr0, left=left, right=right,
    )


def healthy_truth(level: str, size: float) -> dict[str, float]:
    """Nominal (healthy) measurements at ``level`` for a subject of relative ``size``."""
    r_ap, r_lr = _SAC[level][0] * size, _SAC[level][1] * size
    return {
        "spinal_canal_stenosis": math.pi * r_ap * r_lr,
        "left_neural_foraminal_narrowing": 4.0 * size,
        "right_neural_foraminal_narrowing": 4.0 * size,
        "left_subarticular_stenosis": 6.0 * size,
        "right_subarticular_stenosis": 6.0 * size,
    }


def _nominal_truth(level: str, size: float) -> dict[str, ConditionTruth]:
    """Healthy truth for the ungraded discs (T10..L1, sacrum)."""
    return {
        c: ConditionTruth(measurement=v, nominal=v, grade_measured="normal_mild", grade="normal_mild", latent=-3.0)
        for c, v in healthy_truth(level, size).items()
    }


def sample_spine(rng: np.random.Generator, label_noise: float = 0.03) -> Spine:
    """A random subject's spine with pathology truth; placed around the patient origin (mm)."""
    size = float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15))
    nominals = {lv: healthy_truth(lv, size) for lv in LEVELS}
    nominals = {lv: {c: v * rng.uniform(0.92, 1.08) for c, v in cond.items()} for lv, cond in nominals.items()}
    truth = sample_pathology(rng, nominals, label_noise)
    degeneration = np.array(
        [np.clip(0.25 + 0.2 * np.mean([truth[lv][c].latent for c in CONDITIONS]) + rng.normal(0, 0.12), 0, 1) for lv in LEVELS]
    )
    vert_layout, disc_layout = _layout(rng, size, degeneration)
    lordosis = float(np.clip(rng.normal(45.0, 8.0), 25.0, 70.0))
    sacral_slope = float(np.clip(lordosis * 0.7 + rng.normal(0.0, 4.0), 20.0, 50.0))
    origin = np.array([rng.normal(0.0, 4.0), rng.normal(60.0, 8.0), rng.normal(-40.0, 15.0)])
    s, centre, theta = _centreline(rng, disc_layout, origin, lordosis, sacral_slope)
    canal_ap = 17.0 * size
    vertebrae = tuple(
        Vertebra(
            name=v, s_centre=vert_layout[v][0], height=vert_layout[v][1], depth=_BODY[v][1] * size,
            width=_BODY[v][2] * size, interpedicular=_PEDICLE[v][0] * size, pedicle_width=_PEDICLE[v][1] * size,
            lamina_front=_BODY[v][1] * size / 2 + canal_ap * (0.6 if v.startswith("S") else 1.0),
            concavity=BODY_CONCAVITY * _BODY[v][1] * size / 2 * (0.3 if v.startswith("S") else 1.0),
        )
        for v in VERTEBRAE
    )
    by_name = {v.name: v for v in vertebrae}
    levels = []
    for i, name in enumerate(DISCS):
        sc, h = disc_layout[name]
        above = by_name[VERTEBRAE[i + 1]]
        below = by_name[VERTEBRAE[i]]
        depth, width = (above.depth + below.depth) / 2 + 1.0, (above.width + below.width) / 2 + 1.0
        lt = truth[name] if name in LEVELS else _nominal_truth(name, size)
        deg = degeneration[LEVELS.index(name)] if name in LEVELS else 0.1
        wedge = max(math.radians(_DISC[name][1]) - 0.45 * math.radians(abs(_LORDOSIS_WEIGHT[name]) * lordosis / 76.0), 0.0)
        concavity = _DISC_CONCAVITY.get(name, 0.15) * depth / 2
        levels.append(_level(name, sc, h, math.tan(wedge), (depth, width, concavity), above, lt, size, deg))
    fat_back = float(rng.uniform(8, 40))
    torso = Torso(
        half_width=float(rng.uniform(140, 180)), half_depth=float(rng.uniform(95, 130)),
        back_offset=float(72.0 * size + fat_back + rng.uniform(0, 12)), fat_back=fat_back,
        fat_side=float(rng.uniform(10, 45)), paraspinal_scale=float(rng.uniform(0.85, 1.15)),
        psoas_scale=float(rng.uniform(0.8, 1.2)),
    )
    return Spine(
        x0=float(origin[0]), s=s, centre=centre, theta=theta, vertebrae=vertebrae, levels=tuple(levels),
        torso=torso, conus_s=by_name["L1"].s_centre + rng.uniform(-10, 10), sac_end_s=by_name["S2"].s_centre,
        truth=truth, field_strength=float(rng.choice([1.5, 3.0])), marrow_fat=float(rng.uniform(0.3, 0.6)),
        age=float(rng.uniform(25, 85)),
    )
