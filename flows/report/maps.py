"""World maps (PNG): prediction errors, predicted candidates, the entity table.

Plate carrée: x = lon_deg, y = lat_deg (EPSG:4326), with Natural Earth country outlines
(geodata.admin.outlines). Figures as in flows/report/figure.py: explicit Agg canvas,
checked inputs, atomic PNG writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from flows.report import labels
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


def crowd_fraction(n: int) -> float:
    """0 for at most 10 points, 1 for at least 100,000, linear in log10(n) between."""
    return float(np.clip(np.log10(max(n, 1) / 10.0) / 4.0, 0.0, 1.0))


def point_style(n: int) -> tuple[float, float, float]:
    """(marker area pt^2, alpha, edge width pt) for ``n`` points on a world map. With
    t = crowd_fraction(n): area = 36 * (2 / 36)^t (6 pt wide at 10 points, 1.4 pt at 100k),
    alpha = 1 - 0.7 t (opaque -> 0.3), a dark edge 0.5 (1 - t) pt wide (none at 100k).
    n = 10, 1,000, 100,000: (36, 1.0, 0.5), (8.5, 0.65, 0.25), (2, 0.3, 0)."""
    t = crowd_fraction(n)
    return 36.0 * (2.0 / 36.0) ** t, 1.0 - 0.7 * t, 0.5 * (1.0 - t)


def line_style(n: int) -> tuple[float, float]:
    """(line width pt, alpha) for ``n`` truth -> prediction lines: with t = crowd_fraction(n),
    width = 1.6 * (0.25 / 1.6)^t, alpha = 0.9 - 0.7 t. n = 10, 1,000, 2,000 (the default
    cap): (1.6, 0.9), (0.63, 0.55), (0.55, 0.50)."""
    t = crowd_fraction(n)
    return 1.6 * (0.25 / 1.6) ** t, 0.9 - 0.7 * t


def error_map(
    true_lat_deg: Any, true_lon_deg: Any, pred_lat_deg: Any, pred_lon_deg: Any, path: str | os.PathLike[str],
    *, max_lines: int = 2000, title: str | None = None, seed: int = 0,
) -> Path:
    """World map of the truths (N,) coloured by error km (log scale, 1 km .. 20,015 km), with
    truth -> prediction lines for a seeded random subset of at most ``max_lines``. Marker size,
    alpha and line width follow the number drawn (point_style, line_style): few points are
    big and opaque, 100k small and translucent."""
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
    width_pt, line_alpha = line_style(len(pick))
    ax.add_collection(LineCollection(segments, colors="crimson", linewidths=width_pt, alpha=line_alpha, zorder=2))
    order = np.argsort(dist_km, kind="stable")  # largest errors drawn last, on top
    size_pt2, alpha, edge_pt = point_style(len(t_lat))
    norm = LogNorm(*ERROR_RANGE_KM)
    ax.scatter(t_lon[order], t_lat[order], c=np.clip(dist_km[order], *ERROR_RANGE_KM), s=size_pt2, alpha=alpha,
               edgecolors="0.15", linewidths=edge_pt, cmap="viridis", norm=norm, zorder=3)
    # the colour bar from the colour map itself: opaque, whatever the points' alpha
    fig.colorbar(ScalarMappable(norm, "viridis"), ax=ax, label="error (km, log scale)", shrink=0.8)
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


#: Candidates labelled on the map at most (by rank); the next ones go to the numbered list.
MAX_LABELS = 10
#: Lines of the numbered list at most; the rest are counted on one more line.
MAX_LISTED = 24
#: A label longer than this is cut, with an ellipsis.
LABEL_CHARS = 40
_TOP_TEXT = {"fontsize": 9.0, "fontweight": "bold"}  # the top answer's label
_TEXT = {"fontsize": 8.0}
_PAD = 0.2  # the label boxes' padding, in font sizes
_TOP_EDGE_PT = 0.8  # the top label box's outline
TRUTH_AREA_PT2 = 260.0  # the truth star


class CandidateLabels(NamedTuple):
    """Where each candidate's name went (ranks from 1): on the map, in the numbered list beside
    it, or only counted on its last line (past MAX_LISTED)."""

    labelled: list[int]
    listed: list[int]
    unlisted: int


def candidates_map(
    candidates: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
    truth: tuple[float, float] | None = None, title: str | None = None,
) -> Path:
    """Map of predicted candidates (dicts with lat, lon (deg), prob, label), sized and coloured by
    prob; optional ``truth`` = (lat_deg, lon_deg) as a star. Labels never collide (candidates_figure)."""
    fig, _ = candidates_figure(candidates, truth=truth, title=title)
    return save_png(fig, path)


def candidates_figure(
    candidates: Sequence[Mapping[str, Any]], *, truth: tuple[float, float] | None = None,
    title: str | None = None, max_labels: int = MAX_LABELS,
) -> tuple[Figure, CandidateLabels]:
    """The figure of candidates_map and where each label went. The top answer's label is always
    drawn, bold, above every other artist; the next ``max_labels - 1`` are placed by
    flows.report.labels so that no two labels overlap and none covers the top answer's label,
    marker, the truth star or the legend; the ones that cannot be placed, and those past
    ``max_labels``, are listed by rank in a panel beside the map (MAX_LISTED lines, then a count)."""
    if len(candidates) == 0:
        raise ValueError("candidates is empty: nothing to map")
    for i, c in enumerate(candidates):
        if missing := {"lat", "lon", "prob", "label"} - set(c):
            raise ValueError(f"candidates[{i}] lacks keys {sorted(missing)}")
    if max_labels < 1:
        raise ValueError(f"max_labels={max_labels}: must be >= 1 (the top answer is always labelled)")
    lat, lon = checked_latlon([c["lat"] for c in candidates], [c["lon"] for c in candidates], "candidates ")
    prob = finite_floats([c["prob"] for c in candidates], "candidates prob")
    if (prob < 0).any():
        raise ValueError(f"candidates prob: negative value {prob.min()}")
    rank = np.argsort(-prob, kind="stable")  # rank[0]: the top answer; ties keep the input order
    texts = [f"{r}. {_cut(str(candidates[i]['label']))} ({100 * prob[i]:.1f}%)" for r, i in enumerate(rank, start=1)]
    if truth is not None:
        t_lat, t_lon = checked_latlon([truth[0]], [truth[1]], "truth ")
        truth = float(t_lat[0]), float(t_lon[0])
        dist = float(haversine_km(t_lat[0], t_lon[0], lat[rank[0]], lon[rank[0]]))
        title = title or f"{len(prob)} candidate(s); best is {dist:.0f} km from the truth"
    title = title or f"{len(prob)} candidate(s); best: {candidates[rank[0]]['label']}"
    args = (lat[rank], lon[rank], prob[rank], truth, title)
    fig, ax, _ = _candidates_axes(*args, panel=False)
    dropped = _label(fig, ax, lat[rank], lon[rank], prob[rank], texts[:max_labels], truth=truth, skip=set())
    listed = sorted(dropped) + list(range(max_labels, len(rank)))
    if listed:  # again, with the list beside the map: its axes may be smaller, so more may drop
        fig, ax, side = _candidates_axes(*args, panel=True)
        listed = sorted(set(listed) | set(_label(fig, ax, lat[rank], lon[rank], prob[rank], texts[:max_labels],
                                                   truth=truth, skip=set(dropped))))
        lines = [texts[k] for k in listed[:MAX_LISTED]]
        if len(listed) > MAX_LISTED:
            lines.append(f"+ {len(listed) - MAX_LISTED} more, each <= {100 * prob[rank[listed[MAX_LISTED]]]:.1f}%")
        side.text(0.0, 1.0, "not labelled on the map:\n" + "\n".join(lines), transform=side.transAxes,
                  ha="left", va="top", linespacing=1.35, gid="candidate-list", **_TEXT)
    labelled = [k + 1 for k in range(min(max_labels, len(rank))) if k not in set(listed)]
    return fig, CandidateLabels(labelled, [k + 1 for k in listed[:MAX_LISTED]], max(len(listed) - MAX_LISTED, 0))


def _cut(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "\u2026"


def _marker_area_pt2(prob: np.ndarray) -> np.ndarray:
    return 30 + 300 * prob / max(float(prob.max()), 1e-12)


def _candidates_axes(lat: np.ndarray, lon: np.ndarray, prob: np.ndarray, truth: tuple[float, float] | None,
                     title: str, *, panel: bool) -> tuple[Figure, Axes, Axes | None]:
    """The map (candidates in rank order), colour bar, truth and title, with a blank panel for the
    list on the right when ``panel``; laid out once, then frozen so labels can be measured."""
    t_lat, t_lon = (np.array([truth[0]]), np.array([truth[1]])) if truth is not None else (lat[:0], lon[:0])
    extent = map_extent(np.r_[lon, t_lon], np.r_[lat, t_lat])
    fig = new_figure(9.0 + 3.4 * panel, 6.0)
    grid = fig.add_gridspec(1, 1 + panel, width_ratios=[9.0, 3.4][: 1 + panel])
    ax, side = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]) if panel else None
    if side is not None:
        side.set_axis_off()
    draw_world(ax, extent, scale="110m" if extent == WORLD else "50m")
    top_prob = max(float(prob.max()), 1e-12)
    markers = ax.scatter(lon[::-1], lat[::-1], s=_marker_area_pt2(prob)[::-1], c=prob[::-1], cmap="viridis",
                         vmin=0.0, vmax=top_prob, edgecolors="black", linewidths=0.5, zorder=3)  # the top one on top
    fig.colorbar(markers, ax=ax, label="probability", shrink=0.7)
    if truth is not None:
        ax.scatter(t_lon, t_lat, marker="*", s=TRUTH_AREA_PT2, color="red", edgecolors="black", linewidths=0.6,
                   zorder=5, label="truth")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title)
    for _ in range(3):  # the constrained layout of a fixed-aspect map settles on its second pass
        before = ax.get_position().bounds
        fig.draw_without_rendering()
        if ax.get_position().bounds == before:
            break
    fig.set_layout_engine("none")  # positions fixed from here: the labels are measured against them
    return fig, ax, side


def _label(fig: Figure, ax: Axes, lat: np.ndarray, lon: np.ndarray, prob: np.ndarray, texts: list[str], *,
           truth: tuple[float, float] | None, skip: set[int]) -> list[int]:
    """Annotate the first ``len(texts)`` candidates (rank order) but ``skip``, placed by
    flows.report.labels; -> the ranks (from 0) that found no place."""
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    centres = ax.transData.transform(np.c_[lon, lat])
    radius_pt = np.sqrt(_marker_area_pt2(prob)) / 2 + 0.25  # + half the edge line
    markers = [(x - r * px, y - r * px, x + r * px, y + r * px) for (x, y), r in zip(centres, radius_pt)]
    keep = [k for k in range(len(texts)) if k == 0 or k not in skip]
    styles = [_TOP_TEXT if k == 0 else _TEXT for k in keep]
    sizes = np.concatenate([labels.measure(fig, renderer, [texts[k]], **st) for k, st in zip(keep, styles)])
    pads_pt = np.array([_PAD * st["fontsize"] + (_TOP_EDGE_PT / 2 if k == 0 else 0.0) for k, st in zip(keep, styles)])
    row_pt = float(sizes[:, 1].max()) / px + 2 * pads_pt.max() + 1.0
    slot_lists = [labels.slots(radius_pt[k] + p, row_pt) for k, p in zip(keep, pads_pt)]
    obstacles = []
    if truth is not None:  # the star and the legend
        (x, y), r = ax.transData.transform((truth[1], truth[0])), (np.sqrt(TRUTH_AREA_PT2) / 2 + 0.3) * px
        obstacles = [(x - r, y - r, x + r, y + r), tuple(ax.get_legend().get_window_extent(renderer).extents)]
    own = [markers[k] for k in keep]
    placed = labels.place(centres[keep], sizes, pads_pt * px + 0.5, slot_lists,  # 0.5 px: rounding
                          own + [m for k, m in enumerate(markers) if k not in keep], ax.bbox.extents, obstacles, px)
    dropped = []
    for k, style, got in zip(keep, styles, placed):
        if got is None:
            dropped.append(k)
            continue
        slot = got[0]
        top = k == 0  # opaque, outlined, above every other artist
        leader = {"arrowstyle": "-", "color": "0.3", "linewidth": 0.6, "shrinkA": 0, "shrinkB": radius_pt[k],
                  "relpos": (0.0 if slot.ha == "left" else 1.0, 0.5)}  # from the box's near side to the marker
        ax.annotate(texts[k], (lon[k], lat[k]), xytext=(slot.dx_pt, slot.dy_pt), textcoords="offset points",
                    ha=slot.ha, va=slot.va, zorder=10 if top else 7, annotation_clip=False,
                    bbox={"boxstyle": f"round,pad={_PAD}", "facecolor": "white", "alpha": 1.0 if top else 0.85,
                          "edgecolor": "black", "linewidth": _TOP_EDGE_PT if top else 0.0},
                    arrowprops=leader if slot.leader else None, gid=f"candidate-label-{k + 1}", **style)
    return dropped


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
