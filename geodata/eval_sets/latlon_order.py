"""Which of two coordinate columns is the latitude, whatever the header says.

By range (a |value| > 90 can only be a longitude) and by plausibility (photos are taken near
populated places: the order whose points lie clearly closer to their nearest GeoNames
cities1000 place wins). geodata.eval_sets.benchmark_csv reads the files.
"""

from __future__ import annotations

import math

import numpy as np

from geodata.labels.geonames import GeoNamesLabeler, default_labeler
from geodata.osv5m import EARTH_RADIUS_KM

#: One order must have a median nearest-place distance this many times smaller to win.
PLAUSIBILITY_FACTOR = 2.0
#: Rows sampled for the plausibility check.
PLAUSIBILITY_SAMPLE_ROWS = 5_000
#: km per degree along a meridian, only to make the evidence readable.
_KM_PER_DEG = math.radians(EARTH_RADIUS_KM)


def to_float(text: str) -> float | None:
    """Python float() of a cell, None when it does not parse."""
    try:
        return float(text)
    except ValueError:
        return None


def _median_nearest_deg(labeler: GeoNamesLabeler, lat_deg: np.ndarray, lon_deg: np.ndarray) -> float:
    """Median distance (degrees, the labeler's own metric) to the nearest GeoNames place."""
    dist_deg, _ = labeler.tree.query(np.column_stack([lat_deg, lon_deg]), k=1)
    return float(np.median(dist_deg))


def _fmt_deg(d: float) -> str:
    return f"{d:.3g} deg (~{d * _KM_PER_DEG:.0f} km)"


def _plausibility(
    a: np.ndarray, b: np.ndarray, labeler: GeoNamesLabeler, seed: int
) -> tuple[str | None, str]:
    """Which order is plausible: "as-labelled", "swapped" or None (unclear), with evidence.

    a: values of the labelled-latitude column, b: of the labelled-longitude column,
    (N,) finite with |a|, |b| <= 90 so both readings are valid points.
    """
    if a.size == 0:
        return None, "no row valid in both orders to compare"
    if a.size > PLAUSIBILITY_SAMPLE_ROWS:
        pick = np.random.default_rng(seed).choice(a.size, PLAUSIBILITY_SAMPLE_ROWS, replace=False)
        a, b = a[pick], b[pick]
    as_deg = _median_nearest_deg(labeler, a, b)
    sw_deg = _median_nearest_deg(labeler, b, a)
    text = (
        f"median distance to the nearest GeoNames place over {a.size} rows: "
        f"as labelled {_fmt_deg(as_deg)}, swapped {_fmt_deg(sw_deg)}"
    )
    if sw_deg * PLAUSIBILITY_FACTOR <= as_deg and as_deg > 0:
        return "swapped", text
    if as_deg * PLAUSIBILITY_FACTOR <= sw_deg and sw_deg > 0:
        return "as-labelled", text
    return None, text


def decide_order(
    lat_text: list[str],
    lon_text: list[str],
    *,
    labeler: GeoNamesLabeler | None = None,
    seed: int = 0,
) -> tuple[bool, str]:
    """(swapped, evidence) for two columns of coordinate strings labelled latitude, longitude.

    1. Range: a |labelled latitude| > 90 with every labelled longitude in [-90, 90] means
       swapped; the mirror case means as labelled.
    2. Plausibility (always computed, on <= PLAUSIBILITY_SAMPLE_ROWS seeded rows): the order
       whose median nearest-place distance is PLAUSIBILITY_FACTOR times smaller wins. It
       overrides the range rule when it clearly contradicts it (a single corrupt value
       must not swap a whole file; the corrupt rows then go to the quarantine).
    Neither conclusive: as labelled, said so in the evidence.
    """
    a = np.array([to_float(t) for t in lat_text], dtype=np.float64)  # None -> nan
    b = np.array([to_float(t) for t in lon_text], dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    a_wide, b_wide = np.abs(a) > 90, np.abs(b) > 90

    by_range: str | None = None
    range_text = ""
    if a_wide.any() and not b_wide.any():
        by_range = "swapped"
        range_text = (
            f"{int(a_wide.sum())} labelled-latitude value(s) have |v| > 90 "
            f"(e.g. {a[a_wide][0]:g}) while every labelled longitude is within [-90, 90]"
        )
    elif b_wide.any() and not a_wide.any():
        by_range = "as-labelled"
        range_text = (
            f"{int(b_wide.sum())} labelled-longitude value(s) have |v| > 90 "
            f"(e.g. {b[b_wide][0]:g}) while every labelled latitude is within [-90, 90]"
        )

    both = ~a_wide & ~b_wide
    by_plaus, plaus_text = _plausibility(a[both], b[both], labeler or default_labeler(), seed)

    if by_range is not None and by_plaus not in (None, by_range):
        return by_plaus == "swapped", (
            f"{by_plaus} by plausibility ({plaus_text}), overriding the range rule "
            f"({range_text}): those values are treated as bad rows"
        )
    if by_range is not None:
        return by_range == "swapped", f"{by_range}: {range_text}; {plaus_text}"
    if by_plaus is not None:
        return by_plaus == "swapped", f"{by_plaus} by plausibility: {plaus_text}"
    return False, (
        f"as-labelled: neither order is clearly more plausible ({plaus_text}; "
        f"need a factor {PLAUSIBILITY_FACTOR:g}); pass latlon_order= to be sure"
    )

