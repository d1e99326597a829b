"""GeoNames labels: geodata.labels.geonames.GeoNamesLabeler.label vs reverse_geocoder.search, same points.

The OSV-5M labels and the official metric come from ``reverse_geocoder.search(coords)``
(default mode 2). This script times both on OSV-5M-like points (a random GeoNames place
plus N(0, 0.2 deg) noise on each coordinate, clipped to the valid ranges), checks that
every answer is identical (same place index, same name, admin1, admin2, cc), and reports
throughput and memory.

What is timed is what a user calls to get labels, on a warm labeler (reverse_geocoder's
singleton loaded, our table and grid loaded): ``rg.search(coords)`` on a prebuilt list of
(lat, lon) tuples, and ``labeler.label(lat, lon)`` on prebuilt float64 arrays. Building
the inputs is outside both timings. One-time costs (rg's load, our grid build or cache
load) are reported separately.

    python benchmarks/geonames_labeler.py --quick     # 500k points
    python benchmarks/geonames_labeler.py             # 4.9M points (OSV-5M train size)

Run it in a fresh process: reverse_geocoder's geocoder is a singleton, and once created
in mode 1 its ``search`` never runs mode 2. Last line:
``geonames_vs_reverse_geocoder: <ratio>`` (our points/s over rg.search's).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from geodata.labels.geonames import GeoNamesLabeler, default_labeler  # noqa: E402

FIELDS = ("name", "admin1", "admin2", "cc")


def osv5m_like_points(
    place_lat: np.ndarray, place_lon: np.ndarray, n: int, rng: np.random.Generator, sigma_deg: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """(n,) lat, lon degrees: random places plus N(0, sigma_deg) noise, clipped to the globe."""
    src = rng.integers(0, len(place_lat), n)
    lat = np.clip(place_lat[src] + rng.normal(0.0, sigma_deg, n), -90.0, 90.0)
    lon = np.clip(place_lon[src] + rng.normal(0.0, sigma_deg, n), -180.0, 180.0)
    return lat, lon


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reverse_geocoder():
    """The package, imported and its mode-2 geocoder loaded with stdout silenced: (rg, geocoder, load_s)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import reverse_geocoder as rg

        t0 = time.perf_counter()
        geocoder = rg.RGeocoder(mode=2, verbose=False)
        load_s = time.perf_counter() - t0
    if geocoder.mode != 2:
        raise RuntimeError(
            "reverse_geocoder's singleton was created in mode 1 in this process, so search() "
            "cannot run its default mode 2: run the comparison in a fresh process"
        )
    return rg, geocoder, load_s


def compare_with_reverse_geocoder(
    lat: np.ndarray,
    lon: np.ndarray,
    labeler: GeoNamesLabeler | None = None,
    repeat: int = 3,
) -> dict[str, float | int]:
    """Time ``labeler.label`` and ``reverse_geocoder.search`` on the same (N,) points and
    compare every answer. Returns a flat dict of numbers:

    n, ours_s / rg_s (best of ``repeat`` runs, warm), ours_points_per_s, rg_points_per_s,
    ratio (ours points/s over rg's), same_place / same_labels (fractions of points whose
    place index / (name, admin1, admin2, cc) are identical), label_mismatches,
    ours_setup_s (table + tree + grid load or build), rg_load_s, rss_ours_mb (RSS
    after our runs), peak_rss_ours_mb (process peak after our runs, before rg's),
    peak_rss_mb (process peak at the end), rg_children_peak_rss_mb (rg's worker processes).
    """
    lat = np.ascontiguousarray(lat, dtype=np.float64)
    lon = np.ascontiguousarray(lon, dtype=np.float64)
    n = len(lat)
    labeler = labeler or default_labeler()

    t0 = time.perf_counter()
    labeler.places, labeler.tree, labeler.grid  # noqa: B018 - load once, as a long-lived labeler is
    ours_setup_s = time.perf_counter() - t0
    ours_s, ours = float("inf"), None
    for _ in range(repeat):
        ours = None
        gc.collect()
        t0 = time.perf_counter()
        ours = labeler.label(lat, lon)
        ours_s = min(ours_s, time.perf_counter() - t0)
    ours_place = labeler.nearest(lat, lon)
    rss_ours_mb, peak_ours_mb = _rss_mb(), _peak_rss_mb()

    rg, geocoder, rg_load_s = _reverse_geocoder()
    coords = list(zip(lat.tolist(), lon.tolist()))  # what rg.search takes; outside the timing
    rg_s, theirs = float("inf"), None
    with contextlib.redirect_stdout(io.StringIO()):
        for _ in range(repeat):
            theirs = None
            gc.collect()
            t0 = time.perf_counter()
            theirs = rg.search(coords)  # the official call: default mode 2
            rg_s = min(rg_s, time.perf_counter() - t0)
    del coords

    row_of = {id(loc): i for i, loc in enumerate(geocoder.locations)}
    their_place = np.fromiter((row_of[id(loc)] for loc in theirs), dtype=np.int64, count=n)
    same_labels = np.ones(n, dtype=bool)
    for field in FIELDS:
        their_field = np.array([loc[field] for loc in theirs], dtype=object)
        same_labels &= ours[field].to_numpy(dtype=object) == their_field
    return {
        "n": n,
        "ours_s": ours_s,
        "rg_s": rg_s,
        "ours_points_per_s": n / ours_s,
        "rg_points_per_s": n / rg_s,
        "ratio": rg_s / ours_s,
        "same_place": float(np.mean(ours_place == their_place)) if n else 1.0,
        "same_labels": float(np.mean(same_labels)) if n else 1.0,
        "label_mismatches": int(n - same_labels.sum()),
        "ours_setup_s": ours_setup_s,
        "rg_load_s": rg_load_s,
        "rss_ours_mb": rss_ours_mb,
        "peak_rss_ours_mb": peak_ours_mb,
        "peak_rss_mb": _peak_rss_mb(),
        "rg_children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4_900_000, help="points (default 4.9M, OSV-5M train size)")
    ap.add_argument("--quick", action="store_true", help="500k points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best counts")
    args = ap.parse_args()
    n = 500_000 if args.quick else args.n

    labeler = default_labeler()
    peak_before_mb = _peak_rss_mb()
    t0 = time.perf_counter()
    grid_cached = labeler.grid_path.is_file()
    labeler.grid  # noqa: B018 - load, or build and cache
    grid_s = time.perf_counter() - t0
    grid_peak_mb = _peak_rss_mb()
    lat, lon = osv5m_like_points(
        labeler.place_column("lat"), labeler.place_column("lon"), n, np.random.default_rng(args.seed)
    )
    r = compare_with_reverse_geocoder(lat, lon, labeler, repeat=args.repeat)

    print(f"points: {n:,} OSV-5M-like (place + N(0, 0.2 deg)), seed {args.seed}, {os.cpu_count()} CPUs")
    print(f"grid: {'loaded from' if grid_cached else 'built and cached at'} {labeler.grid_path} in {grid_s:.2f} s"
          f" ({labeler.grid.nbytes / 2**20:.0f} MiB in memory; process peak {peak_before_mb:.0f} -> {grid_peak_mb:.0f} MiB)")
    print(f"reverse_geocoder load (mode 2): {r['rg_load_s']:.2f} s")
    print(f"{'method':<34}{'seconds':>9}{'points/s':>14}")
    print(f"{'reverse_geocoder.search(coords)':<34}{r['rg_s']:>9.3f}{r['rg_points_per_s']:>14,.0f}")
    print(f"{'GeoNamesLabeler.label(lat, lon)':<34}{r['ours_s']:>9.3f}{r['ours_points_per_s']:>14,.0f}")
    print(f"agreement: place index {r['same_place']:.4%}, (name, admin1, admin2, cc) {r['same_labels']:.4%}"
          f" ({r['label_mismatches']} mismatches)")
    print(f"RSS: {r['rss_ours_mb']:.0f} MiB after ours (peak {r['peak_rss_ours_mb']:.0f} MiB); "
          f"process peak {r['peak_rss_mb']:.0f} MiB after rg; rg workers' peak {r['rg_children_peak_rss_mb']:.0f} MiB")
    print(f"geonames_vs_reverse_geocoder: {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
