"""The entity embeddings in the Poincaré disk (PNG), and the maps that put them there.

Figures as in flows/report/figure.py: explicit Agg canvas, checked inputs, atomic PNG writes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.patches import Circle

from flows.report.figure import LEVEL_NAMES, new_figure, save_png
from hierloc.geometry.lorentz import to_poincare


def lorentz_to_ball(points: Any, curvature: float) -> np.ndarray:
    """Hyperboloid points (N, d+1) of geoopt's Lorentz(k=K) (time first, <x,x>_L = -K) ->
    unit Poincaré ball (N, d): p = x_space / (x0 + sqrt(K)), |p| = tanh(dist0(x) / (2 sqrt(K)))."""
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"points: expected shape (N, d+1) with d >= 1, got {x.shape}")
    if not (np.isfinite(curvature) and curvature > 0):
        raise ValueError(f"curvature={curvature}: K must be > 0 (points satisfy <x,x>_L = -K)")
    x0, space = x[:, 0], x[:, 1:]
    inner = -x0**2 + np.sum(space**2, axis=1)
    # float32 points far out lose the constraint to rounding (x0^2 ~ 1e8 at distance 10): relative test
    bad = np.flatnonzero(~(x0 > 0) | ~(np.abs(inner + curvature) <= 1e-4 * np.maximum(curvature, x0**2)))
    if bad.size:
        raise ValueError(
            f"points: {bad.size} of {len(x)} rows are off the hyperboloid <x,x>_L = -K, K={curvature} "
            f"(row {bad[0]}: <x,x>_L = {inner[bad[0]]:.4g}); pass the model's curvature, or geometry='euclidean'"
        )
    # hierloc.geometry.lorentz.to_poincare maps to the ball of radius sqrt(K): scale it to the unit ball.
    return to_poincare(torch.from_numpy(x), k=curvature).numpy() / np.sqrt(curvature)


def radial_pca_2d(coords: np.ndarray) -> np.ndarray:
    """(N, d) -> (N, 2): direction from the top-2 principal axes of the centred coords, norm kept
    exactly (each uncentred projection is rescaled to the point's own norm; the origin stays put)."""
    c = np.asarray(coords, dtype=np.float64)
    if c.shape[1] == 1:
        return np.c_[c, np.zeros(len(c))]
    centred = c - c.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    proj = c @ vectors[:, ::-1][:, :2]
    proj_norm = np.linalg.norm(proj, axis=1, keepdims=True)
    # a point orthogonal to the plane has no direction there: put it on the first axis
    direction = np.where(proj_norm > 1e-12, proj / np.maximum(proj_norm, 1e-12), [1.0, 0.0])
    return direction * np.linalg.norm(c, axis=1, keepdims=True)


def poincare_disk(
    points: Any, levels: Any, curvature: float, path: str | os.PathLike[str], *,
    level_names: Sequence[str] = LEVEL_NAMES, max_points_per_level: int = 3000, seed: int = 0,
    geometry: str = "lorentz",
) -> tuple[Path, dict[str, float]]:
    """Entity embeddings in the unit disk, coloured by level (ints (N,) indexing level_names).

    lorentz: (N, d+1) hyperboloid points -> unit ball (:func:`lorentz_to_ball`) -> radial PCA.
    euclidean: (N, d) vectors divided by the largest norm -> radial PCA (curvature ignored).
    Draws at most ``max_points_per_level`` per level (seeded). Returns the path and, on ALL
    points, ``mean_ball_radius_<level>`` (lorentz) or ``mean_scaled_norm_<level>`` (euclidean).
    """
    if geometry == "lorentz":
        coords, key, how = lorentz_to_ball(points, curvature), "mean_ball_radius", f"Poincaré disk, K={curvature:g}"
    elif geometry == "euclidean":
        coords = np.asarray(points, dtype=np.float64)
        if coords.ndim != 2 or not np.isfinite(coords).all():
            raise ValueError(f"points: expected a finite (N, d) array, got shape {coords.shape}")
        coords = coords / max(float(np.linalg.norm(coords, axis=1).max(initial=0.0)), 1e-12)
        key, how = "mean_scaled_norm", "Euclidean, scaled by the max norm (no ball map)"
    else:
        raise ValueError(f"geometry={geometry!r}: expected 'lorentz' or 'euclidean'")
    lv = np.asarray(levels)
    if lv.shape != (len(coords),) or lv.dtype.kind not in "iu" or ((lv < 0) | (lv >= len(level_names))).any():
        raise ValueError(f"levels: need {len(coords)} ints in [0, {len(level_names)}) indexing {tuple(level_names)}")
    xy, radius = radial_pca_2d(coords), np.linalg.norm(coords, axis=1)
    stats = {f"{key}_{name}": float(radius[lv == i].mean()) for i, name in enumerate(level_names) if (lv == i).any()}
    rng = np.random.default_rng(seed)
    fig = new_figure(7.0, 7.0)
    ax = fig.add_subplot()
    ax.add_patch(Circle((0.0, 0.0), 1.0, fill=False, color="0.3", linewidth=1.0))
    for i in reversed(range(len(level_names))):  # deepest first, so parents are drawn on top
        rows = np.flatnonzero(lv == i)
        if rows.size:
            shown = rng.choice(rows, size=min(rows.size, max_points_per_level), replace=False)
            ax.scatter(*xy[shown].T, s=max(24.0 / 2**i, 1.5), color=f"C{i}", alpha=0.7, linewidths=0,
                       label=f"{level_names[i]} ({rows.size}), mean r {radius[rows].mean():.3f}")
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.legend(loc="lower left", fontsize=8, markerscale=2)
    ax.set_title(f"Entities: {how}, radial PCA to 2-D", fontsize=10)
    return save_png(fig, path), stats

