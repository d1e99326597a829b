"""Where the demo's images are: real GeoNames places, sampled with street-level-like skew.

A country's weight is ``(places in country) ** COUNTRY_EXPONENT`` times a seeded log-normal
factor; places within a country are equally likely. Each sampled place gets ``1 + multinomial``
images with log-normal city weights. Each image point is its place plus a uniform random
offset in a disc of OFFSET_KM, shrunk to VORONOI_MARGIN of the distance to the nearest other
place, so the point's label city is its source place (geodata.demo.build puts it together).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from geodata.osv5m import EARTH_RADIUS_KM

#: Country weight = (places in country) ** COUNTRY_EXPONENT * LogNormal(0, COUNTRY_SIGMA).
COUNTRY_EXPONENT = 0.8
COUNTRY_SIGMA = 1.0
#: Images per source city: 1 + multinomial with weights LogNormal(0, CITY_SIGMA).
CITY_SIGMA = 1.2
#: Image points lie uniformly in a disc of this radius around their place.
OFFSET_KM = 3.0
#: ... but at most this fraction of the (degree) distance to the nearest other place, so a
#: point stays in its place's nearest-neighbour cell and is labelled with its source place.
VORONOI_MARGIN = 0.45
#: Decimals kept for latitude/longitude (1e-7 deg ~ 1 cm), so CSV text round-trips exactly.
COORD_DECIMALS = 7
#: Mapillary-style ids: 14 to 16 digits, positive int64.
ID_RANGE = (10**13, 10**16)

#: km per degree of great circle on the sphere of EARTH_RADIUS_KM, kept at 3 decimals (111.195):
#: the demo's offsets were drawn with this value, so its data stays byte-identical.
KM_PER_DEG = round(math.radians(EARTH_RADIUS_KM), 3)


def sample_places(
    places: pd.DataFrame,
    n_cities: int,
    rng: np.random.Generator,
    *,
    country_exponent: float = COUNTRY_EXPONENT,
    country_sigma: float = COUNTRY_SIGMA,
) -> np.ndarray:
    """Pick ``n_cities`` distinct rows of ``places`` with skewed per-country coverage.

    places: DataFrame with a ``cc`` column (one row per GeoNames place).
    Country weight = count ** country_exponent * LogNormal(0, country_sigma), shared
    equally by the country's places. Returns sorted positional row indices, (n_cities,).
    """
    if not 0 < n_cities <= len(places):
        raise ValueError(f"n_cities must be in 1..{len(places)}, got {n_cities}")
    cc = places["cc"].to_numpy(dtype=str)
    codes, inverse, counts = np.unique(cc, return_inverse=True, return_counts=True)
    country_w = counts.astype(np.float64) ** country_exponent * rng.lognormal(
        0.0, country_sigma, size=len(codes)
    )
    place_w = (country_w / counts)[inverse]
    rows = rng.choice(len(places), size=n_cities, replace=False, p=place_w / place_w.sum())
    return np.sort(rows)


def images_per_place(
    n_cities: int, n_images: int, rng: np.random.Generator, *, city_sigma: float = CITY_SIGMA
) -> np.ndarray:
    """Split ``n_images`` over ``n_cities``: each gets 1 + a skewed multinomial share.

    Returns int64 counts, (n_cities,), summing to n_images (mean n_images / n_cities).
    """
    if not 0 < n_cities <= n_images:
        raise ValueError(f"need 0 < n_cities <= n_images, got {n_cities}, {n_images}")
    w = rng.lognormal(0.0, city_sigma, size=n_cities)
    return 1 + rng.multinomial(n_images - n_cities, w / w.sum()).astype(np.int64)


def wrap_lon_deg(lon_deg: np.ndarray) -> np.ndarray:
    """Wrap longitudes into [-180, 180)."""
    out = np.mod(np.asarray(lon_deg, dtype=np.float64) + 180.0, 360.0) - 180.0
    # np.mod of a tiny negative number can return exactly 360.0, giving +180.
    return np.where(out >= 180.0, out - 360.0, out)


def offset_points(
    lat_deg: np.ndarray,
    lon_deg: np.ndarray,
    rng: np.random.Generator,
    *,
    radius_km: float = OFFSET_KM,
    max_offset_deg: np.ndarray | None = None,
    decimals: int = COORD_DECIMALS,
) -> tuple[np.ndarray, np.ndarray]:
    """Move each point uniformly within a disc of ``radius_km`` (local flat approximation).

    max_offset_deg: optional per-point cap on the move, measured as the Euclidean norm
    in raw (lat, lon) degrees (the metric reverse_geocoder's nearest-place search uses);
    a longer move is shrunk along its direction.
    Returns (lat_deg, lon_deg) rounded to ``decimals``, lat clipped to [-90, 90],
    lon wrapped into [-180, 180).
    """
    lat_deg = np.asarray(lat_deg, dtype=np.float64)
    r_km = radius_km * np.sqrt(rng.random(lat_deg.shape))
    theta = rng.uniform(0.0, 2.0 * np.pi, lat_deg.shape)
    # Near the poles a km east spans many degrees: floor cos(lat) to keep offsets finite.
    cos_lat = np.maximum(np.cos(np.radians(lat_deg)), 1e-3)
    dlat = r_km * np.cos(theta) / KM_PER_DEG
    dlon = r_km * np.sin(theta) / (KM_PER_DEG * cos_lat)
    if max_offset_deg is not None:
        norm_deg = np.hypot(dlat, dlon)
        scale = np.minimum(1.0, max_offset_deg / np.maximum(norm_deg, 1e-12))
        dlat, dlon = dlat * scale, dlon * scale
    new_lat = lat_deg + dlat
    new_lon = np.asarray(lon_deg, dtype=np.float64) + dlon
    new_lat = np.clip(round_decimal(new_lat, decimals), -90.0, 90.0)
    new_lon = round_decimal(wrap_lon_deg(new_lon), decimals)
    # Rounding can push 179.99999996 onto +180; subtracting 360 there is exact, whereas
    # wrapping after rounding (x + 180) % 360 - 180 would re-add float noise.
    new_lon = np.where(new_lon >= 180.0, new_lon - 360.0, new_lon)
    return new_lat, new_lon


def round_decimal(values: np.ndarray, decimals: int) -> np.ndarray:
    """Round to ``decimals`` via decimal text, giving the float64 nearest to that decimal.

    np.round scales by 10**decimals and can land one ulp off (44.830703400000004), which
    would print long; parsing the decimal text gives the value that prints short.
    """
    return np.array([float(f"{v:.{decimals}f}") for v in np.asarray(values).tolist()], dtype=np.float64)


def nearest_other_place_deg(tree: cKDTree, rows: np.ndarray) -> np.ndarray:
    """Raw-degree distance from each place in ``rows`` to the nearest other place.

    tree: cKDTree over the places' (lat, lon) degrees, rows indexing its data (the
    labeler's tree: Euclidean on degrees, no wrap, as reverse_geocoder). A point moved
    less than half this distance keeps its place as nearest, i.e. as its label.
    Returns (len(rows),) float64; 0 where another place has the same coordinates.
    """
    dist, _ = tree.query(tree.data[rows], k=2)
    return dist[:, 1]


def draw_ids(n: int, rng: np.random.Generator, *, id_range: tuple[int, int] = ID_RANGE) -> np.ndarray:
    """Draw ``n`` distinct positive int64 ids uniformly in ``id_range`` (random order)."""
    ids = np.empty(0, dtype=np.int64)
    while len(ids) < n:
        draw = rng.integers(id_range[0], id_range[1], size=n - len(ids) + 16, dtype=np.int64)
        pool = np.concatenate([ids, draw])
        _, first = np.unique(pool, return_index=True)
        ids = pool[np.sort(first)]
    return ids[:n]
