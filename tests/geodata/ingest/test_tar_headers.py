"""geodata.ingest.tar_headers lists every tar as tarfile does: members, offsets and errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from geodata.ingest.tar_headers import iter_headers


def _listing(items):
    return [(i.name, i.type, i.size, i.offset, i.offset_data, i.linkname, i.isreg(), i.isdir()) for i in items]


def _both(path: Path):
    """(listing, error) from tarfile's own iteration and from iter_headers."""
    out = []
    for reader in (lambda p: tarfile.open(p, "r:"), None):
        got, err = [], None
        try:
            if reader is None:
                for info in iter_headers(path):
                    got.append(info)
            else:
                with reader(path) as tf:
                    for info in tf:
                        got.append(info)
        except tarfile.ReadError as exc:
            err = str(exc)
        out.append((_listing(got), err))
    return out


def _write(path: Path, fmt, members) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "lnk": tarfile.LNKTYPE,
                             "fifo": tarfile.FIFOTYPE}[kind]
                info.linkname = data.decode() if kind in ("sym", "lnk") else ""
                tf.addfile(info)
    return path


MEMBERS = [("a/1.json", "file", b'{"id": 1}'), ("a/1.street_clip.npy", "file", b"\x93NUMPY" + b"x" * 700),
           ("dir", "dir", b""), ("a/link", "sym", b"../../etc/passwd"), ("a/hard", "lnk", b"a/1.json"),
           ("a/fifo", "fifo", b""), ("deep/" * 30 + "x.jpg", "file", b"y" * 1500), ("b" * 150, "file", b""),
           ("\u00e9t\u00e9/caf\u00e9.json", "file", b"{}")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_listing_as_tarfile_in_every_format(tmp_path, fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or len(m[0]) <= 100]
    path = _write(tmp_path / "t.tar", fmt, members)
    ours, theirs = _both(path)[1], _both(path)[0]
    assert ours == theirs and len(ours[0]) == len(members)


def test_damaged_archives_fail_or_end_as_tarfile_does(tmp_path):
    good = _write(tmp_path / "good.tar", tarfile.USTAR_FORMAT, MEMBERS[:2] + [("c.bin", "file", b"z" * 5000)]).read_bytes()
    cases = {
        "truncated_data": good[:512 * 3 + 100],  # the second member's data cut short
        "truncated_header": good[:512 * 4 + 200],
        "bad_checksum_mid": good[:512 * 4] + good[512 * 4:512 * 4 + 148] + b"0000000\0" + good[512 * 4 + 156:],
        "bad_checksum_first": good[:148] + b"0000000\0" + good[156:],
        "no_end_blocks": good[:512 * 5 + 5120],
        "zeros": b"\0" * 10240,
        "empty": b"",
        "not_a_tar": b"PK\3\4" + b"x" * 2000,
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        theirs, ours = _both(path)
        assert ours == theirs, name


def test_a_base256_size_is_left_to_tarfile(tmp_path):
    raw = bytearray(_write(tmp_path / "a.tar", tarfile.GNU_FORMAT, [("x.bin", "file", b"q" * 10)]).read_bytes())
    raw[124:136] = b"\x80" + (10).to_bytes(11, "big")  # GNU base-256 size
    raw[148:156] = b"        "
    raw[148:156] = f"{sum(raw[:512]):06o}\0 ".encode()
    (tmp_path / "b.tar").write_bytes(bytes(raw))
    theirs, ours = _both(tmp_path / "b.tar")
    assert ours == theirs and ours[0][0][2] == 10


def test_plain_headers_never_reach_tarfiles_parser(tmp_path, monkeypatch):
    """The point of the module: a WebDataset shard's headers are parsed here, not by tarfile
    (which only reads the end-of-archive block)."""
    seen = []
    original = tarfile.TarInfo.frombuf.__func__

    def spy(cls, buf, encoding, errors):
        seen.append(bytes(buf))
        return original(cls, buf, encoding, errors)

    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        path = _write(tmp_path / f"{fmt}.tar", fmt, [m for m in MEMBERS if len(m[0]) <= 100])
        expected = _both(path)[0]
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(tarfile.TarInfo, "frombuf", classmethod(spy))
            got = list(iter_headers(path))
        assert _listing(got) == expected[0] and len(got) == 7
        assert seen and all(b == bytes(512) for b in seen)
