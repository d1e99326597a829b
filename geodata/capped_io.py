"""Size-capped reads of regular files and archive members: the byte caps of every image read.

Every image, metadata and feature read in geodata goes through here (the image listing, the
ImageStore and photo decoding of geodata.ingest, the WebDataset reader). The size a file or
member *declares* (os.fstat for a file, ZipInfo.file_size for a zip member, the header for a
tar member) is checked against a cap before any byte is read, and no read goes past the cap
even when the declared size lies: a zip member is read through its decompressing stream at
most `declared + 1` bytes (never more than the cap + 1) and refused when more come.

Only regular files are opened: a FIFO would block the reader forever, a device such as
/dev/zero never ends, sockets and folders are not photos. The check is made on the path
(symlinks followed) before opening, and again on the opened descriptor (opened with
O_NONBLOCK, so a path swapped for a FIFO in between cannot block the open).

Caps (bytes), with reasons:

- MAX_IMAGE_BYTES = 64 MiB per image. OSV-5M photos are 100-300 KB (512 px tall); a photo
  at the 40 Mpx pixel cap (geodata.ingest.image_decode.DEFAULT_MAX_IMAGE_PIXELS) is a 10-40 MB JPEG even
  at high quality, so 64 MiB refuses nothing real while keeping a bomb's cost bounded.
- MAX_JSON_BYTES = 64 KiB per WebDataset metadata member: an OSV-5M sample's JSON is its 32
  short release columns, about 1 KB.
- .npy features: NPY_HEADER_BYTES + 16 bytes (the widest accepted item) per expected value,
  the expected length being the D already seen for that feature, else MAX_FEATURE_VALUES
  (the published backbones have D = 768 or 1024).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

#: Byte cap of one image (file, zip or tar member, WebDataset .jpg, served bytes).
MAX_IMAGE_BYTES = 64 * 2**20
#: Byte cap of one WebDataset .json metadata member.
MAX_JSON_BYTES = 64 * 2**10
#: Room left for a .npy member's header (numpy pads it to 64-byte multiples; ~128 B for a vector).
NPY_HEADER_BYTES = 4096
#: Widest item accepted in a feature .npy (float64 / int64 are 8, longdouble 16).
NPY_MAX_ITEMSIZE = 16
#: Feature length assumed before the first vector of a feature has been seen.
MAX_FEATURE_VALUES = 65_536


class InputError(OSError):
    """An input refused or unreadable; the message is '<file or member>: <reason>', `reason` the reason alone."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


class InputTooLargeError(InputError):
    """A file or archive member over its byte cap (declared or actual size): not read past the cap."""


class NotRegularFileError(InputError):
    """A path that is not a regular file (fifo, device, socket, folder): never read."""


def feature_cap(dim: int | None) -> int:
    """Byte cap of one .npy feature member holding `dim` values (None: not known yet)."""
    return NPY_HEADER_BYTES + NPY_MAX_ITEMSIZE * (dim if dim else MAX_FEATURE_VALUES)


def format_size(n: int) -> str:
    """`n` bytes for people: '812 bytes', '64 KiB', '1.4 GiB'."""
    if n < 1024:
        return f"{n} bytes"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"  # unreachable


def size_refusal(size: int, cap: int, what: str = "image", *, declared: bool = False) -> str | None:
    """Why `size` bytes is refused under `cap` (None when it fits), e.g.
    'image is 1.4 GiB (1,500,000,000 bytes), over the 64 MiB image cap; refused, not read'."""
    if size <= cap:
        return None
    verb = "declares" if declared else "is"
    exact = f" ({size:,} bytes)" if size >= 1024 else ""
    return f"{what} {verb} {format_size(size)}{exact}, over the {format_size(cap)} {what} cap; refused, not read"


def check_size(size: int, cap: int, where: str, what: str = "image", *, declared: bool = False) -> None:
    """Raise InputTooLargeError naming `where` when `size` is over `cap`."""
    reason = size_refusal(size, cap, what, declared=declared)
    if reason is not None:
        raise InputTooLargeError(f"{where}: {reason}", reason)


def file_kind(mode: int) -> str:
    """A file type in words: 'regular file', 'fifo', 'character device', ..."""
    for test, name in (
        (stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "special file"


def regular_refusal(mode: int) -> str | None:
    """Why a file of this st_mode is not read ('not a regular file (fifo)...'), None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({file_kind(mode)}); refused, never read"


def path_refusal(path: Path) -> str | None:
    """Why an existing path that is not a regular file is refused; None for a regular file or a missing path."""
    try:
        return regular_refusal(os.stat(path).st_mode)
    except OSError:
        return None


def require_regular(path: Path, where: str | None = None) -> os.stat_result:
    """os.stat(path) (symlinks followed); NotRegularFileError naming the file unless it is a regular file."""
    st = os.stat(path)
    reason = regular_refusal(st.st_mode)
    if reason is not None:
        raise NotRegularFileError(f"{where or path}: {reason}", reason)
    return st


def open_regular(path: Path, where: str | None = None) -> int:
    """A read-only descriptor of `path`, only when it is a regular file (checked before and after opening).

    O_NONBLOCK: a path swapped for a FIFO after the check cannot block the open; the
    descriptor's own fstat then refuses it. The caller closes the descriptor.
    """
    require_regular(path, where)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        reason = regular_refusal(os.fstat(fd).st_mode)
        if reason is not None:
            raise NotRegularFileError(f"{where or path}: {reason}", reason)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_stream_capped(fh: BinaryIO, declared: int, cap: int, where: str, what: str = "image") -> bytes:
    """Read a stream that declares `declared` bytes: refused above `cap` before reading, and at
    most declared + 1 bytes are ever read (a stream holding more than it declares is refused)."""
    check_size(declared, cap, where, what, declared=True)
    data = fh.read(declared + 1)
    if len(data) > declared:
        reason = f"{what} holds more than the {declared:,} bytes it declares; refused, not read further"
        raise InputTooLargeError(f"{where}: {reason}", reason)
    return data


def read_capped(path: Path | str, cap: int = MAX_IMAGE_BYTES, *, what: str = "image", where: str | None = None) -> bytes:
    """The bytes of a regular file of at most `cap` bytes.

    Raises NotRegularFileError for a fifo, device, socket or folder (never opened for
    reading, so a FIFO cannot hang the caller), InputTooLargeError when the file is over
    `cap` (checked on the opened file's size before reading; a file that grows while read
    is not read past its size + 1 byte), FileNotFoundError / PermissionError as usual.
    Messages start with `where` (default: the path).
    """
    where = where or str(path)
    fd = open_regular(Path(path), where)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        check_size(size, cap, where, what)
        return read_stream_capped(fh, size, cap, where, what)
