"""Label image locations with the four OSV-5M label columns, by either labeler, in parallel.

- ``osv5m``: the labels the dataset ships (OSV-5M's CSV columns), taken as they are;
- ``geonames``: the OSV-5M method, nearest GeoNames cities1000 place
  (geodata.labels.geonames, identical to reverse_geocoder);
- ``polygons``: point-in-polygon against administrative polygons
  (geodata.labels.polygons); the city is the nearest GeoNames place inside the point's
  sub-region (or region).

Both labelers give the columns the entity table is built from (country, region,
sub-region, city, as in OSV-5M's CSVs) and run over Parquet partitions with Dask
(geodata.labels.parallel.map_partitions): the labeler is broadcast once, each worker reads its
own partition. Polygon names are made unique among siblings ("Name (code)" where two
units under one parent share a name), so entity keys built from names stay one per unit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import geopandas as gpd
import numpy as np
import pandas as pd

from geodata.labels.geonames import GeoNamesLabeler, default_labeler
from geodata.labels.geonames_csv import label_frame
from geodata.labels.parallel import map_partitions
from geodata.osv5m import LABEL_COLUMNS

log = logging.getLogger(__name__)

Method = Literal["osv5m", "geonames", "polygons"]


def geonames_partition(df: pd.DataFrame, labeler: GeoNamesLabeler | None) -> pd.DataFrame:
    """One partition (id, latitude, longitude) -> id + the OSV-5M label columns."""
    out = label_frame(df[["id", "latitude", "longitude"]], labeler=labeler)
    return out[["id", *LABEL_COLUMNS]]


def polygons_partition(df: pd.DataFrame, payload: tuple) -> pd.DataFrame:
    """One partition -> id, the OSV-5M label columns ("" where unassigned), and per level the
    polygon code and the labeler's reason (geodata.labels.polygons), plus the city's reason.
    ``payload`` = (PolygonLabeler, GeoNames places); places None: polygons only, no city."""
    labeler, places = payload
    lat = df["latitude"].to_numpy(np.float64)
    lon = df["longitude"].to_numpy(np.float64)
    lab = labeler.label(lat, lon)
    if places is not None:
        lab = labeler.assign_cities(lab, places)
    else:
        lab = lab.assign(city_name="", city_reason="not_requested")
    out = pd.DataFrame({"id": df["id"].to_numpy()})
    out["country"] = lab["cc"].fillna("").astype(str).to_numpy()
    for name in ("region", "sub-region"):
        col = f"{name}_name"
        out[name] = lab[col].fillna("").astype(str).to_numpy() if col in lab else ""
    out["city"] = lab["city_name"].fillna("").astype(str).to_numpy()
    for name in labeler.level_names:
        out[f"{name}_code"] = lab[f"{name}_code"].fillna("").astype(str).to_numpy()
        out[f"{name}_reason"] = lab[f"{name}_reason"].astype(str).to_numpy()
    out["city_reason"] = lab["city_reason"].astype(str).to_numpy()
    return out


def disambiguate_names(admin: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Copy where a unit whose (level, parent, name) is shared by another gets "name (code)"."""
    out = admin.copy()
    parent = out["parent_code"].astype(object).where(out["parent_code"].notna(), "")
    dup = pd.DataFrame({"l": out["level"], "p": parent, "n": out["name"]}).duplicated(keep=False).to_numpy()
    out.loc[dup, "name"] = out.loc[dup, "name"].astype(str) + " (" + out.loc[dup, "code"].astype(str) + ")"
    if dup.any():
        log.info("%d admin units share a name with a sibling: named 'name (code)'", int(dup.sum()))
    return out


@dataclass
class LabelResult:
    """labels: one row per input point (same order): id, country, region, sub-region, city
    (str, "" where unassigned) and, for polygons, <level>_code / <level>_reason columns.
    report: counts for the QC report."""

    labels: pd.DataFrame
    report: dict = field(default_factory=dict)


def label_points(
    points: pd.DataFrame,
    method: Method,
    *,
    admin: gpd.GeoDataFrame | None = None,
    grid_deg: float = 5.0,
    max_snap_km: float = 25.0,
    check_all_levels: bool = False,
    scheduler: str | None = None,
    n_workers: int = 2,
    labeler=None,
    work_dir=None,
    runner=None,
) -> LabelResult:
    """Label ``points`` (id, latitude, longitude[, OSV-5M label columns for "osv5m"]).

    ``labeler`` reuses a prepared PolygonLabeler (e.g. the one that labelled the train split).
    ``work_dir``: where the Parquet partitions go (a folder the Dask workers can read: required
    for a remote cluster; default a temporary folder). ``runner``: geodata.labels.parallel.map_partitions'.
    """
    if method == "osv5m":
        missing = [c for c in LABEL_COLUMNS if c not in points]
        if missing:
            raise ValueError(f"labeler 'osv5m' needs the dataset's label columns; missing {missing}: "
                             "use labeler 'geonames' or 'polygons' for unlabelled data")
        labels = points[["id", *LABEL_COLUMNS]].copy()
        for c in LABEL_COLUMNS:
            labels[c] = labels[c].fillna("").astype(str)
        return LabelResult(labels.reset_index(drop=True), {"method": "osv5m"})
    frame = points[["id", "latitude", "longitude"]].reset_index(drop=True)
    if method == "geonames":
        labels = map_partitions(frame, geonames_partition, default_labeler(), scheduler=scheduler, n_workers=n_workers,
                                work_dir=work_dir, runner=runner)
        return LabelResult(labels, {"method": "geonames", "unassigned_country": 0})
    if method != "polygons":
        raise ValueError(f"unknown labeler {method!r}: use 'osv5m', 'geonames' or 'polygons'")
    if labeler is None:
        if admin is None:
            raise ValueError("labeler 'polygons' needs admin polygons (geodata.admin.load_admin)")
        from geodata.labels.polygons import PolygonLabeler

        labeler = PolygonLabeler(disambiguate_names(admin), grid_deg=grid_deg, max_snap_km=max_snap_km,
                                 check_all_levels=check_all_levels)
    labels = map_partitions(frame, polygons_partition, (labeler, default_labeler().places),
                            scheduler=scheduler, n_workers=n_workers, work_dir=work_dir, runner=runner)
    return LabelResult(labels, polygon_report(labels, labeler.level_names))


def polygon_report(labels: pd.DataFrame, level_names: tuple[str, ...]) -> dict:
    """Counts per level: inside, snapped, filled from a finer level, unassigned, disagreements."""
    rep: dict = {"method": "polygons", "n": int(len(labels))}
    for name in level_names:
        r = labels[f"{name}_reason"].astype(str)
        rep[name] = {"inside": int((r == "").sum()), "snapped": int((r == "snapped").sum()),
                     "filled": int(r.str.startswith("from_").sum()),
                     "unassigned": int(r.str.startswith("no_polygon").sum()),
                     "disagreements": int((r.str.startswith("overridden_by_") | r.str.startswith("disagrees_with_")).sum())}
    cr = labels["city_reason"].astype(str)
    rep["city"] = {"in_own_polygon": int((cr == "").sum()), "from_parent": int(cr.str.startswith("from_").sum()),
                   "unassigned": int((labels["city"] == "").sum())}
    rep["unassigned_country"] = int((labels["country"] == "").sum())
    return rep


def country_disagreements(labels: pd.DataFrame, geonames_country: pd.Series | np.ndarray) -> int:
    """Points whose polygon country differs from the GeoNames (OSV-5M) country (both assigned)."""
    poly = labels["country"].astype(str).to_numpy()
    gn = pd.Series(geonames_country).fillna("").astype(str).to_numpy()
    return int(((poly != "") & (gn != "") & (poly != gn)).sum())


def representative_coords(entities: pd.DataFrame, labels: pd.DataFrame, admin: gpd.GeoDataFrame) -> pd.DataFrame:
    """Copy of ``entities`` with countries, regions and sub-regions at a representative point of
    their polygon (shapely point_on_surface: always inside, unlike a centroid); cities keep theirs.

    labels: the polygon labels of the training points the entities were built from (same rows as
    the manifest), with <level>_code columns; entities without a polygon keep their coordinates.
    """
    from geodata.labels.hierarchy import level_keys

    keys = level_keys(labels)
    rep = admin.set_index("code").geometry.representative_point()
    out = entities.copy()
    for lvl, (key_col, poly_level) in enumerate((("country", "country"), ("region", "region"), ("subregion", "sub-region"))):
        code_col = f"{poly_level}_code"
        if code_col not in labels:
            continue
        pair = pd.DataFrame({"key": keys[key_col].to_numpy(), "code": labels[code_col].astype(str).to_numpy()})
        # One key can span several polygons (a country made of several level-0 units, e.g. Natural
        # Earth's Kazakhstan and Baikonur): the polygon holding most of its images represents it.
        counts = pair[pair["code"] != ""].groupby(["key", "code"], sort=True).size().reset_index(name="n")
        pair = counts.sort_values(["key", "n"], ascending=[True, False], kind="stable").drop_duplicates("key")
        pt = rep.reindex(pair["code"].to_numpy())
        ok = pt.notna().to_numpy()
        key_to = pd.DataFrame({"lat": pt.y.to_numpy()[ok], "lon": pt.x.to_numpy()[ok]}, index=pair["key"].to_numpy()[ok])
        rows = (out["level"] == lvl) & out["key"].isin(key_to.index)
        out.loc[rows, "lat"] = key_to.loc[out.loc[rows, "key"], "lat"].to_numpy()
        out.loc[rows, "lon"] = key_to.loc[out.loc[rows, "key"], "lon"].to_numpy()
    return out


def label_csv_polygons(
    in_csv, out_csv, *, lat_col: str = "latitude", lon_col: str = "longitude", admin_source: str = "gazetteer",
    admin_path=None, grid_deg: float = 5.0, max_snap_km: float = 25.0, scheduler: str | None = None,
) -> dict:
    """``hierloc label --method polygons``: a CSV with coordinates -> the same rows plus country,
    region, sub-region, city and, per level, the polygon code and the labeler's reason. Written
    atomically; returns the polygon report (counts per level)."""
    from geodata.admin import load_admin
    from geodata.atomic import atomic_write_path
    from geodata.labels.coordinates import parse_coordinates

    try:
        frame = pd.read_csv(in_csv, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError:  # pandas names neither the file nor the line
        from geodata.ingest.csv_lines import not_utf8_message

        raise ValueError(not_utf8_message(in_csv)) from None
    lat, lon = parse_coordinates(frame, lat_col, lon_col, source=str(in_csv), first_line=2)
    points = pd.DataFrame({"id": np.arange(len(frame), dtype=np.int64), "latitude": lat, "longitude": lon})
    res = label_points(points, "polygons", admin=load_admin(admin_source, admin_path), grid_deg=grid_deg,
                       max_snap_km=max_snap_km, scheduler=scheduler)
    out = frame.copy()
    for col in res.labels.columns.drop("id"):
        out[col] = res.labels[col].to_numpy()
    with atomic_write_path(out_csv) as tmp:
        out.to_csv(tmp, index=False)
    return res.report
