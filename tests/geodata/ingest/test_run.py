"""Tests for geodata.ingest.run: tiny OSV-5M release folders built in tmp_path.

Real rows: the six OSV-5M test photos of shared/osv5m-sample that have coordinates and
labels in select.csv; more real photos get synthetic coordinates.
"""

from __future__ import annotations

import os
import csv
import io
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from geodata.ingest.csv_read import OSV5MFormatError, record_numbers, record_start_lines
from geodata.ingest.quarantine import QUARANTINE_COLUMNS, REASONS
from geodata.ingest.run import IngestError, ingest_osv5m
from geodata.osv5m import OSV5M_COLUMNS

SAMPLE = Path(os.environ["HIERLOC_OSV5M_SAMPLE"])
MANIFEST_EXTRA = ("split", "line", "image_container", "image_member", "image_offset", "image_size")


def sample_rows() -> list[dict[str, str]]:
    """Release-shaped rows for the sample photos that select.csv locates (6 rows)."""
    select = pd.read_csv(SAMPLE / "select.csv", dtype=str, keep_default_na=False)
    have = {p.stem for p in (SAMPLE / "images").glob("*.jpg")}
    rows = []
    for r in select.loc[select["id"].isin(have)].itertuples():
        rows.append(
            osv_row(
                r.id, r.true_lat, r.true_lon,
                country=r.country, region=r.region, **{"sub-region": r.area}, city=r.city,
            )
        )
    return rows


def unlocated_sample_ids() -> list[str]:
    """Sample photo ids without coordinates in select.csv."""
    select = set(pd.read_csv(SAMPLE / "select.csv", dtype=str)["id"])
    return sorted(p.stem for p in (SAMPLE / "images").glob("*.jpg") if p.stem not in select)


def osv_row(
    image_id: object, lat: object = "10.5", lon: object = "20.25", **fields: str
) -> dict[str, str]:
    """A 32-column release row; unspecified columns get plausible strings."""
    row = {name: f"{name}-v" for name in OSV5M_COLUMNS}
    row.update({"id": str(image_id), "latitude": str(lat), "longitude": str(lon), "country": "FR"})
    row.update(fields)
    row["unique_country"] = row["country"]
    return row


def jpeg_bytes(size: tuple[int, int] = (12, 8)) -> bytes:
    """A small real JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


def write_csv(
    path: Path, rows: list[dict[str, str] | str], header: tuple[str, ...] = OSV5M_COLUMNS
) -> None:
    """Write a release CSV; a str row is written verbatim as one raw line."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            if isinstance(row, str):
                fh.write(row + "\n")
            else:
                writer.writerow([row[c] for c in OSV5M_COLUMNS])


def write_images(root: Path, split: str, images: dict[str, bytes], layout: str = "zip") -> None:
    """Put `<id>.jpg` files under root/images/split: two zip shards or nested folders."""
    base = root / "images" / split
    base.mkdir(parents=True, exist_ok=True)
    items = sorted(images.items())
    if layout == "zip":
        for shard, chunk in enumerate((items[::2], items[1::2])):
            with zipfile.ZipFile(base / f"{shard:02d}.zip", "w") as zf:
                for image_id, data in chunk:
                    zf.writestr(f"{split}/{image_id}.jpg", data)
    else:  # unzipped at depth 2: images/split/00/sub/<id>.jpg
        folder = base / "00" / "sub"
        folder.mkdir(parents=True, exist_ok=True)
        for image_id, data in items:
            (folder / f"{image_id}.jpg").write_bytes(data)


def make_release(
    root: Path,
    train: list[dict[str, str] | str],
    test: list[dict[str, str] | str] | None = None,
    images: dict[str, dict[str, bytes]] | None = None,
    layout: str = "zip",
) -> Path:
    """A release folder with train.csv, test.csv and images/{split}/; images default to
    one small JPEG per well-formed row id."""
    test = test if test is not None else []
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "train.csv", train)
    write_csv(root / "test.csv", test)
    if images is None:
        images = {
            split: {r["id"]: jpeg_bytes() for r in rows if not isinstance(r, str)}
            for split, rows in (("train", train), ("test", test))
        }
    for split in ("train", "test"):
        write_images(root, split, images.get(split, {}), layout)
    return root


def read_quarantine(out: Path) -> pd.DataFrame:
    """quarantine.parquet as a frame."""
    return pd.read_parquet(out / "quarantine.parquet")


def test_clean_release_ingests_fully_with_typed_columns(tmp_path: Path) -> None:
    located = sample_rows()
    assert len(located) == 6
    namibia = osv_row(
        unlocated_sample_ids()[0], "-22.5594", "17.0832",
        country="NA", region="Khomas", **{"sub-region": ""},
    )
    extra = [osv_row(i, 45.0 + n, -3.5) for n, i in enumerate(unlocated_sample_ids()[1:4])]
    images = {
        split: {r["id"]: (SAMPLE / "images" / f"{r['id']}.jpg").read_bytes() for r in rows}
        for split, rows in (("train", located), ("test", [namibia, *extra]))
    }
    root = make_release(tmp_path / "osv5m", located, [namibia, *extra], images)
    out = tmp_path / "out"
    report = ingest_osv5m(root, out)  # verify_images="decode" by default

    assert report.ok
    for split, n in (("train", 6), ("test", 4)):
        s = report.splits[split]
        assert (s.n_in, s.n_kept, s.n_quarantined) == (n, n, 0)
    train = pd.read_parquet(out / "manifest/train.parquet")
    assert list(train.columns) == [*OSV5M_COLUMNS, *MANIFEST_EXTRA]
    schema = pq.read_table(out / "manifest/train.parquet").schema
    assert str(schema.field("id").type) == "int64"
    assert str(schema.field("latitude").type) == str(schema.field("longitude").type) == "double"
    text_columns = [c for c in OSV5M_COLUMNS if c not in ("id", "latitude", "longitude")]
    assert all(str(schema.field(c).type) == "string" for c in text_columns)
    select = pd.read_csv(SAMPLE / "select.csv", dtype={"id": "int64"})
    merged = train.merge(select, on="id")
    assert len(merged) == 6
    np.testing.assert_array_equal(merged["latitude"], merged["true_lat"])
    np.testing.assert_array_equal(merged["longitude"], merged["true_lon"])
    assert train["line"].tolist() == list(range(2, 8))
    assert (train["split"] == "train").all()
    assert train["image_container"].str.fullmatch(r"images/train/0[01]\.zip").all()
    assert (train["image_member"] == "train/" + train["id"].astype(str) + ".jpg").all()

    test = pd.read_parquet(out / "manifest/test.parquet")
    nam = test.loc[test["id"] == int(namibia["id"])].iloc[0]
    assert nam["country"] == "NA" and nam["unique_country"] == "NA"  # not NaN
    assert nam["sub-region"] == ""  # empty stays an empty string
    assert test["country"].notna().all()

    q = read_quarantine(out)
    assert list(q.columns) == list(QUARANTINE_COLUMNS) and len(q) == 0
    on_disk = json.loads((out / "ingest_report.json").read_text())
    assert on_disk["splits"]["train"]["n_kept"] == 6 and on_disk["ok"] is True
    assert sorted(p.name for p in (out / "manifest").iterdir()) == ["test.parquet", "train.parquet"]
    assert [p.name for p in (out / "manifest/train.parquet").iterdir()] == ["part-00001.parquet"]
    assert (train["image_size"] > 1000).all() and train["image_offset"].isna().all()  # zips: no offset


def test_sixteen_digit_ids_keep_exact_value(tmp_path: Path) -> None:
    ids = ["4887875507910938", "9007199254740993", "9999999999999999"]  # 2^53 + 1 is not a float
    root = make_release(tmp_path / "osv", [osv_row(i) for i in ids])
    ingest_osv5m(root, tmp_path / "out", verify_images="exists")
    got = pd.read_parquet(tmp_path / "out/manifest/train.parquet")["id"]
    assert got.dtype == "int64"
    assert got.tolist() == [int(i) for i in ids]


def test_each_quarantine_reason_with_line_and_field(tmp_path: Path) -> None:
    good = lambda i: osv_row(i)  # noqa: E731
    short_row = ",".join(["77"] + ["x"] * 30)  # 31 columns
    long_row = ",".join(["78"] + ["x"] * 32)  # 33 columns
    train: list[dict[str, str] | str] = [
        good(1),                                  # line 2
        short_row,                                # line 3  column_count
        good(2),                                  # line 4
        osv_row("12a"),                           # line 5  id_not_integer
        osv_row("1.5e3"),                         # line 6  id_not_integer (never via float)
        osv_row(3, lat="north"),                  # line 7  latitude_not_numeric
        osv_row(4, lat="90.5"),                   # line 8  latitude_out_of_range
        osv_row(5, lon=""),                       # line 9  longitude_not_numeric
        osv_row(6, lon="-180.01"),                # line 10 longitude_out_of_range
        osv_row(7, lat="nan", lon="999"),         # line 11 two problems: first reason only
        good(1),                                  # line 12 duplicate_id
        good(8),                                  # line 13 image_missing
        good(9),                                  # line 14 image_corrupt
        long_row,                                 # line 15 column_count
        good(10),                                 # line 16
        osv_row(11, lat="-90", lon="180"),        # line 17 edges are valid
    ]
    truncated = jpeg_bytes((64, 64))
    images = {"train": {str(i): jpeg_bytes() for i in (1, 2, 10, 11)}}
    images["train"]["9"] = truncated[: len(truncated) // 2]
    root = make_release(tmp_path / "osv", train, images=images)
    report = ingest_osv5m(root, tmp_path / "out", max_bad_fraction=1.0)

    q = read_quarantine(tmp_path / "out")
    got = q[["line", "id", "field", "reason", "value"]].values.tolist()
    assert got[:11] == [
        [3, "77", "", "column_count", short_row],
        [5, "12a", "id", "id_not_integer", "12a"],
        [6, "1.5e3", "id", "id_not_integer", "1.5e3"],
        [7, "3", "latitude", "latitude_not_numeric", "north"],
        [8, "4", "latitude", "latitude_out_of_range", "90.5"],
        [9, "5", "longitude", "longitude_not_numeric", ""],
        [10, "6", "longitude", "longitude_out_of_range", "-180.01"],
        [11, "7", "latitude", "latitude_not_numeric", "nan"],
        [12, "1", "id", "duplicate_id", "1"],
        [13, "8", "id", "image_missing", "8"],
        [14, "9", "image", "image_corrupt", got[10][4]],
    ]
    assert got[10][4].startswith("images/train/0") and "9.jpg" in got[10][4]
    assert got[11][:4] == [15, "78", "", "column_count"]
    assert (q["split"] == "train").all() and (q["file"] == "train.csv").all()

    kept = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert kept[["id", "line"]].values.tolist() == [[1, 2], [2, 4], [10, 16], [11, 17]]
    s = report.splits["train"]
    assert (s.n_in, s.n_kept, s.n_quarantined) == (16, 4, 12)
    assert s.reasons == {
        "column_count": 2, "id_not_integer": 2, "latitude_not_numeric": 2,
        "latitude_out_of_range": 1, "longitude_not_numeric": 1, "longitude_out_of_range": 1,
        "duplicate_id": 1, "image_missing": 1, "image_corrupt": 1,
    }
    webdataset_only = {"metadata_invalid", "feature_invalid"}
    in_faults = {"encoding_invalid", "unclosed_quote"}  # tested in test_ingest_faults
    assert set(s.reasons) == set(REASONS) - webdataset_only - in_faults - {"image_unsafe"}  # unsafe: test_archives
    assert s.examples["latitude_out_of_range"] == [
        "train.csv line 8, field latitude: latitude_out_of_range ('90.5')"
    ]


def test_report_and_log_name_reasons_with_examples(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [osv_row(i, lat=str(100 + i)) for i in range(7)] + [osv_row(99)]
    root = make_release(tmp_path / "osv", rows)
    with caplog.at_level(logging.INFO, logger="geodata.ingest.report"):
        report = ingest_osv5m(root, tmp_path / "out", verify_images="exists", max_bad_fraction=1.0)
    examples = report.splits["train"].examples["latitude_out_of_range"]
    assert len(examples) == 5
    assert examples[0] == "train.csv line 2, field latitude: latitude_out_of_range ('100')"
    assert "7 rows quarantined as latitude_out_of_range" in caplog.text
    assert "train.csv line 6, field latitude: latitude_out_of_range ('104')" in caplog.text
    assert "line 8," not in caplog.text  # at most 5 examples


def test_duplicate_across_splits_keeps_first_split(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [osv_row(1), osv_row(2)], [osv_row(2), osv_row(3)])
    report = ingest_osv5m(root, tmp_path / "out", verify_images="exists", max_bad_fraction=0.5)
    q = read_quarantine(tmp_path / "out")
    got = q[["split", "file", "line", "reason"]].values.tolist()
    assert got == [["test", "test.csv", 2, "duplicate_id"]]
    assert pd.read_parquet(tmp_path / "out/manifest/test.parquet")["id"].tolist() == [3]
    s = report.splits["test"]
    assert s.n_in == s.n_kept + s.n_quarantined == 2


def test_malformed_first_occurrence_does_not_hide_good_duplicate(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [osv_row(1, lat="x"), osv_row(1)])
    ingest_osv5m(root, tmp_path / "out", verify_images="exists", max_bad_fraction=1.0)
    assert read_quarantine(tmp_path / "out")["reason"].tolist() == ["latitude_not_numeric"]
    assert pd.read_parquet(tmp_path / "out/manifest/train.parquet")["line"].tolist() == [3]


@pytest.mark.parametrize(
    ("header", "pattern"),
    [
        (
            tuple(c if c != "longitude" else "lng" for c in OSV5M_COLUMNS),
            r"test\.csv.*column 2 \(position 3\).*'longitude'.*'lng'",
        ),
        (OSV5M_COLUMNS[:-1], r"test\.csv.*column 31.*'creator_id'.*'\(missing\)'"),
        (OSV5M_COLUMNS + ("extra",), r"test\.csv.*column 32.*'extra'"),
    ],
)
def test_wrong_header_raises_format_error(
    tmp_path: Path, header: tuple[str, ...], pattern: str
) -> None:
    root = make_release(tmp_path / "osv", [osv_row(1)], [osv_row(2)])
    with open(root / "test.csv", "w", encoding="utf-8") as fh:
        fh.write(",".join(header) + "\n")
    with pytest.raises(OSV5MFormatError, match=pattern):
        ingest_osv5m(root, tmp_path / "out", verify_images="none")
    assert not (tmp_path / "out/manifest/train.parquet").exists()  # headers are checked before any row


def test_bad_fraction_threshold_raises_after_writing_quarantine(tmp_path: Path) -> None:
    rows = [osv_row(1), osv_row(2, lat="x"), osv_row(3), osv_row(4)]  # 25% bad
    root = make_release(tmp_path / "osv", rows)
    out = tmp_path / "out"
    ingest_osv5m(root, out, verify_images="exists", max_bad_fraction=0.25)  # not exceeded
    assert (out / "manifest/train.parquet").exists()
    with pytest.raises(IngestError, match=r"train: 1 of 4 rows quarantined .*latitude_not_numeric"):
        ingest_osv5m(root, out, verify_images="exists", max_bad_fraction=0.2)
    assert read_quarantine(out)["line"].tolist() == [3]
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["ok"] is False and "max_bad_fraction" in report["error"]
    assert not (out / "manifest/train.parquet").exists()  # no stale manifest left
    left = sorted(p.name for p in out.rglob("*"))
    assert left == ["ingest_report.json", "manifest", "quarantine.parquet"]  # no state: the next run starts over


def test_unzipped_folder_layout_at_depth_two(tmp_path: Path) -> None:
    rows = sample_rows()[:3]
    images = {"train": {r["id"]: (SAMPLE / "images" / f"{r['id']}.jpg").read_bytes() for r in rows}}
    root = make_release(tmp_path / "osv", rows, images=images, layout="folders")
    ingest_osv5m(root, tmp_path / "out", splits=("train",))
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert len(m) == 3
    assert (m["image_container"] == "images/train/00/sub").all()
    assert (m["image_member"] == m["id"].astype(str) + ".jpg").all()


def test_verify_modes(tmp_path: Path) -> None:
    data = jpeg_bytes((64, 64))
    images = {"train": {"1": data, "2": data[:200]}}
    root = make_release(tmp_path / "osv", [osv_row(1), osv_row(2)], images=images)
    exists = ingest_osv5m(root, tmp_path / "a", splits=("train",), verify_images="exists")
    assert exists.splits["train"].n_kept == 2  # "exists" does not decode
    shutil.rmtree(root / "images")
    none = ingest_osv5m(root, tmp_path / "b", splits=("train",), verify_images="none")
    assert none.splits["train"].n_kept == 2
    assert pd.read_parquet(tmp_path / "b/manifest/train.parquet")["image_member"].isna().all()
    with pytest.raises(FileNotFoundError, match=r"images/train.*verify_images='none'"):
        ingest_osv5m(root, tmp_path / "c", splits=("train",), verify_images="exists")


def test_blank_lines_and_quoted_newlines_keep_physical_line_numbers(tmp_path: Path) -> None:
    multi = osv_row(2, thumb_original_url="two\nlines")  # csv module quotes it
    rows = [osv_row(1), "", multi, osv_row(3, lat="x"), "", osv_row(4)]
    root = make_release(tmp_path / "osv", rows)
    ingest_osv5m(root, tmp_path / "out", verify_images="exists", max_bad_fraction=1.0)
    # lines: 1 header, 2 row1, 3 blank, 4-5 row2, 6 bad, 7 blank, 8 row4
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert m[["id", "line"]].values.tolist() == [[1, 2], [2, 4], [4, 8]]
    assert m.loc[m["id"] == 2, "thumb_original_url"].item() == "two\nlines"
    assert read_quarantine(tmp_path / "out")["line"].tolist() == [6]


def test_record_line_helpers() -> None:
    # invalid records 3 and 4: valid rows take 2, 5, 6
    np.testing.assert_array_equal(record_numbers(3, np.array([4, 3])), [2, 5, 6])
    np.testing.assert_array_equal(record_numbers(2, np.array([], dtype=np.int64)), [2, 3])


def test_record_start_lines_chunk_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b'a,b\n1,"x\ny"\n\r\n2,3\n"\n",4\n5,6')
    for chunk in (1, 3, 7, 1 << 20):
        np.testing.assert_array_equal(record_start_lines(path, chunk), [1, 2, 5, 6, 8])


def test_no_temp_files_left_and_rerun_is_a_noop(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [osv_row(1)], [osv_row(2)])
    first = ingest_osv5m(root, tmp_path / "out", verify_images="exists")
    again = ingest_osv5m(root, tmp_path / "out", verify_images="exists")
    assert not first.noop and again.noop
    assert again.splits["train"].mode == "unchanged" and again.splits["train"].n_in == 0
    for split in ("train", "test"):
        assert again.splits[split].manifest_digest == first.splits[split].manifest_digest
        assert again.splits[split].kept_total == 1
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert not [n for n in names if n.endswith(".tmp")]
    public = [n for n in names if not n.startswith(".runs")]
    assert public == [
        "image_index", "image_index/test.parquet", "image_index/train.parquet", "ingest_report.json",
        "ingest_state.json", "manifest", "manifest/test.parquet", "manifest/test.parquet/part-00001.parquet",
        "manifest/train.parquet", "manifest/train.parquet/part-00001.parquet", "quarantine.parquet",
    ]


def test_empty_and_undecodable_csvs(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [])
    report = ingest_osv5m(root, tmp_path / "out", splits=("train",), verify_images="none")
    assert (report.splits["train"].n_in, report.splits["train"].n_kept) == (0, 0)
    assert len(pd.read_parquet(tmp_path / "out/manifest/train.parquet")) == 0
    (root / "train.csv").write_bytes(b"")
    with pytest.raises(OSV5MFormatError, match=r"train\.csv.*Empty CSV"):
        ingest_osv5m(root, tmp_path / "out", splits=("train",), verify_images="none")
    bad = ",".join(OSV5M_COLUMNS).encode() + b"\n1,\xff,3" + b",x" * 29 + b"\n"
    (root / "train.csv").write_bytes(bad)
    # Not UTF-8: the row is quarantined with its line (was: the whole split stopped), so the
    # one-row split fails max_bad_fraction.
    with pytest.raises(IngestError, match=r"train: 1 of 1 rows quarantined.*encoding_invalid"):
        ingest_osv5m(root, tmp_path / "out", splits=("train",), verify_images="none")
    assert read_quarantine(tmp_path / "out")[["file", "line", "reason"]].values.tolist() == [
        ["train.csv", 2, "encoding_invalid"]]


def test_unsafe_archive_members_quarantine_their_rows(tmp_path: Path) -> None:
    import tarfile

    root = make_release(tmp_path / "osv", [osv_row(1), osv_row(2), osv_row(3)], images={"train": {"1": jpeg_bytes()}})
    with zipfile.ZipFile(root / "images/train/02.zip", "w") as zf:  # 2.jpg: a symlink to a file outside
        info = zipfile.ZipInfo("2.jpg")
        info.create_system, info.external_attr = 3, 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    with tarfile.open(root / "images/train/03.tar", "w") as tf:  # 3.jpg: a hardlink member
        link = tarfile.TarInfo("3.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "/etc/passwd"
        tf.addfile(link)
    report = ingest_osv5m(root, tmp_path / "out", splits=("train",), max_bad_fraction=1.0)
    q = read_quarantine(tmp_path / "out")
    assert q[["id", "field", "reason"]].values.tolist() == [["2", "image", "image_unsafe"], ["3", "image", "image_unsafe"]]
    assert "symlink" in q["value"].iloc[0] and "hardlink" in q["value"].iloc[1]
    assert report.splits["train"].n_kept == 1
    index = pd.read_parquet(tmp_path / "out/image_index/train.parquet")
    assert index["refused"].notna().sum() == 2


def test_images_in_tar_shards_are_found_and_decoded(tmp_path: Path) -> None:
    import tarfile

    rows = sample_rows()[:2]
    root = make_release(tmp_path / "osv", rows, images={"train": {}})
    with tarfile.open(root / "images/train/00.tar", "w") as tf:
        for r in rows:
            tf.add(SAMPLE / "images" / f"{r['id']}.jpg", arcname=f"train/{r['id']}.jpg")
    ingest_osv5m(root, tmp_path / "out", splits=("train",))  # decode through ImageStore's tar reader
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert (m["image_container"] == "images/train/00.tar").all() and m["image_offset"].notna().all()


def test_zip_bombs_are_quarantined_without_being_inflated(tmp_path: Path, zip_bombs, traced_peak) -> None:
    root = make_release(tmp_path / "osv", [osv_row(1), osv_row(2), osv_row(3)], images={"train": {"1": jpeg_bytes()}})
    shutil.copy(zip_bombs["declared"], root / "images/train/02.zip")  # 2.jpg: a JPEG + 300 MiB of zeros
    shutil.copy(zip_bombs["lying"], root / "images/train/03.zip")  # 3.jpg: the same, declaring 100,000 bytes
    with traced_peak() as peak:
        report = ingest_osv5m(root, tmp_path / "out", splits=("train",), max_bad_fraction=1.0)
    assert peak[0] < 32 * 2**20, peak  # the bombs inflate to 300 MiB each
    q = read_quarantine(tmp_path / "out")
    assert q[["id", "field", "reason"]].values.tolist() == [["2", "image", "image_unsafe"], ["3", "image", "image_corrupt"]]
    assert q["value"].iloc[0].startswith("image declares 300.0 MiB (") and "over the 64 MiB image cap" in q["value"].iloc[0]
    assert q["value"].iloc[1] == "images/train/03.zip:3.jpg: BadZipFile: Bad CRC-32 for file '3.jpg'"
    assert report.splits["train"].n_kept == 1


@pytest.mark.timeout(60)
def test_fifos_devices_and_huge_files_in_image_folders_are_quarantined_unread(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [osv_row(i) for i in (1, 2, 3, 4)], images={"train": {"1": jpeg_bytes()}},
                        layout="dir")
    folder = root / "images/train/00/sub"
    os.mkfifo(folder / "2.jpg")
    (folder / "3.jpg").symlink_to("/dev/zero")
    with open(folder / "4.jpg", "wb") as fh:
        fh.truncate(1_500_000_000)
    report = ingest_osv5m(root, tmp_path / "out", splits=("train",), max_bad_fraction=1.0)
    q = read_quarantine(tmp_path / "out")
    assert q[["id", "reason", "value"]].values.tolist() == [
        ["2", "image_unsafe", "not a regular file (fifo); refused, never read"],
        ["3", "image_unsafe", "not a regular file (character device); refused, never read"],
        ["4", "image_unsafe", "image is 1.4 GiB (1,500,000,000 bytes), over the 64 MiB image cap; refused, not read"],
    ]
    assert report.splits["train"].n_kept == 1


def test_reading_a_large_csv_reports_bytes_rows_and_eta(tmp_path: Path, monkeypatch, progress_lines) -> None:
    """A multi-GB train.csv takes tens of seconds: bytes judged (one parse block per batch), rows/s, ETA."""
    import geodata.ingest.csv_read

    monkeypatch.setattr(geodata.ingest.csv_read, "CSV_BLOCK_BYTES", 1 << 12)  # 4 KiB blocks: ~20 rows each
    root = make_release(tmp_path / "osv", [osv_row(i) for i in range(1, 201)], [osv_row(1000)], images={})
    ingest_osv5m(root, tmp_path / "out", verify_images="none")
    size = (root / "train.csv").stat().st_size
    lines = [x for x in progress_lines() if x.startswith("reading train.csv: ")]
    assert len(lines) >= 10 and all(re.search(r"/\d+\.\d+ kB \(\d+%\), [\d.,]+ [kMGT]?B/s, [\d,.]+ rows/s, ETA \d+ s$", x)
                                    for x in lines[:-2]), lines
    assert lines[-2].startswith(f"reading train.csv: {size / 1e3:.3g} kB/{size / 1e3:.3g} kB (100%), ")
    assert lines[-1].startswith(f"reading train.csv: {size / 1e3:.3g} kB/{size / 1e3:.3g} kB in ")
