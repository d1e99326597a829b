"""One .npy member of an archive, read without numpy's per-call header parsing where it can be.

A WebDataset shard holds one small .npy vector per sample and feature, millions in all, whose
headers are byte for byte the same: ``npy_array`` parses each distinct header once (numpy's
safe reader, no pickle), checks that it accounts for exactly the bytes that follow, and views
the data in place.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy header block (magic to padding), parsed by numpy's
    safe reader; cached, since the vectors of one feature share one header byte for byte."""
    fh = io.BytesIO(header)
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(fh)


def npy_array(data: bytes) -> np.ndarray:
    """A .npy member's array; its header's shape and dtype must account for exactly the bytes
    that follow it, checked before numpy allocates the array the header declares."""
    version = tuple(data[6:8]) if data[:6] == b"\x93NUMPY" else None
    if version not in ((1, 0), (2, 0)):
        version = np.lib.format.read_magic(io.BytesIO(data))  # raises on a bad magic
        raise ValueError(f".npy format version {version} not supported")
    size_bytes = 2 if version == (1, 0) else 4
    start = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    if len(data) < start:
        raise ValueError(f".npy header declares {start:,} bytes, the member holds {len(data):,}")
    shape, fortran, dtype = _npy_header(bytes(data[:start]))
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects; refused")
    declared, held = math.prod(shape) * dtype.itemsize, len(data) - start
    if declared != held:
        raise ValueError(f"header declares shape {shape} {dtype} ({declared:,} bytes), holds {held:,}")
    arr = np.frombuffer(data, dtype, count=math.prod(shape), offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")
