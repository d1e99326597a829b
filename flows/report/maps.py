"""World maps (PNG): prediction errors, predicted candidates, the entity table.

Plate carrée: x = lon_deg, y = lat_deg (EPSG:4326), with Natural Earth country outlines
(geodata.admin.outlines). Figures as in flows/report/figure.py: explicit Agg canvas,
checked inputs, atomic PNG writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm

from flows.report.figure import ERROR_RANGE_KM, LEVEL_NAMES, checked_latlon, finite_floats, new_figure, save_png
from geodata.admin.outlines import world_outlines
from hierloc.geometry.geo import haversine_km

WORLD = (-180.0, 180.0, -90.0, 90.0)  # lon_min, lon_max, lat_min, lat_max (deg)


def draw_world(ax: Axes, extent: tuple[float, float, float, float] = WORLD, *, scale: str = "110m") -> None:
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
    t_lat, t_lon = checked_latlon(true_lat_deg, true_lon_deg, "true_")
    if len(t_lat) == 0:
        raise ValueError("error_map: no points (true_lat_deg is empty)")
    p_lat, p_lon = checked_latlon(pred_lat_deg, pred_lon_deg, "pred_", n=len(t_lat))
    if max_lines < 0:
        raise ValueError(f"max_lines={max_lines}: must be >= 0")
    dist_km = haversine_km(t_lat, t_lon, p_lat, p_lon)
    fig = new_figure(12.0, 6.4)
    ax = fig.add_subplot()
    draw_world(ax)
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
    return save_png(fig, path)


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
    lat, lon = checked_latlon([c["lat"] for c in candidates], [c["lon"] for c in candidates], "candidates ")
    prob = finite_floats([c["prob"] for c in candidates], "candidates prob")
    if (prob < 0).any():
        raise ValueError(f"candidates prob: negative value {prob.min()}")
    t_lat, t_lon = checked_latlon([truth[0]], [truth[1]], "truth ") if truth is not None else (lat[:0], lon[:0])
    extent = map_extent(np.r_[lon, t_lon], np.r_[lat, t_lat])
    fig = new_figure(9.0, 6.0)
    ax = fig.add_subplot()
    draw_world(ax, extent, scale="110m" if extent == WORLD else "50m")
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
    return save_png(fig, path)


def entity_map(lat_deg: Any, lon_deg: Any, levels: Any, path: str | os.PathLike[str], *,
               n_images: Any = None, title: str | None = None) -> Path:
    """World map of the entity table: one marker per entity at its coordinates, coloured by
    level (ints indexing LEVEL_NAMES), cities sized by their image count when given."""
    lat, lon = checked_latlon(lat_deg, lon_deg, "entity ")
    lv = np.asarray(levels)
    if lv.shape != lat.shape or lv.dtype.kind not in "iu" or ((lv < 0) | (lv >= len(LEVEL_NAMES))).any():
        raise ValueError(f"levels: need {len(lat)} ints in [0, {len(LEVEL_NAMES)})")
    counts = None if n_images is None else finite_floats(n_images, "n_images", n=len(lat))
    fig = new_figure(12.0, 6.5)
    ax = fig.add_subplot()
    draw_world(ax)
    for i in reversed(range(len(LEVEL_NAMES))):  # cities first, countries on top
        rows = lv == i
        if not rows.any():
            continue
        size = 2.0 if counts is None or i < 3 else 1.0 + 12.0 * np.sqrt(counts[rows] / max(counts[rows].max(), 1.0))
        ax.scatter(lon[rows], lat[rows], s=size if i == 3 else 40.0 / (i + 1), color=f"C{i}", alpha=0.6 if i == 3 else 0.9,
                   linewidths=0, label=f"{LEVEL_NAMES[i]} ({int(rows.sum()):,})", zorder=3 + (3 - i))
    ax.legend(loc="lower left", fontsize=8, markerscale=2)
    ax.set_title(title or f"{len(lat):,} entities")
    return save_png(fig, path)
