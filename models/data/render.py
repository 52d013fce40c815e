"""Rendering the phantom: tissue labels and MR signal sampled at voxel centres (patient LPS, mm).

Modelling choices:
- Each tissue is an implicit shape with an approximate signed distance f (mm, negative inside);
  it is painted over what lies below it with coverage clip(0.5 - f / pixel, 0, 1), which is the
  in-plane partial-volume effect at the acquisition resolution. Through-plane partial volume is
  approximated by averaging ``subslices`` planes across the slice thickness (1 by default).
- Images are sampled on the acquisition matrix and their k-space zero-filled to the
  reconstruction matrix (truncation ringing and blur as on a scanner); complex Gaussian noise is
  then added per reconstructed pixel and the magnitude taken (Rician noise floor).
- The receive bias is a spine-coil profile: sensitivity falls with distance anterior to the skin
  of the back, plus a gentle cranio-caudal fall-off.
- Painting order is fixed: torso, muscles, vessels, posterior fat, bone, discs, ligamentum
  flavum, dural sac, roots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.data.anatomy import ROOT_RADIUS, TRAVERSING_RADIUS, Spine, bulge_at, bulge_weight, footprint_half
from models.data.tissues import Tissue

NUCLEUS_BASE = 32  # painted id of the nucleus of disc j is NUCLEUS_BASE + j (anatomy.DISCS order)


@dataclass(frozen=True)
class Stack:
    """Parallel slices of one orientation; all vectors in patient LPS, distances in mm."""

    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    thickness: float
    spacing: float
    acq_rows: int
    acq_cols: int

    @property
    def normal(self) -> np.ndarray:
        """Slice normal, row_dir x col_dir."""
        return np.cross(self.row_dir, self.col_dir)

    def affine(self, k: int) -> np.ndarray:
        """4x4 map from (column, row, 0, 1) pixel indices of slice k to patient LPS mm."""
        m = np.eye(4)
        m[:3, 0] = self.row_dir * self.pixel_spacing[1]
        m[:3, 1] = self.col_dir * self.pixel_spacing[0]
        m[:3, 2] = self.normal
        m[:3, 3] = self.positions[k]
        return m


class Canvas:
    """Two-tissue partial-volume mixture per voxel: tissues a, b and the fraction of a."""

    def __init__(self, n: int) -> None:
        self.a = np.zeros(n, dtype=np.int16)
        self.b = np.zeros(n, dtype=np.int16)
        self.frac = np.ones(n, dtype=np.float32)

    def paint(self, f: np.ndarray, tissue: int | np.ndarray, delta: float, idx: np.ndarray | None = None) -> np.ndarray:
        """Paint ``tissue`` (an id, or one per voxel) with signed distance f (mm) on voxels idx; coverage."""
        alpha = np.clip(0.5 - f / delta, 0.0, 1.0).astype(np.float32)
        hit = np.flatnonzero(alpha > 0)
        where = hit if idx is None else idx[hit]
        al = alpha[hit]
        t = tissue if isinstance(tissue, int) else tissue[hit]
        dominant = np.where(self.frac[where] >= 0.5, self.a[where], self.b[where])
        self.b[where] = np.where(al >= 1.0, t, dominant)
        self.a[where] = t
        self.frac[where] = al
        return alpha

    def labels(self) -> np.ndarray:
        """Dominant tissue per voxel."""
        return np.where(self.frac >= 0.5, self.a, self.b)

    def signals(self, table: np.ndarray) -> np.ndarray:
        """Signal (contrasts, N) from a table (contrasts, tissues) of pure-tissue signals."""
        return table[:, self.a] * self.frac + table[:, self.b] * (1.0 - self.frac)


def _ellipse_f(dx: np.ndarray, dy: np.ndarray, rx: float | np.ndarray, ry: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse with half axes rx, ry."""
    return (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * np.minimum(rx, ry)


def _paint_torso(c: Canvas, sp: Spine, p: np.ndarray, delta: float) -> None:
    """Skin, subcutaneous fat, abdomen, psoas, paraspinal muscles and great vessels (patient mm)."""
    t = sp.torso
    sz = np.interp(p[:, 2], sp.centre[:, 2], sp.s)
    ry = p[:, 1] - np.interp(sz, sp.s, sp.centre[:, 1])
    rx = p[:, 0] - sp.x0
    cy = t.back_offset - t.half_depth
    c.paint(_ellipse_f(rx, ry - cy, t.half_width, t.half_depth), Tissue.FAT, delta)
    inner_d = t.half_depth - (t.fat_back + t.fat_side) / 2
    c.paint(_ellipse_f(rx, ry - cy - (t.fat_side - t.fat_back) / 2, t.half_width - t.fat_side, inner_d), Tissue.SOFT, delta)
    local = np.flatnonzero((np.abs(rx) < 90) & (ry > -70) & (ry < 100))
    sz, rx, ry = sz[local], rx[local], ry[local]
    s_of = {v.name: v.s_centre for v in sp.vertebrae}
    grow = np.clip((s_of["L1"] - sz) / (s_of["L1"] - s_of["L5"]), 0.0, 1.0)
    r_psoas = (3.0 + 16.0 * grow) * t.psoas_scale
    below = np.maximum(-sz, 0)
    lateral = 30.0 + 8.0 * grow + below * 0.5
    k = t.paraspinal_scale
    for side in (1.0, -1.0):
        c.paint(_ellipse_f(rx - side * lateral, ry + 8.0 + below * 0.6, r_psoas, r_psoas * 0.9), Tissue.MUSCLE, delta, local)
        c.paint(_ellipse_f(rx - side * 21.0 * k, ry - 50.0 * k, 19.0 * k, 17.0 * k), Tissue.MUSCLE, delta, local)
    c.paint(_ellipse_f(rx - 12.0, ry + 32.0, 10.0, 10.0) + np.maximum(s_of["L4"] - sz, 0) * 10, Tissue.VESSEL, delta, local)
    c.paint(_ellipse_f(rx + 17.0, ry + 28.0, 11.0, 7.0) + np.maximum(s_of["L5"] - sz, 0) * 10, Tissue.VESSEL, delta, local)


class _Levels:
    """Per-voxel gathers of disc-level and vertebra parameters, selected by nearest disc."""

    def __init__(self, sp: Spine, s: np.ndarray, x: np.ndarray) -> None:
        lv = sp.levels
        sc = np.array([l.s_centre for l in lv])
        self.j = np.searchsorted((sc[1:] + sc[:-1]) / 2, s)
        self.ds = s - sc[self.j]
        self.left = x > 0
        self.sp = sp

    def disc(self, attr: str) -> np.ndarray:
        """Attribute of the nearest disc Level, per voxel."""
        return np.array([getattr(l, attr) for l in self.sp.levels], dtype=np.float32)[self.j]

    def side(self, attr: str) -> np.ndarray:
        """Attribute of the nearest disc's Side on the voxel's side (x > 0 left), per voxel."""
        left = np.array([getattr(l.left, attr) for l in self.sp.levels], dtype=np.float32)[self.j]
        right = np.array([getattr(l.right, attr) for l in self.sp.levels], dtype=np.float32)[self.j]
        return np.where(self.left, left, right)

    def vert(self, attr: str, kv: np.ndarray) -> np.ndarray:
        """Attribute of vertebra index kv (VERTEBRAE order), per voxel."""
        return np.array([getattr(v, attr) for v in self.sp.vertebrae], dtype=np.float32)[kv]


def _bone(c: Canvas, f: np.ndarray, delta: float, idx: np.ndarray) -> None:
    """Paint bone: a 1 mm cortical shell (signal void) around marrow."""
    c.paint(f, Tissue.CORTEX, delta, idx)
    c.paint(f + 1.0, Tissue.MARROW, delta, idx)


def _paint_spine(c: Canvas, sp: Spine, s: np.ndarray, v: np.ndarray, x: np.ndarray, idx: np.ndarray, delta: float) -> None:
    """Paint bodies, discs, posterior elements, canal and roots on voxels idx (straightened mm)."""
    g = _Levels(sp, s, x)
    ds, ax = g.ds, np.abs(x)
    h, wedge = g.disc("height"), g.disc("wedge")
    kv = g.j + (ds > 0)
    dv, wv = g.vert("depth", kv), g.vert("width", kv)
    lam = g.vert("lamina_front", kv)
    dsv = s - g.vert("s_centre", kv)
    hv = g.vert("height", kv)
    xr, xf = g.side("recess_x"), g.side("foramen_x")
    dd, wd = g.disc("depth"), g.disc("width")
    bulge = bulge_at(x, g.disc("bulge_central"), g.side("bulge_paracentral"), xr, g.side("bulge_foraminal"), xf)
    wb = bulge_weight(ds, h)
    wds = np.exp(-((ds / (h / 2 + 5.0)) ** 2))

    posterior = (v > 0) & (ax < xf + 4) & (v < lam + 2)
    c.paint(np.where(posterior, -5.0, 5.0), Tissue.FAT, delta, idx)

    dome = 1.2 * np.clip(1 - (x / (wd / 2)) ** 2 - (v / (dd / 2)) ** 2, 0, 1)
    hh = 0.5 * (h - wedge * v) + dome
    half_b = footprint_half(x, dv / 2, wv / 2)
    f_body = np.maximum(np.maximum(np.abs(v) - half_b, ax - wv / 2), hh - np.abs(ds))
    _bone(c, f_body, delta, idx)
    half_d = footprint_half(x, dd / 2, wd / 2) + np.where(v > 0, bulge * wb, 0.0)
    f_disc = np.maximum(np.maximum(np.abs(v) - half_d, ax - wd / 2), np.abs(ds) - hh)
    f_ext = np.maximum(np.maximum(v - (half_b + bulge * wb), half_b - 0.5 - v), np.abs(ds) - hh - 8.0)
    c.paint(np.minimum(f_disc, f_ext), Tissue.ANNULUS, delta, idx)
    f_np = np.maximum(_ellipse_f(v - 0.05 * dd, x, 0.3 * dd, 0.33 * wd), np.abs(ds) - 0.6 * hh)
    c.paint(f_np, (NUCLEUS_BASE + g.j).astype(np.int16), delta, idx)

    sap_r, sap_f = g.side("sap_front_recess"), g.side("sap_front_foramen")
    lf_front = g.disc("lf_front")
    t_in = np.clip(ax / xr, 0, 1)
    prof = np.where(
        ax <= xr, lf_front + (sap_r - lf_front) * t_in * t_in * (3 - 2 * t_in),
        sap_r + (sap_f - sap_r) * np.clip((ax - xr) / (xf - xr), 0, 1),
    )
    v_back = lam + (prof - lam) * wds
    root_top = g.side("root_s") - g.disc("s_centre") + ROOT_RADIUS + 2.5
    xp, pw = g.vert("interpedicular", kv) / 2 + g.vert("pedicle_width", kv) / 2, g.vert("pedicle_width", kv)
    f_lamina = np.maximum.reduce([lam - v, v - lam - 7.0, ax - xp - 2.0, -dsv - hv / 2 - 4 - 0.3 * (v - lam), dsv - hv / 2 + 6])
    f_spinous = np.maximum.reduce([ax - 3.5, lam + 4 - v, v - lam - 32.0, -dsv - 0.3 * hv - 0.35 * (v - lam), dsv - 0.2 * hv + 0.35 * (v - lam)])
    f_pedicle = np.maximum(_ellipse_f(ax - xp, dsv - 0.22 * hv, pw / 2, 7.0), np.maximum(dv / 2 - 3 - v, v - lam - 2))
    f_tp = np.maximum(_ellipse_f(v - lam + 3.0, dsv - 0.1 * hv, 4.0, 5.0), np.maximum(xp - ax, ax - xp - 28.0))
    f_facet = np.maximum.reduce([xr - 1 - ax, ax - xf - 7, prof - v, v - prof - 12, -ds - h / 2 - 10, ds - root_top])
    _bone(c, np.minimum.reduce([f_lamina, f_spinous, f_pedicle, f_tp, f_facet]), delta, idx)
    joint = np.abs(v - prof - 5.5 - 0.3 * (ax - xr)) - 0.6
    c.paint(np.maximum(joint, f_facet + 0.8), Tissue.JOINT, delta, idx)

    t_lf = g.disc("lf_thickness") * wds
    f_lf = np.maximum.reduce([v_back - v, v - v_back - t_lf, ax - xr - 1.0, np.abs(ds) - h / 2 - 9.0])
    c.paint(f_lf, Tissue.LIGAMENT, delta, idx)

    r_ap0, r_lr0 = g.disc("sac_r_ap0"), g.disc("sac_r_lr0")
    v0 = dv / 2 + 1.0 + r_ap0
    v_sc = v0 + (g.disc("sac_v") - v0) * wds
    r_ap = r_ap0 + (g.disc("sac_r_ap") - r_ap0) * wds
    r_lr = r_lr0 + (g.disc("sac_r_lr") - r_lr0) * wds
    taper = np.clip((s - sp.sac_end_s) / 15.0, 0.05, 1.0)
    sac = c.paint(_ellipse_f(x, v - v_sc, r_lr * taper, r_ap * taper), Tissue.CSF, delta, idx)
    cord = np.clip((s - sp.conus_s) / 15.0, 0.0, 1.0)
    c.paint(_ellipse_f(x, v - v_sc, 5.0 * cord + 0.01, 4.0 * cord + 0.01) + 10.0 * (cord <= 0), Tissue.CORD, delta, idx)
    inside = np.nonzero((sac > 0.2) & (s < sp.conus_s + 5))[0]
    for xn, yn in _CAUDA:
        f_root = np.hypot(x[inside] - xn * r_lr[inside], v[inside] - v_sc[inside] - yn * r_ap[inside]) - 1.0
        c.paint(f_root, Tissue.NERVE, delta, idx[inside])

    near = np.nonzero((np.abs(ds) < h / 2 + 14) & (ax > r_lr0 - 2))[0]
    _paint_roots(c, g, s, v, x, idx, near, delta)


# Cauda equina roots: (x, v) positions as fractions of the sac half axes, dependent (posterior).
_CAUDA: tuple[tuple[float, float], ...] = tuple(
    (0.62 * np.cos(a), 0.25 + 0.5 * np.sin(a)) for a in np.linspace(0.15 * np.pi, 0.85 * np.pi, 12)
) + ((0.0, 0.35), (0.25, 0.1), (-0.25, 0.1))


def _paint_roots(c: Canvas, g: _Levels, s: np.ndarray, v: np.ndarray, x: np.ndarray, idx: np.ndarray, near: np.ndarray, delta: float) -> None:
    """Exiting roots through the foramina and traversing roots in the lateral recesses."""
    ax, vn = np.abs(x[near]), v[near]
    ds = g.ds[near]
    sel = lambda arr: arr[near]  # noqa: E731
    xf, xr = sel(g.side("foramen_x")), sel(g.side("recess_x"))
    sc = sel(g.disc("s_centre"))
    root_s, root_v, r_ap = sel(g.side("root_s")), sel(g.side("root_v")), sel(g.side("root_r_ap"))
    s_path = root_s - sc + 0.45 * np.maximum(xf - ax, 0.0)
    drg = 1.0 + 0.35 * np.exp(-(((ax - xf - 6.0) / 3.0) ** 2))
    f_exit = np.maximum(_ellipse_f(ds - s_path, vn - root_v, ROOT_RADIUS * drg, r_ap * drg), np.maximum(xr - ax, ax - xf - 16))
    c.paint(f_exit, Tissue.NERVE, delta, idx[near])
    depth = sel(g.side("recess_depth"))
    front = sel(g.side("sap_front_recess")) - depth
    r_t = np.minimum(TRAVERSING_RADIUS, depth / 2 + 0.2)
    f_trav = np.maximum(_ellipse_f(ax - (xr - 1.0), vn - front - depth / 2, TRAVERSING_RADIUS, r_t), np.abs(ds) - sel(g.disc("height")) / 2 - 8)
    c.paint(f_trav, Tissue.NERVE, delta, idx[near])


def render_points(sp: Spine, p: np.ndarray, delta: float) -> Canvas:
    """Tissue mixture at patient points p (N, 3), LPS mm, painted with edge width delta (mm)."""
    c = Canvas(len(p))
    _paint_torso(c, sp, p, delta)
    near = np.flatnonzero(np.abs(p[:, 0] - sp.x0) < 75.0)
    y_c = np.interp(p[near, 2], sp.centre[:, 2], sp.centre[:, 1])
    near = near[np.abs(p[near, 1] - y_c - 20.0) < 90.0]
    s, v = sp.straighten(p[near, 1], p[near, 2])
    box = (v > -30) & (v < 75) & (s > sp.s[0] + 5) & (s < sp.s[-1] - 5)
    idx = near[box]
    _paint_spine(c, sp, s[box].astype(np.float32), v[box].astype(np.float32), (p[idx, 0] - sp.x0).astype(np.float32), idx, delta)
    return c


def stack_points(stack: Stack, k: int, offset: float = 0.0) -> np.ndarray:
    """Acquisition-grid voxel centres of slice k (acq_rows*acq_cols, 3), patient mm, row-major."""
    dr = stack.pixel_spacing[0] * stack.rows / stack.acq_rows
    dc = stack.pixel_spacing[1] * stack.cols / stack.acq_cols
    i = np.arange(stack.acq_rows, dtype=np.float32)[:, None, None]
    j = np.arange(stack.acq_cols, dtype=np.float32)[None, :, None]
    origin = stack.positions[k] + offset * stack.normal
    return (origin + i * dr * stack.col_dir + j * dc * stack.row_dir).reshape(-1, 3).astype(np.float32)


def coil_bias(sp: Spine, p: np.ndarray, falloff: float) -> np.ndarray:
    """Receive sensitivity (N,) of a posterior spine coil at points p (patient mm)."""
    sz = np.interp(p[:, 2], sp.centre[:, 2], sp.s)
    ry = p[:, 1] - np.interp(sz, sp.s, sp.centre[:, 1])
    depth = np.clip(sp.torso.back_offset - ry, 0, None)
    return (0.3 + 0.7 * np.exp(-depth / falloff)) * np.exp(-(((sz - 90.0) / 260.0) ** 2))


def zero_fill(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Zero-filled k-space interpolation of real images (..., r, c) to (..., rows, cols)."""
    r, cc = img.shape[-2:]
    k = np.fft.rfft2(img)
    out = np.zeros(img.shape[:-2] + (rows, cols // 2 + 1), dtype=np.complex64)
    half = r // 2
    out[..., :half, : cc // 2 + 1] = k[..., :half, :]
    out[..., rows - (r - half) :, : cc // 2 + 1] = k[..., half:, :]
    return np.fft.irfft2(out, s=(rows, cols)) * np.float32(rows * cols / (r * cc))


def signal_table(tissues: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Signal per painted id (contrasts, NUCLEUS_BASE + discs) from tissue and nucleus signals."""
    return np.concatenate([tissues, np.zeros((tissues.shape[0], NUCLEUS_BASE - tissues.shape[1]), np.float32), nuclei], axis=1)


def render_stack(
    sp: Spine, stack: Stack, table: np.ndarray, rng: np.random.Generator,
    noise: float, falloff: float, subslices: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude images (contrasts, slices, rows, cols) and labels (slices, acq_rows, acq_cols).

    ``table`` (contrasts, ids) is the pure signal of each painted id (see ``signal_table``).
    """
    n, ar, ac = len(stack.positions), stack.acq_rows, stack.acq_cols
    delta = float(max(stack.pixel_spacing[0] * stack.rows / ar, stack.pixel_spacing[1] * stack.cols / ac))
    offsets = [0.0] if subslices <= 1 else list(np.linspace(-0.35, 0.35, subslices) * stack.thickness)
    acc = np.zeros((table.shape[0], n * ar * ac), dtype=np.float32)
    labels = np.zeros(n * ar * ac, dtype=np.int16)
    for o in offsets:
        p = np.concatenate([stack_points(stack, k, o) for k in range(n)])
        canvas = render_points(sp, p, delta)
        acc += canvas.signals(table) * (coil_bias(sp, p, falloff) / len(offsets)).astype(np.float32)
        if o == offsets[len(offsets) // 2]:
            labels = canvas.labels()
    img = zero_fill(acc.reshape(-1, n, ar, ac), stack.rows, stack.cols)
    scale = (noise * table.max(axis=1)).astype(np.float32)[:, None, None, None]
    real = img + scale * rng.standard_normal(img.shape, dtype=np.float32)
    imag = scale * rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag), labels.reshape(n, ar, ac)
