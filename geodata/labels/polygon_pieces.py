"""Admin polygons as small pieces: polygonal parts, coordinates snapped to the world's bounds,
and cut on a grid (geodata.labels.polygons builds its lookups from these pieces).

Polygons are split into parts and cut on a grid of cells anchored at (-180, -90) by recursive
halving (``shapely.clip_by_rect``), so each piece is small and its bounding box tight.
"""

from __future__ import annotations

import numpy as np
import shapely

#: Coordinates this close (deg) to +-180 / +-90 are set to the bound (Natural Earth's noisy
#: -179.99999999999991 or -89.99999999999994 mean the bound).
BOUND_TOL_DEG = 1e-9

_ORIGIN = np.array([-180.0, -90.0])  # grid cells are anchored at the world's lower-left corner
_CELL_SLACK = 1e-9  # fraction of a cell by which a piece may overrun a grid line (rounding)
_MAX_CUT_ROUNDS = 64  # halvings; 360 / 2**32 deg is far below any sensible grid_deg


def polygon_parts(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty Polygons inside each geometry, collections flattened: (N,) -> (M,), (M,) index."""
    parts, index = shapely.get_parts(geoms, return_index=True)  # multi -> single, collection -> items
    multi = shapely.get_type_id(parts) == shapely.GeometryType.MULTIPOLYGON  # inside collections
    if multi.any():
        sub, sub_index = shapely.get_parts(parts[multi], return_index=True)
        parts = np.concatenate([parts[~multi], sub])
        index = np.concatenate([index[~multi], index[multi][sub_index]])
    keep = (shapely.get_type_id(parts) == shapely.GeometryType.POLYGON) & ~shapely.is_empty(parts)
    return parts[keep], index[keep]


def snap_to_world_bounds(geoms: np.ndarray) -> np.ndarray:
    """Geometries with coordinates within BOUND_TOL_DEG of +-180 (x) or +-90 (y) set to the bound."""

    def snap(xy: np.ndarray) -> np.ndarray:
        out = xy.copy()
        for axis, bound in ((0, 180.0), (1, 90.0)):
            near = np.abs(np.abs(out[:, axis]) - bound) < BOUND_TOL_DEG
            out[near, axis] = np.copysign(bound, out[near, axis])
        return out

    return shapely.transform(geoms, snap)


def cut_on_grid(geoms: np.ndarray, grid_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Polygons cut so that each piece lies in one cell of a ``grid_deg`` grid anchored at (-180, -90).

    geoms: (N,) Polygons (lon_deg, lat_deg). Returns the pieces (M,) and, per piece, the index
    of its polygon (M,). Pieces spanning several cells are halved at a grid line across their
    longer side, all at once per round, so each vertex is processed ~log2(cells) times. Clipping
    uses GEOS's rectangle clipper (shapely.clip_by_rect, ~20x faster than an overlay and no
    topology errors on invalid input). The pieces of a polygon tile it (shared cut edges).
    """
    if grid_deg <= 0:
        raise ValueError(f"grid_deg={grid_deg}: must be > 0 to cut")
    todo, rows = np.asarray(geoms, dtype=object), np.arange(len(geoms))
    done, done_rows = [], []
    for _ in range(_MAX_CUT_ROUNDS):
        if len(todo) == 0:
            break
        bounds = shapely.bounds(todo)
        first = np.floor((bounds[:, :2] - _ORIGIN) / grid_deg + _CELL_SLACK)
        last = np.ceil((bounds[:, 2:] - _ORIGIN) / grid_deg - _CELL_SLACK)
        span = np.maximum(last - first, 1.0)  # cells spanned in x and y
        fits = (span <= 1.0).all(axis=1)
        done.append(todo[fits])
        done_rows.append(rows[fits])
        todo, rows, bounds, first, span = todo[~fits], rows[~fits], bounds[~fits], first[~fits], span[~fits]
        axis = (span[:, 1] > span[:, 0]).astype(np.int64)  # halve the longer side
        at = np.arange(len(todo))
        line = first[at, axis] + np.floor(span[at, axis] / 2)  # grid line index
        # clip_by_rect takes one rectangle per call: clip all pieces cut along one line at once
        halves = np.empty(2 * len(todo), dtype=object)
        keys, group = np.unique(axis * (1 << 32) + line.astype(np.int64), return_inverse=True)
        for g, key in enumerate(keys):
            sel = np.flatnonzero(group == g)
            ax, cut = divmod(int(key), 1 << 32)
            cut = _ORIGIN[ax] + cut * grid_deg
            low, high = ((-181.0, -91.0, cut, 91.0), (cut, -91.0, 181.0, 91.0)) if ax == 0 else (
                (-181.0, -91.0, 181.0, cut), (-181.0, cut, 181.0, 91.0))
            halves[sel] = shapely.clip_by_rect(todo[sel], *low)
            halves[len(todo) + sel] = shapely.clip_by_rect(todo[sel], *high)
        todo, index = polygon_parts(halves)
        rows = np.concatenate([rows, rows])[index]
    else:
        raise RuntimeError(f"cutting on a {grid_deg} deg grid did not finish in {_MAX_CUT_ROUNDS} rounds")
    return np.concatenate(done), np.concatenate(done_rows)

