"""The entity hierarchy: countries > regions > sub-regions > cities, from image labels.

Each entity has a stable composite key built from its labels, coarse to fine,
joined with ``|``: ``cc``, ``cc|admin1``, ``cc|admin1|admin2``,
``cc|admin1|admin2|city``. The same place gets the same key in every rebuild;
given the previous table, old entities keep their ids and new ones are appended,
so a retrained model's entities line up with the last one's.

Where a region has images without a sub-region (admin2 empty, common in GeoNames),
a placeholder sub-region with key ``cc|admin1|`` (empty name, ``placeholder`` true)
keeps the tree four levels deep everywhere, so beam search is uniform.

The table is built from labels (OSV-5M's GeoNames labels today); a polygon labeler
only has to produce the same four label columns to feed it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from geodata.osv5m import LEVELS, MISSING_SUBREGION_TOKEN

KEY_SEP = "|"
ENTITY_COLUMNS = (
    "entity_id", "level", "level_name", "level_index", "key", "name", "parent_id",
    "lat", "lon", "n_images", "placeholder", "osv5m_key",
)
CoordSource = Literal["geonames", "mean", "medoid"]


class HierarchyError(ValueError):
    """The entity table is not a valid tree."""


def level_keys(labels: pd.DataFrame) -> pd.DataFrame:
    """Composite keys per level for rows with columns country, region, sub-region, city.

    Returns columns country, region, subregion, city (the keys) and the matching
    OSV-5M unique keys as osv5m_<level>.
    """
    cc = labels["country"].astype(str)
    a1 = labels["region"].astype(str)
    a2 = labels["sub-region"].astype(str)
    city = labels["city"].astype(str)
    k_region = cc + KEY_SEP + a1
    k_sub = k_region + KEY_SEP + a2
    osv_region = a1 + "_" + cc
    has_sub = a2 != ""
    return pd.DataFrame(
        {
            "country": cc.to_numpy(),
            "region": k_region.to_numpy(),
            "subregion": k_sub.to_numpy(),
            "city": (k_sub + KEY_SEP + city).to_numpy(),
            "osv5m_country": cc.to_numpy(),
            "osv5m_region": osv_region.to_numpy(),
            "osv5m_subregion": np.where(has_sub, a2 + "_" + osv_region, None),
            "osv5m_city": (city + "_" + a2.where(has_sub, MISSING_SUBREGION_TOKEN) + "_" + osv_region).to_numpy(),
        },
        index=labels.index,
    )


def spherical_mean_deg(lat_deg: np.ndarray, lon_deg: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean direction of the points of each group on the unit sphere: -> (n_groups, 2) lat, lon.

    Unlike averaging degrees, this is right across the antimeridian.
    """
    xyz = unit_xyz(lat_deg, lon_deg)
    sums = np.stack([np.bincount(group, weights=xyz[:, i], minlength=n_groups) for i in range(3)], axis=1)
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    # Antipodal points can cancel to a zero vector: then the group's first point stands in.
    first = np.zeros(n_groups, dtype=np.int64)
    uniq, idx = np.unique(group, return_index=True)
    first[uniq] = idx
    sums = np.where(norm > 1e-12, sums / np.maximum(norm, 1e-12), xyz[first])
    return np.degrees(np.stack([np.arcsin(np.clip(sums[:, 2], -1, 1)), np.arctan2(sums[:, 1], sums[:, 0])], axis=1))


def medoid_deg(
    lat_deg: np.ndarray, lon_deg: np.ndarray, group: np.ndarray, n_groups: int, *, max_points: int = 512, seed: int = 0
) -> np.ndarray:
    """Medoid of each group's points: the point with the least summed great-circle distance to the
    others -> (n_groups, 2) lat, lon. Groups above ``max_points`` points use a seeded sample of that
    many as both candidates and targets (exact below it). Always one of the group's own points."""
    xyz = unit_xyz(lat_deg, lon_deg)
    out = np.full((n_groups, 2), np.nan)
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(n_groups + 1))
    rng = np.random.default_rng(seed)
    for g in range(n_groups):
        rows = order[starts[g] : starts[g + 1]]
        if len(rows) == 0:
            continue
        if len(rows) > 2:
            if len(rows) > max_points:
                rows = np.sort(rng.choice(rows, max_points, replace=False))
            v = xyz[rows]
            angle = np.arccos(np.clip(v @ v.T, -1.0, 1.0))  # great-circle distances (radians)
            rows = rows[[int(np.argmin(angle.sum(1)))]]
        out[g] = lat_deg[rows[0]], lon_deg[rows[0]]
    return out


def unit_xyz(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """(N,) x 2 degrees -> (N, 3) unit vectors on the sphere."""
    lat, lon = np.radians(lat_deg), np.radians(lon_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def _city_place_coords(cities: pd.DataFrame, places: pd.DataFrame) -> pd.DataFrame:
    """GeoNames coordinates of each city entity, matched on (cc, admin1, admin2, name).

    Several places can share all four labels; the one nearest the images' mean wins.
    """
    p = places.rename(columns={"lat": "p_lat", "lon": "p_lon"})
    m = cities.merge(p, left_on=["cc", "admin1", "admin2", "name"], right_on=["cc", "admin1", "admin2", "name"], how="inner")
    d2 = (m["p_lat"] - m["lat"]) ** 2 + ((m["p_lon"] - m["lon"] + 180) % 360 - 180) ** 2
    best = m.assign(d2=d2).sort_values("d2").drop_duplicates("key")
    return best.set_index("key")[["p_lat", "p_lon"]]


def build_entities(
    manifest: pd.DataFrame,
    *,
    places: pd.DataFrame | None = None,
    coords: CoordSource = "geonames",
    previous: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Entity table from labelled training images.

    manifest: columns latitude, longitude, country, region, sub-region, city.
    places: GeoNames places (lat, lon, name, admin1, admin2, cc) for coords="geonames".
    coords: entity coordinates. "geonames": cities at their GeoNames place, upper levels at the
    spherical mean of their training images; "mean": the spherical mean everywhere; "medoid":
    the medoid of the entity's training images everywhere (an image location, never in the sea
    between two coasts as a mean can be). Polygon representative points are set by the stage
    that has the polygons (geodata.labels.label.representative_coords).
    previous: an earlier entity table whose ids must be kept.
    Returns ENTITY_COLUMNS, sorted by level then level_index.
    """
    if coords == "geonames" and places is None:
        raise ValueError("coords='geonames' needs the GeoNames places table")
    keys = level_keys(manifest)
    lat = manifest["latitude"].to_numpy(float)
    lon = manifest["longitude"].to_numpy(float)
    tables = []
    for lvl, level in enumerate(LEVELS):
        codes, uniq = pd.factorize(keys[level], sort=True)
        mean = (medoid_deg if coords == "medoid" else spherical_mean_deg)(lat, lon, codes, len(uniq))
        first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
        parts = pd.Series(uniq).str.split(KEY_SEP, regex=False)
        t = pd.DataFrame(
            {
                "level": lvl, "level_name": level, "key": uniq.astype(str), "name": parts.str[-1].to_numpy(),
                "parent_key": parts.str[:-1].str.join(KEY_SEP).to_numpy() if lvl else None,
                "lat": mean[:, 0], "lon": mean[:, 1],
                "n_images": np.bincount(codes, minlength=len(uniq)),
                "placeholder": (lvl == 2) & (parts.str[-1] == "").to_numpy(),
                "osv5m_key": keys[f"osv5m_{level}"].to_numpy()[first],
            }
        )
        if lvl == 3 and coords == "geonames":
            cities = t.assign(cc=parts.str[0].to_numpy(), admin1=parts.str[1].to_numpy(), admin2=parts.str[2].to_numpy())
            place = _city_place_coords(cities, places)
            hit = t["key"].isin(place.index)
            t.loc[hit, "lat"] = place.loc[t.loc[hit, "key"], "p_lat"].to_numpy()
            t.loc[hit, "lon"] = place.loc[t.loc[hit, "key"], "p_lon"].to_numpy()
        tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    table = _assign_ids(table, previous)
    check_tree(table)
    return table


def _assign_ids(table: pd.DataFrame, previous: pd.DataFrame | None) -> pd.DataFrame:
    """Give entity_id and level_index: kept from ``previous``, appended for new keys."""
    if previous is None or previous.empty:
        table = table.sort_values(["level", "key"], kind="stable").reset_index(drop=True)
        table["entity_id"] = np.arange(len(table), dtype=np.int64)
        table["level_index"] = table.groupby("level").cumcount().astype(np.int64)
    else:
        old = previous.set_index("key")[["entity_id", "level_index"]]
        merged = table.join(old, on="key")
        # Entities of the previous table that have no images now stay: their ids are in use.
        gone = previous[~previous["key"].isin(table["key"])].assign(n_images=0)
        gone = gone.assign(parent_key=gone["key"].str.rsplit(KEY_SEP, n=1).str[0].where(gone["level"] > 0, None))
        merged = merged.sort_values(["level", "key"], kind="stable")
        next_id = int(previous["entity_id"].max()) + 1
        new_rows = merged[merged["entity_id"].isna()]
        merged.loc[new_rows.index, "entity_id"] = np.arange(next_id, next_id + len(new_rows))
        base = previous.groupby("level")["level_index"].max().reindex(range(len(LEVELS))).fillna(-1)
        rank = new_rows.groupby("level").cumcount() + 1
        merged.loc[new_rows.index, "level_index"] = base.loc[new_rows["level"]].to_numpy() + rank.to_numpy()
        cols = [c for c in merged.columns if c in gone.columns]
        table = pd.concat([merged, gone[cols]], ignore_index=True)
        table[["entity_id", "level_index"]] = table[["entity_id", "level_index"]].astype(np.int64)
    key_to_id = dict(zip(table["key"], table["entity_id"]))
    table["parent_id"] = table["parent_key"].map(key_to_id).fillna(-1).astype(np.int64) if "parent_key" in table else -1
    table = table.sort_values(["level", "level_index"]).reset_index(drop=True)
    table["level"] = table["level"].astype(np.int8)
    table["n_images"] = table["n_images"].astype(np.int64)
    table["placeholder"] = table["placeholder"].astype(bool)
    return table[list(ENTITY_COLUMNS)]


def check_tree(table: pd.DataFrame) -> None:
    """Raise HierarchyError unless every entity's parent exists one level up."""
    by_id = table.set_index("entity_id")["level"]
    if by_id.index.has_duplicates or table["key"].duplicated().any():
        raise HierarchyError("duplicate entity ids or keys in the entity table")
    top = table["level"] == 0
    if (table.loc[top, "parent_id"] != -1).any():
        raise HierarchyError("a country has a parent")
    child = table[~top]
    parent_level = by_id.reindex(child["parent_id"]).to_numpy()
    bad = child[~(parent_level == child["level"].to_numpy() - 1)]
    if len(bad):
        raise HierarchyError(f"{len(bad)} entities have no parent one level up, e.g. key {bad['key'].iloc[0]!r}")
    for lvl, grp in table.groupby("level"):
        idx = np.sort(grp["level_index"].to_numpy())
        if not np.array_equal(idx, np.arange(len(grp))):
            raise HierarchyError(f"level {lvl}: level_index is not 0..{len(grp) - 1}")


def assign_images(manifest: pd.DataFrame, entities: pd.DataFrame) -> pd.DataFrame:
    """Per image, the entity id and index within level at each level (-1 if not in the table).

    Returns columns id, <level>_id and <level>_index for each level.
    """
    keys = level_keys(manifest)
    lookup = entities.set_index("key")
    out = pd.DataFrame({"id": manifest["id"].to_numpy()})
    for level in LEVELS:
        hit = lookup.reindex(keys[level].to_numpy())
        out[f"{level}_id"] = hit["entity_id"].fillna(-1).astype(np.int64).to_numpy()
        out[f"{level}_index"] = hit["level_index"].fillna(-1).astype(np.int64).to_numpy()
    return out


def parent_rows(entities: pd.DataFrame) -> np.ndarray:
    """Row (in the table's order) of each entity's parent, -1 for countries."""
    row_of = pd.Series(np.arange(len(entities)), index=entities["entity_id"].to_numpy())
    return row_of.reindex(entities["parent_id"].to_numpy()).fillna(-1).astype(np.int64).to_numpy()
