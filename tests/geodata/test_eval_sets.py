"""Benchmark metadata readers: coordinate order detection, quarantine, image finding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from geodata.eval_sets.benchmark_csv import (
    INCLUSIVE_BY_FORMAT,
    QUARANTINE_COLUMNS,
    ROW_COLUMNS,
    read_geo_benchmark,
)
from geodata.eval_sets.photos import find_benchmark_images

PLACES365_TAIL = "S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban"
SWAPPED_HEADER = f"IMG_ID,AUTHOR,LON,LAT,{PLACES365_TAIL}"
CORRECT_HEADER = f"IMG_ID,AUTHOR,LAT,LON,{PLACES365_TAIL}"

#: (image, lat_deg, lon_deg) of photos in real cities, all with |lon| <= 90 so only the
#: plausibility check can tell the order. The first is Im2GPS3k's real first row.
ATLANTIC = [
    ("1000269685_e60e9cdfb4_1125_78841376@N00.jpg", 32.325436, -64.764404),  # Bermuda
    ("2301441862_3d4f0ba1c5_1362_31319738@N00.jpg", 40.758896, -73.985130),  # New York
    ("3146216046_1d0d8b7e01_3011_27695853@N00.jpg", 48.858370, 2.294481),  # Paris
    ("4021554733_dbb3f1a4e2_2571_10340981@N00.jpg", 51.500729, -0.124625),  # London
    ("2486102381_c5e1aa1b8e_3024_89446826@N00.jpg", -22.951916, -43.210487),  # Rio
    ("1396839584_5bf5d3be34_1056_26214316@N00.jpg", 29.979235, 31.134202),  # Giza
    ("3601788251_64e9cb5f3e_2480_14790384@N00.jpg", 55.753930, 37.620795),  # Moscow
    ("2767403810_5c7d8f8e23_3232_29567201@N00.jpg", -34.603722, -58.381592),  # Buenos Aires
    ("1177946163_0e6f6c2d7b_1260_73461451@N00.jpg", 40.415363, -3.707398),  # Madrid
    ("3795183590_4a4c0a5c2b_2506_21483741@N00.jpg", 64.141796, -21.926590),  # Reykjavik
    ("2119470129_f4b0d7bba8_2291_16462910@N00.jpg", -1.286389, 36.817223),  # Nairobi
    ("3480024571_11d3c6fd91_3627_83945012@N08.jpg", 41.890210, 12.492231),  # Rome
]
#: Photos east of 90E: a swapped copy then has |labelled latitude| > 90.
FAR_EAST = [
    ("2954302817_4e2c7b6d3a_3053_47210837@N00.jpg", -33.856784, 151.215297),  # Sydney
    ("1405831735_9c1e8b0a7d_2153_31784214@N00.jpg", 13.750000, 100.491667),  # Bangkok
    ("3221589304_bd7ac1f92e_3342_22190367@N00.jpg", 35.658581, 139.745433),  # Tokyo
]


def _write(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def _places365(path: Path, header: str, photos, lat_first: bool) -> Path:
    """A GeoEstimation-style copy; values lat,lon when lat_first else lon,lat."""
    lines = []
    for image, lat, lon in photos:
        a, b = (lat, lon) if lat_first else (lon, lat)
        author = image.rsplit("_", 1)[1].removesuffix(".jpg")
        lines.append(f"{image},{author},{a},{b},1,9,118,0.05,0.31,0.64")
    return _write(path, header, lines)


def _check_rows(table, photos) -> None:
    assert list(table.rows.columns) == list(ROW_COLUMNS)
    assert table.rows["id"].tolist() == [p[0] for p in photos]
    assert table.rows["image"].tolist() == [p[0] for p in photos]
    np.testing.assert_array_equal(table.rows["latitude"].to_numpy(), [p[1] for p in photos])
    np.testing.assert_array_equal(table.rows["longitude"].to_numpy(), [p[2] for p in photos])
    assert table.rows["latitude"].dtype == np.float64
    assert table.quarantine.empty
    assert list(table.quarantine.columns) == list(QUARANTINE_COLUMNS)


# --- coordinate order ---------------------------------------------------------------


def test_swapped_header_im2gps3k_copy_detected_by_plausibility(tmp_path):
    path = _places365(tmp_path / "im2gps3k_places365.csv", SWAPPED_HEADER, ATLANTIC, lat_first=True)
    table = read_geo_benchmark(path)
    assert table.fmt == "im2gps3k"
    assert table.swapped
    assert table.swap_evidence.startswith("swapped by plausibility")
    _check_rows(table, ATLANTIC)
    assert INCLUSIVE_BY_FORMAT[table.fmt]


def test_correct_header_copy_read_as_labelled(tmp_path):
    path = _places365(tmp_path / "im2gps3k_places365.csv", CORRECT_HEADER, ATLANTIC, lat_first=True)
    table = read_geo_benchmark(path)
    assert not table.swapped
    assert table.swap_evidence.startswith("as-labelled by plausibility")
    _check_rows(table, ATLANTIC)


def test_swapped_copy_with_far_east_longitudes_is_certain(tmp_path):
    photos = ATLANTIC[:3] + FAR_EAST
    path = _places365(tmp_path / "im2gps3k_places365.csv", SWAPPED_HEADER, photos, lat_first=True)
    table = read_geo_benchmark(path)
    assert table.swapped
    assert "|v| > 90" in table.swap_evidence and "151.215" in table.swap_evidence
    _check_rows(table, photos)


def test_correct_copy_with_far_east_longitudes_is_certain(tmp_path):
    photos = ATLANTIC[:3] + FAR_EAST
    path = _places365(tmp_path / "yfcc4k_places365.csv", CORRECT_HEADER, photos, lat_first=True)
    table = read_geo_benchmark(path)
    assert table.fmt == "yfcc4k"
    assert not table.swapped
    assert table.swap_evidence.startswith("as-labelled: ")
    _check_rows(table, photos)


def test_one_corrupt_latitude_does_not_swap_the_file(tmp_path):
    """Range says swapped (one |lat| > 90, all |lon| <= 90), plausibility clearly says not:
    plausibility wins and the corrupt row is quarantined."""
    path = _places365(tmp_path / "bench.csv", CORRECT_HEADER, ATLANTIC, lat_first=True)
    text = path.read_text().replace("40.758896,-73.98513", "140.758896,-73.98513")
    path.write_text(text)
    table = read_geo_benchmark(path, max_bad_fraction=0.1)
    assert not table.swapped
    assert "overriding the range rule" in table.swap_evidence
    assert table.quarantine[["line", "field"]].values.tolist() == [[3, "LAT"]]
    assert "latitude outside [-90, 90]" in table.quarantine["reason"][0]
    assert table.quarantine["value"][0] == "140.758896"


def test_ambiguous_order_keeps_labels_and_says_so(tmp_path):
    # lat == lon: both readings are the same points
    lines = [f"p{i},{v},{v}" for i, v in enumerate([10.5, 20.25, 30.0, 45.5, -12.0])]
    path = _write(tmp_path / "diag.csv", "id,latitude,longitude", lines)
    table = read_geo_benchmark(path)
    assert table.fmt == "generic"
    assert not table.swapped
    assert "neither order is clearly more plausible" in table.swap_evidence


@pytest.mark.parametrize("order, swapped", [("as-labelled", False), ("swapped", True)])
def test_explicit_order_overrides_detection(tmp_path, order, swapped):
    path = _places365(tmp_path / "im2gps3k_places365.csv", SWAPPED_HEADER, ATLANTIC, lat_first=True)
    table = read_geo_benchmark(path, latlon_order=order)
    assert table.swapped is swapped
    assert "set by the caller" in table.swap_evidence
    expected = ATLANTIC if swapped else [(n, lon, lat) for n, lat, lon in ATLANTIC]
    np.testing.assert_array_equal(table.rows["latitude"], [p[1] for p in expected])


# --- columns and ids ----------------------------------------------------------------


def test_generic_yfcc_csv_columns_and_string_ids(tmp_path):
    photos = [(f"{10_000_000_000_000_000 + i}", lat, lon) for i, (_, lat, lon) in enumerate(ATLANTIC)]
    lines = [f"{pid},{lat},{lon},0" for pid, lat, lon in photos]
    lines[0] = "0007," + lines[0].split(",", 1)[1]  # leading zeros survive
    path = _write(tmp_path / "yfcc4k.csv", "Photo_ID,Latitude,Longitude,accuracy", lines)
    table = read_geo_benchmark(path)
    assert table.fmt == "yfcc4k"
    assert not table.swapped
    assert table.rows["id"].tolist() == ["0007"] + [p[0] for p in photos[1:]]
    assert table.rows["image"].tolist() == table.rows["id"].tolist()


def test_explicit_columns_override_detection(tmp_path):
    lines = [f"{n},x{i},{lat},{lon},999,999" for i, (n, lat, lon) in enumerate(ATLANTIC)]
    path = _write(tmp_path / "b.csv", "key,file,y,x,lat,lon", lines)
    table = read_geo_benchmark(path, id_col="KEY", image_col="file", lat_col="y", lon_col="x")
    assert table.rows["id"].tolist() == [p[0] for p in ATLANTIC]
    assert table.rows["image"].tolist() == [f"x{i}" for i in range(len(ATLANTIC))]
    np.testing.assert_array_equal(table.rows["latitude"], [p[1] for p in ATLANTIC])
    with pytest.raises(ValueError, match=r"b\.csv, line 1: lat column 'nope' not in header"):
        read_geo_benchmark(path, lat_col="nope")


def test_missing_columns_named(tmp_path):
    path = _write(tmp_path / "b.csv", "IMG_ID,where", ["a.jpg,Paris"])
    with pytest.raises(ValueError, match=r"b\.csv, line 1: no latitude / longitude column"):
        read_geo_benchmark(path)


# --- quarantine ---------------------------------------------------------------------


def _with_bad_rows(tmp_path: Path) -> Path:
    good = [f"{n},a,{lat},{lon},1,9,118,0.1,0.2,0.7" for n, lat, lon in ATLANTIC * 3]
    good = [f"r{i}_{line}" for i, line in enumerate(good)]  # unique ids: 36 good rows
    bad = [
        "r_bad_lat.jpg,a,north,2.3,1,9,118,0.1,0.2,0.7",  # line 38
        ",a,48.85,2.29,1,9,118,0.1,0.2,0.7",  # line 39: empty id
        "r_range.jpg,a,48.85,200.5,1,9,118,0.1,0.2,0.7",  # line 40
        f"{'r0_' + ATLANTIC[0][0]},a,1.0,2.0,1,9,118,0.1,0.2,0.7",  # line 41: duplicate of line 2
        "r_short.jpg,a,48.85",  # line 42: too few fields
        "r_nan.jpg,a,nan,inf,1,9,118,0.1,0.2,0.7",  # line 43: two bad fields
    ]
    return _write(tmp_path / "im2gps3k_places365.csv", CORRECT_HEADER, good + bad)


def test_bad_rows_are_quarantined_with_lines_and_fields(tmp_path):
    path = _with_bad_rows(tmp_path)
    table = read_geo_benchmark(path, max_bad_fraction=0.2)
    assert not table.swapped
    assert len(table.rows) == 36
    q = table.quarantine
    assert (q["file"] == str(path)).all()
    assert q[["line", "field"]].values.tolist() == [
        [38, "LAT"],
        [39, "IMG_ID"],
        [40, "LON"],
        [41, "IMG_ID"],
        [42, "(row)"],
        [43, "LAT"],
        [43, "LON"],
    ]
    reasons = q["reason"].tolist()
    assert reasons[0] == "latitude is not a number" and q["value"][0] == "north"
    assert reasons[1] == "empty id"
    assert reasons[2] == "longitude outside [-180, 180]" and q["value"][2] == "200.5"
    assert reasons[3] == "duplicate id, kept line 2"
    assert reasons[4] == "3 fields, header has 10"
    assert reasons[5:] == ["latitude is not finite", "longitude is not finite"]
    assert q["value"][5:].tolist() == ["nan", "inf"]


def test_too_many_bad_rows_raise_naming_file_and_lines(tmp_path):
    path = _with_bad_rows(tmp_path)  # 6 bad of 42 data rows: 14%
    with pytest.raises(ValueError) as err:
        read_geo_benchmark(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "6 of 42 data rows are bad (> max_bad_fraction=0.05)" in msg
    assert "line 38 LAT='north': latitude is not a number" in msg
    assert "line 39 IMG_ID=''" in msg


def test_quarantine_lines_count_blank_and_multiline_records(tmp_path):
    header = "id,latitude,longitude,title"
    lines = [f'p{i},{lat},{lon},"t"' for i, (_, lat, lon) in enumerate(ATLANTIC)]
    lines[2] = f'p2,{ATLANTIC[2][1]},{ATLANTIC[2][2]},"two\nlines"'  # one record, lines 4-5
    lines[4] = "p4,?,1.0,t"  # line 7
    lines.insert(5, "")  # blank line 8, not a record
    lines.append("p99,95.5,10.0,x")  # line 16; every |lon| <= 90 but plausibility says as-labelled
    path = _write(tmp_path / "gen.csv", header, lines)
    assert path.read_text().splitlines()[15] == "p99,95.5,10.0,x"
    table = read_geo_benchmark(path, max_bad_fraction=0.2)
    assert not table.swapped
    assert table.quarantine[["line", "field", "value"]].values.tolist() == [
        [7, "latitude", "?"],
        [16, "latitude", "95.5"],
    ]
    assert table.rows["id"].tolist() == [f"p{i}" for i in range(12) if i != 4]


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"e\.csv: empty file"):
        read_geo_benchmark(empty)
    only = _write(tmp_path / "h.csv", "id,lat,lon", [])
    with pytest.raises(ValueError, match=r"h\.csv: no data rows"):
        read_geo_benchmark(only)


# --- images -------------------------------------------------------------------------


def test_find_benchmark_images_nested_and_missing(tmp_path):
    root = tmp_path / "im2gps3k"
    files = {
        "a.jpg": "a.jpg",
        "d1/d2/b.jpg": "b.jpg",  # deep, by base name
        "d1/c.JPEG": "c",  # no extension in the name, suffix case ignored
        "sub/e.png": "sub/e.png",  # name with subfolder
        "other/e.png": None,
        "x/f.jpg": "moved/f.jpg",  # subfolder in the name, file elsewhere: base name
        "x/._g.jpg": None,  # macOS resource fork: not an image
        "x/notes.txt": None,
    }
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\xff\xd8")
    names = ["a.jpg", "b.jpg", "c", "sub/e.png", "moved/f.jpg", "g.jpg", "A.jpg", "missing.jpg", "a.jpg"]
    found, missing = find_benchmark_images(root, names)
    assert found == {
        "a.jpg": root / "a.jpg",
        "b.jpg": root / "d1/d2/b.jpg",
        "c": root / "d1/c.JPEG",
        "sub/e.png": root / "sub/e.png",
        "moved/f.jpg": root / "x/f.jpg",
    }
    assert missing == ["g.jpg", "A.jpg", "missing.jpg"]  # case-sensitive, input order
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        find_benchmark_images(tmp_path / "nope", names)


def test_rows_feed_find_benchmark_images(tmp_path):
    path = _places365(tmp_path / "im2gps3k_places365.csv", SWAPPED_HEADER, ATLANTIC, lat_first=True)
    table = read_geo_benchmark(path)
    shard = tmp_path / "imgs" / "00"
    shard.mkdir(parents=True)
    for name in table.rows["image"][:-1]:
        (shard / name).write_bytes(b"\xff\xd8")
    found, missing = find_benchmark_images(tmp_path / "imgs", table.rows["image"])
    assert len(found) == len(ATLANTIC) - 1
    assert missing == [ATLANTIC[-1][0]]


@pytest.mark.timeout(60)
def test_find_benchmark_images_prefers_regular_files_over_fifos_and_devices(tmp_path, caplog):
    import logging
    import os

    root = tmp_path / "yfcc4k"
    (root / "x").mkdir(parents=True)
    (root / "deep/er").mkdir(parents=True)
    os.mkfifo(root / "x/a.jpg")  # shorter path than the real a.jpg: it used to win
    (root / "deep/er/a.jpg").write_bytes(b"\xff\xd8")
    (root / "b.jpg").symlink_to("/dev/zero")  # the only b.jpg: mapped, and refused when read
    with caplog.at_level(logging.WARNING):
        found, missing = find_benchmark_images(root, ["a.jpg", "b.jpg"])
    assert found == {"a.jpg": root / "deep/er/a.jpg", "b.jpg": root / "b.jpg"} and missing == []
    assert "2 image name(s) are not regular files" in caplog.text
