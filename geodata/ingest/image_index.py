"""One split's image index for an ingest run: list shards incrementally, look ids up, decode.

- `update_image_index` lists the image containers (zip / tar shards, folders) under
  `root/images/{split}` that are new or changed since the last run (by
  `geodata.ingest.incremental.container_fingerprint`), reuses the earlier rows of unchanged
  ones, and says when a change is more than added members (a full re-ingest). A shard
  with a member name that could escape is refused whole (`refused_listing`): its images
  are listed as refused, so their rows are quarantined as image_unsafe and the run goes on.
- `ImageIndex.lookup` maps (n,) int64 ids to image references (`IMAGE_REF_SCHEMA`): the
  first listed image per id, readable members before refused ones.
- `decode_checker` is the `ImageChecker` of `geodata.ingest.validate.judge_batch` that decodes
  the found images in threads.
- `recheck_pending` judges again the rows an earlier run kept aside as image_missing,
  against an index with new containers: found ones are admitted, refused / corrupt ones
  quarantined, the rest stay pending.

The index table is `geodata.ingest.image_listing.LISTING_SCHEMA` (id, container, member,
size_bytes, offset, refused), written per run as `image_index/{split}.parquet` by
`geodata.ingest.commit`.
"""

from __future__ import annotations

import logging
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geodata.ingest.archive_members import UnsafeMemberError, is_safe_relative_name
from geodata.ingest.image_decode import decode_image
from geodata.ingest.image_listing import LISTING_SCHEMA, Container, find_containers, is_image_name, list_container
from geodata.ingest.image_store import ImageStore
from geodata.ingest.incremental import container_fingerprint
from geodata.ingest.quarantine import REASON_CODE, quarantine_table
from geodata.ingest.validate import ID_REGEX, IMAGE_REF_SCHEMA, MANIFEST_SCHEMA, image_checks
from geodata.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["ImageIndex", "PendingRecheck", "decode_checker", "recheck_pending", "update_image_index"]


@dataclass
class ImageIndex:
    """One split's image index: all listed rows, and a lookup by int64 id (first row per id)."""

    table: pa.Table  # LISTING_SCHEMA, old rows first then new, each in walk order
    fingerprints: dict[str, str]
    n_listed: int  # containers listed this run
    n_reused: int
    new_containers: bool
    full_reason: str = ""
    sorted_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # row in table per sorted id
    duplicates: pa.Table | None = None

    def build_lookup(self) -> None:
        """Numeric ids only, first occurrence per id (readable members before refused ones)."""
        numeric = pc.match_substring_regex(self.table["id"], ID_REGEX)
        idx = np.flatnonzero(np.asarray(numeric.to_numpy(zero_copy_only=False), dtype=bool))
        ids = pc.cast(self.table["id"].take(pa.array(idx, pa.int64())), pa.int64()).to_numpy()
        refused = np.asarray(self.table["refused"].is_valid().to_numpy(zero_copy_only=False), dtype=bool)[idx]
        order = np.lexsort((np.arange(len(ids)), refused, ids))  # by id, then readable first, then order
        sorted_ids = ids[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        self.sorted_ids = sorted_ids[first]
        self.rows = idx[order[first]]
        self.duplicates = self.table.take(pa.array(np.sort(idx[order[~first]]), pa.int64()))

    def lookup(self, ids: np.ndarray) -> pa.Table:
        """(n,) int64 ids -> IMAGE_REF_SCHEMA rows (container null where no image)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.sorted_ids):
            pos = np.zeros(len(ids), np.int64)
            found = np.zeros(len(ids), bool)
        else:
            pos = np.minimum(np.searchsorted(self.sorted_ids, ids), len(self.sorted_ids) - 1)
            found = self.sorted_ids[pos] == ids
        take = pa.array(np.where(found, self.rows[pos] if len(self.rows) else 0, 0), pa.int64(), mask=~found)
        rows = self.table.take(take)
        return pa.table(
            {
                "container": rows["container"], "member": rows["member"], "offset": rows["offset"],
                "size": rows["size_bytes"], "refused": rows["refused"],
            },
            schema=IMAGE_REF_SCHEMA,
        )

    def duplicate_examples(self, n: int) -> list[str]:
        """Up to n "<id> in <container>:<member>" for images whose id was listed before."""
        if self.duplicates is None:
            return []
        return [f"{r['id']} in {r['container']}:{r['member']}" for r in self.duplicates.slice(0, n).to_pylist()]


def update_image_index(
    root: Path, split: str, previous: pa.Table | None, prev_fp: dict[str, str]
) -> ImageIndex:
    """List the image containers of a split that are new or changed since `prev_fp`.

    Unchanged containers (same fingerprint) reuse their rows of `previous`. A container
    that disappeared, or changed other than by adding members, sets full_reason.
    """
    containers = find_containers(root / "images" / split, root)
    fingerprints = {c.rel: container_fingerprint(c.kind, c.path) for c in containers}
    reason = ""
    gone = sorted(set(prev_fp) - set(fingerprints))
    if gone:
        reason = f"images/{split}: {len(gone)} image container(s) gone since the last ingest, e.g. {gone[0]}"
    old_parts: list[pa.Table] = []
    new_parts: list[pa.Table] = []
    n_listed = 0
    for c in containers:
        unchanged = prev_fp.get(c.rel) == fingerprints[c.rel] and previous is not None
        if unchanged:
            old_parts.append(previous.filter(pc.equal(previous["container"], c.rel)))
            continue
        try:
            listing = list_container(c)
        except UnsafeMemberError:
            listing = refused_listing(c)  # the whole shard is refused; its rows are quarantined
        n_listed += 1
        if c.rel in prev_fp and previous is not None and not reason:
            before = previous.filter(pc.equal(previous["container"], c.rel))
            kept = pa.Table.from_pydict({"m": listing["member"], "s": listing["size_bytes"]})
            was = pa.Table.from_pydict({"m": before["member"], "s": before["size_bytes"]})
            if was.join(kept, ["m", "s"], join_type="left anti").num_rows:
                reason = f"{c.rel}: members changed or removed since the last ingest"
            else:  # only members added: keep the old rows first, the new ones after
                old_parts.append(before)
                listing = listing.join(was.rename_columns(["member", "size_bytes"]), ["member", "size_bytes"],
                                       join_type="left anti")
        new_parts.append(listing)
    table = pa.concat_tables([*old_parts, *new_parts]) if old_parts or new_parts else LISTING_SCHEMA.empty_table()
    index = ImageIndex(
        table=table.cast(LISTING_SCHEMA), fingerprints=fingerprints, n_listed=n_listed,
        n_reused=len(containers) - n_listed, new_containers=n_listed > 0, full_reason=reason,
    )
    index.build_lookup()
    return index


def refused_listing(container: Container, max_name_chars: int = 60) -> pa.Table:
    """LISTING_SCHEMA rows for every image member of an archive that holds a member name that
    could escape (absolute, drive letter, '..'), each refused with a reason naming the shard
    and that member: none of its members is ever read, rows pointing at them are quarantined
    as image_unsafe. Names come from the zip's central directory or the tar's headers."""
    if container.kind == "zip":
        with zipfile.ZipFile(container.path) as zf:
            members = [(i.filename, i.file_size, None) for i in zf.infolist()]
    else:
        with tarfile.open(container.path, "r:") as tf:
            members = [(i.name, i.size, i.offset_data) for i in tf if not i.isdir()]
    bad = next((name for name, _, _ in members if not is_safe_relative_name(name)), "")
    shown = bad if len(bad) <= max_name_chars else bad[: max_name_chars - 3] + "..."
    why = (f"shard {container.rel} refused: member {shown!r} could escape the dataset folder; "
           "none of its members is used")
    images = [(n, size, off) for n, size, off in members if is_image_name(n.replace("\\", "/"))]
    return pa.table({
        "id": pa.array([PurePosixPath(n.replace("\\", "/")).stem for n, _, _ in images], pa.string()),
        "container": pa.array([container.rel] * len(images), pa.string()),
        "member": pa.array([n for n, _, _ in images], pa.string()),
        "size_bytes": pa.array([size for _, size, _ in images], pa.int64()),
        "offset": pa.array([off for _, _, off in images], pa.int64()),
        "refused": pa.array([why] * len(images), pa.string()),
    }, schema=LISTING_SCHEMA)


def decode_checker(store: ImageStore, workers: int, jpg: list[bytes | None] | None = None) -> Any:
    """An ImageChecker decoding images through `store` (or from in-memory `jpg` bytes) in threads."""

    def check(args: tuple[int, str, str, int | None, int | None]) -> str | None:
        row, container, member, offset, size = args
        try:
            if jpg is not None and jpg[row] is not None:
                decode_image(jpg[row], f"{container}:{member}", store.max_image_pixels)
            else:
                store.open(container, member, offset=offset, size=size)
        except Exception as exc:  # any failure to read or decode is a quarantine reason
            cause = exc.__cause__ or exc  # ImageStore wraps PIL's error; report PIL's
            reason = getattr(exc, "reason", None)  # ours (geodata.capped_io.InputError): without the file name
            return f"{container}:{member}: {reason or f'{type(cause).__name__}: {cause}'}"
        return None

    def checker(rows: np.ndarray, refs: pa.Table) -> list[str | None]:
        args = zip(rows.tolist(), refs["container"].to_pylist(), refs["member"].to_pylist(),
                   refs["offset"].to_pylist(), refs["size"].to_pylist(), strict=True)
        # PIL releases the GIL while decoding, so threads scale with cores.
        out: list[str | None] = []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
                Progress(len(rows), "decoding images", unit="img", logger=log) as bar:
            for reason in pool.map(check, args, chunksize=16):
                out.append(reason)
                bar.update()
        return out

    return checker


@dataclass
class PendingRecheck:
    """Pending rows judged again against a newer index (all MANIFEST_SCHEMA unless noted).

    admitted: rows whose image arrived, image_* columns filled (None when none);
    resolved: the `line` column of the rows no longer pending for image_missing (admitted
    or rejected for another image reason); rejudged: QUARANTINE_SCHEMA rows of the
    rejected ones; still_missing: rows whose image is still missing, in input order.
    """

    admitted: pa.Table | None
    resolved: pa.Table
    rejudged: pa.Table
    still_missing: pa.Table


def recheck_pending(
    split: str, file: str, pending: pa.Table, index: ImageIndex, checker: Any
) -> PendingRecheck | None:
    """Rows waiting for their image: admit the found ones, re-judge refused/corrupt (None when no rows)."""
    n = pending.num_rows
    if n == 0:
        return None
    refs = index.lookup(pending["id"].to_numpy())
    code = np.zeros(n, np.int8)
    errors = np.full(n, None, dtype=object)
    image_checks(code, errors, refs, checker)
    ok = np.flatnonzero(code == 0)
    admitted = None
    if len(ok):
        admitted = pending.take(pa.array(ok, pa.int64()))
        sub = refs.take(pa.array(ok, pa.int64()))
        for name, col in (("image_container", "container"), ("image_member", "member"),
                          ("image_offset", "offset"), ("image_size", "size")):
            admitted = admitted.set_column(admitted.schema.get_field_index(name), name, sub[col])
        admitted = admitted.cast(MANIFEST_SCHEMA)
    changed = np.flatnonzero((code != 0) & (code != REASON_CODE["image_missing"]))
    resolved = pending.take(pa.array(np.concatenate([ok, changed]), pa.int64())).select(["line"])
    t = pending.take(pa.array(changed, pa.int64()))
    rejudged = quarantine_table(
        split, file, t["line"].to_numpy(), pc.cast(t["id"], pa.string()), code[changed],
        pa.array(errors[changed].tolist(), pa.string()),
    )
    still = np.flatnonzero(code == REASON_CODE["image_missing"])
    return PendingRecheck(admitted=admitted, resolved=resolved, rejudged=rejudged,
                          still_missing=pending.take(pa.array(still, pa.int64())))
