"""The entity hierarchy at OSV-5M scale: both labelers and the entity-table build, in one process.

N points drawn like OSV-5M's (a random GeoNames place, weighted towards a few countries as
the demo's draw, plus a few km to ~20 km of noise), then:

1. ``geonames`` labeler (geodata.labels.geonames) against ``reverse_geocoder.search`` on the same
   points: answers compared one by one, time ratio;
2. ``polygons`` labeler (geodata.labels.polygons, the embedded geoBoundaries polygons) on a
   2-worker Dask LocalCluster over Parquet partitions (geodata.labels.parallel), against a plain
   per-level ``geopandas.sjoin`` loop on the same polygons, in one process (the baseline a
   user would write; no snapping, no consistency between levels, no cities);
3. the entity table from the polygon labels (geodata.labels.hierarchy.build_entities).

    python benchmarks/hierarchy.py --quick      # 500k points
    python benchmarks/hierarchy.py              # 4.9M points (OSV-5M train)

Last line: ``geonames_vs_reverse_geocoder: <ratio>``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from geonames_labeler import compare_with_reverse_geocoder  # noqa: E402

from geodata.admin import load_admin  # noqa: E402
from geodata.labels.geonames import default_labeler  # noqa: E402
from geodata.labels.hierarchy import build_entities  # noqa: E402
from geodata.labels.label import disambiguate_names, label_points, polygons_partition  # noqa: E402
from geodata.labels.parallel import map_partitions  # noqa: E402
from geodata.labels.polygons import PolygonLabeler  # noqa: E402


def osv5m_like_points(n: int, seed: int = 0) -> pd.DataFrame:
    """Points around GeoNames places, skewed towards some countries, with km-scale noise."""
    rng = np.random.default_rng(seed)
    places = default_labeler().places
    cc = places["cc"].to_numpy()
    uniq, inv = np.unique(cc, return_inverse=True)
    country_w = rng.pareto(1.2, len(uniq)) + 0.05  # a few countries dominate, a long tail
    w = country_w[inv] / np.bincount(inv)[inv]
    idx = rng.choice(len(places), n, p=w / w.sum())
    noise_deg = rng.exponential(0.05, n)[:, None] * rng.normal(size=(n, 2))
    lat = np.clip(places["lat"].to_numpy()[idx] + noise_deg[:, 0], -90, 90)
    lon = (places["lon"].to_numpy()[idx] + noise_deg[:, 1] + 180) % 360 - 180
    return pd.DataFrame({"id": np.arange(n, dtype=np.int64), "latitude": lat, "longitude": lon})


def sjoin_loop(points: pd.DataFrame, admin: gpd.GeoDataFrame) -> pd.DataFrame:
    """The plain baseline: one geopandas.sjoin per level, first match per point."""
    pts = gpd.GeoDataFrame(points[["id"]], geometry=gpd.points_from_xy(points["longitude"], points["latitude"]),
                           crs="EPSG:4326")
    out = points[["id"]].copy()
    for level in sorted(admin["level"].unique()):
        polys = admin.loc[admin["level"] == level, ["code", "geometry"]]
        j = gpd.sjoin(pts, polys, predicate="within", how="left")
        out[f"l{level}"] = j[~j.index.duplicated()]["code"].reindex(pts.index).to_numpy()
    return out


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="500k points")
    ap.add_argument("--n", type=int, default=None, help="points (default 4.9M, quick 500k)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    n = args.n or (500_000 if args.quick else 4_900_000)
    points = osv5m_like_points(n)
    rows = []

    # 1. geonames vs reverse_geocoder
    gn = compare_with_reverse_geocoder(points["latitude"].to_numpy(), points["longitude"].to_numpy())
    rows.append(("geonames labeler", gn["ours_s"], n / gn["ours_s"]))
    rows.append(("reverse_geocoder.search (baseline)", gn["rg_s"], n / gn["rg_s"]))

    # 2. polygons on Dask vs a plain sjoin loop
    t0 = time.perf_counter()
    admin = disambiguate_names(load_admin("gazetteer"))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    labeler = PolygonLabeler(admin, grid_deg=5.0, max_snap_km=25.0)
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = label_points(points, "polygons", labeler=labeler, scheduler="local", n_workers=args.workers)
    poly_s = time.perf_counter() - t0
    rows.append((f"polygons labeler, {args.workers} Dask workers (3 levels + snapping + cities)", poly_s, n / poly_s))
    # The same work as the baseline (point in polygon per level; no snapping, no cities), 2 workers.
    bare_labeler = PolygonLabeler(admin, grid_deg=5.0, max_snap_km=0.0)
    t0 = time.perf_counter()
    bare = map_partitions(points, polygons_partition, (bare_labeler, None), scheduler="local", n_workers=args.workers)
    bare_s = time.perf_counter() - t0
    rows.append((f"polygons labeler, same work as the baseline (no snapping, no cities), {args.workers} workers",
                 bare_s, n / bare_s))
    t0 = time.perf_counter()
    base = sjoin_loop(points, admin)
    sjoin_s = time.perf_counter() - t0
    rows.append(("geopandas.sjoin per level, 1 process (baseline: no snapping, no cities)", sjoin_s, n / sjoin_s))
    inside = res.labels["sub-region_reason"].to_numpy() == ""
    same = (res.labels["sub-region_code"].to_numpy()[inside] == base["l2"].to_numpy()[inside]).mean()

    # 3. entity table
    t0 = time.perf_counter()
    m = points.assign(**{c: res.labels[c].to_numpy() for c in ("country", "region", "sub-region", "city")})
    m = m[m["country"] != ""]
    ents = build_entities(m, places=default_labeler().places, coords="geonames")
    ent_s = time.perf_counter() - t0
    rows.append(("entity table (build_entities)", ent_s, len(m) / ent_s))

    total = gn["ours_s"] + load_s + prep_s + poly_s + ent_s
    print(f"\n{n:,} OSV-5M-like points; 2-core machine; polygons: {len(admin):,} embedded geoBoundaries units "
          f"(loaded from the cache in {load_s:.1f} s, prepared in {prep_s:.1f} s)")
    print("\n| stage | seconds | points/s |\n|---|---|---|")
    for name, s, rate in rows:
        print(f"| {name} | {s:.1f} | {rate:,.0f} |")
    print(f"\ngeonames answers identical to reverse_geocoder: {100 * gn['same_labels']:.4f} % of {n:,} points ({gn['label_mismatches']} mismatches)")
    print(f"polygons == sjoin on points inside a sub-region: {100 * same:.3f} %; "
          f"unassigned country: {res.report['unassigned_country']:,}; disagreements (country/region; only for points outside a finer polygon): "
          f"{res.report['country']['disagreements']:,} / {res.report['region']['disagreements']:,}")
    print(f"entities: {ents.groupby('level').size().to_dict()}")
    print(f"whole hierarchy (geonames labels + polygon labels + entity table, cache warm): {total:.1f} s; "
          f"peak RSS {rss_gb():.2f} GB")
    same_bare = (bare["sub-region_code"].to_numpy()[inside] == base["l2"].to_numpy()[inside]).mean()
    print(f"no-snapping run == sjoin on points inside a sub-region: {100 * same_bare:.3f} %")
    print(f"polygons_full_vs_sjoin: {sjoin_s / poly_s:.2f}")
    print(f"polygons_vs_sjoin: {sjoin_s / bare_s:.2f}")
    print(f"geonames_vs_reverse_geocoder: {gn['rg_s'] / gn['ours_s']:.2f}")


if __name__ == "__main__":
    main()
