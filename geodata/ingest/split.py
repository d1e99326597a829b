"""One split's pass of an ingest run: new input -> judged rows -> a temporary manifest part.

`geodata.ingest.run` plans a run and commits it; this module does the work in between for
one split, without publishing anything:

- `ingest_csv_split` streams the CSV bytes appended since the last run through
  `geodata.ingest.validate.judge_batch` (hashing the same bytes in a thread), then re-checks the
  rows kept aside as image_missing when the image index has new containers
  (`geodata.ingest.image_index.recheck_pending`);
- `ingest_wds_split` reads the new WebDataset tar shards (`wds_shard_plan`) the same way
  and writes their .npy features as one npz per (feature, shard);
- `PartWriter` holds the split's new manifest rows of this run in a temp Parquet file,
  moved into place only at commit.

What a split produced (kept rows in the part, quarantine and pending tables, CSV state,
shard fingerprints, counts in its `SplitReport`) is gathered in a `SplitRun`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geodata.atomic import atomic_write_path
from geodata.ingest.image_index import ImageIndex, decode_checker, recheck_pending
from geodata.ingest.image_listing import LISTING_SCHEMA
from geodata.ingest.image_store import ImageStore
from geodata.ingest.incremental import CsvState, PartState, container_fingerprint, file_sha256, scan_range
from geodata.ingest.csv_lines import MAX_RECORD_LINES, CleanedReader, RecordLines, SetAside, read_lines_text, scan_records, set_aside
from geodata.ingest.csv_read import CsvDataError, CsvStream, OSV5MFormatError, apply_line_map, count_lines
from geodata.ingest.quarantine import REASON_CODE, quarantine_table, truncate
from geodata.ingest.validate import MANIFEST_SCHEMA, IdSet, judge_batch

if TYPE_CHECKING:
    from geodata.ingest.run import SplitReport

__all__ = [
    "PartWriter", "SplitRun", "ingest_csv_split", "ingest_wds_split", "remap_table_lines", "wds_shard_plan",
]

MAX_EXAMPLES = 5
log = logging.getLogger(__name__)


class PartWriter:
    """Writes one split's new manifest rows of this run to a temp part; moved into place at commit."""

    def __init__(self, part_dir: Path, name: str) -> None:
        self.final = part_dir / name
        self.tmp = part_dir / f".{name}.tmp"
        self._writer: pq.ParquetWriter | None = None
        self.n_rows = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        if self._writer is None:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, MANIFEST_SCHEMA, compression="zstd")
        if isinstance(batch, pa.Table):
            self._writer.write_table(batch)
        else:
            self._writer.write_batch(batch)
        self.n_rows += batch.num_rows

    def close(self) -> PartState | None:
        """Finish the temp file; its PartState (None when no rows were written)."""
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        return PartState(name=self.final.name, n_rows=self.n_rows, sha256=file_sha256(self.tmp))

    def remap_lines(self, line_map: Any) -> np.ndarray:
        """Rewrite the temp part's line column through a LineMap (rare: blank lines, quoted
        newlines); returns the new lines, (n_rows,) int64."""
        if self._writer is None:
            return np.zeros(0, np.int64)
        self._writer.close()
        table = pq.read_table(self.tmp)
        lines = apply_line_map(table["line"].to_numpy(), line_map)
        table = table.set_column(table.schema.get_field_index("line"), "line", pa.array(lines, pa.int64()))
        self._writer = pq.ParquetWriter(self.tmp, MANIFEST_SCHEMA, compression="zstd")
        self._writer.write_table(table)
        return lines

    def discard(self) -> None:
        """Drop what was written (the writer can be written to again)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.n_rows = 0
        self.tmp.unlink(missing_ok=True)
        if self.tmp.parent.is_dir() and not any(self.tmp.parent.iterdir()):
            self.tmp.parent.rmdir()  # a folder this run created for nothing

    def commit(self) -> None:
        os.replace(self.tmp, self.final)


def remap_table_lines(table: pa.Table, line_map: Any) -> pa.Table:
    """`table` with its line column mapped through a LineMap (nulls stay null)."""
    if table.num_rows == 0:
        return table
    lines = table["line"].fill_null(-1).to_numpy()
    mapped = apply_line_map(lines, line_map)
    return table.set_column(table.schema.get_field_index("line"), "line", pa.array(mapped, pa.int64(), mask=mapped < 0))


@dataclass
class SplitRun:
    """What one split produced in this run (before commit)."""

    report: SplitReport
    writer: PartWriter
    quarantine: list[pa.Table] = field(default_factory=list)
    pending: list[pa.Table] = field(default_factory=list)
    csv: CsvState | None = None
    shards: dict[str, str] = field(default_factory=dict)
    resolved: pa.Table | None = None  # lines of earlier image_missing rows judged again this run
    rejudged: pa.Table | None = None  # their new quarantine rows (image found but unsafe / corrupt)


def ingest_csv_split(
    run: SplitRun, root: Path, plan: Any, seen: IdSet, images: ImageIndex | None, checker: Any,
    old_pending: pa.Table,
) -> pa.Table:
    """Stream the new bytes of one CSV through the checks into the run's part, then re-check
    `old_pending` (earlier image_missing rows) when `images` has new containers.

    Returns the split's pending rows after this run (MANIFEST_SCHEMA): earlier ones still
    missing their image, then this run's.
    """
    _stream_csv(run, root, plan, seen, images, checker)
    file = f"{run.report.split}.csv"
    if images is not None and images.new_containers and old_pending.num_rows:
        still = _admit_pending(run, file, old_pending, images, checker)
        pending = pa.concat_tables([still, *run.pending]).cast(MANIFEST_SCHEMA)
    else:
        pending = pa.concat_tables([old_pending, *run.pending]).cast(MANIFEST_SCHEMA)
    if images is not None:
        srep = run.report
        srep.n_images_indexed = images.table.num_rows
        srep.n_containers_listed, srep.n_containers_reused = images.n_listed, images.n_reused
        srep.n_duplicate_images = images.duplicates.num_rows if images.duplicates is not None else 0
        srep.duplicate_image_examples = images.duplicate_examples(MAX_EXAMPLES)
    return pending


def _judge_stream(run: SplitRun, stream: CsvStream, seen: IdSet, images: ImageIndex | None, checker: Any) -> None:
    """Judge every batch of `stream` into the run's part, quarantine and pending tables."""
    for raw, lines in stream:
        judged = judge_batch(run.report.split, stream.csv_path.name, raw, lines, seen,
                             images.lookup if images is not None else None, checker)
        run.writer.write(judged.kept)
        if judged.quarantine.num_rows:
            run.quarantine.append(judged.quarantine)
        if judged.pending.num_rows:
            run.pending.append(pa.Table.from_batches([judged.pending]))


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
    split = run.report.split
    csv_path = root / f"{split}.csv"
    scanned: dict[str, Any] = {}

    def scan() -> None:  # hash + newline count, overlapping with parsing (hashlib releases the GIL)
        try:
            scanned["range"] = scan_range(csv_path, plan.hasher, plan.start, plan.end)
        except BaseException as exc:  # re-raised in the caller
            scanned["error"] = exc

    thread = threading.Thread(target=scan, name=f"hash-{split}", daemon=True)
    thread.start()
    mark = seen.snapshot()
    stream = CsvStream(csv_path, plan.start, plan.line_base)
    failed: CsvDataError | None = None
    try:
        _judge_stream(run, stream, seen, images, checker)
    except CsvDataError as exc:
        failed = exc
    finally:
        thread.join()
    if "error" in scanned:
        raise scanned["error"]
    if csv_path.stat().st_size != plan.end:
        raise OSV5MFormatError(f"{csv_path}: the file changed while it was ingested; re-run when it is complete")
    rng = scanned["range"]
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
            run.writer.discard()
            run.quarantine, run.pending = [], []
            aside = set_aside(csv_path, plan.start, plan.end, unclosed)
            records = aside.records
            with CleanedReader(csv_path, plan.start, plan.end, aside.cut(plan.start)) as source:
                stream = CsvStream(csv_path, plan.start, plan.line_base, source=source)
                _judge_stream(run, stream, seen, images, checker)
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
    srep.n_lines = n_lines
    n_quarantined = sum(t.num_rows for t in run.quarantine)
    if line_map is None:  # one line per record, no blank line (or lines unknown: record numbers)
        srep.n_lines_kept, srep.n_lines_quarantined = run.writer.n_rows, n_quarantined
    else:
        _count_lines(run, records, line_map.base, kept_lines, n_quarantined)
    run.csv = plan.new_state(csv_path.name, rng)


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


def wds_shard_plan(root: Path, split: str, prev_fps: dict[str, str]) -> tuple[list[Path], dict[str, str], str]:
    """The tar shards of `root/split` not ingested yet, every shard's fingerprint, and why
    the split must be re-ingested in full ('' when only shards were added)."""
    from geodata.ingest.webdataset import find_shards

    shards = find_shards(root / split)
    if not shards:
        raise FileNotFoundError(f"{root / split}: no .tar shards; expected the WebDataset copy's {split}/*.tar")
    fps = {s.relative_to(root).as_posix(): container_fingerprint("tar", s) for s in shards}
    changed = [k for k, v in prev_fps.items() if fps.get(k) != v]
    reason = f"{split}: tar shard {changed[0]} changed or is gone since the last ingest" if changed else ""
    new = [s for s in shards if s.relative_to(root).as_posix() not in prev_fps]
    return new, fps, reason


def _write_features(out_dir: Path, split: str, shard_rel: str, ids: list[np.ndarray],
                    feats: dict[str, list[np.ndarray]]) -> None:
    """One npz per feature name for one tar shard: ids int64 (n,), feats float32 (n, D); atomic."""
    from geodata.ingest.webdataset import feature_shard_path

    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    for name, parts in feats.items():
        path = feature_shard_path(out_dir, name, split, shard_rel)
        matrix = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        with atomic_write_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: np.savez would append .npz
            np.savez(fh, ids=all_ids.astype(np.int64), feats=matrix.astype(np.float32))


def ingest_wds_split(
    run: SplitRun, root: Path, out_dir: Path, shards: list[Path], seen: IdSet, verify_images: str,
    store: ImageStore, workers: int, features: tuple[str, ...] | None, dims: dict[str, int],
    listings: list[pa.Table],
) -> None:
    """Read new tar shards of one split: rows judged into the part, features into npz shards.

    Appends each batch's image listing (LISTING_SCHEMA) to `listings`; `dims` collects
    feature name -> D across shards.
    """
    from geodata.ingest.webdataset import discover_features, read_shard, refused_shard_rows, shard_refusal

    split = run.report.split
    for shard in shards:
        rel = shard.relative_to(root).as_posix()
        why = shard_refusal(shard, rel)
        if why is not None:  # refused whole: its samples are quarantined, the others go on
            quarantine, listing = refused_shard_rows(shard, rel, split, why, seen)
            run.quarantine.append(quarantine)
            run.report.n_in += quarantine.num_rows
            listings.append(listing.cast(LISTING_SCHEMA))
            continue
        names = features if features is not None else discover_features(shard)
        if features is None:
            features = names
        ids: list[np.ndarray] = []
        feats: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for batch in read_shard(shard, rel, names, dims, read_images=verify_images == "decode"):
            checker = decode_checker(store, workers, batch.jpg) if verify_images == "decode" else None
            lookup = (lambda _ids, refs=batch.refs: refs) if verify_images != "none" else None
            judged = judge_batch(split, rel, batch.raw, batch.lines, seen, lookup, checker,
                                 pre_code=batch.pre_code, pre_value=batch.pre_value,
                                 late_code=batch.late_code, late_value=batch.late_value)
            if verify_images == "none":  # still record where the image is
                kept = judged.kept
                refs = batch.refs.take(pa.array(judged.kept_rows, pa.int64()))
                cols = {n: kept.column(n) for n in MANIFEST_SCHEMA.names}
                cols.update(image_container=refs["container"].combine_chunks(), image_member=refs["member"].combine_chunks(),
                            image_offset=refs["offset"].combine_chunks(), image_size=refs["size"].combine_chunks())
                judged.kept = pa.RecordBatch.from_pydict(cols, schema=MANIFEST_SCHEMA)
            run.writer.write(judged.kept)
            if judged.quarantine.num_rows:
                run.quarantine.append(judged.quarantine)
            run.report.n_in += len(batch.lines)
            ids.append(judged.kept.column("id").to_numpy())
            for name in names:
                feats[name].append(batch.feats[name][judged.kept_rows])
            refs_all = batch.refs
            listings.append(pa.table({
                "id": batch.raw["id"], "container": refs_all["container"], "member": refs_all["member"],
                "size_bytes": refs_all["size"], "offset": refs_all["offset"], "refused": refs_all["refused"],
            }, schema=LISTING_SCHEMA).filter(pc.is_valid(refs_all["container"])))
        _write_features(out_dir, split, shard.relative_to(root / split).as_posix(), ids, feats)
    run.report.features = dict(dims)
