"""Frozen backbone features, computed once per image id and cached on disk incrementally.

A *cache* is one folder per (backbone spec, weights key, precision) (hierloc.features.backbones):

    shard-00000.npz ...   ids int64 (n,), feats float32 (n, D); for images that could not be
                          read also fail_ids int64 (k,) and fail_reasons str (k,) (their feats
                          rows are NaN). Each shard is written atomically: the cache never
                          holds a half-written one.
    failures.json         {id: reason} of the failed images (a summary of the shards)
    .lock                 held while one process extracts into the cache

The shards are the truth: which ids are cached is read from them. ``extract_features``
encodes only the ids not cached yet, so a run that adds a few thousand images to millions
encodes those; a killed run (even SIGKILL) loses at most the images since its last shard.
When an id appears in several shards (a failed image retried), the newest shard wins.
The WebDataset ingest writes precomputed features in the same format, one shard per tar
shard (``<ingest>/features/<name>/``); ``load_features`` reads both.

A *view* is what a pipeline stage hands on for one split: a folder holding ``view.json``
(the cache it reads, relative to the view, and the split's digest) and that split's
``failures.json``. ``resolve_feature_dir`` accepts a view or a cache folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from hierloc.atomic import atomic_write_path
from hierloc.features.backbones import Backbone, load_backbone, parse_spec  # noqa: F401  (the last two: re-exported)

log = logging.getLogger(__name__)

#: (container, member) -> RGB image; called with offset=, size= keywords too where the item has them
#: (a tar member's data position, so the reader seeks straight to it): geodata.ingest.images.ImageStore.open.
OpenImage = Callable[..., "PIL.Image.Image"]  # noqa: F821
Progress = Callable[[int, int, float], None]  # (done, total, seconds)

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
VIEW_FORMAT = 1


# --- the cache on disk ----------------------------------------------------------
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


def _shard_number(path: Path) -> int | None:
    """5 in 'shard-00005.npz'; None for other names (the ingest's 'shard-train-00000.npz')."""
    m = re.fullmatch(r"shard-(\d+)", path.stem)
    return int(m.group(1)) if m else None


def shard_paths(cache_dir: Path) -> list[Path]:
    """The folder's shards in write order: numbered ones by number (past 99999 too), then others by name."""
    def key(p: Path) -> tuple:
        n = _shard_number(p)
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


def load_features(cache_dir: Path, ids: np.ndarray, index: CacheIndex | None = None) -> np.ndarray:
    """Features of ``ids`` in the requested order: (len(ids), D) float32 (NaN rows: unreadable images).

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
    out = np.empty((len(ids), index.dim), np.float32)
    shard, row = index.shard[pos], index.row[pos]
    # Read each shard once. Shard numbers as uint16 when they fit: numpy's stable sort is then a radix sort.
    key = shard.astype(np.uint16) if len(index.paths) <= np.iinfo(np.uint16).max else shard
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(shard[order])) + 1
    for sel in np.split(order, bounds) if len(order) else []:
        with np.load(index.paths[shard[sel[0]]]) as z:
            out[sel] = z["feats"][row[sel]]
    return out


def write_failures(cache_dir: Path, failures: dict[int, str]) -> None:
    with atomic_write_path(Path(cache_dir) / "failures.json") as tmp:
        tmp.write_text(json.dumps({str(k): v for k, v in failures.items()}, indent=1))


def _write_shard(path: Path, ids: np.ndarray, feats: np.ndarray, errors: list[str]) -> None:
    """One shard, atomically: ids (n,), feats (n, D), and fail_ids / fail_reasons of the rows whose error is set."""
    bad = np.array([bool(e) for e in errors], bool)
    with atomic_write_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: np.savez would append .npz
        np.savez(fh, ids=ids.astype(np.int64), feats=feats.astype(np.float32), fail_ids=ids[bad].astype(np.int64),
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


# --- extraction -------------------------------------------------------------------
@dataclass
class _Items:
    """Images to encode as compact arrays (no per-item Python objects: forked workers share the
    pages): ids (N,) int64, codes (N,) int32 into ``containers``, members (N,) bytes, offsets and
    sizes (N,) int64 (-1: none)."""

    ids: np.ndarray
    codes: np.ndarray
    containers: list[str]
    members: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray


class _ImageDataset(Dataset):
    """(id, transformed image (C, H, W), error '' or why it could not be read) per item."""

    def __init__(self, items: _Items, open_image: OpenImage, transform: Callable, shape: tuple[int, ...]):
        self.items, self.open_image, self.transform, self.shape = items, open_image, transform, shape

    def __len__(self) -> int:
        return len(self.items.ids)

    def __getitem__(self, i: int):
        it = self.items
        container, member, image_id = it.containers[it.codes[i]], it.members[i].decode(), int(it.ids[i])
        where = {"offset": int(it.offsets[i]), "size": int(it.sizes[i])} if it.offsets[i] >= 0 else {}
        try:
            x = self.transform(self.open_image(container, member, **where))
            if tuple(x.shape) != self.shape:
                raise ValueError(f"transform gave shape {tuple(x.shape)}, expected {self.shape}")
            return image_id, x, ""
        except Exception as exc:  # reported per image, the batch goes on
            return image_id, torch.zeros(self.shape), f"{container}:{member}: {type(exc).__name__}: {exc}"


def _probe_shape(backbone: Backbone) -> tuple[int, ...]:
    from PIL import Image

    return tuple(backbone.transform(Image.new("RGB", (640, 480))).shape)


def effective_precision(device: str, precision: str) -> str:
    """The precision extraction really uses: autocast fp16/bf16 on CUDA, fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {sorted(PRECISIONS)}")
    if precision != "fp32" and torch.device(device).type != "cuda":
        log.warning("precision %s is for CUDA; the CPU computes fp32", precision)
        return "fp32"
    return precision


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; anything else unchanged."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _progress_bar(total: int):
    """A tqdm bar (images/s, ETA) when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="features", smoothing=0.1)


def _compact_items(ids: np.ndarray, containers: np.ndarray, members: np.ndarray, offsets: np.ndarray | None,
                   sizes: np.ndarray | None) -> _Items:
    """The items sorted by container, so workers read one shard at a time (stable within one)."""
    codes, names = pd.factorize(containers)  # hashing: millions of rows, a few hundred shards
    order = np.argsort(codes, kind="stable")
    members_b = np.char.encode(np.asarray(members, dtype=str), "utf-8")
    none = np.full(len(ids), -1, np.int64)
    offsets = none if offsets is None else np.asarray(offsets, np.int64)
    sizes = none if sizes is None else np.asarray(sizes, np.int64)
    return _Items(ids[order], codes[order].astype(np.int32), [str(c) for c in names], members_b[order],
                  offsets[order], sizes[order])


@dataclass
class Extraction:
    """What one ``extract_features`` call did: ``encoded_ids`` the ids encoded now, ``index``
    the cache after it; ``summary()`` the counts for logs and metrics."""

    requested: int
    encoded_ids: np.ndarray
    failures: int  # among the requested ids, old and new
    shards: int  # written now
    seconds: float
    index: CacheIndex

    def summary(self) -> dict:
        n_new = int(len(self.encoded_ids))
        return {"requested": self.requested, "cached": self.requested - n_new, "encoded": n_new,
                "failures": self.failures, "shards": self.shards, "seconds": self.seconds,
                "images_per_s": n_new / self.seconds if n_new and self.seconds > 0 else float("nan")}


def extract_features(
    ids: np.ndarray,
    containers: Sequence[str],
    members: Sequence[str],
    open_image: OpenImage,
    backbone: Backbone,
    cache_dir: Path,
    *,
    batch_size: int = 256,
    shard_size: int = 8192,
    num_workers: int = 2,
    device: str = "cpu",
    precision: str = "fp32",
    retry_failed: bool = False,
    offsets: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
    progress: Progress | None = None,
) -> Extraction:
    """Encode the images (ids[i] at containers[i]:members[i]) that ``cache_dir`` lacks.

    ``open_image``: (container, member) -> PIL RGB image, picklable (it runs in DataLoader
    workers; geodata.ingest.images.ImageStore.open). A shard is written every ``shard_size`` images.
    Unreadable images get NaN features and a reason (failures.json); with ``retry_failed``
    images that failed before are read again. ``offsets``/``sizes`` (int64, -1 where none): where
    a tar member's bytes lie, passed on to ``open_image``. ``device``: 'cpu', 'cuda[:n]' or 'auto';
    ``precision``: fp32, or fp16 / bf16 autocast on CUDA (the CPU computes fp32).
    """
    cache_dir = Path(cache_dir)
    ids = np.asarray(ids, np.int64)
    if not (len(ids) == len(containers) == len(members)):
        raise ValueError(f"ids, containers, members differ in length: {len(ids)}, {len(containers)}, {len(members)}")
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise ValueError(f"{int(dup.sum())} image ids are requested twice (e.g. {int(ids[dup][0])}); "
                         "an id names one image in the cache")
    device = resolve_device(device)
    precision = effective_precision(device, precision)
    t0 = time.perf_counter()
    with cache_lock(cache_dir):
        for stale in cache_dir.glob(".shard-*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        index = scan_cache(cache_dir)
        todo = index.positions(ids) < 0
        if retry_failed and index.failures:
            todo |= index.failed(ids)
        sel = np.flatnonzero(todo)
        written = 0
        if len(sel):
            items = _compact_items(ids[sel], np.asarray(containers, dtype=object)[sel],
                                   np.asarray(members, dtype=object)[sel],
                                   None if offsets is None else np.asarray(offsets, np.int64)[sel],
                                   None if sizes is None else np.asarray(sizes, np.int64)[sel])
            written = _encode_into(
                items, open_image, backbone, cache_dir, index, batch_size=batch_size, shard_size=shard_size,
                num_workers=num_workers, device=device, precision=precision, progress=progress)
            index = scan_cache(cache_dir)
    failed = int(index.failed(ids).sum())
    if failed:
        log.warning("%d of %d images could not be read; first: %s", failed, len(ids),
                    next(iter(index.failures.items())))
    return Extraction(int(len(ids)), ids[sel], failed, written, time.perf_counter() - t0, index)


class _Pending:
    """Encoded rows waiting for their shard: ids (n,), feats (n, D), errors (n,) ('' = read fine)."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.feats: list[np.ndarray] = []
        self.errors: list[list[str]] = []

    def __len__(self) -> int:
        return sum(len(a) for a in self.ids)

    def add(self, ids: np.ndarray, feats: np.ndarray, errors: list[str]) -> None:
        self.ids.append(ids)
        self.feats.append(feats)
        self.errors.append(errors)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The first n rows; the rest stay pending."""
        ids, feats, errors = np.concatenate(self.ids), np.concatenate(self.feats), list(chain.from_iterable(self.errors))
        self.ids, self.feats, self.errors = [ids[n:]], [feats[n:]], [errors[n:]]
        return ids[:n], feats[:n], errors[:n]


def _record_failures(failures: dict[int, str], ids: np.ndarray, errors: list[str]) -> bool:
    """Update {id: reason} with one shard's outcome (a success clears an old failure); True if it changed."""
    changed = False
    for i, err in zip(ids.tolist(), errors):
        if err:
            failures[i], changed = err, True
        elif i in failures:  # retried and read this time
            del failures[i]
            changed = True
    return changed


def _encode_into(items: _Items, open_image: OpenImage, backbone: Backbone, cache_dir: Path, index: CacheIndex, *,
                 batch_size: int, shard_size: int, num_workers: int, device: str, precision: str,
                 progress: Progress | None) -> int:
    """Encode ``items`` into new shards after the existing ones; returns shards written."""
    if index.dim and index.dim != backbone.dim:
        raise ValueError(f"{cache_dir}: cached features have D={index.dim}, backbone {backbone.spec} gives "
                         f"{backbone.dim}; this folder belongs to another backbone")
    dev = torch.device(device)
    backbone.module.to(dev)
    dtype = PRECISIONS[precision]
    dataset = _ImageDataset(items, open_image, backbone.transform, _probe_shape(backbone))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda")
    next_no = max((n for n in map(_shard_number, index.paths) if n is not None), default=-1) + 1
    failures, pending, written, done = dict(index.failures), _Pending(), 0, 0
    total = len(items.ids)
    t0, bar = time.perf_counter(), _progress_bar(total)

    def write(n: int) -> None:
        nonlocal next_no, written
        s_ids, s_feats, s_err = pending.take(n)
        _write_shard(cache_dir / f"shard-{next_no:05d}.npz", s_ids, s_feats, s_err)
        if _record_failures(failures, s_ids, s_err):  # a kill before this line: rebuilt from the shards next run
            write_failures(cache_dir, failures)
        next_no, written = next_no + 1, written + 1

    try:
        with torch.inference_mode():
            for batch_ids, x, errors in loader:
                amp = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
                with amp:
                    f = backbone.encode(x.to(dev, non_blocking=True)).float().cpu().numpy()
                f[[bool(e) for e in errors]] = np.nan  # unreadable: the stages drop and count these rows
                pending.add(batch_ids.numpy().astype(np.int64), f, list(errors))
                while len(pending) >= shard_size:
                    write(shard_size)
                done += len(errors)
                if bar is not None:
                    bar.update(len(errors))
                if progress is not None:
                    progress(done, total, time.perf_counter() - t0)
            if len(pending):
                write(len(pending))
    finally:
        if bar is not None:
            bar.close()
    write_failures(cache_dir, failures)  # in step with the shards, even after a killed run
    return written


# --- views: what a stage hands on for one split ------------------------------------
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
