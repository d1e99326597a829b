"""Open images by (container, member) under a dataset root: `ImageStore`.

A container is a zip shard, a tar shard or a folder (as geodata.ingest.image_listing
lists them). The store is picklable and keeps one open handle per zip / tar per process
(at most MAX_OPEN_ZIPS zips, least recently used closed first).

Byte caps (geodata.capped_io): an image over MAX_IMAGE_BYTES (64 MiB) by its declared size
(zip central directory, tar header, file size) is never read; reads stop past the cap
even when a zip member lies about its size. Only regular files are opened: fifos,
devices and sockets are refused, never read. Decoding: geodata.ingest.image_decode.
"""

from __future__ import annotations

import os
import tarfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from geodata.capped_io import (
    MAX_IMAGE_BYTES,
    check_size,
    open_regular,
    read_capped,
    read_stream_capped,
    require_regular,
)
from geodata.ingest.archive_members import (
    UnsafeMemberError,
    check_safe_name,
    iter_tar_members,
    tar_refusal,
    zip_refusal,
)
from geodata.ingest.image_decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    EncodedImage,
    ImageDecodeError,
    decode_image,
    inspect_image,
)


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
        check_safe_name(container, f"store {self.root}")
        check_safe_name(member, f"container {container}")
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
            refused = zip_refusal(info)
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

    def open(self, container: str, member: str, *, offset: int | None = None, size: int | None = None,
             min_side: int | None = None, raw: bool = False) -> Image.Image | EncodedImage:
        """Decode one image fully and return it as RGB with EXIF orientation applied.

        ``min_side``: a JPEG is decoded at 1/2, 1/4 or 1/8 scale where both sides stay >=
        ``min_side`` (geodata.ingest.image_decode.decode_image); other formats ignore it.
        ``raw``: decode nothing; return the bytes with their header's format, size and EXIF
        orientation (an EncodedImage, geodata.ingest.image_decode.inspect_image), after the same
        byte and pixel caps, for a caller that decodes them itself.

        Raises PIL.Image.DecompressionBombError when it has more than max_image_pixels,
        ImageDecodeError (an OSError) when it is truncated, corrupt or not an image,
        InputTooLargeError / NotRegularFileError (see the class); the message names the
        container and member.
        """
        data = self.read_bytes(container, member, offset=offset, size=size)
        if raw:
            return inspect_image(data, f"{container}:{member}", self.max_image_pixels, self.max_image_bytes)
        return decode_image(data, f"{container}:{member}", self.max_image_pixels, self.max_image_bytes,
                            min_side=min_side)
