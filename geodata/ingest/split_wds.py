"""One split's pass over WebDataset tar shards: new shards -> judged rows and feature npz files.

`wds_shard_plan` finds the shards of a split not ingested yet (and whether any shard changed,
which makes a full re-ingest); `ingest_wds_split` reads them (geodata.ingest.webdataset) through
`geodata.ingest.validate.judge_batch` into the split's temp manifest part (geodata.ingest.split)
and writes their .npy features as one npz per (feature, shard).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geodata.atomic import atomic_write_path
from geodata.ingest.image_index import decode_checker
from geodata.ingest.image_listing import LISTING_SCHEMA
from geodata.ingest.image_store import ImageStore
from geodata.ingest.incremental import container_fingerprint
from geodata.ingest.split import SplitRun
from geodata.ingest.validate import MANIFEST_SCHEMA, IdSet, judge_batch
from geodata.ingest.webdataset import (
    discover_features,
    feature_shard_path,
    find_shards,
    read_shard,
    refused_shard_rows,
    shard_refusal,
)

__all__ = ["ingest_wds_split", "wds_shard_plan"]


def wds_shard_plan(root: Path, split: str, prev_fps: dict[str, str]) -> tuple[list[Path], dict[str, str], str]:
    """The tar shards of `root/split` not ingested yet, every shard's fingerprint, and why
    the split must be re-ingested in full ('' when only shards were added)."""
    shards = find_shards(root / split)
    if not shards:
        raise FileNotFoundError(f"{root / split}: no .tar shards; expected the WebDataset copy's {split}/*.tar")
    fps = {s.relative_to(root).as_posix(): container_fingerprint("tar", s) for s in shards}
    changed = [k for k, v in prev_fps.items() if fps.get(k) != v]
    reason = f"{split}: tar shard {changed[0]} changed or is gone since the last ingest" if changed else ""
    new = [s for s in shards if s.relative_to(root).as_posix() not in prev_fps]
    return new, fps, reason


def _write_features(out_dir: Path, split: str, shard_rel: str, ids: list[np.ndarray],
                    feats: dict[str, list[np.ndarray]]) -> None:
    """One npz per feature name for one tar shard: ids int64 (n,), feats (n, D) float16 when the
    vectors were float16, else float32; uncompressed (np.savez), so the features memory-map; atomic."""
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    for name, parts in feats.items():
        path = feature_shard_path(out_dir, name, split, shard_rel)
        rows = [p for p in parts if len(p)]  # a batch with no kept rows says nothing of the dtype
        kept = np.float16 if rows and all(p.dtype == np.float16 for p in rows) else np.float32  # the source's
        matrix = np.concatenate(parts).astype(kept, copy=False) if parts else np.zeros((0, 0), np.float32)
        with atomic_write_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: np.savez would append .npz
            np.savez(fh, ids=all_ids.astype(np.int64), feats=matrix)


def ingest_wds_split(
    run: SplitRun, root: Path, out_dir: Path, shards: list[Path], seen: IdSet, verify_images: str,
    store: ImageStore, workers: int, features: tuple[str, ...] | None, dims: dict[str, int],
) -> None:
    """Read new tar shards of one split: rows judged into the part, features into npz shards.

    Appends each batch's image listing (LISTING_SCHEMA) to `run.listings`; `dims` collects
    feature name -> D across shards.
    """
    split = run.report.split
    for shard in shards:
        rel = shard.relative_to(root).as_posix()
        why = shard_refusal(shard, rel)
        if why is not None:  # refused whole: its samples are quarantined, the others go on
            quarantine, listing = refused_shard_rows(shard, rel, split, why, seen)
            run.quarantine.append(quarantine)
            run.report.n_in += quarantine.num_rows
            run.listings.append(listing.cast(LISTING_SCHEMA))
            continue
        names = features if features is not None else discover_features(shard)
        if features is None:
            features = names
        ids: list[np.ndarray] = []
        feats: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for batch in read_shard(shard, rel, names, dims, read_images=verify_images == "decode"):
            checker = decode_checker(store, workers, batch.jpg) if verify_images == "decode" else None
            lookup = (lambda _ids, refs=batch.refs: refs) if verify_images != "none" else None
            judged = judge_batch(split, rel, batch.raw, batch.lines, seen, lookup, checker,
                                 pre_code=batch.pre_code, pre_value=batch.pre_value,
                                 late_code=batch.late_code, late_value=batch.late_value)
            if verify_images == "none":  # still record where the image is
                kept = judged.kept
                refs = batch.refs.take(pa.array(judged.kept_rows, pa.int64()))
                cols = {n: kept.column(n) for n in MANIFEST_SCHEMA.names}
                cols.update(image_container=refs["container"].combine_chunks(), image_member=refs["member"].combine_chunks(),
                            image_offset=refs["offset"].combine_chunks(), image_size=refs["size"].combine_chunks())
                judged.kept = pa.RecordBatch.from_pydict(cols, schema=MANIFEST_SCHEMA)
            run.writer.write(judged.kept)
            if judged.quarantine.num_rows:
                run.quarantine.append(judged.quarantine)
            run.report.n_in += len(batch.lines)
            ids.append(judged.kept.column("id").to_numpy())
            for name in names:
                feats[name].append(batch.feats[name][judged.kept_rows])
            refs_all = batch.refs
            run.listings.append(pa.table({
                "id": batch.raw["id"], "container": refs_all["container"], "member": refs_all["member"],
                "size_bytes": refs_all["size"], "offset": refs_all["offset"], "refused": refs_all["refused"],
            }, schema=LISTING_SCHEMA).filter(pc.is_valid(refs_all["container"])))
        _write_features(out_dir, split, shard.relative_to(root / split).as_posix(), ids, feats)
    run.report.features = dict(dims)
