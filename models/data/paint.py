"""Painting the phantom's anatomy onto a Canvas: torso in patient mm, spine in straightened mm.

Modelling choices:
- Torso (patient LPS relative to the centreline at the same height, mm): skin ellipse,
  subcutaneous fat, abdomen, psoas (teardrop, growing caudally), quadratus lumborum, the
  multifidus/erector spinae mass between the laminae and the thoracolumbar fascia with a fat
  septum, aorta and IVC (flow voids).
- Spine (straightened coordinates s, v, x of ``anatomy.py``): kidney-shaped vertebral bodies
  (superellipse sections with a posterior notch, an anterior waist, rounded rims) whose
  endplates are carved by the domed disc between them (cranial endplate 1.5 mm, caudal 0.7 mm
  deep); discs with the same kidney section, a posterior bulge set by the pathology, and an
  ellipsoidal nucleus; a posterior arch (pedicles, arched laminae, spinous and transverse
  processes, facet complexes with an oblique joint line) blended by smooth unions; the
  ligamentum flavum as a V-shaped band lining the arch; epidural fat filling the bony ring;
  the dural sac, conus and cauda equina; exiting and traversing roots.
- Every structure is evaluated only on the voxels of its bounding region, which keeps the
  renderer fast; painting order is fixed (later paints over earlier).
"""

from __future__ import annotations

import numpy as np

from models.data.anatomy import (
    ENDPLATE_CAUDAL,
    ENDPLATE_CRANIAL,
    ROOT_RADIUS,
    SECTION_POWER,
    TRAVERSING_RADIUS,
    Spine,
    bulge_at,
    bulge_weight,
    concavity_at,
)
from models.data.canvas import Array, Canvas, ellipse_f, round_max, smooth_min, superellipse_f
from models.data.tissues import Tissue

NUCLEUS_BASE = 32  # painted id of the nucleus of disc j is NUCLEUS_BASE + j (anatomy.DISCS order)
F32 = np.float32


def paint_torso(c: Canvas, sp: Spine, rx: Array, ry: Array, sz: Array, delta: float) -> None:
    """Skin, fat, abdomen, muscles and great vessels; rx, ry from the centreline, sz arc length (mm)."""
    t = sp.torso
    cy = t.back_offset - t.half_depth
    c.paint(ellipse_f(rx, ry - cy, t.half_width, t.half_depth), Tissue.FAT, delta)
    inner_d = t.half_depth - (t.fat_back + t.fat_side) / 2
    c.paint(ellipse_f(rx, ry - cy - (t.fat_side - t.fat_back) / 2, t.half_width - t.fat_side, inner_d), Tissue.SOFT, delta)
    s_of = {v.name: float(v.s_centre) for v in sp.vertebrae}
    ax = np.abs(rx)
    i = np.flatnonzero((ax < 80) & (ry > -50) & (ry < 32) & (sz < s_of["T12"]))
    _paint_psoas(c, sp, ax[i], ry[i], sz[i], delta, i)
    i = np.flatnonzero((ax < 75) & (ry > 15) & (ry < t.back_offset))
    _paint_back_muscles(c, sp, ax[i], ry[i], np.maximum(s_of["L5"] - sz[i], 0.0), delta, i)
    i = np.flatnonzero((ax < 35) & (ry > -45) & (ry < -10) & (sz > s_of["L5"]))
    rx, ry, sz = rx[i], ry[i], sz[i]
    c.paint(ellipse_f(rx - 14.0, ry + 30.0, 10.0, 10.0) + np.maximum(s_of["L4"] - sz, 0) * 10, Tissue.VESSEL, delta, i)
    c.paint(ellipse_f(rx + 18.0, ry + 26.0, 11.0, 7.5) + np.maximum(s_of["L5"] - sz, 0) * 10, Tissue.VESSEL, delta, i)


def _paint_psoas(c: Canvas, sp: Spine, ax: Array, ry: Array, sz: Array, delta: float, i: Array) -> None:
    """Quadratus lumborum and psoas (teardrop, growing from L1 to L5) on both sides (mm)."""
    s_of = {v.name: float(v.s_centre) for v in sp.vertebrae}
    span = s_of["L1"] - s_of["L5"]
    grow = np.clip((s_of["L1"] - sz) / span, 0.0, 1.0)
    below = np.maximum(s_of["L5"] - sz, 0.0)
    ql = 1.0 - np.clip((s_of["L1"] - 10 - sz) / span, 0.0, 1.0) ** 2
    c.paint(ellipse_f(ax - 60.0, ry - 12.0 + 0.15 * (ax - 60.0), 14.0 * ql + 0.01, 7.0 * ql + 0.01), Tissue.MUSCLE, delta, i)
    r = (4.0 + 15.0 * grow) * sp.torso.psoas_scale
    lateral = 24.0 + 0.9 * r + below * 0.5
    du, dw = ax - lateral, ry + 4.0 + 0.2 * r + below * 0.6
    u = du * 0.82 + dw * 0.57
    w = -du * 0.57 + dw * 0.82
    c.paint(ellipse_f(u, w, 1.2 * r * (1.0 + 0.15 * np.clip(u / r, -1, 1)), 0.8 * r), Tissue.MUSCLE, delta, i)


def _paint_back_muscles(c: Canvas, sp: Spine, ax: Array, ry: Array, below: Array, delta: float, i: Array) -> None:
    """Multifidus and erector spinae between the laminae and the fascia, with a fat septum (mm)."""
    t, k = sp.torso, sp.torso.paraspinal_scale
    front, back = 24.0, t.back_offset - t.fat_back - 1.5
    width = 52.0 * k * (1.0 - 0.35 * np.clip(below / 40.0, 0, 1))
    centre_x, half_d = 3.0 + width / 2, (back - front) / 2
    f = round_max([superellipse_f(ax - centre_x, ry - front - half_d, width / 2, half_d, 2.4), 3.0 - ax], 3.0)
    c.paint(f, Tissue.MUSCLE, delta, i)
    septum = np.abs(ax - 3.0 - 0.4 * width - 0.3 * (ry - front - half_d)) - 0.2
    c.paint(np.maximum.reduce([septum, f + 5.0, front + 0.4 * half_d - ry]), Tissue.FAT, delta, i)


class _Levels:
    """Per-voxel indices of the nearest disc j, its vertebra kv and side js, offset ds from the disc (mm), and gathers."""

    def __init__(self, sp: Spine, j: Array, ds: Array, kv: Array, js: Array) -> None:
        self.sp, self.j, self.ds, self.kv, self.js = sp, j, ds, kv, js

    @classmethod
    def nearest(cls, sp: Spine, s: Array, x: Array) -> _Levels:
        """Indices for voxels at arc length s and lateral offset x (mm)."""
        sc = np.array([lv.s_centre for lv in sp.levels])
        j = np.searchsorted((sc[1:] + sc[:-1]) / 2, s)
        ds = (s - sc[j]).astype(F32)
        return cls(sp, j, ds, j + (ds > 0), 2 * j + (x <= 0))

    def at(self, i: Array) -> _Levels:
        """The same indices restricted to voxels i."""
        return _Levels(self.sp, self.j[i], self.ds[i], self.kv[i], self.js[i])

    def disc(self, attr: str, i: Array | None = None) -> Array:
        """Attribute of the nearest disc Level per voxel (on voxels i when given)."""
        return np.array([getattr(lv, attr) for lv in self.sp.levels], dtype=F32)[self.j if i is None else self.j[i]]

    def side(self, attr: str, i: Array | None = None) -> Array:
        """Attribute of the nearest disc's Side on the voxel's side (x > 0 left), per voxel (on voxels i when given)."""
        table = np.array([getattr(side, attr) for lv in self.sp.levels for side in (lv.left, lv.right)], dtype=F32)
        return table[self.js if i is None else self.js[i]]

    def vert(self, attr: str, i: Array | None = None) -> Array:
        """Attribute of the voxel's vertebra (VERTEBRAE order) per voxel (on voxels i when given)."""
        return np.array([getattr(v, attr) for v in self.sp.vertebrae], dtype=F32)[self.kv if i is None else self.kv[i]]


def _bone(c: Canvas, f: Array, delta: float, idx: Array) -> None:
    """Paint bone: a 1 mm cortical shell (signal void) around marrow."""
    c.paint(f, Tissue.CORTEX, delta, idx)
    c.paint(f + 1.0, Tissue.MARROW, delta, idx)


def paint_spine(c: Canvas, sp: Spine, s: Array, v: Array, x: Array, idx: Array, delta: float) -> None:
    """Paint the spinal column, arch, canal and roots on voxels idx (straightened mm)."""
    g = _Levels.nearest(sp, s, x)
    arch = np.flatnonzero((v > 4) & (v < 72) & (np.abs(x) < 52))
    ga = g.at(arch)
    prof, v_back = _arch_front(ga, v[arch], x[arch])
    fat = round_max([4.0 - v[arch], v[arch] - v_back - 2.0, np.abs(x[arch]) - ga.side("foramen_x") - 1.0], 5.0)
    c.paint(fat, Tissue.FAT, delta, idx[arch])
    _paint_column(c, g, s, v, x, idx, delta)
    _paint_arch(c, ga, s, v, x, idx, arch, prof, v_back, delta)
    _paint_canal(c, sp, g, s, v, x, idx, delta)
    near = np.flatnonzero((np.abs(g.ds) < 22) & (np.abs(x) > 5) & (np.abs(x) < 52) & (v > 5) & (v < 45))
    _paint_roots(c, g.at(near), v, x, idx, near, delta)


def _paint_column(c: Canvas, g: _Levels, s: Array, v: Array, x: Array, idx: Array, delta: float) -> None:
    """Vertebral bodies, discs (annulus, bulge, nucleus) on the anterior column's voxels."""
    i = np.flatnonzero((v > -26) & (v < 30) & (np.abs(x) < 32))
    g = g.at(i)
    vv, xv, ds = v[i], x[i], g.ds
    h, wedge, dd, wd = g.disc("height"), g.disc("wedge"), g.disc("depth"), g.disc("width")
    dv, wv, hv = g.vert("depth"), g.vert("width"), g.vert("height")
    dome = 1.0 - np.minimum((xv / (wd / 2)) ** 2 + (vv / (dd / 2)) ** 2, 1.0)
    hh = 0.5 * (h - wedge * vv) + np.where(ds > 0, F32(ENDPLATE_CAUDAL), F32(ENDPLATE_CRANIAL)) * dome
    bulge = bulge_at(xv, g.disc("bulge_central"), g.side("bulge_paracentral"), g.side("recess_x"),
                     g.side("bulge_foraminal"), g.side("foramen_x")) * bulge_weight(ds, h)
    v_disc = np.where(vv > 0, vv + concavity_at(xv, g.disc("concavity"), wd / 2) - bulge, vv)
    power = np.where(vv > 0, F32(SECTION_POWER[1]), F32(SECTION_POWER[0]))
    f_disc_xs = superellipse_f(xv, v_disc, wd / 2, dd / 2, power)
    ext = np.maximum.reduce([f_disc_xs, np.abs(ds) - h / 2 - 8.0, 0.3 - bulge, -vv])
    c.paint(ext, Tissue.ANNULUS, delta, idx[i])
    dsv = s[i] - g.vert("s_centre")
    waist = 1.0 - 0.06 * np.maximum(1.0 - (2.0 * dsv / hv) ** 2, 0.0)
    v_body = np.where(vv > 0, vv + concavity_at(xv, g.vert("concavity"), wv / 2), vv / waist)
    f_body = round_max([superellipse_f(xv, v_body, wv / 2, dv / 2, power), hh - np.abs(ds)], 1.5)
    _bone(c, f_body, delta, idx[i])
    c.paint(round_max([f_disc_xs, np.abs(ds) - hh], 0.7), Tissue.ANNULUS, delta, idx[i])
    rs = np.maximum(0.62 * hh, 0.5)
    f_np = (np.sqrt((xv / (0.34 * wd)) ** 2 + ((vv - 0.06 * dd) / (0.3 * dd)) ** 2 + (ds / rs) ** 2) - 1.0) * rs
    c.paint(f_np, (NUCLEUS_BASE + g.j).astype(np.int16), 3.0 * delta, idx[i])


def _arch_front(g: _Levels, v: Array, x: Array) -> tuple[Array, Array]:
    """Front of the posterior elements at g's voxels (v, x): SAP/LF profile at the disc, and blended (mm)."""
    ax = np.abs(x)
    xr, xf = g.side("recess_x"), g.side("foramen_x")
    sap_r, sap_f, lf_front = g.side("sap_front_recess"), g.side("sap_front_foramen"), g.disc("lf_front")
    t_in = np.clip(ax / xr, 0, 1)
    t_out = np.clip((ax - xr) / (xf - xr), 0, 1)
    prof = np.where(ax <= xr, lf_front + (sap_r - lf_front) * t_in * t_in * (3 - 2 * t_in),
                    sap_r + (sap_f - sap_r) * t_out * t_out * (3 - 2 * t_out))
    wds = np.exp(-((g.ds / (g.disc("height") / 2 + 5.0)) ** 2))
    lam = g.vert("lamina_front")
    xp = g.vert("interpedicular") / 2
    roof = lam - 4.0 * np.clip(ax / xp, 0, 1) ** 2
    return prof, roof + (prof - roof) * wds


def _paint_arch(c: Canvas, g: _Levels, s: Array, v: Array, x: Array, idx: Array, i: Array, prof: Array, v_back: Array, delta: float) -> None:
    """Pedicles, laminae, spinous and transverse processes, facets, joint line, ligamentum flavum (g on voxels i)."""
    vv, ax, ds = v[i], np.abs(x[i]), g.ds
    lam, dv, hv = g.vert("lamina_front"), g.vert("depth"), g.vert("height")
    dsv = s[i] - g.vert("s_centre")
    pw = g.vert("pedicle_width")
    xp = g.vert("interpedicular") / 2 + pw / 2
    xr, xf, h = g.side("recess_x"), g.side("foramen_x"), g.disc("height")
    f = np.full(len(i), 50.0, dtype=F32)
    parts = [
        (ax < xp + 4, lambda k: round_max([v_back[k] - vv[k], vv[k] - v_back[k] - 7.5, ax[k] - xp[k] - 1.0,
                                           -dsv[k] - hv[k] / 2 - 4 - 0.3 * (vv[k] - lam[k]), dsv[k] - hv[k] / 2 + 6], 1.5)),
        (ax < 8, lambda k: round_max([ax[k] - 2.5 - 0.04 * (vv[k] - lam[k]), lam[k] + 4 - vv[k], vv[k] - lam[k] - 31.0,
                                      -dsv[k] - 0.42 * hv[k] - 0.35 * (vv[k] - lam[k]), dsv[k] - 0.3 * hv[k] + 0.35 * (vv[k] - lam[k])], 3.0)),
        (np.abs(ax - xp) < pw / 2 + 3, lambda k: round_max([ellipse_f(ax[k] - xp[k], dsv[k] - 0.22 * hv[k], pw[k] / 2, 7.0),
                                                          dv[k] / 2 - 3 - vv[k], vv[k] - lam[k] - 2], 1.0)),
        (ax > xp - 3, lambda k: round_max([ellipse_f(vv[k] - lam[k] + 3.0, dsv[k] - 0.1 * hv[k],
                                                     4.0 - 1.5 * np.clip((ax[k] - xp[k]) / 28, 0, 1), 5.0 - 2.0 * np.clip((ax[k] - xp[k]) / 28, 0, 1)),
                                           xp[k] - ax[k], ax[k] - xp[k] - 28.0], 2.0)),
    ]
    root_top = g.side("root_s") - g.disc("s_centre") + ROOT_RADIUS + 2.5
    xc, vc = (xr + xf) / 2 + 2.0, g.side("sap_front_recess") + 9.0
    facet_zone = (ax > xr - 3) & (ax < xf + 10) & (ds > -h / 2 - 12) & (ds < root_top + 2)
    parts.append((facet_zone, lambda k: round_max([xr[k] - 1 - ax[k], prof[k] - vv[k], ellipse_f(ax[k] - xc[k], vv[k] - vc[k], (xf[k] - xr[k]) / 2 + 6, 10.0),
                                                   -ds[k] - h[k] / 2 - 10, ds[k] - root_top[k]], 2.0)))
    for zone, shape in parts:
        k = np.flatnonzero(zone)
        f[k] = smooth_min(f[k], shape(k), 2.0)
    _bone(c, f, delta, idx[i])
    k = np.flatnonzero(facet_zone)
    angle = g.disc("facet_angle", k)
    d = (ax[k] - xc[k]) * np.cos(angle) - (vv[k] - vc[k]) * np.sin(angle)
    f_facet = parts[-1][1](k)
    c.paint(np.maximum(np.abs(d) - 0.6, f_facet + 1.2), Tissue.JOINT, delta, idx[i[k]])
    k = np.flatnonzero((ax < xr + 3) & (np.abs(ds) < h / 2 + 11))
    t_lf = g.disc("lf_thickness", k) * np.exp(-((ds[k] / (h[k] / 2 + 5.0)) ** 2))
    f_lf = round_max([v_back[k] - vv[k], vv[k] - v_back[k] - t_lf, ax[k] - xr[k] - 1.0, np.abs(ds[k]) - h[k] / 2 - 9.0], 1.0)
    c.paint(f_lf, Tissue.LIGAMENT, delta, idx[i[k]])


# Cauda equina roots: (x, v) positions as fractions of the sac half axes, dependent (posterior).
_CAUDA: tuple[tuple[float, float], ...] = tuple(
    (0.62 * float(np.cos(a)), 0.25 + 0.5 * float(np.sin(a))) for a in np.linspace(0.15 * np.pi, 0.85 * np.pi, 12)
) + ((0.0, 0.35), (0.25, 0.1), (-0.25, 0.1))


def _paint_canal(c: Canvas, sp: Spine, g: _Levels, s: Array, v: Array, x: Array, idx: Array, delta: float) -> None:
    """Dural sac (CSF), conus and cauda equina."""
    i = np.flatnonzero((v > 2) & (v < 50) & (np.abs(x) < 16))
    g = g.at(i)
    sv, vv, xv, ds = s[i], v[i], x[i], g.ds
    h = g.disc("height")
    wds = np.exp(-((ds / (h / 2 + 5.0)) ** 2))
    r_ap0, r_lr0 = g.disc("sac_r_ap0"), g.disc("sac_r_lr0")
    v0 = g.vert("depth") / 2 + 1.0 + r_ap0
    v_sc = v0 + (g.disc("sac_v") - v0) * wds
    r_ap = r_ap0 + (g.disc("sac_r_ap") - r_ap0) * wds
    r_lr = r_lr0 + (g.disc("sac_r_lr") - r_lr0) * wds
    taper = np.clip((sv - float(sp.sac_end_s)) / 15.0, 0.05, 1.0)
    sac = c.paint(ellipse_f(xv, vv - v_sc, r_lr * taper, r_ap * taper), Tissue.CSF, delta, idx[i])
    cord = np.clip((sv - float(sp.conus_s)) / 15.0, 0.0, 1.0)
    c.paint(ellipse_f(xv, vv - v_sc, 5.0 * cord + 0.01, 4.0 * cord + 0.01) + F32(10.0) * (cord <= 0), Tissue.CORD, delta, idx[i])
    k = np.flatnonzero((sac > 0.2) & (sv < sp.conus_s + 5))
    for xn, yn in _CAUDA:
        f_root = np.hypot(xv[k] - xn * r_lr[k], vv[k] - v_sc[k] - yn * r_ap[k]) - 1.0
        c.paint(f_root, Tissue.NERVE, delta, idx[i[k]])


def _paint_roots(c: Canvas, g: _Levels, v: Array, x: Array, idx: Array, near: Array, delta: float) -> None:
    """Exiting roots through the foramina (with ganglia) and traversing roots in the lateral recesses (g on voxels near)."""
    ax, vn, ds = np.abs(x[near]), v[near], g.ds
    xf, xr = g.side("foramen_x"), g.side("recess_x")
    sc = g.disc("s_centre")
    root_s, root_v, r_ap = g.side("root_s"), g.side("root_v"), g.side("root_r_ap")
    s_path = root_s - sc + 0.45 * np.maximum(xf - ax, 0.0)
    drg = 1.0 + 0.35 * np.exp(-(((ax - xf - 6.0) / 3.0) ** 2))
    f_exit = np.maximum(ellipse_f(ds - s_path, vn - root_v, ROOT_RADIUS * drg, r_ap * drg), np.maximum(xr - ax, ax - xf - 16))
    c.paint(f_exit, Tissue.NERVE, delta, idx[near])
    depth = g.side("recess_depth")
    front = g.side("sap_front_recess") - depth
    r_t = np.minimum(TRAVERSING_RADIUS, depth / 2 + 0.2)
    f_trav = np.maximum(ellipse_f(ax - (xr - 1.0), vn - front - depth / 2, TRAVERSING_RADIUS, r_t), np.abs(ds) - g.disc("height") / 2 - 8)
    c.paint(f_trav, Tissue.NERVE, delta, idx[near])
