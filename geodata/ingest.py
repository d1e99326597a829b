"""Ingest an OSV-5M release folder into typed Parquet manifests, quarantining bad rows.

Input (DATA.md): `root/{split}.csv` (32 columns, `OSV5M_COLUMNS` order) and the photos
under `root/images/{split}/` (zip shards or unzipped folders, any depth).

Outputs, each written atomically (temp file in the same folder, then os.replace):

- `out_dir/manifest/{split}.parquet`: the kept rows; id int64, latitude/longitude float64,
  the other 29 columns as strings exactly as in the CSV (Namibia's "NA" and empty fields
  stay strings), plus `split`, `line` (physical CSV line, header = 1), `image_container`,
  `image_member` (null when verify_images="none").
- `out_dir/quarantine.parquet`: one row per rejected CSV row (`QUARANTINE_COLUMNS`), with
  the first reason that applies, in `REASONS` order.
- `out_dir/ingest_report.json`: `IngestReport` (counts per split and reason, examples, paths).

How it works: each CSV is streamed once with pyarrow; per-row checks (column count, id,
latitude, longitude) run per batch and the passing rows go to a staging Parquet file.
Then, over all splits at once, duplicate ids are dropped (first occurrence in split order,
then file order, is kept) and images are looked up (and decoded). A second streaming pass
writes the manifests. Memory stays at a few int64 arrays per row plus one batch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from geodata.atomic import atomic_write_path, write_parquet_atomic, write_text_atomic
from geodata.images import ImageStore, list_images, split_duplicate_ids
from geodata.osv5m import OSV5M_COLUMNS

log = logging.getLogger(__name__)

VerifyImages = Literal["none", "exists", "decode"]

#: Quarantine reasons, in priority order: a row with several problems gets the first.
REASONS: tuple[str, ...] = (
    "column_count",
    "id_not_integer",
    "latitude_not_numeric",
    "latitude_out_of_range",
    "longitude_not_numeric",
    "longitude_out_of_range",
    "duplicate_id",
    "image_missing",
    "image_corrupt",
)

#: Reason code used internally: 0 = row ok, else 1 + index in REASONS.
REASON_CODE: dict[str, int] = {r: i + 1 for i, r in enumerate(REASONS)}

#: The CSV field each reason is about ("" for a malformed row as a whole).
REASON_FIELD: dict[str, str] = {
    "column_count": "",
    "id_not_integer": "id",
    "latitude_not_numeric": "latitude",
    "latitude_out_of_range": "latitude",
    "longitude_not_numeric": "longitude",
    "longitude_out_of_range": "longitude",
    "duplicate_id": "id",
    "image_missing": "id",
    "image_corrupt": "image",
}

QUARANTINE_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("file", pa.string()),
        ("line", pa.int64()),
        ("id", pa.string()),
        ("field", pa.string()),
        ("reason", pa.string()),
        ("value", pa.string()),
    ]
)
QUARANTINE_COLUMNS: tuple[str, ...] = tuple(QUARANTINE_SCHEMA.names)

#: Manifest schema: the 32 release columns typed, then the ingest columns.
MANIFEST_SCHEMA = pa.schema(
    [
        (
            name,
            pa.int64()
            if name == "id"
            else pa.float64()
            if name in ("latitude", "longitude")
            else pa.string(),
        )
        for name in OSV5M_COLUMNS
    ]
    + [
        ("split", pa.string()),
        ("line", pa.int64()),
        ("image_container", pa.string()),
        ("image_member", pa.string()),
    ]
)

# Ids are Mapillary ids (up to 16 digits): digits only, at most 18 so that every match
# fits int64 and is parsed exactly (never through float).
ID_REGEX = r"^[0-9]{1,18}$"
# Plain decimal or scientific notation; rejects "", "nan", "inf", " 1", "0x1".
FLOAT_REGEX = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
LAT_RANGE_DEG = (-90.0, 90.0)
LON_RANGE_DEG = (-180.0, 180.0)

MAX_VALUE_CHARS = 120
MAX_EXAMPLES = 5
CSV_BLOCK_BYTES = 16 << 20
_STAGE_ORDINAL = "__ordinal"


class OSV5MFormatError(ValueError):
    """A CSV that is not an OSV-5M table (wrong header, unreadable text)."""


class IngestError(RuntimeError):
    """Too many rows of a split were quarantined (see the report and quarantine.parquet)."""


@dataclass
class SplitReport:
    """Counts and outputs of one split. n_in = n_kept + n_quarantined."""

    split: str
    csv_path: str
    n_in: int = 0
    n_kept: int = 0
    n_quarantined: int = 0
    bad_fraction: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    manifest_path: str | None = None
    line_numbers: Literal["physical", "record"] = "physical"
    n_images_indexed: int = 0
    n_duplicate_images: int = 0
    duplicate_image_examples: list[str] = field(default_factory=list)


@dataclass
class IngestReport:
    """What `ingest_osv5m` read, kept, quarantined and wrote. JSON-serialisable."""

    root: str
    out_dir: str
    verify_images: str
    max_bad_fraction: float
    ok: bool = True
    error: str | None = None
    splits: dict[str, SplitReport] = field(default_factory=dict)
    quarantine_path: str = ""
    report_path: str = ""
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (nested dataclasses expanded)."""
        return asdict(self)

    def to_json(self) -> str:
        """Indented JSON text of `to_dict()`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# --------------------------------------------------------------------------- writing


def _scratch_path(path: Path) -> Path:
    """A fresh temp path next to ``path`` for a staging file (removed by the caller)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


# --------------------------------------------------------------------------- checks


def check_header(names: list[str], csv_path: Path) -> None:
    """Raise OSV5MFormatError unless `names` equals OSV5M_COLUMNS exactly.

    The message names the file, the first differing column position (0-based and
    1-based), and the expected vs found name.
    """
    expected = list(OSV5M_COLUMNS)
    if names == expected:
        return
    pos = next(
        (i for i, (e, f) in enumerate(zip(expected, names, strict=False)) if e != f),
        min(len(expected), len(names)),
    )
    want = expected[pos] if pos < len(expected) else "(no more columns)"
    got = names[pos] if pos < len(names) else "(missing)"
    raise OSV5MFormatError(
        f"{csv_path}: header differs from the OSV-5M release at column {pos} "
        f"(position {pos + 1}): expected {want!r}, found {got!r} "
        f"({len(names)} columns found, {len(expected)} expected). "
        "Use the unmodified train.csv/test.csv of the release."
    )


def _truncate(value: str, max_chars: int = MAX_VALUE_CHARS) -> str:
    """`value` cut to max_chars, marked with '...' when cut."""
    return value if len(value) <= max_chars else value[: max_chars - 3] + "..."


def _parse_float(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(is_numeric bool, value float64 with NaN where not numeric) for a string column."""
    ok = pc.match_substring_regex(col, FLOAT_REGEX)
    # Non-matching strings are replaced before the cast, which fails on any bad string.
    values = pc.cast(pc.if_else(ok, col, "nan"), pa.float64())
    return _to_bool(ok), values.to_numpy(zero_copy_only=False)


def _to_bool(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow boolean (no nulls) to a numpy bool array."""
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def row_reasons(id_raw: pa.Array, lat_raw: pa.Array, lon_raw: pa.Array) -> dict[str, np.ndarray]:
    """Per-row checks on raw string columns, vectorised.

    Returns 'code' (int8: 0 = ok, else 1 + index of the first failing reason in REASONS),
    'id' (int64, 0 where invalid), 'latitude', 'longitude' (float64, NaN where invalid).
    """
    id_ok = _to_bool(pc.match_substring_regex(id_raw, ID_REGEX))
    ids = pc.cast(pc.if_else(id_ok, id_raw, "0"), pa.int64()).to_numpy(zero_copy_only=False)
    lat_ok, lat = _parse_float(lat_raw)
    lon_ok, lon = _parse_float(lon_raw)
    with np.errstate(invalid="ignore"):
        lat_in = (lat >= LAT_RANGE_DEG[0]) & (lat <= LAT_RANGE_DEG[1])
        lon_in = (lon >= LON_RANGE_DEG[0]) & (lon <= LON_RANGE_DEG[1])
    conditions = [~id_ok, ~lat_ok, ~lat_in, ~lon_ok, ~lon_in]
    codes = [REASON_CODE[r] for r in REASONS[1:6]]
    code = np.select(conditions, codes, default=0).astype(np.int8)  # first true wins
    return {"code": code, "id": ids.astype(np.int64), "latitude": lat, "longitude": lon}


# --------------------------------------------------------------------------- line numbers


def record_numbers(n_valid: int, invalid_records: np.ndarray) -> np.ndarray:
    """CSV record number (header = 1) of each valid row, given the invalid rows' numbers.

    Valid rows fill the record numbers 2, 3, ... that the invalid rows leave free:
    valid row k lands at k + 2 + (number of invalid records before it).
    """
    bad = np.sort(np.asarray(invalid_records, dtype=np.int64))
    valid_before_bad = bad - 2 - np.arange(len(bad))  # valid rows preceding each bad one
    k = np.arange(n_valid, dtype=np.int64)
    return k + 2 + np.searchsorted(valid_before_bad, k, side="right")


def _count_physical_lines(path: Path, chunk_bytes: int = 1 << 24) -> int:
    """Number of physical lines ('\\n'-terminated; a last line without '\\n' counts)."""
    n, last = 0, b""
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (1 if last not in (b"", b"\n") else 0)


def record_start_lines(path: Path, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Physical line number (1-based) where each non-blank CSV record starts.

    Quote-aware: a newline ends a record only after an even number of '"' (standard
    CSV escaping keeps the parity right). Blank lines are skipped, as pyarrow does.
    Quirk: a '"' inside an unquoted field would flip the parity; the caller checks the
    record count against pyarrow's and falls back to record numbers when they differ.
    """
    empty = path.stat().st_size == 0  # np.memmap refuses empty files
    data = np.zeros(0, np.uint8) if empty else np.memmap(path, dtype=np.uint8, mode="r")
    n = data.size
    newlines, terminators, parity = [], [], 0
    for start in range(0, n, chunk_bytes):
        chunk = np.asarray(data[start : start + chunk_bytes])
        quotes = (np.cumsum(chunk == 34, dtype=np.int64) + parity) & 1  # 34 = '"'
        nl = np.flatnonzero(chunk == 10)  # 10 = '\n'
        newlines.append(nl + start)
        terminators.append(nl[quotes[nl] == 0] + start)
        parity = int(quotes[-1])
    all_nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    ends = np.concatenate(terminators) if terminators else np.zeros(0, np.int64)
    starts = np.concatenate([[0], ends + 1]).astype(np.int64)
    starts = starts[starts < n]
    first = np.asarray(data[starts]) if n else np.zeros(0, np.uint8)
    second = np.asarray(data[np.minimum(starts + 1, max(n - 1, 0))]) if n else first
    blank = (first == 10) | ((first == 13) & (second == 10))  # '\n' or '\r\n'
    starts = starts[~blank]
    return 1 + np.searchsorted(all_nl, starts, side="left")


def physical_lines(path: Path, records: np.ndarray, n_records: int) -> tuple[np.ndarray, str]:
    """Map CSV record numbers (header = 1) to physical line numbers.

    Returns (lines, kind) with kind "physical", or "record" when the file could not be
    mapped (then lines == records). The common case (one record per line, no blank
    lines) costs one newline count over the file.
    """
    records = np.asarray(records, dtype=np.int64)
    if _count_physical_lines(path) == n_records:
        return records, "physical"
    starts = record_start_lines(path)
    if len(starts) != n_records:
        log.warning(
            "%s: could not map CSV records to physical lines (%d records, %d found by "
            "scanning); quarantine 'line' holds record numbers (header = 1) instead",
            path, n_records, len(starts),
        )
        return records, "record"
    return starts[records - 1], "physical"


# --------------------------------------------------------------------------- pass 1


@dataclass
class _Scan:
    """What the first pass over one split's CSV found."""

    split: str
    csv_path: Path
    stage_path: Path
    n_valid: int = 0  # rows with the right column count
    bad_records: list[int] = field(default_factory=list)  # record numbers, column_count
    bad_texts: list[str] = field(default_factory=list)
    # Per-row rejects: ordinal among valid rows, reason code, raw id, raw value.
    rej_ordinal: list[np.ndarray] = field(default_factory=list)
    rej_code: list[np.ndarray] = field(default_factory=list)
    rej_id: list[pa.Array] = field(default_factory=list)
    rej_value: list[pa.Array] = field(default_factory=list)
    # Rows that passed, in file order.
    kept_ordinal: list[np.ndarray] = field(default_factory=list)
    kept_id: list[np.ndarray] = field(default_factory=list)
    kept_raw_id: list[pa.Array] = field(default_factory=list)


def _stage_schema() -> pa.Schema:
    """Schema of the staging file: the typed 32 columns plus the valid-row ordinal."""
    typed = list(MANIFEST_SCHEMA)[: len(OSV5M_COLUMNS)]
    return pa.schema([pa.field(_STAGE_ORDINAL, pa.int64()), *typed])


def _open_csv(csv_path: Path, on_invalid: Any) -> pcsv.CSVStreamingReader:
    """Open a release CSV as a stream of all-string batches and check its header."""
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"{csv_path} not found; point root at the OSV-5M release folder "
            "(the one holding train.csv, test.csv and images/)"
        )
    try:
        reader = pcsv.open_csv(
            csv_path,
            # use_threads=False: with threads the invalid-row handler gets number=None.
            read_options=pcsv.ReadOptions(
                block_size=CSV_BLOCK_BYTES, encoding="utf8", use_threads=False
            ),
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in OSV5M_COLUMNS},
                # Keep "NA" (Namibia) and empty fields as strings, never nulls.
                null_values=[],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise OSV5MFormatError(
            f"{csv_path}: cannot read as CSV ({exc}); expected the release's UTF-8 CSV "
            "with a header line"
        ) from exc
    check_header(reader.schema.names, csv_path)
    return reader


def _truncate_array(values: pa.Array, max_chars: int = MAX_VALUE_CHARS) -> pa.Array:
    """Vectorised `_truncate` over a string array."""
    cut = pc.binary_join_element_wise(pc.utf8_slice_codeunits(values, 0, max_chars - 3), "...", "")
    return pc.if_else(pc.greater(pc.utf8_length(values), max_chars), cut, values)


def _offending_values(batch: pa.RecordBatch, code: np.ndarray, idx: np.ndarray) -> pa.Array:
    """Raw value of the field each rejected row failed on (rows `idx`, reason `code`)."""
    lat_codes = [REASON_CODE["latitude_not_numeric"], REASON_CODE["latitude_out_of_range"]]
    lon_codes = [REASON_CODE["longitude_not_numeric"], REASON_CODE["longitude_out_of_range"]]
    on_lat, on_lon = pa.array(np.isin(code, lat_codes)), pa.array(np.isin(code, lon_codes))
    values = pc.if_else(
        on_lat,
        batch.column("latitude").take(idx),
        pc.if_else(on_lon, batch.column("longitude").take(idx), batch.column("id").take(idx)),
    )
    return _truncate_array(values)


def _scan_split(split: str, csv_path: Path, stage_path: Path) -> _Scan:
    """Stream one CSV: per-row checks, passing rows to `stage_path`, rejects recorded."""
    scan = _Scan(split=split, csv_path=csv_path, stage_path=stage_path)

    def on_invalid(row: Any) -> str:
        # row.number counts CSV records (header = 1, blank lines skipped); it becomes a
        # physical line number in `physical_lines`. None would mean "unknown" (not seen
        # with the serial streaming reader); -1 keeps it out of the line arithmetic.
        scan.bad_records.append(row.number if row.number is not None else -1)
        scan.bad_texts.append(_truncate(row.text))
        return "skip"

    reader = _open_csv(csv_path, on_invalid)
    schema = _stage_schema()
    with pq.ParquetWriter(stage_path, schema, compression="zstd") as writer:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                raise OSV5MFormatError(
                    f"{csv_path}: cannot parse after {scan.n_valid} valid rows ({exc}); "
                    "check the file's encoding (UTF-8) and that it is not cut short"
                ) from exc
            n = batch.num_rows
            ordinal = np.arange(scan.n_valid, scan.n_valid + n, dtype=np.int64)
            scan.n_valid += n
            id_raw = batch.column("id")
            parsed = row_reasons(id_raw, batch.column("latitude"), batch.column("longitude"))
            code = parsed["code"]
            bad = code != 0
            if bad.any():
                idx = np.flatnonzero(bad)
                scan.rej_ordinal.append(ordinal[idx])
                scan.rej_code.append(code[idx])
                scan.rej_id.append(id_raw.take(idx))
                scan.rej_value.append(_offending_values(batch, code[idx], idx))
            good = np.flatnonzero(~bad)
            columns = {name: batch.column(name).take(good) for name in OSV5M_COLUMNS}
            columns["id"] = pa.array(parsed["id"][good], pa.int64())
            columns["latitude"] = pa.array(parsed["latitude"][good], pa.float64())
            columns["longitude"] = pa.array(parsed["longitude"][good], pa.float64())
            columns = {_STAGE_ORDINAL: pa.array(ordinal[good], pa.int64()), **columns}
            writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=schema))
            scan.kept_ordinal.append(ordinal[good])
            scan.kept_id.append(parsed["id"][good])
            scan.kept_raw_id.append(id_raw.take(good))
    return scan


# --------------------------------------------------------------------------- images


@dataclass
class _ImageIndex:
    """Images of one split keyed by int64 id (first occurrence per id)."""

    ids: pd.Index
    container: np.ndarray
    member: np.ndarray
    n_listed: int
    duplicates: pd.DataFrame


def _image_examples(images: pd.DataFrame) -> list[str]:
    """Up to MAX_EXAMPLES 'id in container:member' strings from an image listing."""
    return [f"{r.id} in {r.container}:{r.member}" for r in images.head(MAX_EXAMPLES).itertuples()]


def _index_split_images(root: Path, split: str) -> _ImageIndex:
    """List root/images/{split}, keep the first image per numeric id."""
    listing = list_images(root / "images" / split, relative_to=root)
    numeric = listing["id"].str.fullmatch(ID_REGEX[1:-1]).to_numpy(dtype=bool)
    listing = listing.loc[numeric].assign(key=listing.loc[numeric, "id"].astype("int64"))
    # Dedupe on the int value so "0123.jpg" and "123.jpg" count as the same id.
    kept, dups = split_duplicate_ids(listing.assign(id=listing["key"]))
    if len(dups):
        log.warning(
            "images/%s: %d duplicate image ids ignored (first occurrence kept), e.g. %s",
            split, len(dups),
            "; ".join(_image_examples(dups)),
        )
    return _ImageIndex(
        ids=pd.Index(kept["key"].to_numpy(dtype=np.int64)),
        container=kept["container"].to_numpy(dtype=object),
        member=kept["member"].to_numpy(dtype=object),
        n_listed=len(listing),
        duplicates=dups,
    )


def _decode_failures(
    store: ImageStore, containers: np.ndarray, members: np.ndarray, workers: int
) -> list[str | None]:
    """Decode each image fully; None where it decodes, else the error message."""

    def check(pair: tuple[str, str]) -> str | None:
        try:
            store.open(*pair)
        except Exception as exc:  # any failure to decode is a quarantine reason
            cause = exc.__cause__ or exc  # ImageStore wraps PIL's error; report PIL's
            return f"{pair[0]}:{pair[1]}: {type(cause).__name__}: {cause}"
        return None

    # PIL releases the GIL while decoding, so threads scale with cores.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(check, zip(containers, members), chunksize=64))


# --------------------------------------------------------------------------- assembling


def _example(file: str, line: int | None, fieldname: str, reason: str, value: str) -> str:
    """One human line: `train.csv line 17, field latitude: latitude_out_of_range ('123.4')`."""
    where = f"{file} line {line if line is not None else '?'}"
    where += f", field {fieldname}" if fieldname else ""
    return f"{where}: {reason} ({value!r})"


def _quarantine_table(
    split: str,
    file: str,
    lines: np.ndarray,
    ids: pa.Array,
    reason_index: np.ndarray,
    values: pa.Array,
) -> pa.Table:
    """Quarantine rows (aligned arrays; reason_index into REASONS) in QUARANTINE_SCHEMA."""
    n = len(lines)
    reason_names = np.asarray(REASONS, dtype=object)[np.asarray(reason_index, dtype=np.int64)]
    fields = np.asarray([REASON_FIELD[r] for r in reason_names], dtype=object)
    lines = np.asarray(lines, dtype=np.int64)
    line_arr = pa.array(lines, pa.int64(), mask=lines < 0)  # -1 = line unknown -> null
    return pa.table(
        {
            "split": pa.array([split] * n, pa.string()),
            "file": pa.array([file] * n, pa.string()),
            "line": line_arr,
            "id": pa.array(ids, pa.string()),
            "field": pa.array(fields, pa.string()),
            "reason": pa.array(reason_names, pa.string()),
            "value": pa.array(values, pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )


def _concat_arrays(parts: list[pa.Array], typ: pa.DataType) -> pa.Array:
    """Concatenate arrow arrays (or chunked arrays) into one array of `typ`."""
    chunks: list[pa.Array] = []
    for p in parts:
        chunks.extend(p.chunks if isinstance(p, pa.ChunkedArray) else [p])
    return pa.concat_arrays(chunks) if chunks else pa.array([], typ)


def _concat_np(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    """np.concatenate that returns an empty `dtype` array for no parts."""
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _write_manifest(
    scan: _Scan,
    path: Path,
    drop: np.ndarray,
    lines: np.ndarray,
    container: np.ndarray,
    member: np.ndarray,
) -> None:
    """Second pass: copy staged rows not in `drop` (by ordinal) to the manifest, atomically.

    `drop`, `lines`, `container`, `member` are indexed by valid-row ordinal.
    """
    with atomic_write_path(path) as tmp:
        with pq.ParquetWriter(tmp, MANIFEST_SCHEMA, compression="zstd") as writer:
            for batch in pq.ParquetFile(scan.stage_path).iter_batches(batch_size=1 << 16):
                ordinal = batch.column(_STAGE_ORDINAL).to_numpy()
                keep = np.flatnonzero(~drop[ordinal])
                ordinal = ordinal[keep]
                cols = {name: batch.column(name).take(keep) for name in OSV5M_COLUMNS}
                cols["split"] = pa.array([scan.split] * len(keep), pa.string())
                cols["line"] = pa.array(lines[ordinal], pa.int64())
                cols["image_container"] = pa.array(container[ordinal], pa.string())
                cols["image_member"] = pa.array(member[ordinal], pa.string())
                writer.write_batch(pa.RecordBatch.from_pydict(cols, schema=MANIFEST_SCHEMA))


def _summarise(report: SplitReport, table: pa.Table) -> None:
    """Fill per-reason counts and up to MAX_EXAMPLES example lines from quarantine rows."""
    frame = table.to_pandas()
    for reason in REASONS:
        rows = frame.loc[frame["reason"] == reason].sort_values("line", kind="stable")
        if not len(rows):
            continue
        report.reasons[reason] = int(len(rows))
        report.examples[reason] = [
            _example(r.file, None if pd.isna(r.line) else int(r.line), r.field, r.reason, r.value)
            for r in rows.head(MAX_EXAMPLES).itertuples()
        ]


# --------------------------------------------------------------------------- entry point


@dataclass
class _Judged:
    """One split after all checks: which valid rows to drop, and what the manifest adds.

    drop, lines, container, member are indexed by valid-row ordinal.
    """

    scan: _Scan
    report: SplitReport
    quarantine: pa.Table
    drop: np.ndarray
    lines: np.ndarray
    container: np.ndarray
    member: np.ndarray


def _late_checks(
    scan: _Scan,
    is_dup: np.ndarray,
    root: Path,
    verify_images: VerifyImages,
    store: ImageStore,
    workers: int,
    split_report: SplitReport,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Duplicate and image checks on the rows that passed the per-row checks.

    Returns (code, value) per kept row (0 = ok, else REASON_CODE) and (container,
    member) per valid-row ordinal (None where no image was looked up or found).
    """
    kept_ord = _concat_np(scan.kept_ordinal, np.int64)
    code = np.where(is_dup, REASON_CODE["duplicate_id"], 0).astype(np.int8)
    value = np.asarray(
        _concat_arrays(scan.kept_raw_id, pa.string()).to_numpy(zero_copy_only=False), dtype=object
    ).copy()
    container = np.full(scan.n_valid, None, dtype=object)
    member = np.full(scan.n_valid, None, dtype=object)
    if verify_images == "none":
        return code, value, container, member

    images = _index_split_images(root, scan.split)
    split_report.n_images_indexed = images.n_listed
    split_report.n_duplicate_images = len(images.duplicates)
    split_report.duplicate_image_examples = _image_examples(images.duplicates)
    pos = images.ids.get_indexer(_concat_np(scan.kept_id, np.int64))
    code[(pos < 0) & (code == 0)] = REASON_CODE["image_missing"]
    found = np.flatnonzero(code == 0)
    container[kept_ord[found]] = images.container[pos[found]]
    member[kept_ord[found]] = images.member[pos[found]]
    if verify_images == "decode" and len(found):
        t0 = time.perf_counter()
        at = kept_ord[found]
        errors = _decode_failures(store, container[at], member[at], workers)
        dt_s = time.perf_counter() - t0
        log.info("%s: decoded %d images in %.1f s", scan.split, len(found), dt_s)
        failed = np.asarray([e is not None for e in errors], dtype=bool)
        code[found[failed]] = REASON_CODE["image_corrupt"]
        value[found[failed]] = [_truncate(e) for e in errors if e is not None]
        container[kept_ord[found[failed]]] = None
        member[kept_ord[found[failed]]] = None
    return code, value, container, member


def _row_lines(scan: _Scan, split_report: SplitReport) -> tuple[np.ndarray, np.ndarray]:
    """Physical lines of (valid rows by ordinal, malformed rows in handler order); -1 = unknown."""
    bad_rec = np.asarray(scan.bad_records, dtype=np.int64)
    known = bad_rec > 0
    valid_rec = record_numbers(scan.n_valid, bad_rec[known])
    all_rec = np.concatenate([valid_rec, np.where(known, bad_rec, 1)])
    n_records = 1 + scan.n_valid + len(bad_rec)
    lines, split_report.line_numbers = physical_lines(scan.csv_path, all_rec, n_records)
    return lines[: scan.n_valid], np.where(known, lines[scan.n_valid :], -1)


def _judge_split(
    scan: _Scan,
    is_dup: np.ndarray,
    root: Path,
    verify_images: VerifyImages,
    store: ImageStore,
    workers: int,
) -> _Judged:
    """Run the late checks, assign lines, and build the split's quarantine and counts."""
    split_report = SplitReport(split=scan.split, csv_path=str(scan.csv_path))
    late_code, late_value, container, member = _late_checks(
        scan, is_dup, root, verify_images, store, workers, split_report
    )
    lines, bad_lines = _row_lines(scan, split_report)
    kept_ord = _concat_np(scan.kept_ordinal, np.int64)
    rej_ord = _concat_np(scan.rej_ordinal, np.int64)
    late_bad = np.flatnonzero(late_code != 0)
    drop = np.zeros(scan.n_valid, dtype=bool)
    drop[rej_ord] = True
    drop[kept_ord[late_bad]] = True

    file = scan.csv_path.name
    n_bad = len(scan.bad_texts)
    table = pa.concat_tables(
        [
            _quarantine_table(  # malformed rows: raw id = text up to the first comma
                scan.split, file, bad_lines,
                pa.array([t.split(",", 1)[0] for t in scan.bad_texts], pa.string()),
                np.zeros(n_bad, dtype=np.int64), pa.array(scan.bad_texts, pa.string()),
            ),
            _quarantine_table(
                scan.split, file, lines[rej_ord], _concat_arrays(scan.rej_id, pa.string()),
                _concat_np(scan.rej_code, np.int64) - 1,
                _concat_arrays(scan.rej_value, pa.string()),
            ),
            _quarantine_table(
                scan.split, file, lines[kept_ord[late_bad]],
                _concat_arrays(scan.kept_raw_id, pa.string()).take(late_bad),
                late_code[late_bad].astype(np.int64) - 1,
                pa.array(late_value[late_bad].tolist(), pa.string()),
            ),
        ]
    )
    table = table.take(pc.sort_indices(table, [("line", "ascending")]))
    _summarise(split_report, table)
    split_report.n_in = scan.n_valid + n_bad
    split_report.n_quarantined = table.num_rows
    split_report.n_kept = split_report.n_in - table.num_rows
    split_report.bad_fraction = table.num_rows / max(split_report.n_in, 1)
    return _Judged(scan, split_report, table, drop, lines, container, member)


def _check_args(verify_images: str, max_bad_fraction: float, splits: tuple[str, ...]) -> None:
    """Raise ValueError for arguments out of their domain."""
    if verify_images not in ("none", "exists", "decode"):
        raise ValueError(f"verify_images={verify_images!r}; use 'none', 'exists' or 'decode'")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction={max_bad_fraction}; use a fraction in [0, 1]")
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits={splits!r}; give each split name once")


def _check_image_folders(root: Path, splits: tuple[str, ...]) -> None:
    """Fail early on a missing images/{split} folder, before streaming gigabytes of CSV."""
    for split in splits:
        if not (root / "images" / split).is_dir():
            raise FileNotFoundError(
                f"{root / 'images' / split} not found; expected the release's "
                f"images/{split}/NN.zip (or unzipped folders), or pass verify_images='none'"
            )


def _too_bad_message(report: IngestReport) -> str | None:
    """The IngestError message when some split exceeds max_bad_fraction, else None."""
    too_bad = [s for s in report.splits.values() if s.bad_fraction > report.max_bad_fraction]
    if not too_bad:
        return None
    return "; ".join(
        f"{s.split}: {s.n_quarantined} of {s.n_in} rows quarantined "
        f"({s.bad_fraction:.2%} > max_bad_fraction {report.max_bad_fraction:.2%}), "
        f"reasons {s.reasons}"
        for s in too_bad
    ) + f". See {report.quarantine_path}."


def ingest_osv5m(
    root: Path,
    out_dir: Path,
    splits: tuple[str, ...] = ("train", "test"),
    verify_images: VerifyImages = "decode",
    max_bad_fraction: float = 0.05,
    *,
    decode_workers: int | None = None,
) -> IngestReport:
    """Read `root/{split}.csv` for each split, validate, and write manifests + quarantine.

    verify_images: "none" skips images entirely (image_* columns null, no images/
    folder needed); "exists" quarantines rows without `<id>.jpg` under
    root/images/{split} (zips or folders, any depth); "decode" also decodes each image
    fully (threads: `decode_workers`, default the CPU count) and quarantines failures.

    Duplicate ids: within and across splits, the first occurrence in `splits` order,
    then file order, is kept. Duplicates are looked for among rows that passed the
    id/latitude/longitude checks, so a malformed first row does not hide a good second;
    image checks run after, so a kept first occurrence with a missing image still
    makes later copies duplicates.

    Raises OSV5MFormatError (bad header / unreadable CSV), FileNotFoundError (missing
    CSV or image folder), IngestError when a split's quarantined fraction exceeds
    `max_bad_fraction`: then quarantine.parquet and ingest_report.json (ok = false) are
    written, but no manifest (and stale manifests of these splits are removed).
    """
    t0 = time.perf_counter()
    root, out_dir, splits = Path(root), Path(out_dir), tuple(splits)
    _check_args(verify_images, max_bad_fraction, splits)
    if verify_images != "none":
        _check_image_folders(root, splits)
    manifest_dir = out_dir / "manifest"
    manifest_dir.mkdir(parents=True, exist_ok=True)
    report = IngestReport(
        root=str(root), out_dir=str(out_dir), verify_images=verify_images,
        max_bad_fraction=max_bad_fraction,
        quarantine_path=str(out_dir / "quarantine.parquet"),
        report_path=str(out_dir / "ingest_report.json"),
    )
    store = ImageStore(root)
    stages: list[Path] = []
    try:
        scans: list[_Scan] = []
        for split in splits:
            t_split = time.perf_counter()
            stages.append(_scratch_path(manifest_dir / f"{split}.stage.parquet"))
            scans.append(_scan_split(split, root / f"{split}.csv", stages[-1]))
            n_read = scans[-1].n_valid + len(scans[-1].bad_records)
            log.info("%s.csv: read %d rows in %.1f s", split, n_read, time.perf_counter() - t_split)

        # Duplicate ids over all splits at once: first in (split order, file order) wins.
        kept_ids = [_concat_np(s.kept_id, np.int64) for s in scans]
        is_dup = pd.Series(_concat_np(kept_ids, np.int64)).duplicated(keep="first").to_numpy()
        offsets = np.cumsum([0] + [len(k) for k in kept_ids])
        workers = decode_workers or os.cpu_count() or 1
        judged = [
            _judge_split(scan, is_dup[lo:hi], root, verify_images, store, workers)
            for scan, lo, hi in zip(scans, offsets[:-1], offsets[1:], strict=True)
        ]
        report.splits = {j.scan.split: j.report for j in judged}
        write_parquet_atomic(
            pa.concat_tables([j.quarantine for j in judged]), Path(report.quarantine_path)
        )
        _log_summary(report)

        report.error = _too_bad_message(report)
        if report.error is not None:
            report.ok = False
            for split in splits:  # never leave a stale manifest next to a failed report
                (manifest_dir / f"{split}.parquet").unlink(missing_ok=True)
        else:
            for j in judged:
                path = manifest_dir / f"{j.scan.split}.parquet"
                _write_manifest(j.scan, path, j.drop, j.lines, j.container, j.member)
                j.report.manifest_path = str(path)
        report.elapsed_s = time.perf_counter() - t0
        write_text_atomic(report.to_json(), Path(report.report_path))
        if report.error is not None:
            raise IngestError(report.error)
        log.info("ingest done in %.1f s; report %s", report.elapsed_s, report.report_path)
        return report
    finally:
        store.close()
        for stage in stages:
            stage.unlink(missing_ok=True)


def _log_summary(report: IngestReport) -> None:
    """Log counts per split and each reason with its count and examples."""
    for s in report.splits.values():
        log.info(
            "%s: %d rows in, %d kept, %d quarantined (%.2f%%)",
            s.split, s.n_in, s.n_kept, s.n_quarantined, 100 * s.bad_fraction,
        )
        for reason, count in s.reasons.items():
            log.warning(
                "%s: %d rows quarantined as %s, e.g.\n  %s",
                s.split, count, reason, "\n  ".join(s.examples[reason]),
            )
