"""The per-id feature cache on disk: shards, their index, the failures, the lock.

A *cache* is one folder per (backbone spec, weights key, precision) (hierloc.features.backbones):

    shard-00000.npz ...   ids int64 (n,), feats float16 or float32 (n, D) (the source's dtype:
                          float16 from an fp16 extraction or float16 .npy vectors, else
                          float32; readers always hand out float32, see
                          hierloc.features.rows); for images that could not be
                          read also fail_ids int64 (k,) and fail_reasons str (k,) (their feats
                          rows are NaN). Each shard is written atomically: the cache never
                          holds a half-written one.
    failures.json         {id: reason} of the failed images (a summary of the shards)
    .lock                 held while one process extracts into the cache

The shards are the truth: which ids are cached is read from them (``scan_cache``). When an id
appears in several shards (a failed image retried), the newest shard wins. The WebDataset
ingest writes precomputed features in the same format, one shard per tar shard
(``<ingest>/features/<name>/``); hierloc.features.views.open_features maps both.
Filling a cache: hierloc.features.extract.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from hierloc.atomic import atomic_write_path

log = logging.getLogger(__name__)


def _npz_header(zf: zipfile.ZipFile, key: str) -> tuple[int, ...] | None:
    """Shape of array ``key`` in an open .npz, read from its header only; None if absent."""
    if f"{key}.npy" not in zf.namelist():
        return None
    with zf.open(f"{key}.npy") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(fh)[0]


@dataclass
class CacheIndex:
    """Where every cached id lives: ``ids`` unique (N,) int64 (in shard order), ``shard`` (N,)
    index into ``paths``, ``row`` (N,) row in that shard; ``dim`` (D, 0 when empty);
    ``failures`` {id: reason}."""

    cache_dir: Path
    paths: list[Path]
    ids: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    dim: int
    failures: dict[int, str] = field(default_factory=dict)

    @cached_property
    def _lookup(self) -> pd.Index:
        return pd.Index(self.ids)  # a hash table: millions of random lookups in about a second

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Index into ``self.ids`` of each requested id, -1 where it is not cached."""
        return self._lookup.get_indexer(np.asarray(ids, np.int64))

    def missing(self, ids: np.ndarray) -> np.ndarray:
        """The requested ids (in their order) that are not cached."""
        ids = np.asarray(ids, np.int64)
        return ids[self.positions(ids) < 0]

    def failed(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) bool: the image could not be read (its features are NaN)."""
        known = np.fromiter(self.failures, np.int64, len(self.failures))
        return np.isin(np.asarray(ids, np.int64), known)


def shard_number(path: Path) -> int | None:
    """5 in 'shard-00005.npz'; None for other names (the ingest's 'shard-train-00000.npz')."""
    m = re.fullmatch(r"shard-(\d+)", path.stem)
    return int(m.group(1)) if m else None


def shard_paths(cache_dir: Path) -> list[Path]:
    """The folder's shards in write order: numbered ones by number (past 99999 too), then others by name."""
    def key(p: Path) -> tuple:
        n = shard_number(p)
        return (0, n, "") if n is not None else (1, 0, p.name)

    return sorted(Path(cache_dir).glob("shard-*.npz"), key=key)


def _read_shard_ids(path: Path) -> tuple[np.ndarray, tuple[int, ...] | None, np.ndarray, np.ndarray]:
    """(ids, feats shape, fail_ids, fail_reasons) of one shard; the features are not read."""
    with np.load(path) as z:
        ids = z["ids"] if "ids" in z.files else None
        head = _npz_header(z.zip, "feats")
        fail_ids = z["fail_ids"] if "fail_ids" in z.files else np.zeros(0, np.int64)
        reasons = z["fail_reasons"] if "fail_reasons" in z.files else np.zeros(0, str)
    if ids is None or head is None or ids.ndim != 1 or len(head) != 2 or head[0] != len(ids):
        raise ValueError(f"{path}: a feature shard needs ids (n,) and feats (n, D); got ids "
                         f"{None if ids is None else ids.shape} and feats {head}. "
                         "Delete this shard (it is recomputed) or re-run the ingest that wrote it")
    return ids.astype(np.int64, copy=False), head, fail_ids.astype(np.int64, copy=False), reasons


def scan_cache(cache_dir: Path) -> CacheIndex:
    """Read the ids (and failures) of every shard; the feature arrays are not loaded.

    Raises ValueError naming the shard when its arrays are inconsistent (lengths, D).
    """
    cache_dir = Path(cache_dir)
    paths = shard_paths(cache_dir)
    ids_parts, dim, failures = [], 0, {}
    for path in paths:
        ids, head, fail_ids, reasons = _read_shard_ids(path)
        if dim and head[1] != dim:
            raise ValueError(f"{path}: feats have D={head[1]}, earlier shards D={dim}; one cache holds one "
                             "backbone: delete the foreign shard")
        dim = int(head[1])
        ids_parts.append(ids)
        if failures:  # a later shard's success clears an earlier failure
            known = np.fromiter(failures, np.int64, len(failures))
            for i in known[np.isin(known, ids) & ~np.isin(known, fail_ids)]:
                del failures[int(i)]
        failures.update({int(i): str(r) for i, r in zip(fail_ids, reasons)})
    all_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    shard = np.repeat(np.arange(len(paths), dtype=np.int32), [len(p) for p in ids_parts])
    row = np.concatenate([np.arange(len(p), dtype=np.int32) for p in ids_parts]) if ids_parts else shard.copy()
    lookup = pd.Index(all_ids)
    if not lookup.is_unique:  # an id written twice (a failed image retried): the newest shard wins
        keep = ~lookup.duplicated(keep="last")
        all_ids, shard, row, lookup = all_ids[keep], shard[keep], row[keep], None
    index = CacheIndex(cache_dir, paths, all_ids, shard, row, dim, failures)
    if lookup is not None:
        index.__dict__["_lookup"] = lookup  # built already for the uniqueness check
    return index


def write_failures(cache_dir: Path, failures: dict[int, str]) -> None:
    """``failures.json`` {id: reason} in a cache or a view folder, atomically."""
    with atomic_write_path(Path(cache_dir) / "failures.json") as tmp:
        tmp.write_text(json.dumps({str(k): v for k, v in failures.items()}, indent=1))


def stored_dtype(feats: np.ndarray) -> type:
    """The dtype a shard keeps ``feats`` in: float16 when they are float16, else float32."""
    return np.float16 if feats.dtype == np.float16 else np.float32


def write_shard(path: Path, ids: np.ndarray, feats: np.ndarray, errors: list[str]) -> None:
    """One shard, atomically: ids (n,), feats (n, D) (float16 kept, anything else as float32),
    and fail_ids / fail_reasons of the rows whose error is set. Uncompressed (np.savez), so
    the features can be memory-mapped where they lie (hierloc.features.npz_map)."""
    bad = np.array([bool(e) for e in errors], bool)
    with atomic_write_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: np.savez would append .npz
        np.savez(fh, ids=ids.astype(np.int64), feats=feats.astype(stored_dtype(feats), copy=False),
                 fail_ids=ids[bad].astype(np.int64),
                 fail_reasons=np.asarray([e for e in errors if e], dtype=str))


@contextlib.contextmanager
def cache_lock(cache_dir: Path) -> Iterator[None]:
    """Hold the cache's lock (one extracting process at a time); waits, with a log line, when taken.

    The lock is an flock: the OS releases it when its holder dies, even by SIGKILL.
    """
    import fcntl

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cache_dir) / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another process is extracting into this cache; waiting for it", cache_dir)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
