"""A place-level held-out split of the demo data: test rows at least R km from every training row.

The default demo split draws test rows at random from all points, so a test photo sits a few
km from training photos of the same place and every method scores ~4980. The held-out split
(``build_demo_dataset(heldout_km=R)``, ``hierloc demo-data --heldout-km R``) instead:

1. takes source places in a seeded random order and gives each at most ``per_place`` of its
   points to the test split until it holds ``n_test`` rows (a cap, so the test rows span many
   places rather than a few big ones);
2. keeps as training candidates only the points whose nearest test row is at least ``R`` km
   away (great circle on the sphere of EARTH_RADIUS_KM; a test place's leftover points and
   its neighbours within R are dropped, and counted);
3. draws ``n_train`` of the candidates at random. If there are too few, the caller draws a
   larger pool of points (HELDOUT_POOL_GROWTH) and tries again.

So a model never sees a training photo within R km of a test photo: it must place photos of
places it never saw. The predicted point of an entity model is a training entity's location,
so accuracy within R km is near 0 by construction (docs/data.md, "Held-out split").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from geodata.atomic import write_text_atomic
from geodata.osv5m import EARTH_RADIUS_KM

#: The held-out distance of ``hierloc demo-data --heldout`` (issue 16: "default 25").
HELDOUT_KM_DEFAULT = 25.0
#: At most this many test rows per held-out place, so the test split spans many places
#: (2,000 rows: at least 400 places) rather than a few big ones.
HELDOUT_PER_PLACE = 5
#: First pool of drawn points, as a multiple of n_train + n_test; each retry multiplies it by
#: HELDOUT_POOL_GROWTH, at most HELDOUT_MAX_ROUNDS times.
HELDOUT_POOL_START = 1.25
HELDOUT_POOL_GROWTH = 1.5
HELDOUT_MAX_ROUNDS = 8
#: Written beside train.csv / test.csv: what the split is, read back by the pipeline.
HELDOUT_FILE = "heldout.json"
_HELDOUT_FILE_CAP = 64 * 1024
#: Keep a candidate only this far (km, 1 mm) beyond R: the chord -> arc conversion of the
#: k-d tree and a plain haversine may differ in the last bits at exactly R.
_SLACK_KM = 1e-6


def unit_vectors(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """(N,) degrees -> (N, 3) points on the unit sphere (float64)."""
    lat, lon = np.radians(np.asarray(lat_deg, np.float64)), np.radians(np.asarray(lon_deg, np.float64))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def nearest_km(lat_deg: np.ndarray, lon_deg: np.ndarray, ref_lat_deg: np.ndarray,
               ref_lon_deg: np.ndarray) -> np.ndarray:
    """Great-circle km from each point to its nearest reference point, (N,) float64.

    Exact nearest neighbour: the chord on the unit sphere is monotone in the arc, so a k-d
    tree over unit vectors finds it; arc = 2 asin(chord / 2) (chord clipped to [0, 2])."""
    tree = cKDTree(unit_vectors(ref_lat_deg, ref_lon_deg))
    chord, _ = tree.query(unit_vectors(lat_deg, lon_deg), k=1)
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(chord, 0.0, 2.0) / 2.0)


def heldout_split(
    lat_deg: np.ndarray,
    lon_deg: np.ndarray,
    source: np.ndarray,
    n_train: int,
    n_test: int,
    heldout_km: float,
    rng: np.random.Generator,
    *,
    per_place: int,
) -> dict | None:
    """Split pooled points into held-out test rows and training rows at least heldout_km away.

    lat_deg, lon_deg, source: (N,) point coordinates and their source place ids.
    Returns {"train": (n_train,) indices, "test": (n_test,) indices, "n_test_places",
    "n_dropped_near_test", "min_test_train_km"}, or None when the pool holds too few test
    rows or too few training candidates (the caller draws a larger pool).
    """
    if heldout_km < 0 or not math.isfinite(heldout_km):
        raise ValueError(f"heldout_km must be a finite number >= 0, got {heldout_km}")
    if per_place < 1:
        raise ValueError(f"per_place must be >= 1, got {per_place}")
    source = np.asarray(source)
    n = len(source)
    places = np.unique(source)
    rank_of_place = np.empty(places.max() + 1 if len(places) else 0, dtype=np.int64)
    rank_of_place[rng.permutation(places)] = np.arange(len(places))
    # points ordered by (place rank, position in the pool); within a place the pool order is random
    order = np.lexsort((np.arange(n), rank_of_place[source]))
    place_sorted = source[order]
    starts = np.r_[0, np.flatnonzero(place_sorted[1:] != place_sorted[:-1]) + 1]
    rank_in_place = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    eligible = order[rank_in_place < per_place]
    if len(eligible) < n_test:
        return None
    test = eligible[:n_test]
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    rest = np.flatnonzero(~is_test)
    if len(rest) == 0:
        return None
    dist = nearest_km(lat_deg[rest], lon_deg[rest], lat_deg[test], lon_deg[test])
    far = rest[dist >= heldout_km + _SLACK_KM]
    if len(far) < n_train:
        return None
    train = rng.choice(far, size=n_train, replace=False)
    return {
        "train": train,
        "test": test,
        "n_test_places": int(np.unique(source[test]).size),
        "n_dropped_near_test": int(len(rest) - len(far)),
        "min_test_train_km": float(nearest_km(lat_deg[test], lon_deg[test], lat_deg[train], lon_deg[train]).min()),
    }


def pool_size(n_images: int, round_: int) -> int:
    """Points drawn in retry ``round_`` (0, 1, ...) for n_images = n_train + n_test rows."""
    return math.ceil(n_images * HELDOUT_POOL_START * HELDOUT_POOL_GROWTH ** round_)


def write_heldout_record(out_dir: Path, record: dict | None) -> None:
    """Write HELDOUT_FILE (record: heldout_km and split statistics), or remove a stale one (None)."""
    path = Path(out_dir) / HELDOUT_FILE
    if record is None:
        path.unlink(missing_ok=True)
    else:
        write_text_atomic(json.dumps(record, indent=2, sort_keys=True) + "\n", path)


def recorded_heldout_km(data_dir: Path) -> float | None:
    """The heldout_km a demo folder was built with (its HELDOUT_FILE), None for a random split.

    Reads at most _HELDOUT_FILE_CAP bytes of a regular file; a malformed record raises
    ValueError naming the file and the field."""
    path = Path(data_dir) / HELDOUT_FILE
    if not path.exists():
        return None
    if not path.is_file() or path.stat().st_size > _HELDOUT_FILE_CAP:
        raise ValueError(f"{path}: not a regular file of at most {_HELDOUT_FILE_CAP} bytes")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["heldout_km"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: field heldout_km: unreadable ({exc!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: field heldout_km: expected a number, got {value!r}")
    return float(value)
