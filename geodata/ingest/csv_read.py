"""Stream an OSV-5M CSV (whole, or only the bytes appended since the last ingest) with pyarrow.

`CsvStream` yields batches of the 32 release columns as raw strings together with each
row's physical line number, and collects the rows with a wrong field count (pyarrow's
invalid-row handler) with their line numbers. Nothing is held per row beyond one batch
and a few int64 arrays.

Line numbers: pyarrow counts CSV *records* (header = 1, blank lines skipped). In the
common case (one record per line, no blank lines) the physical line is the record number;
`CsvStream.lines_final` checks that with one newline count over the bytes read; otherwise
`CsvStream.line_map` maps
records to lines with a scan that splits records as pyarrow does
(`geodata.ingest.csv_lines.scan_records`), telling the caller to rewrite the lines it already wrote.

`CsvDataError`: pyarrow stopped on the rows (a byte that is not UTF-8, a stray quote that
swallowed more than a block); geodata.ingest.split_csv then reads the range again with the
offending lines set aside (`source`, a geodata.ingest.csv_lines.CleanedReader).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from geodata.ingest.csv_lines import RecordLines, scan_records
from geodata.ingest.quarantine import truncate
from geodata.osv5m import OSV5M_COLUMNS

log = logging.getLogger(__name__)

CSV_BLOCK_BYTES = 16 << 20


class OSV5MFormatError(ValueError):
    """A CSV that is not an OSV-5M table (wrong header, unreadable text)."""


class CsvDataError(OSV5MFormatError):
    """pyarrow could not parse the rows of an OSV-5M CSV (its header was fine)."""


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


def read_header(csv_path: Path, max_bytes: int = 1 << 20) -> list[str]:
    """The column names of a CSV's first line (raises OSV5MFormatError when unreadable).

    Only the first line is read (at most `max_bytes`), so bad rows further down are left
    to the ingest to quarantine.
    """
    with open(csv_path, "rb") as fh:
        first = fh.readline(max_bytes)
    try:
        first.decode("utf-8")
        reader = pcsv.open_csv(pa.BufferReader(first), read_options=pcsv.ReadOptions(use_threads=False))
        return reader.schema.names
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise OSV5MFormatError(
            f"{csv_path}: cannot read as CSV ({exc}); expected the release's UTF-8 CSV with a header line"
        ) from exc


# --------------------------------------------------------------------------- line numbers


def record_numbers(n_valid: int, invalid_records: np.ndarray, first: int = 2) -> np.ndarray:
    """CSV record number of each valid row, given the invalid rows' record numbers.

    Valid rows fill the record numbers first, first + 1, ... (2 when the header is record
    1) that the invalid rows leave free: valid row k lands at
    k + first + (number of invalid records before it).
    """
    return records_of_valid(np.arange(n_valid, dtype=np.int64), invalid_records, first)


def records_of_valid(k: np.ndarray, invalid_records: np.ndarray, first: int = 2) -> np.ndarray:
    """Record numbers of the valid rows with 0-based ordinals `k` (see `record_numbers`).

    Invalid records after a valid row do not change its number, so this may be called
    per batch with the invalid records known so far.
    """
    bad = np.sort(np.asarray(invalid_records, dtype=np.int64))
    valid_before_bad = bad - first - np.arange(len(bad))  # valid rows preceding each bad one
    k = np.asarray(k, dtype=np.int64)
    return k + first + np.searchsorted(valid_before_bad, k, side="right")


def record_start_lines(path: Path, chunk_bytes: int = 1 << 24, start: int = 0, end: int | None = None) -> np.ndarray:
    """Physical line number (1-based, counted from byte `start`) where each non-blank CSV record starts.

    Reads bytes [start, end) of `path`. Quote-aware: a newline ends a record only after
    an even number of '"' (standard CSV escaping keeps the parity right). Blank lines are
    skipped, as pyarrow does. Quirk: a '"' inside an unquoted field would flip the parity;
    the caller checks the record count against pyarrow's and falls back to record numbers.
    """
    size = path.stat().st_size
    end = size if end is None else end
    newlines, terminators, parity = [], [], 0
    firsts: list[np.ndarray] = []
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        while pos < end:
            chunk = np.frombuffer(fh.read(min(chunk_bytes, end - pos)), dtype=np.uint8)
            if not len(chunk):
                break
            quotes = (np.cumsum(chunk == 34, dtype=np.int64) + parity) & 1  # 34 = '"'
            nl = np.flatnonzero(chunk == 10)  # 10 = '\n'
            newlines.append(nl + (pos - start))
            terminators.append(nl[quotes[nl] == 0] + (pos - start))
            parity = int(quotes[-1])
            firsts.append(chunk)
            pos += len(chunk)
    n = end - start
    all_nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    ends = np.concatenate(terminators) if terminators else np.zeros(0, np.int64)
    starts = np.concatenate([[0], ends + 1]).astype(np.int64)
    starts = starts[starts < n]
    data = np.concatenate(firsts) if firsts else np.zeros(0, np.uint8)
    first = data[starts] if n else np.zeros(0, np.uint8)
    second = data[np.minimum(starts + 1, max(n - 1, 0))] if n else first
    blank = (first == 10) | ((first == 13) & (second == 10))  # '\n' or '\r\n'
    starts = starts[~blank]
    return 1 + np.searchsorted(all_nl, starts, side="left")


def count_lines(n_newlines: int, last_byte: bytes) -> int:
    """Physical lines of a byte range holding `n_newlines` '\\n' and ending in `last_byte`."""
    return n_newlines + (1 if last_byte not in (b"", b"\n") else 0)


# --------------------------------------------------------------------------- streaming


@contextlib.contextmanager
def _quiet_undecodable_rows() -> Iterator[None]:
    """Silence pyarrow's 'Exception ignored' report when it cannot decode an invalid row's text
    for our handler (it then stops with ArrowInvalid: a CsvDataError, handled by the caller)."""
    previous = sys.unraisablehook

    def hook(args: Any) -> None:
        if not isinstance(args.exc_value, UnicodeDecodeError):
            previous(args)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@dataclass
class LineMap:
    """How `CsvStream.line_map` says lines must be fixed: record number r -> line base + starts[r - 1]."""

    starts: np.ndarray  # (n_records,) physical line (from the stream start) of each record
    base: int


class CsvStream:
    """One pass over `csv_path` from byte `start_byte` (0: with header; else right after a newline).

    Iterate to get (raw, lines): raw maps the 32 release columns to (n,) string arrays
    (Namibia's "NA" and empty fields stay strings), lines is (n,) int64 physical line
    numbers of the file (header = 1), provisional until `lines_final`. Rows with a wrong field
    count are collected in `bad_lines` / `bad_texts` instead.
    """

    def __init__(self, csv_path: Path, start_byte: int = 0, line_base: int = 0, source: Any = None) -> None:
        self.csv_path = Path(csv_path)
        self.start_byte = int(start_byte)
        self.line_base = int(line_base)  # physical lines before start_byte
        self.source = source  # a file object with the bytes from start_byte (None: read csv_path)
        self.first_record = 2 if self.start_byte == 0 else 1  # the header is record 1
        self.n_valid = 0
        self.bad_records: list[int] = []  # record numbers in the stream; -1 = unknown
        self.bad_texts: list[str] = []
        self.line_kind = "physical"
        self._bad_np = np.zeros(0, np.int64)
        self._max_assigned = 0
        self._out_of_order = False

    def _on_invalid(self, row: Any) -> str:
        # row.number counts CSV records in the stream (blank lines skipped). None would mean
        # "unknown" (not seen with the serial reader); -1 keeps it out of the arithmetic.
        number = row.number if row.number is not None else -1
        if number < 0 or number <= self._max_assigned:
            self._out_of_order = True  # lines already handed out may be wrong: line_map() remaps
        self.bad_records.append(number)
        self.bad_texts.append(truncate(row.text))
        return "skip"

    def _open(self) -> pcsv.CSVStreamingReader | None:
        if not self.csv_path.is_file():
            raise FileNotFoundError(
                f"{self.csv_path} not found; point root at the OSV-5M release folder "
                "(the one holding train.csv, test.csv and images/)"
            )
        source: Any = self.csv_path
        names = None
        if self.start_byte and self.source is None:
            source = pa.OSFile(str(self.csv_path))
            source.seek(self.start_byte)
        if self.start_byte:
            names = list(OSV5M_COLUMNS)  # the header is not in the appended bytes
        if self.source is not None:
            source = self.source
        try:
            reader = pcsv.open_csv(
                source,
                # use_threads=False: with threads the invalid-row handler gets number=None.
                read_options=pcsv.ReadOptions(
                    block_size=CSV_BLOCK_BYTES, encoding="utf8", use_threads=False, column_names=names
                ),
                # The careful pass (source set) has no stray quotes left, so a quoted line break
                # may cross a block boundary safely.
                parse_options=pcsv.ParseOptions(invalid_row_handler=self._on_invalid,
                                                newlines_in_values=self.source is not None),
                convert_options=pcsv.ConvertOptions(
                    column_types={name: pa.string() for name in OSV5M_COLUMNS},
                    # Keep "NA" (Namibia) and empty fields as strings, never nulls.
                    null_values=[],
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid as exc:
            if self.start_byte and "Empty CSV" in str(exc):
                return None  # the appended bytes hold no row (blank lines only)
            if "Empty CSV" in str(exc):
                raise OSV5MFormatError(
                    f"{self.csv_path}: cannot read as CSV ({exc}); expected the release's UTF-8 CSV "
                    "with a header line"
                ) from exc
            raise CsvDataError(f"{self.csv_path}: cannot parse the rows ({exc})") from exc
        check_header(reader.schema.names, self.csv_path)
        return reader

    def __iter__(self) -> Iterator[tuple[dict[str, pa.Array], np.ndarray]]:
        if self.start_byte and self.start_byte >= self.csv_path.stat().st_size:
            return  # nothing appended
        with _quiet_undecodable_rows():
            reader = self._open()
        while reader is not None:
            try:
                with _quiet_undecodable_rows():
                    batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as exc:
                raise CsvDataError(
                    f"{self.csv_path}: cannot parse after {self.n_valid} valid rows ({exc}); "
                    "check the file's encoding (UTF-8) and that it is not cut short"
                ) from exc
            n = batch.num_rows
            if len(self._bad_np) < len(self.bad_records):
                self._bad_np = np.asarray(self.bad_records, dtype=np.int64)
            k = np.arange(self.n_valid, self.n_valid + n, dtype=np.int64)
            records = records_of_valid(k, self._bad_np[self._bad_np > 0], self.first_record)
            self.n_valid += n
            if n:
                self._max_assigned = int(records[-1])
            raw = {name: batch.column(name) for name in OSV5M_COLUMNS}
            yield raw, records + self.line_base

    def bad_lines(self) -> np.ndarray:
        """(n_bad,) int64 line numbers of the rows with a wrong field count (-1 = unknown)."""
        bad = np.asarray(self.bad_records, dtype=np.int64)
        return np.where(bad > 0, bad + self.line_base, -1)

    def n_records(self) -> int:
        """Records read, the header included when the stream has one."""
        return (self.first_record - 1) + self.n_valid + len(self.bad_records)

    def lines_final(self, n_lines: int, n_blank: int) -> bool:
        """Whether the provisional lines are the physical ones: as many records as the
        `n_lines` physical lines of the bytes read, none of them blank (`n_blank`)."""
        return n_lines == self.n_records() and n_blank == 0 and not self._out_of_order

    def line_map(self, records: RecordLines) -> LineMap | None:
        """The LineMap from provisional to physical lines, given the records as scanned.

        When the scan's records do not match pyarrow's, lines stay record numbers,
        line_kind becomes "record" and None is returned.
        """
        if len(records.starts) != self.n_records():
            log.warning(
                "%s: could not map CSV records to physical lines (%d records, %d found by "
                "scanning); 'line' holds record numbers (header = 1) instead",
                self.csv_path, self.n_records(), len(records.starts),
            )
            self.line_kind = "record"
            return None
        return LineMap(starts=records.starts, base=self.line_base)


def apply_line_map(lines: np.ndarray, line_map: LineMap) -> np.ndarray:
    """Provisional lines (base + record number) to physical lines; -1 (unknown) stays -1."""
    lines = np.asarray(lines, dtype=np.int64)
    known = lines > 0
    out = lines.copy()
    out[known] = line_map.base + line_map.starts[lines[known] - line_map.base - 1]
    return out
