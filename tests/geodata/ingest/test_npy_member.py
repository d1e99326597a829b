"""geodata.ingest.npy_member reads a .npy member as np.load does, and refuses what it refuses."""

from __future__ import annotations

import io

import numpy as np
import pytest

from geodata.ingest.npy_member import npy_array


def _npy(arr, version=None) -> bytes:
    buf = io.BytesIO()
    if version is None:
        np.save(buf, arr, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, arr, version=version, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("arr", [np.arange(768, dtype=np.float16), np.ones((1, 5), np.float32),
                                 np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.zeros(0, np.float64),
                                 np.arange(6, dtype=">i4").reshape(2, 3)])
@pytest.mark.parametrize("version", [None, (2, 0)])
def test_same_array_as_np_load(arr, version):
    data = _npy(arr, version)
    got = npy_array(data)
    want = np.load(io.BytesIO(data), allow_pickle=False)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


def test_refusals():
    good = _npy(np.arange(8, dtype=np.float32))
    with pytest.raises(ValueError, match="holds"):
        npy_array(good[:-4])  # the data cut short
    with pytest.raises(ValueError, match="holds"):
        npy_array(good + b"\0" * 4)
    with pytest.raises(ValueError):
        npy_array(b"not a npy file at all")
    with pytest.raises(ValueError, match="not supported"):
        npy_array(good[:6] + b"\x03\x00" + good[8:])
    with pytest.raises(ValueError, match="header declares"):
        npy_array(good[:12])
    obj = io.BytesIO()
    np.lib.format.write_array_header_1_0(obj, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    with pytest.raises(ValueError):
        npy_array(obj.getvalue() + b"\0" * 8)
