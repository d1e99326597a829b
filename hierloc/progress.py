"""Progress of a long step: a bar on a terminal, log lines elsewhere, with the same figures.

    bar = Progress(total, "features", unit="img", logger=log)
    for batch in batches:
        ...
        bar.update(len(batch))
    bar.close()  # or: with Progress(...) as bar:

When stderr is a terminal, a tqdm bar: done/total, rate and ETA, shown once the step has run
``delay_s`` (a quick step draws nothing). Elsewhere (a Prefect run, a pipe, a log file), INFO
lines through ``logger``, at most one every ``every_s`` seconds (``HIERLOC_PROGRESS_EVERY_S``,
default 10; 0 = every update), e.g.

    features: 4,096/20,000 img (20%), 410 img/s, ETA 39 s

and, if it wrote any, a closing line with the time taken, so a step shorter than ``every_s``
writes nothing. Rates are averages since the start, in both forms. ``items_unit`` adds a
second rate (training counts steps and shows samples/s).

hierloc/progress.py and geodata/progress.py are one file in two places, as the layers cannot
import each other (tests/test_progress.py checks that they stay identical).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Callable, TextIO

ENV_EVERY_S = "HIERLOC_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 10.0
DEFAULT_DELAY_S = 1.0


def every_s_from_env() -> float:
    """Seconds between log lines: ``HIERLOC_PROGRESS_EVERY_S``, else DEFAULT_EVERY_S."""
    raw = os.environ.get(ENV_EVERY_S, "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{ENV_EVERY_S}={raw!r}: expected a number of seconds >= 0")
    return value


def format_seconds(seconds: float) -> str:
    """'7 s', '2 min 05 s', '1 h 02 min'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _count(x: float) -> str:
    return f"{x:,.1f}" if x != int(x) else f"{int(x):,}"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _bytes(x: float) -> str:
    """'512 B', '16.8 MB', '2.62 GB' (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(x) < 1000:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.3g} {unit}"
        x /= 1000
    return f"{x:,.3g} TB"


def is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a file
        return False


class Progress:
    """A long step's progress (see the module docstring).

    total: units of work (None: unknown, no percentage or ETA); desc: what is done ("epoch 3/20");
    unit: what is counted ("steps", "img"; "B": bytes, shown as kB / MB / GB); logger: where the lines
    go (the caller's module logger);
    items_unit: a second count passed to ``update(items=...)``, shown as a rate; every_s: seconds
    between log lines (None: ``every_s_from_env()``); stream: the terminal test (default
    sys.stderr) and where a bar is drawn; clock: seconds (tests pass a fake one).
    """

    def __init__(self, total: float | None, desc: str, *, logger: logging.Logger, unit: str = "it",
                 items_unit: str | None = None, every_s: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, delay_s: float = DEFAULT_DELAY_S) -> None:
        self.total, self.desc, self.unit, self.items_unit = total, desc, unit, items_unit
        self.log, self.clock = logger, clock
        self.every_s = every_s_from_env() if every_s is None else every_s
        self.done = self.items = 0
        self.t0 = self._last = clock()
        self.lines = 0  # log lines written
        self.bar = None
        self._closed = False
        stream = sys.stderr if stream is None else stream
        if is_terminal(stream):
            from tqdm import tqdm

            # smoothing=0: the average rate since the start, as in the log lines
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream, delay=delay_s, smoothing=0,
                            dynamic_ncols=True, unit_scale=unit == "B", unit_divisor=1000)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1, *, items: float = 0) -> None:
        """``n`` more units done (and ``items`` more of ``items_unit``)."""
        self.done += n
        self.items += items
        if self.bar is not None:
            if self.items_unit:
                self.bar.set_postfix_str(f"{_rate(self.items / self._elapsed())} {self.items_unit}/s", refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self.lines += 1
            self.log.info("%s", self.line(now))

    def _elapsed(self, now: float | None = None) -> float:
        return max((self.clock() if now is None else now) - self.t0, 1e-9)

    def _amount(self) -> str:
        """'done/total unit' ('done unit' when the total is unknown)."""
        if self.unit == "B":
            return _bytes(self.done) + ("" if self.total is None else f"/{_bytes(self.total)}")
        return _count(self.done) + ("" if self.total is None else f"/{_count(self.total)}") + f" {self.unit}"

    def _rates(self, elapsed: float) -> str:
        rate = self.done / elapsed
        text = f"{_bytes(rate)}/s" if self.unit == "B" else f"{_rate(rate)} {self.unit}/s"
        if self.items_unit:
            text += f", {_rate(self.items / elapsed)} {self.items_unit}/s"
        return text

    def line(self, now: float | None = None) -> str:
        """'desc: done/total unit (pct%), rate unit/s[, rate items/s], ETA t' at ``now``."""
        elapsed = self._elapsed(now)
        head, eta = f"{self.desc}: {self._amount()}", ""
        if self.total is not None:
            if self.total > 0:
                head += f" ({100 * min(self.done / self.total, 1):.0f}%)"
            rate = self.done / elapsed
            eta = f", ETA {format_seconds(max(self.total - self.done, 0) / rate)}" if rate > 0 else ", ETA ?"
        return f"{head}, {self._rates(elapsed)}{eta}"

    def close(self) -> None:
        """Close the bar; in log form, a closing line if any line was written."""
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
            return
        if self.lines:
            elapsed = self._elapsed()
            self.log.info("%s: %s in %s (%s)", self.desc, self._amount(), format_seconds(elapsed), self._rates(elapsed))
