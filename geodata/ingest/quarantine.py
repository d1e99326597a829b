"""Quarantine reasons and the quarantine table: one row per rejected input row.

Every ingest path (CSV or WebDataset) judges rows with the same reasons, in the same
priority order: a row with several problems gets the first reason in `REASONS`.
Reason codes are ``1 + index`` in REASONS (0 = row ok), so "first reason wins" is the
smallest non-zero code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Quarantine reasons, in priority order: a row with several problems gets the first.
REASONS: tuple[str, ...] = (
    "column_count",  # CSV row with a wrong number of fields
    "encoding_invalid",  # CSV line holding bytes that are not UTF-8
    "unclosed_quote",  # CSV line whose '"' swallowed the lines after it (geodata.ingest.csv_lines)
    "metadata_invalid",  # WebDataset sample without a readable JSON object
    "id_not_integer",
    "latitude_not_numeric",
    "latitude_out_of_range",
    "longitude_not_numeric",
    "longitude_out_of_range",
    "duplicate_id",
    "image_missing",
    "image_unsafe",  # archive member is a link/device: refused, never read
    "image_corrupt",
    "feature_invalid",  # WebDataset precomputed feature missing, unreadable or wrong shape
)

#: Reason code: 0 = row ok, else 1 + index in REASONS.
REASON_CODE: dict[str, int] = {r: i + 1 for i, r in enumerate(REASONS)}

#: The input field each reason is about ("" for a malformed row as a whole).
REASON_FIELD: dict[str, str] = {
    "column_count": "",
    "encoding_invalid": "",
    "unclosed_quote": "",
    "metadata_invalid": "json",
    "id_not_integer": "id",
    "latitude_not_numeric": "latitude",
    "latitude_out_of_range": "latitude",
    "longitude_not_numeric": "longitude",
    "longitude_out_of_range": "longitude",
    "duplicate_id": "id",
    "image_missing": "id",
    "image_unsafe": "image",
    "image_corrupt": "image",
    "feature_invalid": "features",
}

#: Reasons decided after the duplicate check: such a row's id still counts as taken, so a
#: later copy of it is a duplicate (the first occurrence wins even when it is rejected later).
AFTER_DUPLICATE_REASONS: tuple[str, ...] = REASONS[REASONS.index("duplicate_id") + 1 :]

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

MAX_VALUE_CHARS = 120
MAX_EXAMPLES = 5


def first_reason(*codes: np.ndarray) -> np.ndarray:
    """Element-wise first (highest-priority) reason code of several (n,) int8 arrays; 0 = ok."""
    out = np.zeros(len(codes[0]), dtype=np.int8)
    for code in codes:
        code = np.asarray(code, dtype=np.int8)
        take = (code != 0) & ((out == 0) | (code < out))
        out[take] = code[take]
    return out


def truncate(value: str, max_chars: int = MAX_VALUE_CHARS) -> str:
    """`value` cut to max_chars, marked with '...' when cut."""
    return value if len(value) <= max_chars else value[: max_chars - 3] + "..."


def truncate_array(values: pa.Array, max_chars: int = MAX_VALUE_CHARS) -> pa.Array:
    """Vectorised `truncate` over a string array."""
    cut = pc.binary_join_element_wise(pc.utf8_slice_codeunits(values, 0, max_chars - 3), "...", "")
    return pc.if_else(pc.greater(pc.utf8_length(values), max_chars), cut, values)


def quarantine_table(
    split: str,
    file: str | pa.Array,
    lines: np.ndarray,
    ids: pa.Array,
    codes: np.ndarray,
    values: pa.Array,
) -> pa.Table:
    """Quarantine rows in QUARANTINE_SCHEMA from aligned arrays.

    lines: (n,) int64, -1 = unknown (stored as null); codes: (n,) reason codes (>= 1);
    file: one name for all rows or a (n,) string array.
    """
    n = len(lines)
    codes = np.asarray(codes, dtype=np.int64)
    if n and (codes.min() < 1 or codes.max() > len(REASONS)):
        raise ValueError(f"reason codes must be in 1..{len(REASONS)}, got {np.unique(codes)}")
    reason_names = np.asarray(REASONS, dtype=object)[codes - 1]
    fields = np.asarray([REASON_FIELD[r] for r in REASONS], dtype=object)[codes - 1]
    lines = np.asarray(lines, dtype=np.int64)
    files = file if isinstance(file, (pa.Array, pa.ChunkedArray)) else pa.array([file] * n, pa.string())
    return pa.table(
        {
            "split": pa.array([split] * n, pa.string()),
            "file": files,
            "line": pa.array(lines, pa.int64(), mask=lines < 0),  # -1 = line unknown -> null
            "id": pa.array(ids, pa.string()),
            "field": pa.array(fields, pa.string()),
            "reason": pa.array(reason_names, pa.string()),
            "value": truncate_array(pa.array(values, pa.string())),
        },
        schema=QUARANTINE_SCHEMA,
    )


def empty_quarantine() -> pa.Table:
    """A quarantine table with no rows."""
    return QUARANTINE_SCHEMA.empty_table()


def example(file: str, line: int | None, fieldname: str, reason: str, value: str) -> str:
    """One human line: `train.csv line 17, field latitude: latitude_out_of_range ('123.4')`."""
    where = f"{file} line {line if line is not None else '?'}"
    where += f", field {fieldname}" if fieldname else ""
    return f"{where}: {reason} ({value!r})"


def summarise(table: pa.Table) -> tuple[dict[str, int], dict[str, list[str]]]:
    """(count per reason, up to MAX_EXAMPLES example lines per reason), reasons in REASONS order."""
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    if table.num_rows == 0:
        return counts, examples
    for reason in REASONS:
        rows = table.filter(pc.equal(table["reason"], reason))
        if not rows.num_rows:
            continue
        counts[reason] = rows.num_rows
        rows = rows.take(pc.sort_indices(rows, [("file", "ascending"), ("line", "ascending")]))
        head = rows.slice(0, MAX_EXAMPLES).to_pylist()
        examples[reason] = [example(r["file"], r["line"], r["field"], r["reason"], r["value"]) for r in head]
    return counts, examples


def sort_quarantine(table: pa.Table) -> pa.Table:
    """One split's rows ordered by (file, line): the order of its input files."""
    if table.num_rows == 0:
        return table
    return table.take(pc.sort_indices(table, [("file", "ascending"), ("line", "ascending")]))


def quarantine_path(out_dir: Path) -> Path:
    """Where the quarantine table of an ingest output folder lives."""
    return Path(out_dir) / "quarantine.parquet"
