"""Atomic file writes for every table and file geodata (and flows) write.

One mechanism: write to a temporary name in the destination's folder, then
``os.replace`` it over the destination (atomic on POSIX within one filesystem); on
any error the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_write_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (its folder created); on success move it over ``path``.

    The caller creates the file, so it gets the usual umask permissions (mkstemp's would be 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_parquet_atomic(table: pa.Table, path: str | Path) -> None:
    """Write ``table`` to ``path`` as zstd Parquet, atomically."""
    with atomic_write_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")

