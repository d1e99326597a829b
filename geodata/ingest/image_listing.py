"""Find OSV-5M photos, whether they sit in zip or tar shards or in unzipped folders.

The release ships `images/{split}/NN.zip` holding `<id>.jpg`; users often unzip shards
into folders of any depth. Both layouts are addressed the same way: a *container*
(a zip file or a folder, as a path relative to the dataset root) and a *member* (the
name inside the zip, or the file name inside the folder).

- `find_containers` walks a folder for the zips, tars and folders holding images;
  `list_container` lists one of them as a `LISTING_SCHEMA` table.
- `list_images` / `list_images_table` list every JPEG under a folder (zip members
  from the zip's central directory, tar members from their headers, with the data
  offset; nothing is ever extracted). Member names that could escape (absolute, drive
  letter, '..') make the whole archive refused (geodata.ingest.archive_members);
  link/device members are listed as refused and never read.
- `split_duplicate_ids` / `index_images` keep the first image per id.

Byte caps (geodata.capped_io): an image over MAX_IMAGE_BYTES (64 MiB) by its declared size
(zip central directory, tar header, file size) is listed as refused and never read. Only
regular files are listed as readable: fifos, devices and sockets are listed as refused.
The listed images are opened by geodata.ingest.image_store.ImageStore.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from geodata.capped_io import MAX_IMAGE_BYTES, regular_refusal, size_refusal
from geodata.ingest.archive_members import iter_tar_members, refuse_unsafe_names, tar_refusal, zip_refusal

log = logging.getLogger(__name__)

#: File name endings treated as images (compared lower-case).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg")

#: Columns of an image listing, in order.
IMAGE_INDEX_COLUMNS: tuple[str, ...] = ("id", "container", "member", "size_bytes")


def is_image_name(name: str) -> bool:
    """True for names ending in .jpg/.jpeg, skipping macOS resource forks ('._x.jpg', __MACOSX/)."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith("._") or name.startswith("__MACOSX/") or "/__MACOSX/" in name:
        return False
    return base.lower().endswith(IMAGE_SUFFIXES)


def _relative_posix(path: Path, root: Path) -> str:
    """`path` relative to `root` with forward slashes (raises ValueError if outside root)."""
    return path.relative_to(root).as_posix()


#: Arrow schema of a container listing (`list_container`): one row per image member.
#: offset: byte offset of the member's data in a tar (null for zips and folders);
#: refused: why a member was refused (symlink, hardlink, device, ...); null = readable.
LISTING_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("container", pa.string()),
        ("member", pa.string()),
        ("size_bytes", pa.int64()),
        ("offset", pa.int64()),
        ("refused", pa.string()),
    ]
)

#: Container kinds: a zip shard, a tar shard, or a folder holding image files directly.
ContainerKind = Literal["zip", "tar", "dir"]


@dataclass(frozen=True)
class Container:
    """One place images live: `path` on disk, `rel` its '/'-separated path under the dataset root."""

    kind: ContainerKind
    rel: str
    path: Path


def _names_array(names: list[str]) -> pa.Array:
    return pa.array(names, pa.string())


def _image_mask(names: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(is image name (n,) bool, basename array): .jpg/.jpeg, skipping '._x.jpg' and __MACOSX/."""
    base = pc.replace_substring_regex(names, r"^.*[\\/]", "")  # basename; Windows zips use '\\'
    lower = pc.utf8_lower(base)
    keep = pc.and_(
        pc.or_(*[pc.ends_with(lower, suffix) for suffix in IMAGE_SUFFIXES]),
        pc.invert(pc.or_(pc.starts_with(base, "._"), pc.match_substring_regex(names, r"(?:^|/)__MACOSX/"))),
    )
    return np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool), base


def _listing_table(
    names: list[str], container: str, sizes: list[int], offsets: list[int | None],
    refused: list[str | None], where: str,
) -> pa.Table:
    """LISTING_SCHEMA rows for the image-named members among `names` (all names checked for safety)."""
    arr = _names_array(names)
    refuse_unsafe_names(arr, where)
    keep, base = _image_mask(arr)
    idx = pa.array(np.flatnonzero(keep), pa.int64())
    stems = pc.replace_substring_regex(base.take(idx), r"\.[^.]*$", "")  # '123.jpg' -> '123'
    n = len(idx)
    return pa.table(
        {
            "id": stems,
            "container": pa.array([container] * n, pa.string()),
            "member": arr.take(idx),
            "size_bytes": pa.array(sizes, pa.int64()).take(idx),
            "offset": pa.array(offsets, pa.int64()).take(idx),
            "refused": pa.array(refused, pa.string()).take(idx),
        },
        schema=LISTING_SCHEMA,
    )


def _list_zip(zip_path: Path, container: str, max_image_bytes: int = MAX_IMAGE_BYTES) -> pa.Table:
    """List the JPEG members of one zip (its central directory only; nothing is extracted).

    Every member name is checked, not only JPEGs: an archive holding an escaping name
    is refused as a whole. Symlink/device members and members declaring more than
    `max_image_bytes` uncompressed are listed with `refused` set.
    """
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise zipfile.BadZipFile(
            f"{zip_path}: not a readable zip ({exc}); re-download or re-create this shard"
        ) from exc
    return _listing_table(
        [i.filename for i in infos], container, [i.file_size for i in infos], [None] * len(infos),
        [zip_refusal(i) or size_refusal(i.file_size, max_image_bytes, declared=True) for i in infos],
        f"zip {zip_path}",
    )


def _list_tar(tar_path: Path, container: str, max_image_bytes: int = MAX_IMAGE_BYTES) -> pa.Table:
    """List the JPEG members of one tar with data offset and size; links/devices and members
    over `max_image_bytes` refused."""
    names, sizes, offsets, refused = [], [], [], []
    for info in iter_tar_members(tar_path):
        if info.isdir():
            continue
        names.append(info.name)
        sizes.append(info.size)
        offsets.append(info.offset_data)
        refused.append(tar_refusal(info) or size_refusal(info.size, max_image_bytes))
    return _listing_table(names, container, sizes, offsets, refused, f"tar {tar_path}")


def _entry_stat(entry: os.DirEntry) -> os.stat_result | None:
    """An image-named folder entry's stat (symlinks followed); None for a folder or a dangling link."""
    if not is_image_name(entry.name) or entry.is_dir():
        return None
    try:
        return entry.stat()
    except FileNotFoundError:  # a dangling symlink: the image is missing, not refused
        return None


def _list_dir(folder: Path, container: str, max_image_bytes: int = MAX_IMAGE_BYTES) -> pa.Table:
    """The image files directly in `folder` (symlinked files are followed: the folder is the user's own).

    Fifos, devices and sockets with an image name, and files over `max_image_bytes`, are
    listed with `refused` set (never opened).
    """
    with os.scandir(folder) as it:
        found = sorted(((e, st) for e in it if (st := _entry_stat(e)) is not None), key=lambda x: x[0].name)
    return _listing_table(
        [e.name for e, _ in found], container, [st.st_size for _, st in found], [None] * len(found),
        [regular_refusal(st.st_mode) or size_refusal(st.st_size, max_image_bytes) for _, st in found],
        f"folder {folder}",
    )


def find_containers(images_dir: Path, root: Path) -> list[Container]:
    """Zips, tars and folders holding images under `images_dir`, at any depth, in sorted walk order.

    `rel` is relative to `root`. Symlinked folders are not followed (no cycles).
    """
    found: list[Container] = []

    def walk(folder: Path) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        has_images = False
        for entry in entries:
            if not has_images and is_image_name(entry.name) and _entry_stat(entry) is not None:
                # The folder's own images go where its first image sorts among its entries.
                has_images = True
                found.append(Container("dir", _relative_posix(folder, root), folder))
            if entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path))
            elif entry.name.lower().endswith((".zip", ".tar")) and not entry.is_dir():
                if not entry.is_file():  # a fifo or device would block or never end: never opened
                    log.warning("%s: not a regular file (or a dangling link); shard skipped", entry.path)
                    continue
                kind: ContainerKind = "zip" if entry.name.lower().endswith(".zip") else "tar"
                path = Path(entry.path)
                found.append(Container(kind, _relative_posix(path, root), path))

    walk(images_dir)
    return found


def list_container(container: Container, max_image_bytes: int = MAX_IMAGE_BYTES) -> pa.Table:
    """The image members of one container as a LISTING_SCHEMA table (archive / name order)."""
    if container.kind == "zip":
        return _list_zip(container.path, container.rel, max_image_bytes)
    if container.kind == "tar":
        return _list_tar(container.path, container.rel, max_image_bytes)
    return _list_dir(container.path, container.rel, max_image_bytes)


def list_images_table(images_dir: Path, *, relative_to: Path | None = None) -> pa.Table:
    """Every image under `images_dir` (zips, tars, folders, any depth) as one LISTING_SCHEMA table."""
    images_dir = Path(images_dir)
    root = Path(relative_to) if relative_to is not None else images_dir
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"image folder {images_dir} does not exist; expected OSV-5M shards like "
            f"{images_dir}/00.zip or unzipped folders"
        )
    tables = [list_container(c) for c in find_containers(images_dir, root)]
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


def list_images(images_dir: Path, *, relative_to: Path | None = None) -> pd.DataFrame:
    """List every JPEG under `images_dir`, in zips or plain folders, at any depth.

    Returns a DataFrame with columns id (str: file stem), container (str: the zip file or
    the folder holding the file, relative to `relative_to`, '/'-separated; '.' for
    `relative_to` itself), member (str: name inside the zip, or file name in the folder),
    size_bytes (int64: uncompressed size). Order is deterministic: folders and files are
    walked in sorted name order, zip members in archive order. Duplicate ids are kept
    (see `split_duplicate_ids`).

    `relative_to` defaults to `images_dir`; pass the dataset root so that
    `ImageStore(dataset_root)` can open the rows. Raises FileNotFoundError when
    `images_dir` is not a folder, UnsafeMemberError for an absolute or '..' member name.
    """
    table = list_images_table(images_dir, relative_to=relative_to)
    refused = table.filter(pc.is_valid(table["refused"]))
    if refused.num_rows:
        log.warning("%s: %d image(s) refused (never read), e.g.:", images_dir, refused.num_rows)
    for row in refused.slice(0, 5).to_pylist():
        log.warning("%s:%s: %s", row["container"], row["member"], row["refused"])
    table = table.filter(pc.is_null(table["refused"])).select(list(IMAGE_INDEX_COLUMNS))
    return table.to_pandas().astype({"id": "str", "container": "str", "member": "str", "size_bytes": "int64"})


def split_duplicate_ids(listing: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split an image listing into (kept, duplicates): the first row per id is kept.

    "First" is listing order (sorted walk order). Both frames keep the listing's columns
    and a fresh 0..n-1 index.
    """
    dup = listing["id"].duplicated(keep="first").to_numpy()
    return (
        listing.loc[~dup].reset_index(drop=True),
        listing.loc[dup].reset_index(drop=True),
    )


def index_images(images_dir: Path, *, relative_to: Path | None = None) -> pd.DataFrame:
    """One row per image id under `images_dir`: `list_images` with duplicate ids removed.

    Duplicate ids across shards keep their first occurrence; the others are logged as a
    warning (count and up to 5 examples) and dropped. Call `list_images` and
    `split_duplicate_ids` to get the duplicates as a table.
    """
    kept, dups = split_duplicate_ids(list_images(images_dir, relative_to=relative_to))
    if len(dups):
        examples = "; ".join(
            f"{r.id} in {r.container}:{r.member}" for r in dups.head(5).itertuples()
        )
        log.warning(
            "%s: %d duplicate image ids ignored (first occurrence kept), e.g. %s",
            images_dir, len(dups), examples,
        )
    return kept
