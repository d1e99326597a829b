"""Nearest admin polygon within a distance, for points inside none (the snapping of
geodata.labels.polygons).

Distances are great-circle on the sphere of geodata.osv5m.EARTH_RADIUS_KM, to the polygon's
boundary densified to 0.05 deg: candidate boundary chains are those in the bounding box of the
spherical cap around the point (split in two where it crosses +-180, all longitudes where it
holds a pole); their vertices are projected onto the plane tangent to the sphere at the point,
where a vertex at central angle c lies at sin(c) from the origin. Distances are exact at
vertices and within a metre between them, and the antimeridian and the poles need no special
case. Ties go to the smallest row (code).
"""

from __future__ import annotations

import numpy as np
import shapely

from geodata.labels.polygon_levels import NO_ROW
from geodata.labels.polygon_pieces import BOUND_TOL_DEG
from geodata.osv5m import EARTH_RADIUS_KM

_SEGMENT_DEG = 0.05  # boundaries densified to this: lon/lat-straight ~ great-circle within metres
_CHAIN_SEGMENTS = 16  # segments per indexed chain of a boundary
_SEGMENT_BLOCK = 1_000_000  # candidate segments evaluated at once (bounds memory)
_SEARCH_SCALES = (1 / 16, 1 / 4, 1.0)  # snapping radii tried, as fractions of max_snap_km


def _cap_boxes(lat: np.ndarray, lon: np.ndarray, radius_km: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes (lon/lat degrees) of the spherical caps of ``radius_km`` (scalar or (N,))
    around each point.

    (N,) -> boxes (M,), owner point index (M,), M >= N: a box crossing +-180 is split in two;
    a cap holding a pole spans all longitudes.
    """
    d = np.broadcast_to(np.asarray(radius_km, dtype=np.float64) / EARTH_RADIUS_KM, lat.shape)  # rad
    d_deg = np.degrees(d) + BOUND_TOL_DEG
    polar = np.abs(lat) + d_deg >= 90.0
    # half-width in longitude of a cap of angular radius d at latitude lat: asin(sin d / cos lat)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sin(d) / np.cos(np.radians(lat))
    half = np.where(polar, 180.0, np.degrees(np.arcsin(np.clip(ratio, 0.0, 1.0))) + BOUND_TOL_DEG)
    lo, hi = lon - half, lon + half
    full = polar | (hi - lo >= 360.0)
    lo, hi = np.where(full, -180.0, lo), np.where(full, 180.0, hi)
    south, north = np.maximum(lat - d_deg, -90.0), np.minimum(lat + d_deg, 90.0)
    west, east = np.flatnonzero(lo < -180.0), np.flatnonzero(hi > 180.0)  # parts beyond +-180
    xmin = np.concatenate([np.maximum(lo, -180.0), lo[west] + 360.0, np.full(len(east), -180.0)])
    xmax = np.concatenate([np.minimum(hi, 180.0), np.full(len(west), 180.0), hi[east] - 360.0])
    owner = np.concatenate([np.arange(len(lat)), west, east])
    return shapely.box(xmin, south[owner], xmax, north[owner]), owner


def _origin_to_segments(ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Distance from (0, 0) to each segment A-B: (N,) x 4 -> (N,)."""
    dx, dy = bx - ax, by - ay
    len2 = dx * dx + dy * dy
    t = np.clip(-(ax * dx + ay * dy) / np.where(len2 > 0, len2, 1.0), 0.0, 1.0)  # degenerate: t = 0
    return np.hypot(ax + t * dx, ay + t * dy)


class Boundaries:
    """The boundaries of one level's pieces, indexed for "nearest polygon within a distance".

    Built from the pieces (their rings include the grid cut lines, which lie inside the
    polygons, so for a point outside a polygon the nearest ring point is still its nearest
    point). Rings are densified to _SEGMENT_DEG, so lon/lat-straight edges and great-circle
    arcs agree within metres, and split into chains of _CHAIN_SEGMENTS segments whose bounding
    boxes go into an STRtree. Not pickled: rebuilt from the pieces where needed.
    """

    def __init__(self, pieces: np.ndarray, piece_row: np.ndarray) -> None:
        rings, piece_of_ring = shapely.get_rings(pieces, return_index=True)
        rings = shapely.segmentize(rings, _SEGMENT_DEG)
        self.xy = shapely.get_coordinates(rings)  # (V, 2) lon, lat; rings one after another, closed
        n_vertex = shapely.get_num_coordinates(rings)
        ring_start = np.concatenate([[0], np.cumsum(n_vertex)[:-1]])
        n_chain = -(-(n_vertex - 1) // _CHAIN_SEGMENTS)  # ceil(segments / chain length)
        ring = np.repeat(np.arange(len(rings)), n_chain)
        local = np.arange(len(ring)) - np.repeat(np.cumsum(n_chain) - n_chain, n_chain)
        self.first = ring_start[ring] + local * _CHAIN_SEGMENTS  # (C,) first vertex of each chain
        self.n_seg = np.minimum(_CHAIN_SEGMENTS, n_vertex[ring] - 1 - local * _CHAIN_SEGMENTS)  # (C,)
        self.row = piece_row[piece_of_ring[ring]]  # (C,)
        last = self.first + self.n_seg
        x, y = self.xy[:, 0], self.xy[:, 1]
        # reduceat over [first_c, first_c+1) misses a chain's end vertex (the next one's first): add it
        bounds = [
            np.minimum(np.minimum.reduceat(x, self.first), x[last]),
            np.minimum(np.minimum.reduceat(y, self.first), y[last]),
            np.maximum(np.maximum.reduceat(x, self.first), x[last]),
            np.maximum(np.maximum.reduceat(y, self.first), y[last]),
        ] if len(ring) else [np.zeros(0)] * 4
        self.tree = shapely.STRtree(shapely.box(*bounds))

    def chain_km(self, lat: np.ndarray, lon: np.ndarray, point: np.ndarray, chain: np.ndarray) -> np.ndarray:
        """Great-circle km from point[i] (index into lat, lon) to chain[i]: (M,) pairs -> (M,).

        Vertices are projected onto the plane tangent to the sphere at the point (orthographic:
        a vertex at central angle c lands at sin(c) from the origin), where the distance to each
        segment is taken: exact at vertices, within a metre in between (segments are at most
        _SEGMENT_DEG long), and the antimeridian and the poles need no special case.
        """
        out = np.empty(len(point))
        sin0, cos0 = np.sin(np.radians(lat)), np.cos(np.radians(lat))
        n_vertex = self.n_seg[chain] + 1
        ends = np.cumsum(n_vertex)
        cuts = np.searchsorted(ends, np.arange(1, ends[-1] // _SEGMENT_BLOCK + 1) * _SEGMENT_BLOCK) if len(ends) else []
        for lo, hi in zip(np.concatenate([[0], cuts]).astype(int), np.concatenate([cuts, [len(point)]]).astype(int)):
            if lo >= hi:
                continue
            counts = n_vertex[lo:hi]
            offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
            vertex = np.repeat(self.first[chain[lo:hi]] - offset, counts) + np.arange(counts.sum())
            p = np.repeat(point[lo:hi], counts)
            phi = np.radians(self.xy[vertex, 1])
            dlam = np.radians(self.xy[vertex, 0] - lon[p])
            sin_phi, cos_phi, cos_dlam = np.sin(phi), np.cos(phi), np.cos(dlam)
            x = cos_phi * np.sin(dlam)
            y = cos0[p] * sin_phi - sin0[p] * cos_phi * cos_dlam
            front = sin0[p] * sin_phi + cos0[p] * cos_phi * cos_dlam > 0
            sin_c = _origin_to_segments(x[:-1], y[:-1], x[1:], y[1:])
            # a vertex on the far hemisphere folds onto the plane; the last vertex of a pair
            # and the first of the next make no segment
            valid = front[:-1] & front[1:]
            valid[offset[1:] - 1] = False
            seg_km = np.where(valid, EARTH_RADIUS_KM * np.arcsin(np.clip(sin_c, 0.0, 1.0)), np.inf)
            out[lo:hi] = np.minimum.reduceat(np.append(seg_km, np.inf), offset)
        return out

    def nearest_within(self, lat: np.ndarray, lon: np.ndarray, radius_km: float) -> tuple[np.ndarray, np.ndarray]:
        """Nearest polygon row within ``radius_km`` (great-circle) of each point outside the polygons.

        (N,) x 2 degrees -> row (N,) int64 (-1: none within), distance km (N,) (NaN: none).
        Searched at growing radii (_SEARCH_SCALES of radius_km): every chain whose box meets
        the bounding box of the cap of radius r is measured, and a point whose nearest chain is
        within r is done (all chains within r were measured). Ties go to the smaller row.
        """
        n = len(lat)
        out_row, out_km = np.full(n, NO_ROW, dtype=np.int64), np.full(n, np.nan)
        todo = np.arange(n)
        for scale in _SEARCH_SCALES:
            if len(todo) == 0 or len(self.first) == 0:
                break
            r = radius_km * scale
            boxes, box_owner = _cap_boxes(lat[todo], lon[todo], r)
            box, chain = self.tree.query(boxes)  # bounding boxes overlap
            pair_point = todo[box_owner[box]]
            pair_km = self.chain_km(lat, lon, pair_point, chain)
            pair_row = self.row[chain]
            order = np.lexsort((pair_row, pair_km, pair_point))  # per point: nearest, then smallest row
            points, first_of_point = np.unique(pair_point[order], return_index=True)
            best = order[first_of_point]
            ok = pair_km[best] <= r
            out_row[points[ok]], out_km[points[ok]] = pair_row[best[ok]], pair_km[best[ok]]
            todo = todo[out_row[todo] < 0]
        return out_row, out_km


