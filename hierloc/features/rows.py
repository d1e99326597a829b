"""The features of an ordered id list, left on disk: ``FeatureRows``, a lazy (n, D) matrix.

A FeatureRows holds, per row, which shard of a cache (hierloc.features.cache) and which row of
that shard: two int32 arrays, 8 bytes a row, whatever D. The shards' ``feats`` arrays are
memory-mapped (hierloc.features.npz_map) on first use; a gather reads only the rows it asks for
and converts them to float32 (shards may store float16). ``open_features``
(hierloc.features.views) builds one from a cache or a view; ``feature_chunks`` walks either a
FeatureRows or an in-memory array block by block, so a streaming statistic takes both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from hierloc.features.npz_map import map_npz_member

#: Shard arrays kept mapped at once (each mapping holds a file descriptor); older ones are closed.
MAX_OPEN_SHARDS = 256
#: Bytes of mapped pages a process may have touched before every map is closed: the pages a
#: gather reads count in its RSS until unmapped (they stay in the OS page cache, so a later
#: gather maps them again without reading the disk). Without this an epoch of random batches
#: would leave the whole features file resident (7.5 GB at OSV-5M, 4.9M x 768 float16).
MAX_RESIDENT_BYTES = 256 << 20
#: What one row read can map in: the kernel's fault-around maps up to 16 pages (64 KiB) of the
#: page cache around a faulting page, so a random row costs up to 64 KiB of RSS, not one page.
TOUCH_BYTES = 64 << 10
#: Rows per block of ``chunks`` / ``feature_chunks`` (65,536 x 768 float32: 200 MB).
CHUNK_ROWS = 65_536
#: Rows per block of ``finite_mask`` (16,384 x 768 float32: 50 MB).
SCAN_ROWS = 16_384


class ShardMaps:
    """The ``feats`` arrays of a cache's shards, mapped when first touched (an LRU of MAX_OPEN_SHARDS);
    all closed once about ``max_resident`` bytes of their pages have been read (``account``)."""

    def __init__(self, paths: Sequence[Path], dim: int, max_open: int = MAX_OPEN_SHARDS,
                 max_resident: int = MAX_RESIDENT_BYTES) -> None:
        self.paths, self.dim, self.max_open = [Path(p) for p in paths], int(dim), max(1, max_open)
        self.max_resident, self._touched = max_resident, 0
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def account(self, n_rows: int, row_bytes: int, span_rows: int | None = None) -> None:
        """Count ``n_rows`` rows read, lying within ``span_rows`` consecutive rows of a shard
        (each maps up to TOUCH_BYTES in; a run of consecutive rows maps its own bytes); past
        ``max_resident`` close every map, which returns their pages from this process's RSS to
        the page cache."""
        span = n_rows if span_rows is None else span_rows
        self._touched += min(n_rows * max(row_bytes, TOUCH_BYTES), span * row_bytes + TOUCH_BYTES)
        if self._touched > self.max_resident:
            self._open.clear()
            self._touched = 0

    def get(self, shard: int) -> np.ndarray:
        """(rows, D) features of shard ``shard`` (a memmap, or the array read whole when it cannot be mapped)."""
        arr = self._open.get(shard)
        if arr is not None:
            self._open.move_to_end(shard)
            return arr
        arr = map_npz_member(self.paths[shard], "feats")
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{self.paths[shard]}: feats {arr.shape}, the cache's other shards have D={self.dim}; "
                             "the shard changed since the cache was scanned: run the features stage again")
        self._open[shard] = arr
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)  # the memmap's file closes when its last reference goes
        return arr


class FeatureRows:
    """A lazy (n, D) float32 matrix: row i is row ``row[i]`` of shard ``shard[i]`` of ``maps``.

    ``take`` gathers rows (one fancy index per touched shard), ``subset`` selects rows without
    reading features, ``chunks`` yields float32 blocks in order, ``finite_mask`` streams the
    NaN/inf check; ``rows[key]`` reads the rows a slice, mask or index list picks.
    ``np.asarray(rows)`` reads everything: only for small matrices.
    """

    def __init__(self, maps: ShardMaps, shard: np.ndarray, row: np.ndarray) -> None:
        self.maps = maps
        self.shard = np.asarray(shard, np.int32)
        self.row = np.asarray(row, np.int32)
        if self.shard.shape != self.row.shape or self.shard.ndim != 1:
            raise ValueError(f"shard {self.shard.shape} and row {self.row.shape} must be equal (n,) arrays")

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def dim(self) -> int:
        return self.maps.dim

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    dtype = np.dtype(np.float32)
    ndim = 2

    def take(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Rows ``rows`` (b,) of this matrix, in that order: float32 (b, D)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        shard, row = self.shard[rows], self.row[rows]
        out = np.empty((len(rows), self.dim), np.float32)
        if not len(rows):
            return out
        order = np.argsort(shard, kind="stable")
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        for sel in np.split(order, bounds):
            part = self.maps.get(int(shard[sel[0]]))
            picked = row[sel]
            out[sel] = part[picked]  # float16 shards widen here
            self.maps.account(len(sel), self.dim * part.itemsize, int(picked.max()) - int(picked.min()) + 1)
        return out

    def subset(self, which: np.ndarray | Sequence[int]) -> FeatureRows:
        """The rows picked by a boolean mask (n,) or by row numbers, as a FeatureRows (no feature read)."""
        which = np.asarray(which)
        if which.dtype == bool and which.shape != (len(self),):
            raise ValueError(f"a mask of {which.shape} for {len(self)} rows")
        return FeatureRows(self.maps, self.shard[which], self.row[which])

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """float32 blocks of at most ``size`` rows, in row order."""
        for start in range(0, len(self), size):
            yield self.take(np.arange(start, min(start + size, len(self))))

    def finite_mask(self, size: int = SCAN_ROWS) -> np.ndarray:
        """(n,) bool: the row holds no NaN or inf (a failed image's row is NaN), read block by block."""
        out = np.ones(len(self), bool)
        for i, block in enumerate(self.chunks(size)):
            out[i * size : i * size + len(block)] = np.isfinite(block).all(axis=1)
        return out

    def __getitem__(self, key) -> np.ndarray:
        """Rows read as an array: ``rows[i]`` (D,), ``rows[a:b]``, ``rows[mask]``, ``rows[[i, j]]`` (b, D) float32."""
        picked = np.arange(len(self))[key]
        return self.take(picked) if picked.ndim else self.take([picked])[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.take(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"FeatureRows(n={len(self)}, dim={self.dim}, shards={len(np.unique(self.shard))})"


def feature_chunks(features, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """float32 blocks of at most ``size`` rows of a FeatureRows or an in-memory (N, D) array."""
    if hasattr(features, "chunks"):
        yield from features.chunks(size)
        return
    for start in range(0, len(features), size):
        yield np.asarray(features[start : start + size], np.float32)
