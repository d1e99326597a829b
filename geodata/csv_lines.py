"""Physical lines of a CSV byte range: records as pyarrow splits them, lines to set aside.

The fast ingest path (geodata.ingest_csv.CsvStream) lets pyarrow parse the whole range.
When the range is not one record per line, or pyarrow stops on it, the careful path
(geodata.ingest_split) uses this module:

- `invalid_utf8_lines`: physical lines holding bytes that are not UTF-8;
- `scan_records`: where each CSV record starts and ends, in physical lines, following
  pyarrow's own rules (a '"' opens a quoted field only at the start of a field; inside
  one, '""' is a quote and '"' closes it; after the close, characters up to the next ','
  or line end are plain), optionally with some lines blanked out;
- `CleanedReader`: the range's bytes with those lines emptied (their '\\n' kept, so the
  line numbers stay), which pyarrow then skips as blank lines.

OSV-5M rows never span lines (no field of the release holds a newline: numbers, codes,
GeoNames names, URLs, user names), so `MAX_RECORD_LINES` allows one quoted line break (a
hand-edited cell) and treats a longer record as a stray '"' that swallowed the lines after
it: its first line (the one with the stray quote) is set aside and the others are read again.
Memory: int64 arrays per newline and per quote; bytes are read in 16 MiB chunks.
"""

from __future__ import annotations

import codecs
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: A record over this many physical lines is a stray quote's doing, not a row (see module doc).
MAX_RECORD_LINES = 2
CHUNK_BYTES = 1 << 24
_SURROGATE = re.compile("[\udc80-\udcff]")  # how surrogateescape decodes a byte that is not UTF-8


@dataclass
class RecordLines:
    """Records of a byte range, in physical lines counted from the range start (1-based).

    starts, ends: (n_records,) first and last line of each non-blank record; newlines:
    (n_newlines,) byte offsets (from the range start) of every '\\n'; n_bytes, n_lines:
    size of the range; n_blank: its empty lines (not records, as in pyarrow).
    """

    starts: np.ndarray
    ends: np.ndarray
    newlines: np.ndarray
    n_bytes: int
    n_lines: int
    n_blank: int = 0  # empty lines between records (set-aside lines not counted)

    def spans(self) -> np.ndarray:
        """(n_records,) physical lines of each record."""
        return self.ends - self.starts + 1

    def line_bytes(self, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte ranges [begin, end) of lines' content ('\\n' excluded), offsets from the range start."""
        lines = np.asarray(lines, dtype=np.int64)
        nl = np.concatenate([self.newlines, [self.n_bytes]]).astype(np.int64)
        begin = np.where(lines > 1, nl[np.maximum(lines - 2, 0)] + 1, 0)
        return begin, nl[lines - 1]


def _scan_bytes(path: Path, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Offsets (from `start`) of every '\\n' and whether a '\\r' precedes it; offsets of every '"'
    and whether it starts a field (it follows ',', '\\n', '\\r' or the range start)."""
    newlines, cr_before, quotes, field_start = [], [], [], []
    prev = 10  # the range starts a line
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = 0
        while pos < end - start:
            raw = fh.read(min(CHUNK_BYTES, end - start - pos))
            if not raw:
                break
            chunk = np.frombuffer(raw, dtype=np.uint8)
            nl = np.flatnonzero(chunk == 10)
            q = np.flatnonzero(chunk == 34)
            nl_prev = np.where(nl > 0, chunk[np.maximum(nl - 1, 0)], prev)
            q_prev = np.where(q > 0, chunk[np.maximum(q - 1, 0)], prev)
            newlines.append(nl + pos)
            cr_before.append(nl_prev == 13)
            quotes.append(q + pos)
            field_start.append((q_prev == 44) | (q_prev == 10) | (q_prev == 13))
            prev = int(chunk[-1])
            pos += len(raw)

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return cat(newlines, np.int64), cat(cr_before, bool), cat(quotes, np.int64), cat(field_start, bool)


def _quoted_fields(quotes: list[int], field_start: list[bool], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(opens, closes): offsets of each quoted field's opening and closing '"' (n when never closed)."""
    opens, closes = [], []
    i, count = 0, len(quotes)
    while i < count:
        if not field_start[i]:
            i += 1  # a quote inside an unquoted (or closed) field is a plain character
            continue
        opens.append(quotes[i])
        i += 1
        while i + 1 < count and quotes[i + 1] == quotes[i] + 1:
            i += 2  # '""' inside a quoted field is one quote character
        closes.append(quotes[i] if i < count else n)
        i += 1
    return np.asarray(opens, dtype=np.int64), np.asarray(closes, dtype=np.int64)


def scan_records(path: Path, start: int, end: int, blank: np.ndarray | None = None) -> RecordLines:
    """The records of bytes [start, end) of `path` as pyarrow splits them (see the module doc).

    blank: 1-based lines (from the range start) to read as empty (set aside). Blank lines
    are not records, as in pyarrow. A lone '\\r' is not a line end here (pyarrow's record
    count then differs from this one, and the caller falls back to record numbers).
    """
    nl, cr_before, quotes, field_start = _scan_bytes(Path(path), start, end)
    n = end - start
    n_lines = len(nl) + (1 if n and (not len(nl) or nl[-1] != n - 1) else 0)
    blanked = np.zeros(n_lines + 2, dtype=bool)
    if blank is not None and len(blank):
        blanked[np.asarray(blank, dtype=np.int64)] = True
    keep = ~blanked[1 + np.searchsorted(nl, quotes, side="left")]
    opens, closes = _quoted_fields(quotes[keep].tolist(), field_start[keep].tolist(), n)
    ends_record = np.ones(len(nl), dtype=bool)  # a newline inside a quoted field does not end a record
    if len(opens):
        k = np.searchsorted(opens, nl, side="right") - 1
        ends_record = ~((k >= 0) & (nl < closes[np.maximum(k, 0)]))
    term = np.flatnonzero(ends_record)
    seg_start = np.concatenate([[0], nl[term] + 1]).astype(np.int64)
    seg_end = np.concatenate([nl[term], [n]]).astype(np.int64)  # the terminating '\n' (or the range end)
    real = seg_start < n
    seg_start, seg_end = seg_start[real], seg_end[real]
    term_cr = np.concatenate([cr_before[term], [False]])[real]
    first = 1 + np.searchsorted(nl, seg_start, side="left")
    last = 1 + np.searchsorted(nl, np.minimum(seg_end, n - 1), side="left")
    blank_line = (seg_end == seg_start) | ((seg_end == seg_start + 1) & term_cr)  # '\n' or '\r\n' alone
    empty = blank_line | ((first == last) & blanked[first])
    return RecordLines(first[~empty], last[~empty], nl, n, n_lines, int(blank_line.sum()))


def invalid_utf8_lines(path: Path, start: int = 0, end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lines, byte): 1-based lines (from `start`) holding bytes that are not UTF-8, and the
    first such byte of each line; both (k,) int64, lines sorted. Reads 16 MiB at a time."""
    path = Path(path)
    end = path.stat().st_size if end is None else end
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    lines, values = [], []
    line_base, pos = 0, start
    with open(path, "rb") as fh:
        fh.seek(start)
        while pos < end:
            raw = fh.read(min(CHUNK_BYTES, end - pos))
            if not raw:
                break
            pos += len(raw)
            text = decoder.decode(raw, final=pos >= end)
            if _SURROGATE.search(text):
                cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
                bad = np.flatnonzero((cp >= 0xDC80) & (cp <= 0xDCFF))
                line = line_base + 1 + np.cumsum(cp == 10)[bad]
                line, first = np.unique(line, return_index=True)
                lines.append(line)
                values.append(cp[bad][first].astype(np.int64) - 0xDC00)
            line_base += text.count("\n")
    if not lines:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    line, value = np.concatenate(lines), np.concatenate(values)
    line, first = np.unique(line, return_index=True)  # a line split between chunks
    return line.astype(np.int64), value[first]


def read_lines_text(path: Path, start: int, rec: RecordLines, lines: np.ndarray, max_bytes: int = 4096) -> list[str]:
    """The text of some lines (bytes not UTF-8 shown as \\xNN), each cut at max_bytes."""
    begin, stop = rec.line_bytes(lines)
    out = []
    with open(path, "rb") as fh:
        for b, e in zip(begin.tolist(), stop.tolist(), strict=True):
            fh.seek(start + b)
            out.append(fh.read(min(e - b, max_bytes)).rstrip(b"\r").decode("utf-8", "backslashreplace"))
    return out


class CleanedReader(io.RawIOBase):
    """Bytes [start, end) of a file with the byte ranges `cut` (absolute, sorted, disjoint) left out."""

    def __init__(self, path: Path, start: int, end: int, cut: list[tuple[int, int]]) -> None:
        super().__init__()
        self._fh = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._fh.seek(start)
        self._pos, self._end = start, end
        self._cut = [c for c in cut if c[1] > c[0]]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        while self._cut and self._pos >= self._cut[0][0]:
            self._pos = max(self._pos, self._cut.pop(0)[1])
        stop = min(self._end, self._cut[0][0] if self._cut else self._end, self._pos + len(view))
        if stop <= self._pos:
            return 0
        self._fh.seek(self._pos)
        got = self._fh.readinto(view[: stop - self._pos])
        self._pos += got
        return got

    def close(self) -> None:
        self._fh.close()
        super().close()


@dataclass
class SetAside:
    """Lines of a byte range that the careful pass leaves out, and the records once they are.

    lines: (k,) 1-based lines from the range start, sorted; reasons: "encoding_invalid" or
    "unclosed_quote" per line; ends: the last line of the record each unclosed quote
    swallowed (= the line itself for encoding_invalid); records: the records of the range
    with those lines blank.
    """

    lines: np.ndarray
    reasons: list[str]
    ends: np.ndarray
    records: RecordLines

    def cut(self, start: int) -> list[tuple[int, int]]:
        """Absolute byte ranges of the set-aside lines' content, for CleanedReader."""
        begin, stop = self.records.line_bytes(self.lines)
        return [(start + b, start + e) for b, e in zip(begin.tolist(), stop.tolist(), strict=True)]


def set_aside(path: Path, start: int, end: int, unclosed: dict[int, int] | None = None) -> SetAside:
    """Lines to leave out of bytes [start, end): those with bytes that are not UTF-8, the first
    line of each record spanning more than MAX_RECORD_LINES lines (its stray quote), and
    `unclosed` ({first line: last line} of records found bad already), until none is left."""
    bad, _ = invalid_utf8_lines(path, start, end)
    why = {int(line): ("encoding_invalid", int(line)) for line in bad}
    for first, last in (unclosed or {}).items():
        why.setdefault(int(first), ("unclosed_quote", int(last)))
    while True:  # leaving a line out can make another record too long (rare): scan again
        records = scan_records(path, start, end, np.asarray(sorted(why), dtype=np.int64))
        too_long = np.flatnonzero(records.spans() > MAX_RECORD_LINES)
        if not len(too_long):
            break
        for i in too_long.tolist():
            why.setdefault(int(records.starts[i]), ("unclosed_quote", int(records.ends[i])))
    lines = np.asarray(sorted(why), dtype=np.int64)
    return SetAside(lines=lines, reasons=[why[k][0] for k in lines.tolist()],
                    ends=np.asarray([why[k][1] for k in lines.tolist()], dtype=np.int64), records=records)


def not_utf8_message(path: Path) -> str:
    """'<path>, line L: byte 0xNN is not UTF-8 ...' for the first such line of a text file."""
    lines, values = invalid_utf8_lines(Path(path))
    if not len(lines):
        return f"{path}: not valid UTF-8; save it as UTF-8"
    more = f" ({len(lines)} lines in all)" if len(lines) > 1 else ""
    return (f"{path}, line {int(lines[0])}: byte 0x{int(values[0]):02x} is not UTF-8{more}; "
            "save the file as UTF-8 (e.g. from Latin-1: iconv -f latin1 -t utf-8)")
