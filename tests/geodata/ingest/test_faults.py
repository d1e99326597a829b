"""Faulty and hostile ingest inputs: kills mid-commit, stray quotes, bad bytes, hostile shards.

Every row of the input is accounted for: kept, or quarantined with its file, line and reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from geodata.ingest.commit import COMMIT_STEPS
from geodata.ingest.csv_lines import CleanedReader, invalid_utf8_lines, scan_records
from geodata.ingest.report import SplitReport
from geodata.ingest.run import IngestError, ingest_osv5m
from geodata.ingest.webdataset import write_shard
from geodata.osv5m import OSV5M_COLUMNS
from tests.geodata.ingest.test_run import jpeg_bytes, make_release, osv_row, read_quarantine

REPO = Path(__file__).resolve().parents[3]
TOTALS = ("n_in_total", "kept_total", "quarantined_total", "reasons_total", "manifest_digest", "n_pending",
          "n_parts")


def _outputs(out: Path) -> dict:
    """What an ingest folder publishes, in comparable form: manifests, quarantine, image index, report totals."""
    got: dict = {"quarantine": pq.read_table(out / "quarantine.parquet").to_pylist()}
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["ok"]
    for split in ("train", "test"):
        m = pq.read_table(out / "manifest" / f"{split}.parquet")
        got[f"manifest_{split}"] = sorted(m.to_pylist(), key=lambda r: r["line"])
        got[f"index_{split}"] = pq.read_table(out / "image_index" / f"{split}.parquet").to_pylist()
        got[f"report_{split}"] = {k: report["splits"][split][k] for k in TOTALS}
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not str(p.relative_to(out)).startswith(".runs"))
    got["files"] = names
    got["runs"] = len(list((out / ".runs").iterdir()))
    return got


def _ingest_killed_after(root: Path, out: Path, step: str) -> None:
    """Run the ingest in a child process that SIGKILLs itself after commit step `step`."""
    code = (f"from geodata.ingest.run import ingest_osv5m; "
            f"ingest_osv5m({str(root)!r}, {str(out)!r}, verify_images='exists', max_bad_fraction=1.0)")
    env = {**os.environ, "HIERLOC_INGEST_CRASH_AFTER": step, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_kill_at_each_commit_step_then_rerun_matches_one_shot(tmp_path: Path, step: str) -> None:
    # First ingest: 3 train rows (one bad); then train.csv grows by 2 rows (one without its image).
    rows = [osv_row(1), osv_row(2, lat="x"), osv_row(3), osv_row(4), osv_row(6)]
    images = {"train": {"1": b"", "3": b"", "4": b""}, "test": {"9": b""}}
    root = make_release(tmp_path / "osv", rows, [osv_row(9)], images=images)
    full = (root / "train.csv").read_bytes()
    head = b"".join(full.splitlines(True)[:4])

    def ingest(out: Path) -> None:
        ingest_osv5m(root, out, verify_images="exists", max_bad_fraction=1.0)

    (root / "train.csv").write_bytes(head)
    ingest(tmp_path / "one_head")
    ingest(tmp_path / "one_full")
    (root / "train.csv").write_bytes(full)
    ingest(tmp_path / "one_full")

    out = tmp_path / "out"
    (root / "train.csv").write_bytes(head)
    _ingest_killed_after(root, out, step)  # killed on the first ingest
    ingest(out)
    assert _outputs(out) == _outputs(tmp_path / "one_head")
    (root / "train.csv").write_bytes(full)
    _ingest_killed_after(root, out, step)  # killed on the appending one
    ingest(out)
    assert _outputs(out) == _outputs(tmp_path / "one_full")


# --------------------------------------------------------------------------- stray quotes, bytes not UTF-8


def _csv_lines(rows: list[dict[str, str]]) -> list[bytes]:
    """The release CSV of `rows` as physical lines (header first), each ending in '\\n'."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(OSV5M_COLUMNS)
    for r in rows:
        writer.writerow([r[c] for c in OSV5M_COLUMNS])
    return [line.encode() for line in buf.getvalue().splitlines(True)]


def _stray_quote(line: bytes) -> bytes:
    """`line` with a '"' opened at the start of its region field and never closed on it."""
    assert b",region-v," in line
    return line.replace(b",region-v,", b',"region-v,', 1)


def _lines_add_up(s: SplitReport, header: int = 1) -> None:
    assert s.line_numbers == "physical"
    assert s.n_lines == header + s.n_blank_lines + s.n_lines_kept + s.n_lines_quarantined
    assert s.n_in == s.n_kept + s.n_quarantined


def test_stray_quote_quarantines_its_line_and_keeps_the_lines_it_swallowed(tmp_path: Path) -> None:
    # 600 physical lines; line 100 opens a quote that the quoted region of line 130 closes
    # (the case: 30 lines read as one record, 29 rows gone from the counts).
    rows = [osv_row(i) for i in range(2, 601)]
    rows[128]["region"] = "Ontario, Canada"  # line 130: the csv writer quotes it
    lines = _csv_lines(rows)
    lines[99] = _stray_quote(lines[99])
    root = make_release(tmp_path / "osv", [], [osv_row(1)], images={})
    (root / "train.csv").write_bytes(b"".join(lines))
    report = ingest_osv5m(root, tmp_path / "out", verify_images="none")

    s = report.splits["train"]
    assert report.ok and (s.n_in, s.n_kept, s.n_quarantined) == (599, 598, 1)
    assert (s.n_lines, s.n_lines_kept, s.n_lines_quarantined, s.n_blank_lines) == (600, 598, 1, 0)
    _lines_add_up(s)
    q = read_quarantine(tmp_path / "out")
    assert q[["line", "id", "reason"]].values.tolist() == [[100, "100", "unclosed_quote"]]
    assert q["value"].iloc[0].startswith('lines 100-130: 100,10.5,20.25,thumb_original_url-v,FR,')
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert m["id"].tolist() == [i for i in range(2, 601) if i != 100]  # the swallowed rows are back
    assert m["line"].tolist() == m["id"].tolist()  # row i is on line i
    assert m.loc[m["id"] == 130, "region"].item() == "Ontario, Canada"


def test_stray_quote_to_the_end_of_a_file_larger_than_a_parse_block(tmp_path: Path, monkeypatch) -> None:
    # Never closed: pyarrow stops ("straddling object" / "out of sync") once the record outgrows
    # a block; the careful pass sets the line aside and reads everything after it.
    import geodata.ingest.csv_read

    monkeypatch.setattr(geodata.ingest.csv_read, "CSV_BLOCK_BYTES", 1 << 12)  # 4 KiB blocks: 1 block = ~20 rows
    rows = [osv_row(i) for i in range(2, 202)]
    rows[20]["thumb_original_url"] = "two\nlines"  # line 22-23: a legit quoted line break, kept
    lines = _csv_lines(rows)
    lines[60] = _stray_quote(lines[60])  # line 61: id 60 (ids from 23 on sit one line lower)
    lines.insert(120, b"\n")  # line 121 is blank (ids from 120 on sit two lines lower)
    root = make_release(tmp_path / "osv", [], [osv_row(1)], images={})
    (root / "train.csv").write_bytes(b"".join(lines))
    report = ingest_osv5m(root, tmp_path / "out", verify_images="none")

    s = report.splits["train"]
    assert (s.n_in, s.n_kept, s.n_quarantined) == (200, 199, 1)
    assert (s.n_lines, s.n_lines_kept, s.n_lines_quarantined, s.n_blank_lines) == (203, 200, 1, 1)
    _lines_add_up(s)
    q = read_quarantine(tmp_path / "out")
    assert q[["line", "id", "reason"]].values.tolist() == [[61, "60", "unclosed_quote"]]
    assert q["value"].iloc[0].startswith("lines 61-203: 60,")
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert len(m) == 199 and 60 not in m["id"].tolist()
    line_of = dict(zip(m["id"], m["line"]))
    assert [line_of[i] for i in (21, 22, 23, 59, 61, 119, 120, 201)] == [21, 22, 24, 60, 62, 120, 122, 203]
    assert m.loc[m["id"] == 22, "thumb_original_url"].item() == "two\nlines"


def test_bytes_not_utf8_quarantine_their_line_and_the_split_goes_on(tmp_path: Path) -> None:
    rows = [osv_row(i) for i in range(2, 12)]
    lines = _csv_lines(rows)
    lines[3] = lines[3].replace(b"city-v", b"S\xe3o Paulo")  # line 4 (id 4): Latin-1 'ã', 32 fields
    lines[7] = lines[7].replace(b"city-v", b"caf\xe9,extra")  # line 8 (id 8): Latin-1 and 33 fields
    root = make_release(tmp_path / "osv", [], [osv_row(1)], images={})
    (root / "train.csv").write_bytes(b"".join(lines))
    report = ingest_osv5m(root, tmp_path / "out", verify_images="none", max_bad_fraction=0.25)

    s = report.splits["train"]
    assert (s.n_in, s.n_kept, s.n_quarantined) == (10, 8, 2)
    _lines_add_up(s)
    q = read_quarantine(tmp_path / "out")
    assert q[["file", "line", "id", "reason"]].values.tolist() == [
        ["train.csv", 4, "4", "encoding_invalid"], ["train.csv", 8, "8", "encoding_invalid"]]
    assert "S\\xe3o Paulo" in q["value"].iloc[0]  # the byte shown, not replaced
    assert s.examples["encoding_invalid"][0].startswith("train.csv line 4: encoding_invalid")
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert m[["id", "line"]].values.tolist() == [[i, i] for i in range(2, 12) if i not in (4, 8)]


def test_appended_rows_with_a_bad_byte_and_a_stray_quote(tmp_path: Path) -> None:
    rows = [osv_row(i) for i in range(2, 42)]
    rows[35]["region"] = "Ontario, Canada"  # line 37 closes the stray quote of line 31
    lines = _csv_lines(rows)
    lines[30] = _stray_quote(lines[30])
    lines[33] = lines[33].replace(b"city-v", b"\xff")
    root = make_release(tmp_path / "osv", [], [osv_row(1)], images={})
    (root / "train.csv").write_bytes(b"".join(lines[:21]))  # header + rows 2..21
    first = ingest_osv5m(root, tmp_path / "out", verify_images="none")
    assert first.splits["train"].n_kept == 20
    (root / "train.csv").write_bytes(b"".join(lines))  # 20 rows appended, two of them bad
    report = ingest_osv5m(root, tmp_path / "out", verify_images="none", max_bad_fraction=0.1)

    s = report.splits["train"]
    assert s.mode == "append" and (s.n_in, s.n_kept, s.n_quarantined) == (20, 18, 2)
    _lines_add_up(s, header=0)
    q = read_quarantine(tmp_path / "out")
    assert q[["line", "id", "reason"]].values.tolist() == [[31, "31", "unclosed_quote"], [34, "34", "encoding_invalid"]]
    assert q["value"].iloc[0].startswith("lines 31-37: ")
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert m[["id", "line"]].values.tolist() == [[i, i] for i in range(2, 42) if i not in (31, 34)]


def test_header_only_split_is_reported_as_having_no_rows(tmp_path: Path) -> None:
    root = make_release(tmp_path / "osv", [osv_row(1)], [], images={})
    report = ingest_osv5m(root, tmp_path / "out", verify_images="none")
    s = report.splits["test"]
    assert report.ok and s.n_in_total == 0
    assert s.warning == f"{root / 'test.csv'}: no rows (a header only)"
    on_disk = json.loads((tmp_path / "out/ingest_report.json").read_text())
    assert on_disk["splits"]["test"]["warning"] == s.warning and on_disk["splits"]["train"]["warning"] == ""
    again = ingest_osv5m(root, tmp_path / "out", verify_images="none")  # the no-op re-run says it too
    assert again.noop and again.splits["test"].warning == s.warning


@pytest.mark.parametrize(("seed", "chunk"), [(0, 1 << 24), (1, 1), (2, 2), (3, 5)])
def test_scan_records_splits_records_as_pyarrow_does(tmp_path: Path, monkeypatch, seed: int, chunk: int) -> None:
    # Random bytes of a, ',', '"', line ends: the scan's records must be pyarrow's, line by line,
    # whatever the chunks it reads the bytes in.
    import geodata.ingest.csv_lines

    monkeypatch.setattr(geodata.ingest.csv_lines, "CHUNK_BYTES", chunk)
    rng = random.Random(seed)
    tokens = ["a", ",", '"', '"', "\n", "\r\n", "xy"]
    path = tmp_path / "x.csv"
    for _ in range(300):
        data = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 40))).encode()
        spans: dict[int, int] = {}
        valid: list[int] = []

        def on_invalid(row, spans=spans) -> str:
            spans[row.number] = row.text.count("\n") + 1
            return "skip"

        table = pcsv.read_csv(io.BytesIO(data), read_options=pcsv.ReadOptions(use_threads=False, column_names=list("abc")),
                              parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=True),
                              convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in "abc"}))
        valid = [sum(v.count("\n") for v in r.values()) + 1 for r in table.to_pylist()]
        expected, it = [], iter(valid)
        for number in range(1, len(valid) + len(spans) + 1):
            expected.append(spans[number] if number in spans else next(it))
        path.write_bytes(data)
        rec = scan_records(path, 0, len(data))
        if expected:  # pyarrow's last value may hold the file's final '\n'
            expected[-1] = min(expected[-1], rec.n_lines - int(rec.starts[-1]) + 1) if len(rec.starts) else expected[-1]
        assert rec.spans().tolist() == expected, data
        physical = data.split(b"\n")
        covered = {ln for a, b in zip(rec.starts.tolist(), rec.ends.tolist()) for ln in range(a, b + 1)}
        assert all(physical[ln - 1] in (b"", b"\r") for ln in range(1, rec.n_lines + 1) if ln not in covered)


# --------------------------------------------------------------------------- hostile shards


def test_shard_with_an_escaping_member_is_refused_and_the_ingest_goes_on(tmp_path: Path) -> None:
    # images/train: 00.zip, 01.zip fine (ids 1..4); 02.zip holds 5.jpg and '../evil.jpg';
    # 03.tar holds 6.jpg and '/abs/evil.jpg'. Rows 5 and 6 are image_unsafe, the others kept.
    rows = [osv_row(i) for i in range(1, 11)]
    images = {"train": {str(i): jpeg_bytes() for i in (1, 2, 3, 4, 7, 8, 9, 10)}, "test": {"11": jpeg_bytes()}}
    root = make_release(tmp_path / "osv", rows, [osv_row(11)], images=images)
    with zipfile.ZipFile(root / "images/train/02.zip", "w") as zf:
        zf.writestr("5.jpg", jpeg_bytes())
        zf.writestr("../evil.jpg", jpeg_bytes())
    with tarfile.open(root / "images/train/03.tar", "w") as tf:
        for name in ("6.jpg", "/abs/evil.jpg"):
            data = jpeg_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    report = ingest_osv5m(root, tmp_path / "out", max_bad_fraction=0.2)  # decodes the kept ones

    s = report.splits["train"]
    assert report.ok and (s.n_in, s.n_kept, s.n_quarantined) == (10, 8, 2)
    q = read_quarantine(tmp_path / "out")
    assert q[["line", "id", "reason"]].values.tolist() == [[6, "5", "image_unsafe"], [7, "6", "image_unsafe"]]
    assert q["value"].iloc[0] == ("shard images/train/02.zip refused: member '../evil.jpg' could escape "
                                  "the dataset folder; none of its members is used")
    assert q["value"].iloc[1].startswith("shard images/train/03.tar refused: member '/abs/evil.jpg'")
    index = pd.read_parquet(tmp_path / "out/image_index/train.parquet")
    refused = index[index["refused"].notna()]
    assert sorted(refused["container"].unique()) == ["images/train/02.zip", "images/train/03.tar"]
    assert sorted(refused["id"]) == ["5", "6", "evil", "evil"]
    assert not list(tmp_path.glob("**/evil*")) and not Path("/abs/evil.jpg").exists()
    again = ingest_osv5m(root, tmp_path / "out", max_bad_fraction=0.2)  # the refusal is remembered
    assert again.noop and again.splits["train"].quarantined_total == 2

    # Above max_bad_fraction the run still fails, with its report and quarantine written.
    with pytest.raises(IngestError, match=r"train: 2 of 10 rows quarantined.*image_unsafe"):
        ingest_osv5m(root, tmp_path / "strict", max_bad_fraction=0.1)
    on_disk = json.loads((tmp_path / "strict/ingest_report.json").read_text())
    assert on_disk["ok"] is False and on_disk["splits"]["train"]["reasons"] == {"image_unsafe": 2}
    assert len(read_quarantine(tmp_path / "strict")) == 2


def test_webdataset_shard_with_an_escaping_member_is_refused_and_the_others_ingested(tmp_path: Path) -> None:
    from tests.geodata.ingest.test_webdataset import make_samples, sample_metadata

    metas = sample_metadata()
    write_shard(tmp_path / "wds/train/00000.tar", make_samples(metas[:8]))
    write_shard(tmp_path / "wds/train/00001.tar", make_samples(metas[8:10]))
    with tarfile.open(tmp_path / "wds/train/00001.tar", "a") as tf:
        info = tarfile.TarInfo("../evil.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    write_shard(tmp_path / "wds/test/00000.tar", make_samples(metas[10:12]))
    report = ingest_osv5m(tmp_path / "wds", tmp_path / "out", max_bad_fraction=0.5)

    s = report.splits["train"]
    assert report.ok and (s.n_in, s.n_kept, s.n_quarantined) == (11, 8, 3)
    q = read_quarantine(tmp_path / "out")
    assert q["file"].unique().tolist() == ["train/00001.tar"] and (q["reason"] == "image_unsafe").all()
    assert sorted(q["id"]) == sorted([str(m["id"]) for m in metas[8:10]] + ["evil"])
    assert q["value"].str.startswith("shard train/00001.tar refused: member '../evil.json'").all()
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert sorted(m["id"]) == sorted(int(x["id"]) for x in metas[:8])
    assert not list((tmp_path / "out/features/street_clip").glob("shard-train-00001*"))  # nothing read from it


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_invalid_utf8_lines_across_chunk_boundaries(tmp_path: Path, monkeypatch, chunk: int) -> None:
    import geodata.ingest.csv_lines

    monkeypatch.setattr(geodata.ingest.csv_lines, "CHUNK_BYTES", chunk)
    lines = [b"ok", "S\u00e3o Paulo \u00d6sterreich".encode(), b"caf\xe9", b"", b"a\xc3", b"\xff\xfe x", "\u6771\u4eac".encode(), b"end"]
    path = tmp_path / "x.csv"
    path.write_bytes(b"\n".join(lines))
    got_lines, got_bytes = invalid_utf8_lines(path)

    def first_bad(line: bytes) -> int | None:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return line[exc.start]
        return None

    expected = [(n, first_bad(b)) for n, b in enumerate(lines, 1) if first_bad(b) is not None]
    assert list(zip(got_lines.tolist(), got_bytes.tolist())) == expected == [(3, 0xE9), (5, 0xC3), (6, 0xFF)]


def test_cleaned_reader_leaves_out_the_cut_ranges(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    data = bytes(range(256)) * 8
    path.write_bytes(data)
    rng = random.Random(0)
    for _ in range(100):
        start = rng.randint(0, 1000)
        end = rng.randint(start, len(data))
        points = sorted(rng.sample(range(start, end + 1), min(6, end - start + 1)))
        cuts = [(points[i], points[i + 1]) for i in range(0, len(points) - 1, 2)]
        expected, pos = bytearray(), start
        for a, b in cuts:
            expected += data[pos:a]
            pos = b
        expected += data[pos:end]
        got = bytearray()
        with CleanedReader(path, start, end, cuts) as reader:
            while chunk := reader.read(rng.randint(1, 300)):
                got += chunk
        assert bytes(got) == bytes(expected)


def test_stray_quote_closed_on_the_next_line_gives_that_line_back(tmp_path: Path) -> None:
    # Two lines read as one malformed record (within MAX_RECORD_LINES, but a wrong field count):
    # the stray quote's line is quarantined, the next one is read on its own and kept.
    rows = [osv_row(i) for i in range(2, 10)]
    rows[4]["region"] = "Ontario, Canada"  # line 6, quoted by the csv writer
    lines = _csv_lines(rows)
    lines[4] = _stray_quote(lines[4])  # line 5
    root = make_release(tmp_path / "osv", [], [osv_row(1)], images={})
    (root / "train.csv").write_bytes(b"".join(lines))
    report = ingest_osv5m(root, tmp_path / "out", verify_images="none", max_bad_fraction=0.2)
    s = report.splits["train"]
    assert (s.n_in, s.n_kept, s.n_quarantined, s.n_lines_quarantined) == (8, 7, 1, 1)
    _lines_add_up(s)
    q = read_quarantine(tmp_path / "out")
    assert q[["line", "reason"]].values.tolist() == [[5, "unclosed_quote"]]
    assert q["value"].iloc[0].startswith("lines 5-6: 5,")
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert m["id"].tolist() == [2, 3, 4, 6, 7, 8, 9] and m["line"].tolist() == m["id"].tolist()
