"""Incremental ingest: re-runs parse only appended CSV bytes and new image shards.

The invariant checked: after any sequence of runs, the manifest and the quarantine hold
the same rows and values as a one-shot ingest of the final input.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geodata.ingest.run import IngestError, ingest_osv5m
from geodata.ingest.validate import IdSet
from geodata.osv5m import OSV5M_COLUMNS
from tests.geodata.ingest.test_run import jpeg_bytes, make_release, osv_row


def append_rows(csv_path: Path, rows: list[dict[str, str] | str]) -> int:
    """Append rows to a release CSV; returns the number of bytes appended."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        if isinstance(row, str):
            buf.write(row + "\n")
        else:
            writer.writerow([row[c] for c in OSV5M_COLUMNS])
    data = buf.getvalue().encode()
    with open(csv_path, "ab") as fh:
        fh.write(data)
    return len(data)


def add_shard(root: Path, split: str, name: str, ids: list[int]) -> None:
    with zipfile.ZipFile(root / "images" / split / name, "w") as zf:
        for i in ids:
            zf.writestr(f"{split}/{i}.jpg", jpeg_bytes())


def canonical(out: Path) -> dict[str, pd.DataFrame]:
    """Manifests and quarantine in file order (the order a one-shot ingest gives)."""
    got = {}
    for split in ("train", "test"):
        m = pd.read_parquet(out / "manifest" / f"{split}.parquet")
        got[split] = m.sort_values("line").reset_index(drop=True)
    q = pd.read_parquet(out / "quarantine.parquet")
    got["quarantine"] = q.sort_values(["split", "line"]).reset_index(drop=True)
    return got


def test_idset_marks_the_same_duplicates_as_pandas() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5000, size=20_000)
    seen = IdSet(np.array([7, 11]))
    got = np.concatenate([seen.add_first(chunk) for chunk in np.array_split(ids, 37)])
    want = pd.Series(np.concatenate([[7, 11], ids])).duplicated().to_numpy()[2:]
    np.testing.assert_array_equal(got, want)
    assert len(seen) == len(np.unique(np.concatenate([[7, 11], ids])))


def test_append_rows_and_shard_only_parses_what_is_new(tmp_path: Path) -> None:
    train = [osv_row(i) for i in (1, 2, 3)] + [osv_row(4, lat="x")] + [osv_row(5)]
    test = [osv_row(10), osv_row(11)]
    images = {"train": {str(i): jpeg_bytes() for i in (1, 2, 3)}, "test": {"10": jpeg_bytes(), "11": jpeg_bytes()}}
    root = make_release(tmp_path / "osv", train, test, images)  # 5 has no image yet: image_missing
    out = tmp_path / "inc"
    first = ingest_osv5m(root, out, max_bad_fraction=1.0)
    assert first.splits["train"].reasons == {"latitude_not_numeric": 1, "image_missing": 1}

    size_before = (root / "train.csv").stat().st_size
    new_rows = [osv_row(6), osv_row(2), osv_row(7), ",".join(["8"] * 5), osv_row(9, lon="200")]
    n_bytes = append_rows(root / "train.csv", new_rows)  # 2: duplicate of an earlier run's row
    append_rows(root / "test.csv", [osv_row(12), osv_row(6)])  # 6: duplicate across splits (train first)
    add_shard(root, "train", "02.zip", [5, 6])  # brings the missing image of 5; 7 stays missing
    add_shard(root, "test", "02.zip", [12])
    second = ingest_osv5m(root, out, max_bad_fraction=1.0)

    tr = second.splits["train"]
    assert (tr.mode, tr.bytes_parsed) == ("append", n_bytes)
    assert (root / "train.csv").stat().st_size == size_before + n_bytes
    assert (tr.n_in, tr.n_kept, tr.n_quarantined, tr.n_recovered) == (5, 1, 4, 1)
    assert tr.reasons == {"column_count": 1, "longitude_out_of_range": 1, "duplicate_id": 1, "image_missing": 1}
    assert (tr.kept_total, tr.quarantined_total, tr.n_in_total) == (5, 5, 10)
    assert (tr.n_containers_listed, tr.n_containers_reused) == (1, 2)
    te = second.splits["test"]
    assert (te.n_in, te.n_kept, te.n_quarantined, te.kept_total) == (2, 1, 1, 3)
    assert tr.manifest_digest != first.splits["train"].manifest_digest

    one_shot = tmp_path / "one"
    ingest_osv5m(root, one_shot, max_bad_fraction=1.0)
    a, b = canonical(out), canonical(one_shot)
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key])
    assert a["train"]["id"].tolist() == [1, 2, 3, 5, 6]
    assert a["train"]["line"].tolist() == [2, 3, 4, 6, 7]  # appended rows keep their physical lines

    third = ingest_osv5m(root, out, max_bad_fraction=1.0)
    assert third.noop and third.splits["train"].manifest_digest == tr.manifest_digest
    on_disk = json.loads((out / "ingest_report.json").read_text())
    assert on_disk["noop"] is True and on_disk["splits"]["train"]["kept_total"] == 5


def test_changed_prefix_reingests_everything_and_says_why(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [osv_row(1), osv_row(2)], [osv_row(3)])
    out = tmp_path / "out"
    ingest_osv5m(root, out, verify_images="exists")
    text = (root / "train.csv").read_text().replace("20.25", "21.25", 1)  # same length, new bytes
    (root / "train.csv").write_text(text)
    report = ingest_osv5m(root, out, verify_images="exists")
    s = report.splits["train"]
    assert s.mode == "full" and "first" in s.full_reason and "train.csv changed" in s.full_reason
    assert (s.n_in, s.kept_total) == (2, 2)
    m = pd.read_parquet(out / "manifest/train.parquet")
    assert m["longitude"].tolist() == [21.25, 20.25]
    assert [p.name for p in (out / "manifest/train.parquet").iterdir()] == ["part-00002.parquet"]


def test_last_line_without_newline_then_appended(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [osv_row(1), osv_row(2)], [osv_row(3)])
    data = (root / "train.csv").read_bytes()
    (root / "train.csv").write_bytes(data.rstrip(b"\n"))
    out = tmp_path / "out"
    ingest_osv5m(root, out, verify_images="exists")
    add_shard(root, "train", "02.zip", [4])
    with open(root / "train.csv", "ab") as fh:
        fh.write(b"\n")
    append_rows(root / "train.csv", [osv_row(4)])
    report = ingest_osv5m(root, out, verify_images="exists")
    assert report.splits["train"].mode == "append" and report.splits["train"].n_kept == 1
    m = pd.read_parquet(out / "manifest/train.parquet")
    assert m[["id", "line"]].values.tolist() == [[1, 2], [2, 3], [4, 4]]


def test_crash_leftovers_are_removed_and_not_counted(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [osv_row(1)], [osv_row(3)])
    out = tmp_path / "out"
    ingest_osv5m(root, out, verify_images="exists")
    part_dir = out / "manifest/train.parquet"
    orphan = part_dir / "part-00002.parquet"  # as if a run died after moving its part in place
    orphan.write_bytes((part_dir / "part-00001.parquet").read_bytes())
    (part_dir / ".part-00002.parquet.tmp").write_bytes(b"half")
    append_rows(root / "train.csv", [osv_row(2)])
    add_shard(root, "train", "02.zip", [2])
    report = ingest_osv5m(root, out, verify_images="exists")
    assert report.splits["train"].kept_total == 2
    assert sorted(p.name for p in part_dir.iterdir()) == ["part-00001.parquet", "part-00002.parquet"]
    assert pd.read_parquet(part_dir)["id"].tolist() == [1, 2]


def test_threshold_over_all_runs_and_failure_resets(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [osv_row(i) for i in range(1, 5)], [osv_row(9)])
    out = tmp_path / "out"
    ingest_osv5m(root, out, verify_images="exists", max_bad_fraction=0.3)
    append_rows(root / "train.csv", [osv_row(5, lat="x"), osv_row(6, lat="y")])  # 2 of 6 bad overall
    with pytest.raises(IngestError, match=r"train: 2 of 6 rows quarantined"):
        ingest_osv5m(root, out, verify_images="exists", max_bad_fraction=0.3)
    assert not (out / "manifest/train.parquet").exists() and not (out / "ingest_state.json").exists()
    report = ingest_osv5m(root, out, verify_images="exists", max_bad_fraction=0.5)
    assert report.splits["train"].mode == "full" and report.splits["train"].kept_total == 4
