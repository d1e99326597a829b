"""Helpers shared by the parts of benchmarks/gpu.py: device-honest timing, and failures that are
recorded (named, with their message) instead of ending the run."""

from __future__ import annotations

import contextlib
import gc
import time
import traceback
from collections.abc import Callable, Iterator

import torch


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work: a clock read after this measures finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str | torch.device) -> tuple[float, object]:
    """(seconds, result) of one call of ``fn``, with the device's queue drained before and after
    (no other host round trip is added inside the timed call)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def describe(exc: BaseException, limit: int = 600) -> str:
    """``Type: message`` of an exception, cut to ``limit`` characters (the JSON and the table)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def release_memory() -> None:
    """Drop what a finished (or failed) part left: Python garbage, then the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def guard(errors: dict[str, str], name: str) -> Iterator[None]:
    """Run a part of a section: a failure is printed (with its traceback) and recorded as
    ``errors[name]``, and the section goes on with its next part."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - a benchmark part's failure is a result, not the end
        traceback.print_exc()
        errors[name] = describe(exc)
    finally:
        release_memory()
