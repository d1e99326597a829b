"""One split's pass of an ingest run: what it produced, before anything is published.

`geodata.ingest.plan` plans a run and `geodata.ingest.commit` commits it; in between, each
split is read by `geodata.ingest.split_csv` (the CSV bytes appended since the last run) or
`geodata.ingest.split_wds` (new WebDataset tar shards), into:

- a `PartWriter`: the split's new manifest rows of this run in a temp Parquet file, moved
  into place only at commit;
- a `SplitRun`: everything else the split produced (quarantine and pending tables, CSV
  state, shard fingerprints, image listings, counts in its `SplitReport`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geodata.ingest.csv_read import apply_line_map
from geodata.ingest.incremental import CsvState, PartState, file_sha256
from geodata.ingest.report import SplitReport
from geodata.ingest.validate import MANIFEST_SCHEMA

__all__ = ["PartWriter", "SplitRun"]


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
    # the split's pending rows after this run (MANIFEST_SCHEMA): earlier ones still missing their
    # image, then this run's; what the next run re-checks (WebDataset: none)
    pending_total: pa.Table = field(default_factory=MANIFEST_SCHEMA.empty_table)
    listings: list[pa.Table] = field(default_factory=list)  # WebDataset: this run's image listings (LISTING_SCHEMA)
