"""What an ingest output folder already holds, so that a re-run only processes what is new.

`out_dir/ingest_state.json` records, after each successful ingest:

- per CSV: the byte length ingested and the SHA-256 of those bytes, the physical line
  count (to number appended lines) and whether they ended with a newline;
- per image container (zip / tar shard, or folder): a content fingerprint
  (`container_fingerprint`): a zip's central directory hash (names, sizes and CRC-32 of
  every member), a tar's size + mtime + head/tail hash, a folder's file names and sizes;
- per split: the manifest part files with their SHA-256, and running totals.

A re-run compares the inputs with the state (`csv_prefix_status`, container
fingerprints) and the ingest decides what to parse. The state is the commit point (written
atomically after the run's parts and tables): a crash before it leaves the previous state,
part files that the state does not list are orphans of the crashed run (`orphan_parts`),
and what is published after it is published again by the next run (geodata.ingest.commit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geodata.atomic import write_text_atomic

log = logging.getLogger(__name__)

#: Bump when the manifest layout or the judging rules change: older states then force a full re-ingest.
STATE_VERSION = 2
STATE_FILE = "ingest_state.json"
READ_CHUNK_BYTES = 8 << 20
_TAIL_BYTES = 1 << 20


@dataclass
class CsvState:
    """How much of one CSV is ingested: bytes [0, n_bytes) with SHA-256 `sha256`."""

    path: str
    n_bytes: int = 0
    sha256: str = ""
    n_lines: int = 0  # physical lines in those bytes
    ends_with_newline: bool = True


@dataclass
class PartState:
    """One manifest part file (rows of one run) and the SHA-256 of its bytes."""

    name: str
    n_rows: int
    sha256: str


@dataclass
class SplitState:
    """What one split holds after the last successful run."""

    csv: CsvState | None = None
    shards: dict[str, str] = field(default_factory=dict)  # WebDataset: tar shard -> fingerprint
    containers: dict[str, str] = field(default_factory=dict)  # image containers -> fingerprint
    parts: list[PartState] = field(default_factory=list)
    n_in_total: int = 0
    kept_total: int = 0
    quarantined_total: int = 0
    line_numbers: str = "physical"


@dataclass
class IngestState:
    """The whole state file."""

    version: int = STATE_VERSION
    layout: str = "csv"
    verify_images: str = "decode"
    splits_order: list[str] = field(default_factory=list)
    run: int = 0
    splits: dict[str, SplitState] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _split_from_dict(d: dict[str, Any]) -> SplitState:
    csv = CsvState(**d["csv"]) if d.get("csv") else None
    parts = [PartState(**p) for p in d.get("parts", [])]
    rest = {k: v for k, v in d.items() if k not in ("csv", "parts")}
    return SplitState(csv=csv, parts=parts, **rest)


def load_state(out_dir: Path) -> IngestState | None:
    """The state of `out_dir`, or None when there is none or it cannot be used (logged)."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("version") != STATE_VERSION:
            log.info("%s: state version %s, this code writes %s: full re-ingest", path, raw.get("version"), STATE_VERSION)
            return None
        splits = {name: _split_from_dict(s) for name, s in raw.pop("splits").items()}
        return IngestState(**raw, splits=splits)
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("%s: unreadable ingest state (%s); doing a full re-ingest", path, exc)
        return None


def save_state(state: IngestState, out_dir: Path) -> Path:
    """Write the state file atomically; returns its path."""
    path = Path(out_dir) / STATE_FILE
    write_text_atomic(state.to_json(), path)
    return path


def drop_state(out_dir: Path) -> None:
    """Forget what was ingested (the next run starts from scratch)."""
    (Path(out_dir) / STATE_FILE).unlink(missing_ok=True)


# --------------------------------------------------------------------------- hashing


@dataclass
class RangeScan:
    """Result of `scan_range`: newline and empty-line counts, last byte of the counted bytes."""

    n_newlines: int = 0
    last_byte: bytes = b""
    has_empty_line: bool = False  # a line that is '' or '\r' (the counted bytes start a line)


def _newlines(counted: bytes, prev_nl: int, prev_byte: int) -> tuple[np.ndarray, bool]:
    """Offsets of the '\\n' in `counted` and whether one ends an empty line ('' or '\\r').

    prev_nl: offset of the newline before `counted` relative to its start (-1 when it starts
    the range, which starts a line); prev_byte: the byte before `counted` (10 at the start).
    """
    arr = np.frombuffer(counted, dtype=np.uint8)
    nl = np.flatnonzero(arr == 10)  # numpy: faster than bytes.find for b"\\n\\n", and gives the count
    if not len(nl):
        return nl, False
    gap = np.diff(nl, prepend=prev_nl)
    before = np.where(nl > 0, arr[np.maximum(nl - 1, 0)], prev_byte)
    return nl, bool(((gap == 1) | ((gap == 2) & (before == 13))).any())


def scan_range(path: Path, hasher: Any, start: int, end: int, count_from: int | None = None) -> RangeScan:
    """Feed bytes [start, end) of `path` to `hasher`; count '\\n' in [count_from, end), look for empty lines.

    count_from defaults to start. Reads in 8 MiB chunks (constant memory).
    """
    count_from = start if count_from is None else count_from
    out = RangeScan()
    prev_nl, prev_byte = -1, 10  # the counted bytes start a line
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        while pos < end:
            chunk = fh.read(min(READ_CHUNK_BYTES, end - pos))
            if not chunk:
                raise OSError(f"{path}: file shrank while reading (expected {end} bytes, got {pos})")
            hasher.update(chunk)
            if pos + len(chunk) > count_from:
                counted = chunk[max(0, count_from - pos) :]
                nl, empty = _newlines(counted, prev_nl, prev_byte)
                out.n_newlines += len(nl)
                out.has_empty_line = out.has_empty_line or empty
                prev_nl = (int(nl[-1]) if len(nl) else prev_nl) - len(counted)
                prev_byte = counted[-1]
                out.last_byte = counted[-1:]
            pos += len(chunk)
    return out


@dataclass
class CsvPlan:
    """What to parse of one CSV: bytes [start, end); `reason` says why a full re-parse (or '')."""

    start: int
    end: int
    line_base: int  # physical lines before `start` (= '\n' count of bytes [0, start))
    hasher: Any
    reason: str = ""
    previous: CsvState | None = None

    def new_state(self, path: str, tail: RangeScan) -> CsvState:
        """The CsvState after ingesting [start, end), given the scan of those bytes."""
        if self.end == self.start and self.previous is not None:
            return self.previous
        unterminated = tail.last_byte not in (b"", b"\n")
        return CsvState(path=path, n_bytes=self.end, sha256=self.hasher.hexdigest(),
                        n_lines=self.line_base + tail.n_newlines + int(unterminated), ends_with_newline=not unterminated)


def csv_plan(csv_path: Path, previous: CsvState | None) -> CsvPlan:
    """Compare a CSV with what was ingested; hash the prefix that must be unchanged.

    The returned hasher holds the SHA-256 state after bytes [0, start): feed it
    [start, end) (see `scan_range`) to get the hash of everything ingested.
    Full re-parse (start = 0) when there is no previous state, the file shrank, its first
    n_bytes changed, or the last ingested line had no newline and the new bytes do not
    start one (the last row would have been extended).
    """
    end = csv_path.stat().st_size
    hasher = hashlib.sha256()
    if previous is None:
        return CsvPlan(0, end, 0, hasher, "first ingest")
    if end < previous.n_bytes:
        return CsvPlan(0, end, 0, hashlib.sha256(), f"{csv_path.name} shrank from {previous.n_bytes} to {end} bytes")
    scan_range(csv_path, hasher, 0, previous.n_bytes, count_from=previous.n_bytes)  # hash only
    if hasher.hexdigest() != previous.sha256:
        return CsvPlan(0, end, 0, hashlib.sha256(), f"the first {previous.n_bytes} bytes of {csv_path.name} changed")
    if not previous.ends_with_newline and end > previous.n_bytes:
        with open(csv_path, "rb") as fh:
            fh.seek(previous.n_bytes)
            head = fh.read(2)
        if not head.startswith((b"\n", b"\r\n")):
            return CsvPlan(0, end, 0, hashlib.sha256(), f"{csv_path.name}: its last row was extended")
    # Without a final newline, the new bytes start with the one that ends the last line.
    newlines = previous.n_lines - (0 if previous.ends_with_newline else 1)
    return CsvPlan(previous.n_bytes, end, newlines, hasher, previous=previous)


# --------------------------------------------------------------------------- containers


def _zip_central_directory(path: Path) -> tuple[int, int]:
    """(offset, size) of a zip's central directory, from its end record (zip64 aware)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        tail_len = min(size, (1 << 16) + 22)  # EOCD (22 bytes) + at most a 64 KiB comment
        fh.seek(size - tail_len)
        tail = fh.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0:
            raise ValueError(f"{path}: no zip end-of-central-directory record; not a zip or cut short")
        (_, _, _, _, _, cd_size, cd_offset, _) = struct.unpack("<4s4H2LH", tail[at : at + 22])
        if cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
            loc = tail.rfind(b"PK\x06\x07", 0, at)  # zip64 locator, right before the EOCD
            if loc < 0:
                raise ValueError(f"{path}: zip64 sizes without a zip64 locator")
            (_, _, eocd64, _) = struct.unpack("<4sLQL", tail[loc : loc + 20])
            fh.seek(eocd64)
            rec = fh.read(56)
            (_, _, _, _, _, _, _, _, cd_size, cd_offset) = struct.unpack("<4sQ2H2L4Q", rec)
        return cd_offset, cd_size


def container_fingerprint(kind: str, path: Path) -> str:
    """A cheap content fingerprint of an image container.

    zip: SHA-256 of the central directory (every member's name, size and CRC-32), a few MB
    per release shard; tar: size, mtime and SHA-256 of the first and last MiB (tars have
    no index: hashing a whole shard would cost a full read); folder: names, sizes and
    mtimes of the image files in it.
    """
    h = hashlib.sha256()
    st = path.stat()
    if kind == "zip":
        offset, size = _zip_central_directory(path)
        h.update(f"{st.st_size}:".encode())
        scan_range(path, h, offset, offset + size, count_from=offset + size)
    elif kind == "tar":
        h.update(f"{st.st_size}:{st.st_mtime_ns}:".encode())
        scan_range(path, h, 0, min(_TAIL_BYTES, st.st_size), count_from=st.st_size)
        scan_range(path, h, max(0, st.st_size - _TAIL_BYTES), st.st_size, count_from=st.st_size)
    else:
        with os.scandir(path) as it:
            for e in sorted((e for e in it if e.is_file()), key=lambda e: e.name):
                s = e.stat()
                h.update(f"{e.name}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole file (streamed)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def manifest_digest(split: str, parts: list[PartState]) -> str:
    """Content digest of a split's manifest: SHA-256 over the split name and its parts' hashes, in order.

    Identical re-runs keep it (the parts are unchanged); any added rows add a part and
    change it. It is a hash of the Parquet bytes, so a pyarrow upgrade may change it too.
    """
    h = hashlib.sha256(f"hierloc-manifest:{STATE_VERSION}:{split}\n".encode())
    for p in parts:
        h.update(f"{p.name}:{p.n_rows}:{p.sha256}\n".encode())
    return h.hexdigest()


def orphan_parts(part_dir: Path, parts: list[PartState]) -> list[Path]:
    """Part files in `part_dir` that the state does not list (left by a crashed run)."""
    if not part_dir.is_dir():
        return []
    known = {p.name for p in parts}
    return sorted(p for p in part_dir.iterdir() if p.name not in known)
