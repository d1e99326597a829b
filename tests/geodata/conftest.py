"""Hostile inputs shared by the geodata tests: real zip bombs, sparse tars, a traced-memory probe."""

from __future__ import annotations

import io
import logging
import struct
import sys
import tarfile
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

#: Zeros after the JPEG in each bomb member: 300 MiB inflated, about 0.3 MB compressed.
BOMB_ZEROS = 300 * 2**20
#: The size the lying bomb's member declares (local header and central directory).
LYING_SIZE = 100_000


def _bomb_zip(path: Path, member: str) -> Path:
    """A zip whose `member` is a real JPEG followed by BOMB_ZEROS zero bytes (streamed, ~1 s)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    chunk = b"\0" * 2**20
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(member, "w") as fh:
            fh.write(buf.getvalue())
            for _ in range(BOMB_ZEROS // len(chunk)):
                fh.write(chunk)
    return path


def _lie_about_size(path: Path, declared: int) -> Path:
    """Patch the uncompressed size of a zip's only member in its local header and central directory."""
    data = bytearray(path.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    assert local == 0 and central > 0 and data.count(b"PK\x01\x02") == 1
    struct.pack_into("<I", data, local + 22, declared)
    struct.pack_into("<I", data, central + 24, declared)
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as zf:
        assert zf.infolist()[0].file_size == declared
    return path


@pytest.fixture(scope="session")
def zip_bombs(tmp_path_factory) -> dict[str, Path]:
    """Two real zip bombs (each ~0.3 MB on disk, 300 MiB inflated), built once per session.

    declared: member '2.jpg', a JPEG + 300 MiB of zeros, its size declared honestly;
    lying: member '3.jpg', the same data, declaring LYING_SIZE bytes (under every cap).
    """
    folder = tmp_path_factory.mktemp("zip_bombs")
    return {
        "declared": _bomb_zip(folder / "declared.zip", "2.jpg"),
        "lying": _lie_about_size(_bomb_zip(folder / "lying.zip", "3.jpg"), LYING_SIZE),
    }


def _write_sparse_tar(path: Path, members: list[tuple[str, bytes | int]]) -> Path:
    """A tar of `members`: (name, bytes), or (name, n) for an n-byte member left as a hole.

    The holes are never written (a sparse file), so a tar declaring GBs costs nothing to make.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            info.mode = 0o644
            fh.write(info.tobuf(tarfile.GNU_FORMAT))
            padded = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if isinstance(data, int):
                fh.seek(padded, 1)
            else:
                fh.write(data + b"\0" * (padded - len(data)))
        fh.write(b"\0" * 2 * tarfile.BLOCKSIZE)  # end-of-archive marker
    return path


@pytest.fixture()
def sparse_tar() -> Callable[[Path, list[tuple[str, bytes | int]]], Path]:
    """write_sparse_tar(path, [(name, bytes or a size left as a hole), ...]) -> path."""
    return _write_sparse_tar


@pytest.fixture()
def traced_peak() -> Callable[[], object]:
    """`with traced_peak() as peak:` ... then peak[0] is the peak of Python-traced memory
    (bytes objects, numpy arrays) while the block ran, in bytes."""

    @contextmanager
    def probe() -> Iterator[list[int]]:
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        out = [0]
        try:
            yield out
        finally:
            out[0] = tracemalloc.get_traced_memory()[1] - start
            if not was_tracing:
                tracemalloc.stop()

    return probe


@pytest.fixture
def progress_lines(monkeypatch, caplog) -> Callable[[], list[str]]:
    """The progress lines geodata logs off a terminal (geodata.progress), here one per update
    (HIERLOC_PROGRESS_EVERY_S=0) instead of one per ~10 s: call it for the lines so far."""
    monkeypatch.setenv("HIERLOC_PROGRESS_EVERY_S", "0")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, whatever runs pytest
    caplog.set_level(logging.INFO, logger="geodata")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("geodata.")]
