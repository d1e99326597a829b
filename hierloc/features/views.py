"""Views: what a pipeline stage hands on for one split, and reading features by id through one.

A *view* is a folder holding ``view.json`` (the cache it reads, relative to the view, and the
split's digest) and that split's ``failures.json``. ``resolve_feature_dir``, ``open_features``
(lazy, memory-mapped) and ``load_features`` (in memory) accept a view or a cache folder
(hierloc.features.cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from hierloc.atomic import atomic_write_path
from hierloc.features.cache import CacheIndex, scan_cache, write_failures
from hierloc.features.rows import FeatureRows, ShardMaps

VIEW_FORMAT = 1


def features_digest(spec: str, weights: str, precision: str, ids: np.ndarray) -> str:
    """sha256 hex of the backbone spec, its weights key, the precision and the ids (in order)."""
    h = hashlib.sha256(f"{spec}|{weights}|{precision}|".encode())
    h.update(np.ascontiguousarray(ids, np.int64).tobytes())
    return h.hexdigest()


def write_view(view_dir: Path, cache_dir: Path, ids: np.ndarray, failures: dict[int, str], meta: dict) -> dict:
    """A split's view: view.json (``meta`` + the cache path relative to the view, n, failures:
    how many of ``ids`` failed) and failures.json (those ids' reasons). Returns view.json's content."""
    view_dir = Path(view_dir)
    view_dir.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids, np.int64)
    known = np.fromiter(failures, np.int64, len(failures))
    own = {int(i): failures[int(i)] for i in ids[np.isin(ids, known)]}
    write_failures(view_dir, own)
    rel = os.path.relpath(Path(cache_dir).resolve(), view_dir.resolve())
    doc = {"format": VIEW_FORMAT, "cache": rel, "n": int(len(ids)), "failures": len(own), **meta}
    with atomic_write_path(view_dir / "view.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
    return doc


def resolve_feature_dir(feature_dir: Path) -> Path:
    """The cache a view points at, or ``feature_dir`` itself when it is a cache."""
    feature_dir = Path(feature_dir)
    view = feature_dir / "view.json"
    if view.is_file():
        doc = json.loads(view.read_text())
        if doc.get("format") != VIEW_FORMAT:
            raise ValueError(f"{view}: view format {doc.get('format')}, this hierloc reads {VIEW_FORMAT}")
        return (feature_dir / doc["cache"]).resolve()
    return feature_dir


def open_features(cache_dir: Path, ids: np.ndarray, index: CacheIndex | None = None) -> FeatureRows:
    """Features of ``ids`` in the requested order, left on disk: a lazy (len(ids), D) FeatureRows
    (hierloc.features.rows) over the memory-mapped shards; NaN rows: unreadable images.

    ``cache_dir``: a cache or a view folder. Raises FileNotFoundError when it holds no shards,
    KeyError naming how many ids are missing and one of them.
    """
    cache_dir = resolve_feature_dir(cache_dir)
    index = index or scan_cache(cache_dir)
    ids = np.asarray(ids, np.int64)
    if not index.paths and len(ids):
        raise FileNotFoundError(f"no feature shards in {cache_dir}: run the features stage first")
    pos = index.positions(ids)
    if (pos < 0).any():
        bad = ids[pos < 0]
        raise KeyError(f"{cache_dir}: {len(bad)} of {len(ids)} requested ids have no cached features "
                       f"(e.g. id {int(bad[0])}); run the features stage on the current manifest")
    return FeatureRows(ShardMaps(index.paths, index.dim), index.shard[pos], index.row[pos])


def load_features(cache_dir: Path, ids: np.ndarray, index: CacheIndex | None = None) -> np.ndarray:
    """Features of ``ids`` in the requested order, read into memory: (len(ids), D) float32 (NaN
    rows: unreadable images). For small id lists (predict, tests); a stage opens them lazily
    (``open_features``). Raises as ``open_features``.
    """
    return np.asarray(open_features(cache_dir, ids, index))
