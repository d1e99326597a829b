"""What may be read from an archive: member names that cannot escape, regular members only.

Member names that could escape (absolute, drive letter, '..') make a whole archive refused
(`UnsafeMemberError`); link, device and fifo members are refused one by one (`zip_refusal`,
`tar_refusal`) and never read. `iter_tar_members` walks a tar's headers with every name
checked. Used by the image listing, the ImageStore and the WebDataset reader.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geodata.ingest.tar_headers import iter_headers

_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_UNSAFE_RE = r"^[\\/]|^[A-Za-z]:|(?:^|[\\/])\.\.(?:[\\/]|$)"  # absolute, drive, '..' part


class UnsafeMemberError(ValueError):
    """A zip member or container path that would escape its folder (absolute or '..')."""


def is_safe_relative_name(name: str) -> bool:
    """True when `name` is a relative path with no '..' part (either slash counts).

    Zips made on Windows may use backslashes, so both separators split the name.
    """
    if not name or name.startswith(("/", "\\")) or _DRIVE_RE.match(name):
        return False
    parts = re.split(r"[\\/]", name)
    return ".." not in parts


def check_safe_name(name: str, where: str) -> None:
    """Raise UnsafeMemberError naming `where` when `name` is absolute or contains '..'."""
    if not is_safe_relative_name(name):
        raise UnsafeMemberError(
            f"{where}: member name {name!r} is absolute or contains '..' and could escape "
            "the dataset folder; refusing it. Rebuild the archive with relative member names."
        )


def refuse_unsafe_names(names: pa.Array, where: str) -> None:
    """Raise UnsafeMemberError for the first absolute / drive / '..' / empty member name."""
    unsafe = np.asarray(
        pc.or_(pc.match_substring_regex(names, _UNSAFE_RE), pc.equal(names, "")).to_numpy(zero_copy_only=False),
        dtype=bool,
    )
    if unsafe.any():
        check_safe_name(names[int(np.flatnonzero(unsafe)[0])].as_py(), where)  # raises


def zip_refusal(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member is not a plain file (a unix symlink, device, fifo ...), else None."""
    mode = info.external_attr >> 16
    file_type = stat.S_IFMT(mode)  # 0 when the writer stored permission bits only
    if info.create_system == 3 and file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        kind = "symlink" if stat.S_ISLNK(mode) else f"file of type {stat.filemode(mode)[0]!r}"
        return f"zip member is a {kind}, not a regular file; refused"
    return None


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
    the file is not a readable tar (or its data ends early).
    """
    members = iter_headers(tar_path)  # tarfile's listing, parsed fast (geodata.ingest.tar_headers)
    while True:
        try:
            info = next(members)
        except StopIteration:
            return
        except tarfile.ReadError as exc:
            raise tarfile.ReadError(f"{tar_path}: not a readable tar ({exc}); re-create this shard") from exc
        check_safe_name(info.name, f"tar {tar_path}")
        yield info
