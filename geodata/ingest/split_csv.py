"""One split's pass over its CSV: the bytes appended since the last run -> judged rows.

`ingest_csv_split` streams the new bytes through `geodata.ingest.validate.judge_batch`
(hashing the same bytes in a thread) into the split's temp manifest part
(geodata.ingest.split), then re-checks the rows kept aside as image_missing when the image
index has new containers (`geodata.ingest.image_index.recheck_pending`).

Fast path: one pyarrow pass. When pyarrow stops on the rows (bytes that are not UTF-8, a
stray quote swallowing a block) or a record spans lines that no real row does
(geodata.ingest.csv_lines), a careful pass reads the range again with those lines set
aside and quarantined.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from geodata.ingest import csv_read
from geodata.ingest.csv_lines import (
    MAX_RECORD_LINES,
    CleanedReader,
    RecordLines,
    SetAside,
    read_lines_text,
    scan_records,
    set_aside,
)
from geodata.ingest.csv_read import CsvDataError, CsvStream, OSV5MFormatError, apply_line_map, count_lines
from geodata.ingest.image_index import ImageIndex, recheck_pending
from geodata.ingest.incremental import scan_range
from geodata.ingest.quarantine import REASON_CODE, quarantine_table, truncate
from geodata.ingest.split import SplitRun
from geodata.ingest.validate import MANIFEST_SCHEMA, IdSet, judge_batch
from geodata.progress import Progress

__all__ = ["ingest_csv_split", "remap_table_lines"]

MAX_EXAMPLES = 5
log = logging.getLogger(__name__)


def ingest_csv_split(
    run: SplitRun, root: Path, plan: Any, seen: IdSet, images: ImageIndex | None, checker: Any,
    old_pending: pa.Table,
) -> None:
    """Stream the new bytes of one CSV through the checks into the run's part, then re-check
    `old_pending` (earlier image_missing rows) when `images` has new containers.

    Sets `run.pending_total`, the split's pending rows after this run (MANIFEST_SCHEMA):
    earlier ones still missing their image, then this run's.
    """
    _stream_csv(run, root, plan, seen, images, checker)
    file = f"{run.report.split}.csv"
    if images is not None and images.new_containers and old_pending.num_rows:
        still = _admit_pending(run, file, old_pending, images, checker)
        run.pending_total = pa.concat_tables([still, *run.pending]).cast(MANIFEST_SCHEMA)
    else:
        run.pending_total = pa.concat_tables([old_pending, *run.pending]).cast(MANIFEST_SCHEMA)
    if images is not None:
        srep = run.report
        srep.n_images_indexed = images.table.num_rows
        srep.n_containers_listed, srep.n_containers_reused = images.n_listed, images.n_reused
        srep.n_duplicate_images = images.duplicates.num_rows if images.duplicates is not None else 0
        srep.duplicate_image_examples = images.duplicate_examples(MAX_EXAMPLES)


def _judge_stream(run: SplitRun, stream: CsvStream, seen: IdSet, images: ImageIndex | None, checker: Any,
                  n_bytes: int) -> None:
    """Judge every batch of `stream` (`n_bytes` of CSV) into the run's part, quarantine and pending tables.

    Progress (geodata.progress): bytes judged, rows/s, ETA; pyarrow parses one batch per block of
    CSV_BLOCK_BYTES, so a batch stands for a block (the last one for what is left)."""
    with Progress(n_bytes, f"reading {stream.csv_path.name}", unit="B", items_unit="rows", logger=log) as bar:
        for raw, lines in stream:
            judged = judge_batch(run.report.split, stream.csv_path.name, raw, lines, seen,
                                 images.lookup if images is not None else None, checker)
            run.writer.write(judged.kept)
            if judged.quarantine.num_rows:
                run.quarantine.append(judged.quarantine)
            if judged.pending.num_rows:
                run.pending.append(pa.Table.from_batches([judged.pending]))
            bar.update(min(csv_read.CSV_BLOCK_BYTES, n_bytes - bar.done), items=len(lines))


def _swallowed(stream: CsvStream, records: RecordLines) -> dict[int, int]:
    """{first: last line} of the records a stray quote made: over MAX_RECORD_LINES lines, or
    over one line with a wrong field count ({} when pyarrow's records and the scan's differ)."""
    if len(records.starts) != stream.n_records():
        return {}
    spans = records.spans()
    malformed = np.zeros(len(spans), dtype=bool)
    bad = np.asarray(stream.bad_records, dtype=np.int64)
    malformed[bad[bad > 0] - 1] = True
    pick = (spans > MAX_RECORD_LINES) | ((spans > 1) & malformed)
    return dict(zip(records.starts[pick].tolist(), records.ends[pick].tolist(), strict=True))


def _aside_table(split: str, csv_path: Path, start: int, line_base: int, aside: SetAside) -> pa.Table:
    """Quarantine rows of the lines the careful pass left out (their text, bytes not UTF-8 as \\xNN)."""
    texts = read_lines_text(csv_path, start, aside.records, aside.lines)
    lines = aside.lines + line_base
    values = [_around_bad_byte(t) if r == "encoding_invalid" else f"lines {a}-{b + line_base}: {t}"
              for t, r, a, b in zip(texts, aside.reasons, lines.tolist(), aside.ends.tolist(), strict=True)]
    return quarantine_table(split, csv_path.name, lines, pa.array([t.split(",", 1)[0][:40] for t in texts], pa.string()),
                            np.asarray([REASON_CODE[r] for r in aside.reasons]), pa.array(values, pa.string()))


def _around_bad_byte(text: str, before: int = 40) -> str:
    """`text` from a little before its first \\xNN (a byte that is not UTF-8), so the value shows it."""
    at = text.find("\\x")
    return text if at <= before else "..." + text[at - before:]


def _stream_csv(
    run: SplitRun, root: Path, plan: Any, seen: IdSet, images: ImageIndex | None, checker: Any,
) -> None:
    """Judge the CSV bytes plan.start..plan.end batch by batch; record counts and the new CsvState.

    Fast path: one pyarrow pass. When pyarrow stops on the rows (bytes that are not UTF-8, a
    stray quote swallowing a block) or a record spans lines that no real row does
    (geodata.ingest.csv_lines), everything judged is dropped and the range is read again with
    those lines set aside and quarantined (encoding_invalid, unclosed_quote).
    """
    csv_path = root / f"{run.report.split}.csv"
    mark = seen.snapshot()
    stream, failed, rng = _first_pass(run, csv_path, plan, seen, images, checker)
    n_lines = count_lines(rng.n_newlines, rng.last_byte)
    records = aside = None
    if failed is not None or not stream.lines_final(n_lines, int(rng.has_empty_line)):
        records = scan_records(csv_path, plan.start, plan.end) if failed is None else None
        unclosed = _swallowed(stream, records) if records is not None else {}
        if failed is not None or unclosed:
            log.warning("%s; reading %s again with the offending lines set aside", failed or
                        f"{len(unclosed)} record(s) over several lines, e.g. lines {next(iter(unclosed.items()))}",
                        csv_path)
            seen.restore(mark)
            stream, aside = _careful_pass(run, csv_path, plan, seen, images, checker, unclosed)
            records = aside.records
    _finish_pass(run, csv_path, plan, stream, records, aside)
    run.report.n_lines = n_lines
    run.csv = plan.new_state(csv_path.name, rng)


def _first_pass(
    run: SplitRun, csv_path: Path, plan: Any, seen: IdSet, images: ImageIndex | None, checker: Any,
) -> tuple[CsvStream, CsvDataError | None, Any]:
    """The fast path over bytes plan.start..plan.end, while a thread hashes and counts the same bytes.

    Returns the stream, the error pyarrow stopped on (None when it read everything) and the
    RangeScan of the bytes. Raises OSV5MFormatError when the file changed meanwhile.
    """
    scanned: dict[str, Any] = {}

    def scan() -> None:  # hash + newline count, overlapping with parsing (hashlib releases the GIL)
        try:
            scanned["range"] = scan_range(csv_path, plan.hasher, plan.start, plan.end)
        except BaseException as exc:  # re-raised in the caller
            scanned["error"] = exc

    thread = threading.Thread(target=scan, name=f"hash-{run.report.split}", daemon=True)
    thread.start()
    stream = CsvStream(csv_path, plan.start, plan.line_base)
    failed: CsvDataError | None = None
    try:
        _judge_stream(run, stream, seen, images, checker, plan.end - plan.start)
    except CsvDataError as exc:
        failed = exc
    finally:
        thread.join()
    if "error" in scanned:
        raise scanned["error"]
    if csv_path.stat().st_size != plan.end:
        raise OSV5MFormatError(f"{csv_path}: the file changed while it was ingested; re-run when it is complete")
    return stream, failed, scanned["range"]


def _careful_pass(
    run: SplitRun, csv_path: Path, plan: Any, seen: IdSet, images: ImageIndex | None, checker: Any,
    unclosed: dict[int, int],
) -> tuple[CsvStream, SetAside]:
    """Drop everything judged, then read the range again with the offending lines set aside
    (not UTF-8, and the `unclosed` {first: last line} records a stray quote made)."""
    run.writer.discard()
    run.quarantine, run.pending = [], []
    aside = set_aside(csv_path, plan.start, plan.end, unclosed)
    with CleanedReader(csv_path, plan.start, plan.end, aside.cut(plan.start)) as source:
        stream = CsvStream(csv_path, plan.start, plan.line_base, source=source)
        _judge_stream(run, stream, seen, images, checker, plan.end - plan.start)
    return stream, aside


def _finish_pass(
    run: SplitRun, csv_path: Path, plan: Any, stream: CsvStream, records: RecordLines | None, aside: SetAside | None,
) -> None:
    """Quarantine the malformed rows and the lines set aside, map record numbers to physical
    lines (when `records` were scanned), and count rows and lines into the split's report."""
    split = run.report.split
    texts = stream.bad_texts
    if texts:  # malformed rows: raw id = text up to the first comma
        run.quarantine.append(quarantine_table(
            split, csv_path.name, stream.bad_lines(), pa.array([t.split(",", 1)[0] for t in texts], pa.string()),
            np.full(len(texts), REASON_CODE["column_count"]), pa.array(texts, pa.string()),
        ))
    line_map = stream.line_map(records) if records is not None else None
    if line_map is not None:
        kept_lines = run.writer.remap_lines(line_map)
        run.quarantine = [remap_table_lines(t, line_map) for t in run.quarantine]
        run.pending = [remap_table_lines(t, line_map) for t in run.pending]
    if aside is not None:
        run.quarantine.append(_aside_table(split, csv_path, plan.start, plan.line_base, aside))
    srep = run.report
    srep.line_numbers = stream.line_kind  # type: ignore[assignment]
    srep.bytes_parsed = plan.end - plan.start
    srep.n_in = stream.n_valid + len(texts) + (len(aside.lines) if aside is not None else 0)
    n_quarantined = sum(t.num_rows for t in run.quarantine)
    if line_map is None:  # one line per record, no blank line (or lines unknown: record numbers)
        srep.n_lines_kept, srep.n_lines_quarantined = run.writer.n_rows, n_quarantined
    else:
        _count_lines(run, records, line_map.base, kept_lines, n_quarantined)


def _count_lines(run: SplitRun, records: Any, line_base: int, kept_lines: np.ndarray, n_quarantined: int) -> None:
    """Physical lines of the kept and quarantined rows and blank lines, from the records' spans;
    quarantined records over several lines get 'lines a-b: ' before their value."""
    spans = records.spans()
    multi = np.flatnonzero(spans > 1)
    first, last = records.starts[multi] + line_base, records.ends[multi] + line_base
    q_lines = np.concatenate([t["line"].fill_null(-1).to_numpy() for t in run.quarantine] + [np.zeros(0, np.int64)])
    srep = run.report
    srep.n_lines_kept = run.writer.n_rows + int((last - first)[np.isin(first, kept_lines)].sum())
    srep.n_lines_quarantined = n_quarantined + int((last - first)[np.isin(first, q_lines)].sum())
    srep.n_blank_lines = records.n_blank
    if len(multi):
        run.quarantine = [_mark_ranges(t, first, last) for t in run.quarantine]


def _mark_ranges(table: pa.Table, first: np.ndarray, last: np.ndarray) -> pa.Table:
    """`table` with 'lines a-b: ' before the value of rows whose line is a multi-line record's first."""
    lines = table["line"].fill_null(-1).to_numpy()
    hit = np.isin(lines, first)
    if not hit.any():
        return table
    end_of = dict(zip(first.tolist(), last.tolist(), strict=True))
    values = table["value"].to_pylist()
    for i in np.flatnonzero(hit).tolist():
        if not str(values[i]).startswith("lines "):
            values[i] = truncate(f"lines {lines[i]}-{end_of[int(lines[i])]}: {values[i]}")
    return table.set_column(table.schema.get_field_index("value"), "value", pa.array(values, pa.string()))


def _admit_pending(run: SplitRun, file: str, pending: pa.Table, images: ImageIndex, checker: Any) -> pa.Table:
    """Write the pending rows whose image arrived to the part; note re-judged ones; return still-missing ones."""
    checked = recheck_pending(run.report.split, file, pending, images, checker)
    if checked is None:
        return pending
    if checked.admitted is not None:
        run.writer.write(checked.admitted)
        run.report.n_recovered = checked.admitted.num_rows
    run.resolved, run.rejudged = checked.resolved, checked.rejudged
    return checked.still_missing


def remap_table_lines(table: pa.Table, line_map: Any) -> pa.Table:
    """`table` with its line column mapped through a LineMap (nulls stay null)."""
    if table.num_rows == 0:
        return table
    lines = table["line"].fill_null(-1).to_numpy()
    mapped = apply_line_map(lines, line_map)
    return table.set_column(table.schema.get_field_index("line"), "line", pa.array(mapped, pa.int64(), mask=mapped < 0))
