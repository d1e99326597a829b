"""Find and open OSV-5M photos, whether they sit in zip shards or in unzipped folders.

The release ships `images/{split}/NN.zip` holding `<id>.jpg`; users often unzip shards
into folders of any depth. Both layouts are addressed the same way: a *container*
(a zip file or a folder, as a path relative to the dataset root) and a *member* (the
name inside the zip, or the file name inside the folder).

- `list_images` walks a folder and lists every JPEG (zip members are listed from the
  zip's central directory; nothing is extracted).
- `split_duplicate_ids` / `index_images` keep the first image per id.
- `ImageStore` opens images as RGB from those (container, member) pairs; it is picklable
  and keeps one open ZipFile per zip per process.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

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


class ImageDecodeError(OSError):
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


def _list_zip(zip_path: Path, container: str) -> list[tuple[str, str, str, int]]:
    """List the JPEG members of one zip as (id, container, member, size_bytes) rows.

    Every member name is checked, not only JPEGs: an archive holding an escaping name
    is refused as a whole. Vectorised: a release shard holds ~50k members.
    """
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise zipfile.BadZipFile(
            f"{zip_path}: not a readable zip ({exc}); re-download or re-create this shard"
        ) from exc
    names = pa.array([i.filename for i in infos], pa.string())
    unsafe = np.asarray(
        pc.or_(pc.match_substring_regex(names, _UNSAFE_RE), pc.equal(names, "")), dtype=bool
    )
    if unsafe.any():
        _check_safe(names[int(np.flatnonzero(unsafe)[0])].as_py(), f"zip {zip_path}")  # raises
    base = pc.replace_substring_regex(names, r"^.*[\\/]", "")  # basename; Windows zips use '\\'
    lower = pc.utf8_lower(base)
    keep = np.asarray(
        pc.and_(
            pc.or_(*[pc.ends_with(lower, suffix) for suffix in IMAGE_SUFFIXES]),
            pc.invert(
                pc.or_(
                    pc.starts_with(base, "._"),
                    pc.match_substring_regex(names, r"(?:^|/)__MACOSX/"),
                )
            ),
        ),
        dtype=bool,
    )
    idx = np.flatnonzero(keep)
    ids = pc.replace_substring_regex(base.take(idx), r"\.[^.]*$", "").to_pylist()  # stem
    members = names.take(idx).to_pylist()
    sizes = [infos[i].file_size for i in idx]
    return list(zip(ids, [container] * len(ids), members, sizes, strict=True))


def _walk(folder: Path, root: Path, rows: list[tuple[str, str, str, int]]) -> None:
    """Recursively add images of `folder` (and of zips found there) to `rows`, sorted by name.

    Symlinked folders are not followed (no cycles); symlinked files are.
    """
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    container = _relative_posix(folder, root)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _walk(Path(entry.path), root, rows)
        elif entry.is_file():
            lower = entry.name.lower()
            if lower.endswith(".zip"):
                path = Path(entry.path)
                rows.extend(_list_zip(path, _relative_posix(path, root)))
            elif _is_image_name(entry.name):
                rows.append((_stem(entry.name), container, entry.name, entry.stat().st_size))


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
    images_dir = Path(images_dir)
    root = Path(relative_to) if relative_to is not None else images_dir
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"image folder {images_dir} does not exist; expected OSV-5M shards like "
            f"{images_dir}/00.zip or unzipped folders"
        )
    rows: list[tuple[str, str, str, int]] = []
    _walk(images_dir, root, rows)
    frame = pd.DataFrame(rows, columns=list(IMAGE_INDEX_COLUMNS))
    return frame.astype({"id": "str", "container": "str", "member": "str", "size_bytes": "int64"})


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


class ImageStore:
    """Open images by (container, member) under a dataset root; picklable across workers.

    `container` is a zip file or a folder path relative to `root` (as `list_images`
    writes it); `member` is the name inside the zip or the file name in the folder.
    Open ZipFile handles are cached per process and dropped on pickling and after a
    fork, so DataLoader workers re-open their own. Reads from threads are safe
    (zipfile serialises reads on a shared handle).

    Images with more than `max_image_pixels` pixels raise PIL's DecompressionBombError
    before any pixel is decoded. The limit is checked per store, so PIL's global
    Image.MAX_IMAGE_PIXELS is left untouched.
    """

    def __init__(self, root: Path, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.root = Path(root)
        self.max_image_pixels = int(max_image_pixels)
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the configuration; open handles and the lock stay behind."""
        return {"root": self.root, "max_image_pixels": self.max_image_pixels}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["root"], max_image_pixels=state["max_image_pixels"]
        )

    def __repr__(self) -> str:
        return f"ImageStore(root={str(self.root)!r}, max_image_pixels={self.max_image_pixels})"

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's cached zip handles."""
        with self._lock:
            if self._pid == os.getpid():
                for zf in self._zips.values():
                    zf.close()
            self._zips = {}

    def _zip(self, container: str) -> zipfile.ZipFile:
        """The cached ZipFile for `container`, opened in this process."""
        pid = os.getpid()
        with self._lock:
            if pid != self._pid:
                # Forked child: the parent's handles share a file offset; never use them.
                self._zips, self._pid = {}, pid
            zf = self._zips.get(container)
            if zf is None:
                zf = zipfile.ZipFile(self.root / container)
                self._zips[container] = zf
            return zf

    def _is_zip(self, container: str) -> bool:
        """True when `container` names a zip file (a folder named 'x.zip' is a folder)."""
        return container.lower().endswith(".zip") and not (self.root / container).is_dir()

    def read_bytes(self, container: str, member: str) -> bytes:
        """The raw bytes of one image. Raises KeyError/FileNotFoundError naming both parts."""
        _check_safe(container, f"store {self.root}")
        _check_safe(member, f"container {container}")
        if self._is_zip(container):
            try:
                return self._zip(container).read(member)
            except KeyError:
                raise KeyError(
                    f"{self.root / container}: no member {member!r}; re-run the image index"
                ) from None
        path = self.root / container / member
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: image file not found; re-run the image index"
            ) from None

    def open(self, container: str, member: str) -> Image.Image:
        """Decode one image fully and return it as RGB with EXIF orientation applied.

        Raises PIL.Image.DecompressionBombError when it has more than max_image_pixels,
        ImageDecodeError (an OSError) when it is truncated, corrupt or not an image; the
        message names the container and member.
        """
        return decode_image(self.read_bytes(container, member), f"{container}:{member}", self.max_image_pixels)


def decode_image(data: bytes, where: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes fully; return RGB with EXIF orientation applied.

    Raises PIL.Image.DecompressionBombError above ``max_image_pixels`` (checked from the
    header, before any pixel is decoded) and ImageDecodeError (an OSError) when the data
    is truncated, corrupt or not an image; messages start with ``where``.
    """
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
        raise ImageDecodeError(
            f"{where}: cannot decode image ({type(exc).__name__}: {exc}); "
            "the file is truncated, corrupt or not an image"
        ) from exc


#: Photo file endings picked up when a folder is given to the predict tool.
PHOTO_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")


def expand_photo_paths(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files named directly, plus the photos (by suffix) found under named folders, sorted.

    Returns (files, errors): errors are (path, reason) for paths that do not exist.
    A file named directly is kept whatever its suffix: decoding decides.
    """
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES
                           and not f.name.startswith("._"))
            if not found:
                errors.append((p, f"no photos ({', '.join(PHOTO_SUFFIXES)}) under this folder"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append((p, "no such file or folder"))
    return files, errors


def open_photo(path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open one photo file as RGB (EXIF rotation applied; bomb guard; clear errors)."""
    return decode_image(Path(path).read_bytes(), str(path), max_image_pixels)
