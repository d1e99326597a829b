"""Physical lines of a CSV byte range: records as pyarrow splits them, lines to set aside.

The fast ingest path (geodata.ingest.csv_read.CsvStream) lets pyarrow parse the whole range.
When the range is not one record per line, or pyarrow stops on it, the careful path
(geodata.ingest.split_csv) uses this module:

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
from collections.abc import Iterator
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


def _next_true(flags: np.ndarray, step: int = 1) -> np.ndarray:
    """(n,) for each k the smallest k' >= k with flags[k'], among k, k + step, k + 2 step, ... (n when none)."""
    n = len(flags)
    out = np.full(n, n, dtype=np.int64)
    for phase in range(step):
        idx = np.arange(phase, n, step, dtype=np.int64)
        hit = np.where(flags[idx], idx, n)
        out[idx] = np.minimum.accumulate(hit[::-1])[::-1]
    return out


def _quoted_fields(quotes: np.ndarray, field_start: np.ndarray, n: int,
                   in_quote: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """(opens, closes, still open): offsets of each quoted field's opening and closing '"' in a
    chunk of n bytes (-1: opened in an earlier chunk, n: not closed in this one).

    Works on runs of adjacent quotes. Inside a quoted field a run of even length is escaped
    quotes, an odd one ends the field with its last quote; outside, an odd run that starts a
    field opens one (an even one is an empty field plus escapes), any other quote is a plain
    character. So only odd runs matter: an opener is an odd field-start run and its closer is
    the next odd run. Openers follow each other two runs apart while the data is regular
    (as any CSV writer makes it); the loop below runs once per irregular spot, not per quote.
    """
    first = np.concatenate([[True], quotes[1:] != quotes[:-1] + 1]) if len(quotes) else np.zeros(0, bool)
    starts = np.flatnonzero(first)
    lengths = np.diff(np.concatenate([starts, [len(quotes)]])).astype(np.int64)
    odd = lengths % 2 == 1
    run_open = quotes[starts][odd]  # an odd run's first quote (where an opened field starts)
    run_close = quotes[starts + lengths - 1][odd]  # its last quote (where a closed field ends)
    fs = field_start[starts][odd]
    count = len(fs)
    if in_quote and not count:
        return np.asarray([-1], np.int64), np.asarray([n], np.int64), True
    next_fs = _next_true(fs)
    chain_end = _next_true(~fs, step=2)  # first run k, k + 2, ... that does not start a field
    openers = []
    if in_quote:  # run 0 closes the field opened before this chunk
        k = int(next_fs[1]) if count > 1 else count
    else:
        k = int(next_fs[0]) if count else count
    while k < count:
        end = int(chain_end[k])
        openers.append(np.arange(k, min(end, count), 2, dtype=np.int64))
        k = int(next_fs[end]) if end < count else count
    op = np.concatenate(openers) if openers else np.zeros(0, np.int64)
    closer = op + 1
    opens = run_open[op].astype(np.int64)
    closes = np.where(closer < count, run_close[np.minimum(closer, max(count - 1, 0))] if count else n, n).astype(np.int64)
    if in_quote:  # the field opened before this chunk ends at the first odd run
        opens, closes = np.concatenate([[-1], opens]), np.concatenate([[run_close[0]], closes])
    return opens, closes, bool(len(closes) and closes[-1] == n)


def scan_records(path: Path, start: int, end: int, blank: np.ndarray | None = None) -> RecordLines:
    """The records of bytes [start, end) of `path` as pyarrow splits them (see the module doc).

    blank: 1-based lines (from the range start) to read as empty (set aside). Blank lines
    are not records, as in pyarrow. A lone '\\r' is not a line end here (pyarrow's record
    count then differs from this one, and the caller falls back to record numbers).
    Reads CHUNK_BYTES at a time; memory: a few arrays per newline, per quote of one chunk.
    """
    n = end - start
    blank = np.unique(np.asarray(blank if blank is not None else [], dtype=np.int64))
    newlines, cr_before, inside = [], [], []
    in_quote, prev, lines_before = False, 10, 0  # the range starts a line
    for pos, raw in _chunks(path, start, n):
        chunk = np.frombuffer(raw, dtype=np.uint8)
        nl, q = np.flatnonzero(chunk == 10), np.flatnonzero(chunk == 34)
        nl_prev = np.where(nl > 0, chunk[np.maximum(nl - 1, 0)], prev)
        q_prev = np.where(q > 0, chunk[np.maximum(q - 1, 0)], prev)
        fs = (q_prev == 44) | (q_prev == 10) | (q_prev == 13)  # after ',', a line end or the range start
        if len(blank) and len(q):
            kept = ~np.isin(lines_before + 1 + np.searchsorted(nl, q), blank)
            q, fs = q[kept], fs[kept]
        opens, closes, in_quote = _quoted_fields(q, fs, len(raw), in_quote)
        k = np.searchsorted(opens, nl, side="right") - 1  # a newline inside a quoted field ends no record
        inside.append((k >= 0) & (nl < closes[np.maximum(k, 0)]) if len(opens) else np.zeros(len(nl), bool))
        newlines.append(nl + pos)
        cr_before.append(nl_prev == 13)
        lines_before += len(nl)
        prev = raw[-1]
    return _records(newlines, cr_before, inside, n, blank)


def _chunks(path: Path, start: int, n: int) -> Iterator[tuple[int, bytes]]:
    """Bytes [start, start + n) of `path` as (offset from start, bytes), about CHUNK_BYTES at a time;
    a run of quotes is never split between two chunks."""
    pos = 0
    with open(path, "rb") as fh:
        while pos < n:
            fh.seek(start + pos)
            raw = fh.read(min(CHUNK_BYTES, n - pos))
            if not raw:
                break
            while pos + len(raw) < n and not raw.rstrip(b'"'):  # all quotes: read on to the run's end
                raw += fh.read(min(CHUNK_BYTES, n - pos - len(raw)))
            if pos + len(raw) < n and raw.endswith(b'"'):
                raw = raw.rstrip(b'"')  # a run of quotes is never split: its end goes to the next chunk
            yield pos, raw
            pos += len(raw)


def _records(newlines: list[np.ndarray], cr_before: list[np.ndarray], inside: list[np.ndarray], n: int,
             blank: np.ndarray) -> RecordLines:
    """The RecordLines of a range of n bytes from its chunks' newline offsets, whether a '\\r'
    precedes each, and whether each lies inside a quoted field."""
    nl = np.concatenate(newlines).astype(np.int64) if newlines else np.zeros(0, np.int64)
    cr = np.concatenate(cr_before).astype(bool) if cr_before else np.zeros(0, bool)
    term = np.flatnonzero(~np.concatenate(inside)) if inside else np.zeros(0, np.int64)
    n_lines = len(nl) + (1 if n and (not len(nl) or nl[-1] != n - 1) else 0)
    seg_start = np.concatenate([[0], nl[term] + 1]).astype(np.int64)
    seg_end = np.concatenate([nl[term], [n]]).astype(np.int64)  # the terminating '\\n' (or the range end)
    real = seg_start < n
    seg_start, seg_end = seg_start[real], seg_end[real]
    term_cr = np.concatenate([cr[term], [False]])[real]
    first = 1 + np.searchsorted(nl, seg_start, side="left")
    last = 1 + np.searchsorted(nl, np.minimum(seg_end, n - 1), side="left")
    blank_line = (seg_end == seg_start) | ((seg_end == seg_start + 1) & term_cr)  # '\\n' or '\\r\\n' alone
    empty = blank_line | ((first == last) & np.isin(first, blank))
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
        """Fill `buffer` as far as the data goes (short only at the end): skips the cut ranges."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            while self._cut and self._pos >= self._cut[0][0]:
                self._pos = max(self._pos, self._cut.pop(0)[1])
            stop = min(self._end, self._cut[0][0] if self._cut else self._end, self._pos + len(view) - filled)
            if stop <= self._pos:
                break
            self._fh.seek(self._pos)
            got = self._fh.readinto(view[filled : filled + stop - self._pos])
            if not got:
                break
            self._pos += got
            filled += got
        return filled

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
