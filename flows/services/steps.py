"""A command's account of its steps, one line each, with the seconds taken (`make up`: flows.services).

    starting the Prefect server on 127.0.0.1:4200 ... ready in 12 s

The step's text is written (and flushed) when it starts, so a slow step says what it waits
for; its outcome and seconds when it ends, "failed after 3 s" on an error (which propagates).
Steps without a count; counted work (images, steps, units) uses hierloc.progress / geodata.progress.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO


class Steps:
    """Lines on ``out`` (default: sys.stdout at the time of writing); ``clock`` in seconds."""

    def __init__(self, out: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.clock = out, clock
        self.t0 = clock()

    def _write(self, text: str) -> None:
        out = self.out if self.out is not None else sys.stdout
        out.write(text)
        out.flush()

    def say(self, line: str) -> None:
        self._write(line + "\n")

    def total_s(self) -> float:
        """Seconds since these steps began."""
        return self.clock() - self.t0

    @contextlib.contextmanager
    def step(self, what: str, done: str = "ready") -> Iterator[None]:
        """'what ... ' now, then '<done> in N s' (or 'failed after N s') when the block ends."""
        t = self.clock()
        self._write(f"{what} ... ")
        try:
            yield
        except BaseException:
            self._write(f"failed after {self.clock() - t:.0f} s\n")
            raise
        self._write(f"{done} in {self.clock() - t:.0f} s\n")
