"""Find and open OSV-5M photos, whether they sit in zip shards or in unzipped folders.

The release ships `images/{split}/NN.zip` holding `<id>.jpg`; users often unzip shards
into folders of any depth. Both layouts are addressed the same way: a *container*
(a zip file or a folder, as a path relative to the dataset root) and a *member* (the
name inside the zip, or the file name inside the folder).

- `list_images` / `list_images_table` walk a folder and list every JPEG (zip members
  from the zip's central directory, tar members from their headers, with the data
  offset; nothing is ever extracted). Member names that could escape (absolute, drive
  letter, '..') make the whole archive refused; link/device members are listed as
  refused and never read.
- `split_duplicate_ids` / `index_images` keep the first image per id.
- `ImageStore` opens images as RGB from those (container, member) pairs; it is picklable
  and keeps one open handle per zip / tar per process.

Byte caps (geodata.capped_io, re-exported here): an image over MAX_IMAGE_BYTES (64 MiB) by
its declared size (zip central directory, tar header, file size) is listed as refused and
never read; reads stop past the cap even when a zip member lies about its size. Only
regular files are opened: fifos, devices and sockets are listed as refused, never read.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import tarfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps, UnidentifiedImageError

from geodata.capped_io import (
    MAX_IMAGE_BYTES,
    InputError,
    InputTooLargeError as InputTooLargeError,  # re-exported: the errors of capped reads
    NotRegularFileError as NotRegularFileError,
    check_size,
    open_regular,
    path_refusal,
    read_capped,
    read_stream_capped,
    regular_refusal,
    require_regular,
    size_refusal,
)

log = logging.getLogger(__name__)

#: File name endings treated as images (compared lower-case).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg")

#: Columns of an image listing, in order.
IMAGE_INDEX_COLUMNS: tuple[str, ...] = ("id", "container", "member", "size_bytes")

#: Default pixel limit per image. OSV-5M photos are 512 px tall and at most ~1.2k wide
#: (<1 Mpx); 40 Mpx leaves room for other datasets while refusing decompression bombs
#: far below PIL's own 89 Mpx warning / 179 Mpx error thresholds.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

_DRIVE_RE = re.compile(r"^[A-Za-z]:")


class UnsafeMemberError(ValueError):
    """A zip member or container path that would escape its folder (absolute or '..')."""


class ImageDecodeError(InputError):
    """An image that cannot be read or fully decoded (truncated, corrupt, not an image)."""


def is_safe_relative_name(name: str) -> bool:
    """True when `name` is a relative path with no '..' part (either slash counts).

    Zips made on Windows may use backslashes, so both separators split the name.
    """
    if not name or name.startswith(("/", "\\")) or _DRIVE_RE.match(name):
        return False
    parts = re.split(r"[\\/]", name)
    return ".." not in parts


def _check_safe(name: str, where: str) -> None:
    """Raise UnsafeMemberError naming `where` when `name` is absolute or contains '..'."""
    if not is_safe_relative_name(name):
        raise UnsafeMemberError(
            f"{where}: member name {name!r} is absolute or contains '..' and could escape "
            "the dataset folder; refusing it. Rebuild the archive with relative member names."
        )


def _is_image_name(name: str) -> bool:
    """True for names ending in .jpg/.jpeg, skipping macOS resource forks ('._x.jpg', __MACOSX/)."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith("._") or name.startswith("__MACOSX/") or "/__MACOSX/" in name:
        return False
    return base.lower().endswith(IMAGE_SUFFIXES)


def _stem(file_name: str) -> str:
    """File name without its last suffix ('123.jpg' -> '123')."""
    return PurePosixPath(file_name).stem


def _relative_posix(path: Path, root: Path) -> str:
    """`path` relative to `root` with forward slashes (raises ValueError if outside root)."""
    return path.relative_to(root).as_posix()


_UNSAFE_RE = r"^[\\/]|^[A-Za-z]:|(?:^|[\\/])\.\.(?:[\\/]|$)"  # absolute, drive, '..' part

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


def _refuse_unsafe_names(names: pa.Array, where: str) -> None:
    """Raise UnsafeMemberError for the first absolute / drive / '..' / empty member name."""
    unsafe = np.asarray(
        pc.or_(pc.match_substring_regex(names, _UNSAFE_RE), pc.equal(names, "")).to_numpy(zero_copy_only=False),
        dtype=bool,
    )
    if unsafe.any():
        _check_safe(names[int(np.flatnonzero(unsafe)[0])].as_py(), where)  # raises


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
    _refuse_unsafe_names(arr, where)
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


def _zip_refusal(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member is not a plain file (a unix symlink, device, fifo ...), else None."""
    mode = info.external_attr >> 16
    file_type = stat.S_IFMT(mode)  # 0 when the writer stored permission bits only
    if info.create_system == 3 and file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        kind = "symlink" if stat.S_ISLNK(mode) else f"file of type {stat.filemode(mode)[0]!r}"
        return f"zip member is a {kind}, not a regular file; refused"
    return None


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
        [_zip_refusal(i) or size_refusal(i.file_size, max_image_bytes, declared=True) for i in infos],
        f"zip {zip_path}",
    )


def tar_refusal(info: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read (link, device, fifo, ...), else None for a regular file."""
    if info.isreg():
        return None
    if info.issym():
        return f"tar member is a symlink to {info.linkname!r}; refused"
    if info.islnk():
        return f"tar member is a hardlink to {info.linkname!r}; refused"
    if info.isdev():
        return "tar member is a device or fifo; refused"
    return f"tar member of type {info.type!r} is not a regular file; refused"


def iter_tar_members(tar_path: Path) -> Iterator[tarfile.TarInfo]:
    """The members of a tar in archive order, headers only (nothing extracted).

    Raises UnsafeMemberError naming the tar when a member name is absolute, has a
    drive letter or a '..' part (the whole shard is refused), tarfile.ReadError when
    the file is not a readable tar.
    """
    try:
        tf = tarfile.open(tar_path, "r:")
    except tarfile.ReadError as exc:
        raise tarfile.ReadError(f"{tar_path}: not a readable tar ({exc}); re-create this shard") from exc
    with tf:
        for info in tf:
            _check_safe(info.name, f"tar {tar_path}")
            yield info
            tf.members = []  # headers are not needed again: keep memory flat on big shards


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
    if not _is_image_name(entry.name) or entry.is_dir():
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
            if not has_images and _is_image_name(entry.name) and _entry_stat(entry) is not None:
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Return `image` as RGB: EXIF orientation applied, alpha composited on white.

    Handles L/LA/P/PA/RGBA/CMYK/I;16/... modes. Palette images with transparency go
    through RGBA so the transparent colour becomes white rather than its palette colour.
    """
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # malformed EXIF is not a broken photo: keep it unrotated
        log.debug("ignoring unreadable EXIF orientation", exc_info=True)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16/32-bit greyscale: convert("RGB") would clip, so scale to 8 bits first.
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


#: Zip shards an ImageStore keeps open per process (least recently used closed first).
MAX_OPEN_ZIPS = 8


class ImageStore:
    """Open images by (container, member) under a dataset root; picklable across workers.

    `container` is a zip file, a tar file or a folder path relative to `root` (as
    `list_images` writes it); `member` is the name inside the archive or the file name in
    the folder. Tar members are read with one positioned read (`os.pread`) at their data
    offset: pass `offset`/`size` from the image index (the manifest's image_offset and
    image_size) to skip the lookup, else the tar's headers are indexed once per process.
    Open handles are cached per process and dropped on pickling and after a fork, so
    DataLoader workers re-open their own. Reads from threads are safe (zipfile serialises
    reads on a shared handle; pread does not move a file offset).

    Archive members that are links or devices are refused (UnsafeMemberError), never
    followed. Images with more than `max_image_pixels` pixels raise PIL's
    DecompressionBombError before any pixel is decoded. The limit is checked per store, so
    PIL's global Image.MAX_IMAGE_PIXELS is left untouched. Images over `max_image_bytes`
    (declared size: zip directory, tar header, file size) raise InputTooLargeError before
    any byte is read, and no read goes past it; files that are not regular files (fifo,
    device) raise NotRegularFileError, never opened for reading.
    """

    def __init__(
        self, root: Path, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES
    ) -> None:
        self.root = Path(root)
        self.max_image_pixels = int(max_image_pixels)
        self.max_image_bytes = int(max_image_bytes)
        self._zips: OrderedDict[str, zipfile.ZipFile] = OrderedDict()
        self._tar_fds: dict[str, int] = {}
        self._tar_index: dict[str, dict[str, tuple[int, int, str | None]]] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the configuration; open handles and the lock stay behind."""
        return {"root": self.root, "max_image_pixels": self.max_image_pixels, "max_image_bytes": self.max_image_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["root"], max_image_pixels=state["max_image_pixels"],
            max_image_bytes=state.get("max_image_bytes", MAX_IMAGE_BYTES),
        )

    def __repr__(self) -> str:
        return (f"ImageStore(root={str(self.root)!r}, max_image_pixels={self.max_image_pixels}, "
                f"max_image_bytes={self.max_image_bytes})")

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's cached zip and tar handles."""
        with self._lock:
            if self._pid == os.getpid():
                for zf in self._zips.values():
                    zf.close()
                for fd in self._tar_fds.values():
                    os.close(fd)
            self._zips, self._tar_fds, self._tar_index = OrderedDict(), {}, {}

    def _own_handles(self) -> None:
        """Drop handles inherited through a fork (call with the lock held)."""
        pid = os.getpid()
        if pid != self._pid:
            # Forked child: the parent's zip handles share a file offset; never use them.
            self._zips, self._tar_fds, self._tar_index, self._pid = OrderedDict(), {}, {}, pid

    def _zip(self, container: str) -> zipfile.ZipFile:
        """The cached ZipFile for `container`, opened in this process. At most MAX_OPEN_ZIPS stay
        open (least recently used closed first): an OSV-5M shard's central directory costs ~25 MB
        of ZipInfo, so keeping all ~100 open would cost GBs per DataLoader worker."""
        with self._lock:
            self._own_handles()
            zf = self._zips.get(container)
            if zf is None:
                require_regular(self.root / container)  # a fifo would block the open
                zf = zipfile.ZipFile(self.root / container)
                self._zips[container] = zf
                while len(self._zips) > MAX_OPEN_ZIPS:
                    # A reader that already holds the evicted one keeps its file open until done
                    # (ZipFile counts open members); one that has not started yet retries (read_bytes).
                    self._zips.popitem(last=False)[1].close()
            self._zips.move_to_end(container)
            return zf

    def _tar_fd(self, container: str) -> int:
        """The cached read-only file descriptor of tar `container` in this process."""
        with self._lock:
            self._own_handles()
            fd = self._tar_fds.get(container)
            if fd is None:
                fd = open_regular(self.root / container)
                self._tar_fds[container] = fd
            return fd

    def _tar_member(self, container: str, member: str) -> tuple[int, int]:
        """(data offset, size) of `member` in tar `container`, from a per-process header index."""
        with self._lock:
            self._own_handles()
            index = self._tar_index.get(container)
        if index is None:
            index = {
                info.name: (info.offset_data, info.size, tar_refusal(info))
                for info in iter_tar_members(self.root / container)
            }
            with self._lock:
                self._tar_index[container] = index
        if member not in index:
            raise KeyError(f"{self.root / container}: no member {member!r}; re-run the image index")
        offset, size, refused = index[member]
        if refused is not None:
            raise UnsafeMemberError(f"{self.root / container}: member {member!r}: {refused}")
        return offset, size

    def _read_tar(self, container: str, member: str, offset: int | None, size: int | None) -> bytes:
        """Bytes of a regular tar member, read at its data offset (checked against its header)."""
        fd = self._tar_fd(container)
        if offset is None or size is None:
            offset, size = self._tar_member(container, member)
        else:
            # The 512-byte header right before the data must describe a regular file of this
            # size: a wrong or stale offset fails here instead of returning unrelated bytes.
            block = os.pread(fd, tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE) if offset >= tarfile.BLOCKSIZE else b""
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise KeyError(
                    f"{self.root / container}: no tar header before offset {offset} for {member!r} "
                    f"({exc}); re-run the ingest to refresh the image index"
                ) from None
            if tar_refusal(info) is not None or info.size != size:
                raise KeyError(
                    f"{self.root / container}: offset {offset} holds {info.name!r} "
                    f"({info.size} bytes, type {info.type!r}), not {member!r} ({size} bytes); "
                    "re-run the ingest to refresh the image index"
                )
        check_size(size, self.max_image_bytes, f"{self.root / container}: member {member!r}", declared=True)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ImageDecodeError(f"{self.root / container}: {member!r} cut short ({len(data)} of {size} bytes)")
        return data

    def _kind(self, container: str) -> str:
        """'zip', 'tar' or 'dir' (a folder named 'x.zip' is a folder)."""
        lower = container.lower()
        if lower.endswith((".zip", ".tar")) and not (self.root / container).is_dir():
            return lower[-3:]
        return "dir"

    def read_bytes(self, container: str, member: str, *, offset: int | None = None, size: int | None = None) -> bytes:
        """The raw bytes of one image. Raises KeyError/FileNotFoundError naming both parts,
        UnsafeMemberError for escaping names and for link/device archive members.

        offset/size: where a tar member's data lies (from the image index); ignored otherwise.
        """
        _check_safe(container, f"store {self.root}")
        _check_safe(member, f"container {container}")
        kind = self._kind(container)
        if kind == "tar":
            return self._read_tar(container, member, offset, size)
        if kind == "zip":
            zf = self._zip(container)
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise KeyError(
                    f"{self.root / container}: no member {member!r}; re-run the image index"
                ) from None
            refused = _zip_refusal(info)
            if refused is not None:
                raise UnsafeMemberError(f"{self.root / container}: member {member!r}: {refused}")
            where = f"{self.root / container}: member {member!r}"
            check_size(info.file_size, self.max_image_bytes, where, declared=True)
            for _ in range(3):
                try:
                    return self._read_zip_member(zf, info, where)
                except ValueError:  # closed by another thread's LRU eviction in between: reopen
                    if zf.fp is not None:
                        raise
                    zf = self._zip(container)
            return self._read_zip_member(zf, info, where)
        path = self.root / container / member
        try:
            return read_capped(path, self.max_image_bytes)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: image file not found; re-run the image index"
            ) from None

    def _read_zip_member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
        """A zip member through its decompressing stream, never more than declared + 1 bytes (capped)."""
        with zf.open(info) as fh:
            return read_stream_capped(fh, info.file_size, self.max_image_bytes, where)

    def open(self, container: str, member: str, *, offset: int | None = None, size: int | None = None) -> Image.Image:
        """Decode one image fully and return it as RGB with EXIF orientation applied.

        Raises PIL.Image.DecompressionBombError when it has more than max_image_pixels,
        ImageDecodeError (an OSError) when it is truncated, corrupt or not an image,
        InputTooLargeError / NotRegularFileError (see the class); the message names the
        container and member.
        """
        data = self.read_bytes(container, member, offset=offset, size=size)
        return decode_image(data, f"{container}:{member}", self.max_image_pixels, self.max_image_bytes)


def decode_image(
    data: bytes, where: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES
) -> Image.Image:
    """Decode image bytes fully; return RGB with EXIF orientation applied.

    Raises InputTooLargeError when ``data`` is over ``max_image_bytes`` (nothing decoded),
    PIL.Image.DecompressionBombError above ``max_image_pixels`` (checked from the
    header, before any pixel is decoded) and ImageDecodeError (an OSError) when the data
    is truncated, corrupt or not an image; messages start with ``where``.
    """
    check_size(len(data), max_image_bytes, where)
    try:
        image = Image.open(io.BytesIO(data))
        n_pixels = image.width * image.height
        if n_pixels > max_image_pixels:
            raise Image.DecompressionBombError(
                f"{where}: {image.width}x{image.height} = {n_pixels} pixels exceeds "
                f"max_image_pixels={max_image_pixels} (possible decompression bomb); "
                "raise the limit only for trusted data"
            )
        image.load()  # full decode: truncated data raises here, not later in a worker
        return to_rgb(image)
    except Image.DecompressionBombError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        # PIL names an in-memory file by its repr ('<_io.BytesIO object at 0x...>'): say what it means
        detail = "not a known image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        reason = f"{type(exc).__name__}: {detail}"
        raise ImageDecodeError(
            f"{where}: cannot decode image ({reason}); the file is truncated, corrupt or not an image", reason
        ) from exc


#: Photo file endings picked up when a folder is given to the predict tool.
PHOTO_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")


def expand_photo_paths(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files named directly, plus the photos (by suffix) found under named folders, sorted.

    Returns (files, errors): errors are (path, reason) for paths that do not exist, and for
    photo-named fifos, devices and sockets (never opened: a fifo would block the reader).
    A file named directly is kept whatever its suffix: decoding decides.
    """
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            named = sorted(f for f in p.rglob("*") if f.suffix.lower() in PHOTO_SUFFIXES
                           and not f.name.startswith("._") and not f.is_dir())
            refusals = {f: path_refusal(f) for f in named}  # None: a regular file (or a dangling link)
            found = [f for f in named if refusals[f] is None and f.is_file()]
            refused = [(f, reason) for f, reason in refusals.items() if reason is not None]
            if not found and not refused:
                errors.append((p, f"no photos ({', '.join(PHOTO_SUFFIXES)}) under this folder"))
            errors += refused
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append((p, path_refusal(p) or "no such file or folder"))
    return files, errors


def open_photo(
    path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES
) -> Image.Image:
    """Open one photo file as RGB (EXIF rotation applied; bomb guard; clear errors).

    Only a regular file of at most ``max_image_bytes`` is read (NotRegularFileError,
    InputTooLargeError otherwise, before any byte is read)."""
    return decode_image(read_capped(path, max_image_bytes), str(path), max_image_pixels, max_image_bytes)
