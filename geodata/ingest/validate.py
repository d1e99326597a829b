"""Judge batches of raw OSV-5M rows: typed columns for the kept rows, reasons for the rest.

Both ingest paths (CSV and WebDataset) hand batches of the 32 release columns as raw
strings to `judge_batch`, which runs the checks in `geodata.ingest.quarantine.REASONS` order:

1. checks of the source (column count, sample metadata), passed in as `pre_code`;
2. per-row checks on id, latitude, longitude (`row_reasons`, vectorised);
3. duplicate ids against every id seen so far (`IdSet`, numpy only);
4. image checks: looked up, refused (links/devices in archives), decoded;
5. later source checks (`late_code`, e.g. WebDataset features).

Rows that pass get the canonical manifest schema (`MANIFEST_SCHEMA`); the others become
quarantine rows (split, file, line, id, field, reason, value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geodata.ingest.quarantine import REASON_CODE, first_reason, quarantine_table
from geodata.osv5m import OSV5M_COLUMNS

#: Manifest schema: the 32 release columns typed, then the ingest columns.
#: image_offset is the byte offset of the image data in a tar shard (null for zips and
#: folders); image_size its size in bytes. Both null when images were not looked up.
MANIFEST_SCHEMA = pa.schema(
    [
        (
            name,
            pa.int64() if name == "id" else pa.float64() if name in ("latitude", "longitude") else pa.string(),
        )
        for name in OSV5M_COLUMNS
    ]
    + [
        ("split", pa.string()),
        ("line", pa.int64()),
        ("image_container", pa.string()),
        ("image_member", pa.string()),
        ("image_offset", pa.int64()),
        ("image_size", pa.int64()),
    ]
)

#: Columns of an image reference table (one row per input row; container null = no image).
IMAGE_REF_SCHEMA = pa.schema(
    [
        ("container", pa.string()),
        ("member", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("refused", pa.string()),  # why an archive member was refused (link, device); null = fine
    ]
)

# Ids are Mapillary ids (up to 16 digits): digits only, at most 18 so that every match
# fits int64 and is parsed exactly (never through float).
ID_REGEX = r"^[0-9]{1,18}$"
# Plain decimal or scientific notation; rejects "", "nan", "inf", " 1", "0x1".
FLOAT_REGEX = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
LAT_RANGE_DEG = (-90.0, 90.0)
LON_RANGE_DEG = (-180.0, 180.0)

#: Looks images up for parsed ids: (n,) int64 -> IMAGE_REF_SCHEMA table of n rows.
ImageLookup = Callable[[np.ndarray], pa.Table]
#: Decodes images: (rows of the batch, their refs) -> error message per row (None = decodes).
ImageChecker = Callable[[np.ndarray, pa.Table], list[str | None]]


def _to_bool(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow boolean (no nulls) to a numpy bool array."""
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def _parse_float(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(is_numeric bool, value float64 with NaN where not numeric) for a string column."""
    ok = pc.match_substring_regex(col, FLOAT_REGEX)
    # Non-matching strings are replaced before the cast, which fails on any bad string.
    values = pc.cast(pc.if_else(ok, col, "nan"), pa.float64())
    return _to_bool(ok), values.to_numpy(zero_copy_only=False)


def row_reasons(id_raw: pa.Array, lat_raw: pa.Array, lon_raw: pa.Array) -> dict[str, np.ndarray]:
    """Per-row checks on raw string columns, vectorised.

    Returns 'code' (int8: 0 = ok, else the REASON_CODE of the first failing check),
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
    names = ["id_not_integer", "latitude_not_numeric", "latitude_out_of_range",
             "longitude_not_numeric", "longitude_out_of_range"]
    code = np.select(conditions, [REASON_CODE[r] for r in names], default=0).astype(np.int8)  # first true wins
    return {"code": code, "id": ids.astype(np.int64), "latitude": lat, "longitude": lon}


class IdSet:
    """A growing set of int64 ids kept as a few sorted numpy arrays (no Python objects).

    Levels are merged like a binary counter, so adding n ids in batches costs
    O(n log n) overall and a lookup costs O(log n) per level (at most ~log2(n) levels).
    """

    def __init__(self, ids: np.ndarray | None = None) -> None:
        self._levels: list[np.ndarray] = []
        if ids is not None and len(ids):
            self._levels.append(np.unique(np.asarray(ids, dtype=np.int64)))

    def __len__(self) -> int:
        return int(sum(len(level) for level in self._levels))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which of `ids` are in the set."""
        ids = np.asarray(ids, dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        for level in self._levels:
            pos = np.minimum(np.searchsorted(level, ids), len(level) - 1)
            found |= level[pos] == ids
        return found

    def add_first(self, ids: np.ndarray) -> np.ndarray:
        """Add `ids` in order; return (n,) bool marking duplicates (seen before, or earlier in `ids`)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros(0, dtype=bool)
        order = np.argsort(ids, kind="stable")  # stable: the first copy comes first
        sorted_ids = ids[order]
        later_copy = np.zeros(len(ids), dtype=bool)
        later_copy[order[1:]] = sorted_ids[1:] == sorted_ids[:-1]
        is_dup = later_copy | self.contains(ids)
        self._push(np.unique(ids[~is_dup]))
        return is_dup

    def snapshot(self) -> list[np.ndarray]:
        """The set as it is now, for `restore` (cheap: levels are never changed in place)."""
        return list(self._levels)

    def restore(self, snapshot: list[np.ndarray]) -> None:
        """Forget every id added since `snapshot` was taken."""
        self._levels = list(snapshot)

    def _push(self, level: np.ndarray) -> None:
        """Add a sorted unique array disjoint from the set; merge levels of similar size."""
        if not len(level):
            return
        self._levels.append(level)
        while len(self._levels) > 1 and len(self._levels[-2]) <= 2 * len(self._levels[-1]):
            top = self._levels.pop()
            below = self._levels.pop()
            self._levels.append(np.sort(np.concatenate([below, top]), kind="stable"))


def empty_refs(n: int) -> pa.Table:
    """An image reference table of n rows with no image."""
    return pa.table({f.name: pa.nulls(n, f.type) for f in IMAGE_REF_SCHEMA}, schema=IMAGE_REF_SCHEMA)


def image_checks(code: np.ndarray, errors: np.ndarray, refs: pa.Table, checker: ImageChecker | None) -> None:
    """Image reasons for the rows still ok (code == 0), in place: missing, unsafe, corrupt.

    code: (n,) int8 reason codes; errors: (n,) object messages (set for unsafe/corrupt);
    refs: (n,) IMAGE_REF_SCHEMA rows; checker decodes the found images (None = existence only).
    """
    missing = refs["container"].is_null().to_numpy(zero_copy_only=False)
    refused = refs["refused"].is_valid().to_numpy(zero_copy_only=False)
    ok = code == 0
    code[ok & refused] = REASON_CODE["image_unsafe"]
    code[ok & missing & ~refused] = REASON_CODE["image_missing"]
    errors[ok & refused] = np.asarray(refs["refused"].to_numpy(zero_copy_only=False), dtype=object)[ok & refused]
    if checker is None:
        return
    to_decode = np.flatnonzero(code == 0)
    if len(to_decode):
        found = np.asarray(checker(to_decode, refs.take(pa.array(to_decode, pa.int64()))), dtype=object)
        bad = np.asarray([e is not None for e in found], dtype=bool)
        code[to_decode[bad]] = REASON_CODE["image_corrupt"]
        errors[to_decode[bad]] = found[bad]


@dataclass
class Judged:
    """One batch after all checks.

    kept: the passing rows in MANIFEST_SCHEMA; kept_rows: their (k,) indices in the batch;
    quarantine: the rejected rows; pending: rows rejected only because their image is
    missing, in MANIFEST_SCHEMA (kept aside so a later run can admit them when the image
    arrives).
    """

    kept: pa.RecordBatch
    kept_rows: np.ndarray
    quarantine: pa.Table
    pending: pa.RecordBatch


def _offending(raw: dict[str, pa.Array], code: np.ndarray, rows: np.ndarray) -> pa.Array:
    """Raw value of the field each rejected row failed on (rows `rows` with reason `code`)."""
    on_lat = pa.array(np.isin(code, [REASON_CODE["latitude_not_numeric"], REASON_CODE["latitude_out_of_range"]]))
    on_lon = pa.array(np.isin(code, [REASON_CODE["longitude_not_numeric"], REASON_CODE["longitude_out_of_range"]]))
    return pc.if_else(
        on_lat,
        raw["latitude"].take(rows),
        pc.if_else(on_lon, raw["longitude"].take(rows), raw["id"].take(rows)),
    )


def _manifest_batch(
    raw: dict[str, pa.Array], parsed: dict[str, np.ndarray], rows: np.ndarray, split: str,
    lines: np.ndarray, refs: pa.Table,
) -> pa.RecordBatch:
    """The rows `rows` of a batch in MANIFEST_SCHEMA (refs: image references of those rows)."""
    take = pa.array(rows, pa.int64())
    cols = {name: raw[name].take(take) for name in OSV5M_COLUMNS}
    cols["id"] = pa.array(parsed["id"][rows], pa.int64())
    cols["latitude"] = pa.array(parsed["latitude"][rows], pa.float64())
    cols["longitude"] = pa.array(parsed["longitude"][rows], pa.float64())
    cols["split"] = pa.array(np.full(len(rows), split, dtype=object), pa.string())
    cols["line"] = pa.array(lines[rows], pa.int64())
    cols["image_container"] = refs["container"].combine_chunks()
    cols["image_member"] = refs["member"].combine_chunks()
    cols["image_offset"] = refs["offset"].combine_chunks()
    cols["image_size"] = refs["size"].combine_chunks()
    return pa.RecordBatch.from_pydict(cols, schema=MANIFEST_SCHEMA)


def judge_batch(
    split: str,
    file: str | pa.Array,
    raw: dict[str, pa.Array],
    lines: np.ndarray,
    seen: IdSet,
    lookup: ImageLookup | None = None,
    checker: ImageChecker | None = None,
    *,
    pre_code: np.ndarray | None = None,
    pre_value: pa.Array | None = None,
    late_code: np.ndarray | None = None,
    late_value: pa.Array | None = None,
) -> Judged:
    """Run every check on one batch of raw rows; see the module docstring for the order.

    raw: the 32 release columns as (n,) string arrays; lines: (n,) int64 line (or sample)
    number of each row; file: the input file name, or a (n,) string array of them.
    lookup: finds images by id (None = images not checked); checker: decodes them (None =
    existence only). pre_code/pre_value, late_code/late_value: (n,) reason codes (0 = ok)
    and offending values found by the source before the row checks and after the image
    checks. `seen` is updated with the ids of rows that reach the duplicate check.
    """
    n = len(lines)
    lines = np.asarray(lines, dtype=np.int64)
    parsed = row_reasons(raw["id"], raw["latitude"], raw["longitude"])
    zeros = np.zeros(n, dtype=np.int8)
    code = first_reason(zeros if pre_code is None else pre_code, parsed["code"])
    value = _offending(raw, code, np.arange(n))
    if pre_code is not None and pre_value is not None:
        from_source = (np.asarray(pre_code) != 0) & (code == np.asarray(pre_code))
        value = pc.if_else(pa.array(from_source), pre_value, value)

    candidates = np.flatnonzero(code == 0)
    dup = seen.add_first(parsed["id"][candidates])
    code[candidates[dup]] = REASON_CODE["duplicate_id"]

    refs = empty_refs(n)
    errors = np.full(n, None, dtype=object)
    if lookup is not None:
        refs = lookup(parsed["id"])
        image_checks(code, errors, refs, checker)
    if late_code is not None:
        late = (code == 0) & (np.asarray(late_code) != 0)
        code[late] = np.asarray(late_code, dtype=np.int8)[late]
        if late_value is not None:
            errors[late] = np.asarray(late_value.to_numpy(zero_copy_only=False), dtype=object)[late]
    has_error = np.asarray([e is not None for e in errors], dtype=bool) & (code != 0)
    value = pc.if_else(pa.array(has_error), pa.array(errors, pa.string()), value)

    kept_rows = np.flatnonzero(code == 0)
    bad_rows = np.flatnonzero(code != 0)
    files = file.take(pa.array(bad_rows, pa.int64())) if isinstance(file, pa.Array) else file
    quarantine = quarantine_table(
        split, files, lines[bad_rows], raw["id"].take(pa.array(bad_rows, pa.int64())), code[bad_rows],
        value.take(pa.array(bad_rows, pa.int64())),
    )
    kept = _manifest_batch(raw, parsed, kept_rows, split, lines, refs.take(pa.array(kept_rows, pa.int64())))
    pending_rows = np.flatnonzero(code == REASON_CODE["image_missing"])
    pending = _manifest_batch(raw, parsed, pending_rows, split, lines, empty_refs(len(pending_rows)))
    return Judged(kept, kept_rows, quarantine, pending)
