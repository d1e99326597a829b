"""Tar headers, fast: the members of a tar as ``tarfile.TarInfo``, parsed without ``tarfile``'s
per-header Python work where a header is a plain one.

A WebDataset shard of OSV-5M holds two or three members per sample, millions in all; ``tarfile``
spends ~0.1 ms parsing each header (octal fields one by one, two checksums), more than the ingest
spends on the member itself. ``iter_headers`` parses a well-formed ustar / GNU header of a
regular file, directory, link, device or fifo (type flags 0-7, octal size, a checksum that
matches) itself and hands anything else to ``tarfile`` from that header on (pax and GNU long-name
headers, base-256 sizes, a checksum that does not match, a truncated header, the end of the
archive), so every answer, error included, is the one ``tarfile`` gives: tests compare the two on
pax, GNU, long-name, link, truncated and corrupt archives.
"""

from __future__ import annotations

import mmap
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BLOCK = tarfile.BLOCKSIZE
_FAST_TYPES = frozenset(b"01234567\x00")
_USTAR = (tarfile.POSIX_MAGIC, tarfile.GNU_MAGIC)
_ENCODING = tarfile.ENCODING


def _text(field: bytes) -> str:
    """A NUL-terminated header field as tarfile decodes it (file-system encoding, surrogateescape)."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode(_ENCODING, "surrogateescape")


def _octal(field: bytes) -> int | None:
    """An octal header number, or None when tarfile must decide (base-256, junk)."""
    if field[:1] and field[0] & 0x80:
        return None
    end = field.find(b"\0")
    text = (field if end < 0 else field[:end]).strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def _parse(buf: bytes, offset: int) -> tarfile.TarInfo | None:
    """A plain header block as tarfile would read it, or None to let tarfile read it."""
    if len(buf) < BLOCK or buf[156] not in _FAST_TYPES or buf[257:265] not in _USTAR:
        return None
    size, chksum, mode = _octal(buf[124:136]), _octal(buf[148:156]), _octal(buf[100:108])
    if size is None or chksum is None or mode is None:
        return None
    arr = np.frombuffer(buf, np.uint8, BLOCK)
    if int(arr[:148].sum()) + int(arr[156:].sum()) + 256 != chksum:  # tarfile also accepts a signed sum
        return None
    info = tarfile.TarInfo(_text(buf[0:100]))
    info.mode, info.size, info.type = mode, size, bytes(buf[156:157])
    info.linkname = _text(buf[157:257])
    info.uname, info.gname = _text(buf[265:297]), _text(buf[297:329])
    info.offset, info.offset_data = offset, offset + BLOCK
    if info.type == tarfile.AREGTYPE and info.name.endswith("/"):
        info.type = tarfile.DIRTYPE
    if info.isdir():
        info.name = info.name.rstrip("/")
    prefix = _text(buf[345:500]) if buf[257:265] == tarfile.POSIX_MAGIC else ""
    if prefix:
        info.name = prefix + "/" + info.name
    return info


def iter_headers(tar_path: Path) -> Iterator[tarfile.TarInfo]:
    """The members of a tar in archive order (headers only), as ``tarfile`` lists them.

    Raises tarfile.ReadError where tarfile does (not a tar, unexpected end of data, ...).
    """
    with open(tar_path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        view = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            offset = 0
            while True:
                info = _parse(view[offset:offset + BLOCK], offset) if offset + BLOCK <= size else None
                if info is None:  # tarfile reads the rest: the end, an error, or headers we do not parse
                    fh.seek(offset)
                    yield from _tarfile_from(fh, offset)
                    return
                end = info.offset_data + -(-info.size // BLOCK) * BLOCK if info.type in tarfile.REGULAR_TYPES \
                    else info.offset_data
                yield info
                if end > size:  # as tarfile: the member is listed, the next read fails
                    raise tarfile.ReadError("unexpected end of data")
                offset = end
        finally:
            if isinstance(view, mmap.mmap):
                view.close()


def _tarfile_from(fh, offset: int) -> Iterator[tarfile.TarInfo]:
    """tarfile's own iteration from ``offset`` (an empty rest at offset 0 is its ReadError)."""
    try:
        tf = tarfile.open(fileobj=fh, mode="r:")
    except tarfile.ReadError:
        if offset == 0:
            raise
        return  # past the first member: tarfile treats what follows as the end of the archive
    for info in tf:
        yield info
        tf.members = []
