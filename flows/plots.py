"""Evaluation figures (PNG) for MLflow and ``hierloc predict --map``.

Figures are ``matplotlib.figure.Figure`` objects on an explicit Agg canvas: no pyplot, no
backend switch, no global state, safe in worker threads. Each public plot validates its
inputs (ValueError naming the argument), writes its PNG atomically (temp file in the same
folder, then os.replace) and returns the Path. Maps are plate carrée: x = lon_deg,
y = lat_deg (EPSG:4326), with Natural Earth country outlines (geodata.admin.outlines).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from geodata.atomic import atomic_write_path
from geodata.admin.outlines import world_outlines
from hierloc.geometry.geo import EARTH_RADIUS_KM, haversine_km
from hierloc.geometry.lorentz import to_poincare

LEVEL_NAMES: tuple[str, ...] = ("country", "region", "subregion", "city")
DPI = 120
#: Error colour/axis range (km): errors under 1 km share one colour; the top is half the equator.
ERROR_RANGE_KM = (1.0, float(np.pi * EARTH_RADIUS_KM))
WORLD = (-180.0, 180.0, -90.0, 90.0)  # lon_min, lon_max, lat_min, lat_max (deg)


def _figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically (geodata.atomic)."""
    path = Path(path)
    with atomic_write_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=DPI)
    return path


def _draw_world(ax: Axes, extent: tuple[float, float, float, float] = WORLD, *, scale: str = "110m") -> None:
    """Country outlines on ``ax``, limits set to ``extent`` (lon_min, lon_max, lat_min, lat_max, deg)."""
    ax.add_collection(LineCollection(world_outlines(scale), colors="0.55", linewidths=0.5, zorder=1))
    lon0, lon1, lat0, lat1 = extent
    ax.set_xlim(lon0, lon1)
    ax.set_ylim(lat0, lat1)
    # one degree of longitude is cos(lat) degrees of latitude long; cap the stretch at 2 (60 deg)
    ax.set_aspect(1.0 / np.cos(np.deg2rad(np.clip((lat0 + lat1) / 2, -60.0, 60.0))))
    ax.set_facecolor("#f3f7fa")
    ax.set_xlabel("longitude (deg)")
    ax.set_ylabel("latitude (deg)")


def _floats(values: Any, name: str, *, n: int | None = None) -> np.ndarray:
    """``values`` as a finite 1-D float64 array of length ``n`` (if given), else ValueError."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name}: length {len(a)} does not match the {n} true points")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(f"{name}: {bad.size} non-finite values, first at index {bad[0]}")
    return a


def _latlon(lat_deg: Any, lon_deg: Any, prefix: str, *, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    lat = _floats(lat_deg, f"{prefix}lat_deg", n=n)
    lon = _floats(lon_deg, f"{prefix}lon_deg", n=len(lat) if n is None else n)
    if np.abs(lat).max(initial=0.0) > 90.0 or np.abs(lon).max(initial=0.0) > 180.0:
        raise ValueError(f"{prefix}lat_deg/lon_deg: outside [-90, 90] x [-180, 180] degrees")
    return lat, lon


def map_segments(lon1_deg: np.ndarray, lat1_deg: np.ndarray, lon2_deg: np.ndarray, lat2_deg: np.ndarray) -> np.ndarray:
    """Map segments from point 1 to point 2 the short way round: (n,) x 4 -> (m, 2, 2).

    Each segment is [[lon_a, lat_a], [lon_b, lat_b]] (deg). A pair with |dlon| > 180 (the
    short way crosses the antimeridian) is split at lon = +-180 into two segments, the
    crossing latitude linearly interpolated, so no line spans the map. m = n + crossings.
    """
    lon1, lat1, lon2, lat2 = (np.asarray(a, dtype=np.float64) for a in (lon1_deg, lat1_deg, lon2_deg, lat2_deg))
    dlon = lon2 - lon1
    cross = np.abs(dlon) > 180.0
    direct = np.stack([np.stack([lon1, lat1], -1), np.stack([lon2, lat2], -1)], axis=1)[~cross]
    a_lon, a_lat, b_lon, b_lat = lon1[cross], lat1[cross], lon2[cross], lat2[cross]
    b_unwrapped = b_lon - 360.0 * np.sign(dlon[cross])  # point 2 seen from point 1's side
    edge = np.where(b_unwrapped > 180.0, 180.0, -180.0)
    t = (edge - a_lon) / (b_unwrapped - a_lon)  # |b_unwrapped - a_lon| >= 180: no division by 0
    lat_c = a_lat + t * (b_lat - a_lat)
    first = np.stack([np.stack([a_lon, a_lat], -1), np.stack([edge, lat_c], -1)], axis=1)
    second = np.stack([np.stack([-edge, lat_c], -1), np.stack([b_lon, b_lat], -1)], axis=1)
    return np.concatenate([direct, first, second])


def error_map(
    true_lat_deg: Any, true_lon_deg: Any, pred_lat_deg: Any, pred_lon_deg: Any, path: str | os.PathLike[str],
    *, max_lines: int = 2000, title: str | None = None, seed: int = 0,
) -> Path:
    """World map of the truths (N,) coloured by error km (log scale, 1 km .. 20,015 km), with
    thin truth -> prediction lines for a seeded random subset of at most ``max_lines``."""
    t_lat, t_lon = _latlon(true_lat_deg, true_lon_deg, "true_")
    if len(t_lat) == 0:
        raise ValueError("error_map: no points (true_lat_deg is empty)")
    p_lat, p_lon = _latlon(pred_lat_deg, pred_lon_deg, "pred_", n=len(t_lat))
    if max_lines < 0:
        raise ValueError(f"max_lines={max_lines}: must be >= 0")
    dist_km = haversine_km(t_lat, t_lon, p_lat, p_lon)
    fig = _figure(12.0, 6.4)
    ax = fig.add_subplot()
    _draw_world(ax)
    pick = np.random.default_rng(seed).choice(len(t_lat), size=min(len(t_lat), max_lines), replace=False)
    segments = map_segments(t_lon[pick], t_lat[pick], p_lon[pick], p_lat[pick])
    ax.add_collection(LineCollection(segments, colors="crimson", linewidths=0.3, alpha=0.35, zorder=2))
    order = np.argsort(dist_km, kind="stable")  # largest errors drawn last, on top
    points = ax.scatter(
        t_lon[order], t_lat[order], c=np.clip(dist_km[order], *ERROR_RANGE_KM), s=7, linewidths=0,
        cmap="viridis", norm=LogNorm(*ERROR_RANGE_KM), zorder=3,
    )
    fig.colorbar(points, ax=ax, label="error (km, log scale)", shrink=0.8)
    ax.set_title(title or f"{len(t_lat)} queries, median error {np.median(dist_km):.0f} km "
                 f"({len(pick)} truth -> prediction lines)")
    return _save_png(fig, path)


def error_cdf(
    dist_km: Any, path: str | os.PathLike[str], *, thresholds_km: Sequence[float] = (1, 25, 200, 750, 2500)
) -> Path:
    """Fraction of queries with error <= x (km, log x axis) from (N,) errors; the fraction is
    annotated at each threshold (inclusive, d <= t)."""
    d = np.sort(_floats(dist_km, "dist_km"))
    if d.size == 0:
        raise ValueError("dist_km is empty: no errors to plot a CDF of")
    if d[0] < 0:
        raise ValueError(f"dist_km: negative distance {d[0]} km")
    thresholds = _floats(thresholds_km, "thresholds_km")
    if (thresholds <= 0).any():
        raise ValueError(f"thresholds_km={tuple(thresholds_km)}: must be > 0 km for a log axis")
    floor_km = 0.1  # zero errors sit at the left edge of the log axis
    frac = np.arange(1, d.size + 1) / d.size
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    ax.step(np.r_[floor_km, np.maximum(d, floor_km)], np.r_[0.0, frac], where="post", color="C0")
    for t in thresholds:
        f = float(np.mean(d <= t))
        ax.axvline(t, color="0.6", linestyle="--", linewidth=0.8)
        ax.plot([t], [f], "o", color="C1", markersize=4)
        ax.annotate(f"{100 * f:.1f}% <= {t:g} km", (t, 0.98), xytext=(3, 0), textcoords="offset points",
                    rotation=90, va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(floor_km, max(ERROR_RANGE_KM[1], d[-1]))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("error (km)")
    ax.set_ylabel("fraction of queries with error <= x")
    ax.set_title(f"Error CDF, {d.size} queries, median {np.median(d):.1f} km")
    ax.grid(alpha=0.3, which="both")
    return _save_png(fig, path)


def level_accuracy_bars(metrics: Mapping[str, float], path: str | os.PathLike[str]) -> Path:
    """Grouped bars (%) per level of ``acc_<level>`` (reverse-geocoded, the official metric) and
    ``pick_acc_<level>`` (beam-search pick), fractions in [0, 1]; missing keys skipped, NaN as n/a."""
    series = (("acc", "reverse-geocoded (official)"), ("pick_acc", "beam-search pick"))
    levels = [lv for lv in LEVEL_NAMES if any(f"{p}_{lv}" in metrics for p, _ in series)]
    if not levels:
        raise ValueError(f"metrics has no acc_<level> or pick_acc_<level> for {LEVEL_NAMES}; keys: {sorted(metrics)}")
    used = [(p, label) for p, label in series if any(f"{p}_{lv}" in metrics for lv in levels)]
    fig = _figure(1.6 * len(levels) + 2.5, 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(used)
    for j, (prefix, label) in enumerate(used):
        present = [f"{prefix}_{lv}" in metrics for lv in levels]
        values = np.array([float(metrics.get(f"{prefix}_{lv}", np.nan)) for lv in levels])
        if (np.abs(values - 0.5) > 0.5).any():  # NaN compares False: allowed
            raise ValueError(f"{prefix}_<level> values {values.tolist()}: fractions must lie in [0, 1]")
        x = np.arange(len(levels)) + (j - (len(used) - 1) / 2) * width
        bars = ax.bar(x, np.nan_to_num(100 * values), width, label=label, color=f"C{j}")
        texts = [f"{100 * v:.1f}%" if np.isfinite(v) else "n/a" * has for v, has in zip(values, present)]
        ax.bar_label(bars, labels=texts, fontsize=8)
    ax.set_xticks(np.arange(len(levels)), levels)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per level")
    ax.legend(loc="upper right", fontsize=8)
    return _save_png(fig, path)


def _codes(values: Any, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=object)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of country codes, got shape {a.shape}")
    s = pd.Series(a, dtype=object)
    return s.where(s.notna(), "?").astype(str).to_numpy()  # None/NaN -> "?" ("NA" is Namibia)


def confusion_table(true_cc: Any, pred_cc: Any, *, top: int = 15) -> tuple[list[str], np.ndarray, int]:
    """Row-normalised confusion of the ``top`` most frequent true countries (ties by code).

    (N,) x 2 codes -> (labels (k,), fractions (k, k + 1) whose last column is "other"
    (predictions outside the k), number of queries whose truth is among the k).
    """
    t, p = _codes(true_cc, "true_cc"), _codes(pred_cc, "pred_cc")
    if len(t) != len(p) or len(t) == 0:
        raise ValueError(f"true_cc/pred_cc: need equal non-zero lengths, got {len(t)} and {len(p)}")
    if top < 1:
        raise ValueError(f"top={top}: must be >= 1")
    codes, counts = np.unique(t, return_counts=True)
    labels = codes[np.argsort(-counts, kind="stable")[:top]].tolist()
    index = pd.Index(labels)
    rows, cols = index.get_indexer(t), index.get_indexer(p)
    keep = rows >= 0
    table = np.zeros((len(labels), len(labels) + 1))
    np.add.at(table, (rows[keep], np.where(cols[keep] >= 0, cols[keep], len(labels))), 1.0)
    return labels, table / table.sum(axis=1, keepdims=True), int(keep.sum())


def country_confusion(true_cc: Any, pred_cc: Any, path: str | os.PathLike[str], *, top: int = 15) -> Path:
    """Heat map (row %) of :func:`confusion_table`: rows true country, columns predicted + "other"."""
    labels, frac, covered = confusion_table(true_cc, pred_cc, top=top)
    k = len(labels)
    fig = _figure(0.5 * k + 3.0, 0.45 * k + 2.2)
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), v in np.ndenumerate(frac):
        if v >= 0.005:
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    ax.set_xticks(np.arange(k + 1), [*labels, "other"], rotation=90)
    ax.set_yticks(np.arange(k), labels)
    ax.set_xlabel("predicted country")
    ax.set_ylabel("true country")
    n = len(np.asarray(true_cc, dtype=object))
    ax.set_title(f"Country confusion (row %), top {k} true countries = {100 * covered / n:.0f}% of {n}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the row")
    return _save_png(fig, path)


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
    fig = _figure(7.0, 7.0)
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
    return _save_png(fig, path), stats


def map_extent(
    lon_deg: np.ndarray, lat_deg: np.ndarray, *, margin: float = 0.15, min_width_deg: float = 20.0
) -> tuple[float, float, float, float]:
    """(lon_min, lon_max, lat_min, lat_max) framing the points with a ``margin`` fraction, at least
    ``min_width_deg`` wide and half that tall, kept inside the world; the world when spread out."""
    lon_span, lat_span = float(np.ptp(lon_deg)), float(np.ptp(lat_deg))
    if lon_span > 180.0 or lat_span > 90.0:
        return WORLD
    width = max(lon_span * (1 + 2 * margin), min_width_deg)
    height = max(lat_span * (1 + 2 * margin), min_width_deg / 2)
    lon0 = np.clip((np.min(lon_deg) + np.max(lon_deg) - width) / 2, -180.0, 180.0 - width)
    lat0 = np.clip((np.min(lat_deg) + np.max(lat_deg) - height) / 2, -90.0, 90.0 - height)
    return float(lon0), float(lon0 + width), float(lat0), float(lat0 + height)


def candidates_map(
    candidates: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
    truth: tuple[float, float] | None = None, title: str | None = None,
) -> Path:
    """Map of predicted candidates (dicts with lat, lon (deg), prob, label), sized and coloured by
    prob, the top 5 labelled; optional ``truth`` = (lat_deg, lon_deg) as a star."""
    if len(candidates) == 0:
        raise ValueError("candidates is empty: nothing to map")
    for i, c in enumerate(candidates):
        if missing := {"lat", "lon", "prob", "label"} - set(c):
            raise ValueError(f"candidates[{i}] lacks keys {sorted(missing)}")
    lat, lon = _latlon([c["lat"] for c in candidates], [c["lon"] for c in candidates], "candidates ")
    prob = _floats([c["prob"] for c in candidates], "candidates prob")
    if (prob < 0).any():
        raise ValueError(f"candidates prob: negative value {prob.min()}")
    t_lat, t_lon = _latlon([truth[0]], [truth[1]], "truth ") if truth is not None else (lat[:0], lon[:0])
    extent = map_extent(np.r_[lon, t_lon], np.r_[lat, t_lat])
    fig = _figure(9.0, 6.0)
    ax = fig.add_subplot()
    _draw_world(ax, extent, scale="110m" if extent == WORLD else "50m")
    order = np.argsort(prob, kind="stable")  # most probable drawn last, on top
    top_prob = max(float(prob.max()), 1e-12)
    markers = ax.scatter(lon[order], lat[order], s=30 + 300 * prob[order] / top_prob, c=prob[order], cmap="viridis",
                         vmin=0.0, vmax=top_prob, edgecolors="black", linewidths=0.5, zorder=3)
    fig.colorbar(markers, ax=ax, label="probability", shrink=0.7)
    for rank, i in enumerate(order[::-1][:5], start=1):
        ax.annotate(f"{rank}. {candidates[i]['label']} ({100 * prob[i]:.1f}%)", (lon[i], lat[i]), xytext=(7, 7),
                    textcoords="offset points", fontsize=8, zorder=6,
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.75, "linewidth": 0})
    best = int(order[-1])
    if truth is not None:
        ax.scatter(t_lon, t_lat, marker="*", s=260, color="red", edgecolors="black", linewidths=0.6, zorder=5,
                   label="truth")
        ax.legend(loc="lower left", fontsize=8)
        dist = float(haversine_km(t_lat[0], t_lon[0], lat[best], lon[best]))
        title = title or f"{len(prob)} candidate(s); best is {dist:.0f} km from the truth"
    ax.set_title(title or f"{len(prob)} candidate(s); best: {candidates[best]['label']}")
    return _save_png(fig, path)


def entity_map(lat_deg: Any, lon_deg: Any, levels: Any, path: str | os.PathLike[str], *,
               n_images: Any = None, title: str | None = None) -> Path:
    """World map of the entity table: one marker per entity at its coordinates, coloured by
    level (ints indexing LEVEL_NAMES), cities sized by their image count when given."""
    lat, lon = _latlon(lat_deg, lon_deg, "entity ")
    lv = np.asarray(levels)
    if lv.shape != lat.shape or lv.dtype.kind not in "iu" or ((lv < 0) | (lv >= len(LEVEL_NAMES))).any():
        raise ValueError(f"levels: need {len(lat)} ints in [0, {len(LEVEL_NAMES)})")
    counts = None if n_images is None else _floats(n_images, "n_images", n=len(lat))
    fig = _figure(12.0, 6.5)
    ax = fig.add_subplot()
    _draw_world(ax)
    for i in reversed(range(len(LEVEL_NAMES))):  # cities first, countries on top
        rows = lv == i
        if not rows.any():
            continue
        size = 2.0 if counts is None or i < 3 else 1.0 + 12.0 * np.sqrt(counts[rows] / max(counts[rows].max(), 1.0))
        ax.scatter(lon[rows], lat[rows], s=size if i == 3 else 40.0 / (i + 1), color=f"C{i}", alpha=0.6 if i == 3 else 0.9,
                   linewidths=0, label=f"{LEVEL_NAMES[i]} ({int(rows.sum()):,})", zorder=3 + (3 - i))
    ax.legend(loc="lower left", fontsize=8, markerscale=2)
    ax.set_title(title or f"{len(lat):,} entities")
    return _save_png(fig, path)
