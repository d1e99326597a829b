"""One array of an .npz, memory-mapped in place when it is stored uncompressed.

``np.savez`` writes every array as a ZIP_STORED member: the member's bytes are a plain ``.npy``
file inside the zip, so ``np.memmap`` can read it where it lies. The member's data starts after
its *local* file header (30 bytes, then the name and an extra field whose lengths are read from
that header: the central directory's copy of the extra field may differ), then the ``.npy``
header gives dtype, shape and order. A compressed (``np.savez_compressed``) or Fortran-order
member cannot be mapped: ``map_npz_member`` then reads that one array (capped by its size).
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

#: The largest array read whole when it cannot be mapped (a compressed or Fortran-order member).
MAX_UNMAPPED_BYTES = 4 << 30

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length (30 bytes)


def _check_dtype(path: Path, key: str, dtype: np.dtype) -> None:
    if dtype.kind != "f" or dtype.hasobject:  # data never runs code: no object arrays, no pickles
        raise ValueError(f"{path}: {key} has dtype {dtype}, expected float16/float32/float64; "
                         "delete this shard (it is recomputed) or re-run the ingest that wrote it")


def _read_unmapped(path: Path, key: str, info: zipfile.ZipInfo) -> np.ndarray:
    """The whole array from a member that cannot be mapped, after a size check."""
    if info.file_size > MAX_UNMAPPED_BYTES:
        raise ValueError(f"{path}: {key} is stored compressed or in Fortran order and holds {info.file_size} bytes, "
                         f"over the {MAX_UNMAPPED_BYTES} read whole; rewrite the shard with np.savez (uncompressed)")
    with np.load(path, allow_pickle=False) as z:
        arr = z[key]
    _check_dtype(path, key, arr.dtype)
    return arr


def map_npz_member(path: Path, key: str) -> np.ndarray:
    """Array ``key`` of the .npz at ``path``: a read-only np.memmap when the member is stored
    uncompressed in C order, else the array read whole (MAX_UNMAPPED_BYTES at most).

    Raises KeyError when the member is absent, ValueError naming the file when its headers
    disagree (a truncated or foreign file) or its dtype is not a float.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            raise KeyError(f"{path}: no array {key!r} in this .npz") from None
    if info.compress_type != zipfile.ZIP_STORED:
        return _read_unmapped(path, key, info)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        raw = fh.read(_LOCAL_HEADER.size)
        if len(raw) != _LOCAL_HEADER.size:
            raise ValueError(f"{path}: truncated zip (the local header of {key}.npy is cut off)")
        sig, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
        if sig != b"PK\x03\x04":
            raise ValueError(f"{path}: no zip local header at offset {info.header_offset} for {key}.npy")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        fh.seek(start)
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)  # a literal dict, parsed safely, size-capped by numpy
        data_at = fh.tell()
    _check_dtype(path, key, dtype)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data_at - start + n_bytes != info.file_size:
        raise ValueError(f"{path}: {key}.npy holds {info.file_size} bytes, its header says {data_at - start} + "
                         f"{n_bytes} ({shape} {dtype}); the shard is damaged: delete it (it is recomputed)")
    if fortran and len(shape) > 1:
        return _read_unmapped(path, key, info)
    if n_bytes == 0:  # mmap cannot map zero bytes
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_at, shape=shape, order="C")
