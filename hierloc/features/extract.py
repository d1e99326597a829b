"""Frozen backbone features, computed once per image id and cached on disk incrementally.

``extract_features`` encodes only the ids not cached yet (hierloc.features.cache), so a run
that adds a few thousand images to millions encodes those; a killed run (even SIGKILL) loses
at most the images since its last shard. The images are decoded in DataLoader workers
(hierloc.features.dataset), JPEGs at reduced scale and handed on as uint8, converted and
normalised on the device (hierloc.features.decode); a stage hands the result on as a view
(hierloc.features.views).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from hierloc.device import resolve_device
from hierloc.features.backbones import Backbone
from hierloc.features.cache import CacheIndex, cache_lock, scan_cache, shard_number, write_failures, write_shard
from hierloc.features.dataset import ImageItems, OpenImage, check_open_image, compact_items, device_batches
from hierloc.features.device_decode import check_raw_open_image, device_decoded_batches
from hierloc.progress import Progress

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]  # (done, total, seconds): a hook for callers and tests

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def effective_precision(device: str | torch.device, precision: str) -> str:
    """The precision extraction really uses: autocast fp16/bf16 on CUDA, fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {sorted(PRECISIONS)}")
    if precision != "fp32" and torch.device(device).type != "cuda":
        log.warning("precision %s is for CUDA; the CPU computes fp32", precision)
        return "fp32"
    return precision


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
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    retry_failed: bool = False,
    offsets: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
    progress: ProgressFn | None = None,
) -> Extraction:
    """Encode the images (ids[i] at containers[i]:members[i]) that ``cache_dir`` lacks.

    ``open_image``: (container, member) -> PIL RGB image, picklable (it runs in DataLoader
    workers; geodata.ingest.image_store.ImageStore.open); it is passed ``min_side=`` where the
    backbone decodes JPEGs at reduced scale (``Backbone.fast_decode``, TypeError up front if it
    takes no such keyword), and ``raw=True`` where the backbone decodes on the device
    (``Backbone.decoder``: then it returns the bytes and their header). ``batch_size``: images per forward pass. A shard is written every
    ``shard_size`` images.
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
            items = compact_items(ids[sel], np.asarray(containers, dtype=object)[sel],
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


def _encoded(batches, backbone: Backbone, device: torch.device, dtype: torch.dtype | None):
    """(ids, features (B, D) float32 numpy, errors) per batch of ``batches``. On CUDA one batch stays in
    flight: its features go to pinned host memory without blocking and are read once the next batch is
    queued, so the GPU does not wait for the host (shards, progress) between batches."""
    inflight = None
    for batch_ids, x, errors in batches:
        amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with amp:
            f = backbone.encode(x).float()
        if device.type != "cuda":
            yield batch_ids, f.cpu().numpy(), errors
            continue
        host = torch.empty(f.shape, dtype=f.dtype, pin_memory=True)
        host.copy_(f, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        if inflight is not None:
            yield _landed(*inflight)
        inflight = (batch_ids, host, errors, ready)
    if inflight is not None:
        yield _landed(*inflight)


def _landed(batch_ids, host: torch.Tensor, errors, ready) -> tuple:
    ready.synchronize()  # this batch's copy to the host is done (the next one is queued behind it)
    return batch_ids, host.numpy(), errors


def _encode_into(items: ImageItems, open_image: OpenImage, backbone: Backbone, cache_dir: Path, index: CacheIndex, *,
                 batch_size: int, shard_size: int, num_workers: int, device: torch.device, precision: str,
                 progress: ProgressFn | None) -> int:
    """Encode ``items`` into new shards after the existing ones; returns shards written."""
    if index.dim and index.dim != backbone.dim:
        raise ValueError(f"{cache_dir}: cached features have D={index.dim}, backbone {backbone.spec} gives "
                         f"{backbone.dim}; this folder belongs to another backbone")
    plan = backbone.decoding
    check_open_image(open_image, plan)
    if backbone.decoder == "device":  # workers read bytes, JPEGs decoded on the device
        check_raw_open_image(open_image)
        batches = device_decoded_batches(items, open_image, backbone.device_decoding, batch_size=batch_size,
                                         num_workers=num_workers, device=device)
    else:
        batches = device_batches(items, open_image, plan, batch_size=batch_size, num_workers=num_workers,
                                 device=device)
    backbone.module.to(device)
    dtype = PRECISIONS[precision]
    next_no = max((n for n in map(shard_number, index.paths) if n is not None), default=-1) + 1
    failures, pending, written, done = dict(index.failures), _Pending(), 0, 0
    total = len(items.ids)
    # images/s and ETA: a bar on a terminal, else a log line every ~10 s (hierloc.progress)
    t0, bar = time.perf_counter(), Progress(total, "features", unit="img", logger=log)

    def write(n: int) -> None:
        nonlocal next_no, written
        s_ids, s_feats, s_err = pending.take(n)
        write_shard(cache_dir / f"shard-{next_no:05d}.npz", s_ids, s_feats, s_err)
        if _record_failures(failures, s_ids, s_err):  # a kill before this line: rebuilt from the shards next run
            write_failures(cache_dir, failures)
        next_no, written = next_no + 1, written + 1

    try:
        with torch.inference_mode():
            # x: float32 on the device, normalised there (outside autocast); autocast covers the model only
            for batch_ids, f, errors in _encoded(batches, backbone, device, dtype):
                f[[bool(e) for e in errors]] = np.nan  # unreadable: the stages drop and count these rows
                if precision == "fp16":  # stored as float16 (half the disk), unless a value overflows it
                    f16 = f.astype(np.float16)
                    f = f16 if np.array_equal(np.isfinite(f16), np.isfinite(f)) else f
                pending.add(batch_ids, f, list(errors))
                while len(pending) >= shard_size:
                    write(shard_size)
                done += len(errors)
                bar.update(len(errors))
                if progress is not None:
                    progress(done, total, time.perf_counter() - t0)
            if len(pending):
                write(len(pending))
    finally:
        bar.close()
    write_failures(cache_dir, failures)  # in step with the shards, even after a killed run
    return written
