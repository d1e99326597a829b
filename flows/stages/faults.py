"""Which failures a retry can cure, and the errors of inputs that no retry will fix.

Prefect retries a task only when ``retry_transient`` says so (its ``retry_condition_fn``):
I/O and network failures (a dropped connection, a timeout, a locked or busy database, an
EIO) may pass on a second try; a validation error, a missing file, a bad parameter or a
bug fail the same way every time, so they fail at once, with their own message.
"""

from __future__ import annotations

#: OSErrors that name a state of the file system that a retry will not change.
DETERMINISTIC_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                           PermissionError)


class EmptySplitError(ValueError):
    """A split has no rows to work on (a header-only CSV, every row quarantined)."""


def is_transient(exc: BaseException) -> bool:
    """True for a failure that may pass on a retry: ConnectionError, TimeoutError, other OSErrors
    (not the DETERMINISTIC_OS_ERRORS), a database OperationalError (locked, busy), or an error
    explicitly raised from one of those (``raise ... from``: MLflow wraps its store's errors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and not isinstance(exc, DETERMINISTIC_OS_ERRORS):
            return True
        if type(exc).__name__ == "OperationalError":  # sqlalchemy / sqlite3: locked, busy, disk I/O
            return True
        exc = exc.__cause__
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only a failure that ``is_transient`` (a task that
    raised: its Failed state holds the exception)."""
    exc = getattr(state, "data", None)
    return isinstance(exc, BaseException) and is_transient(exc)


def check_splits_have_rows(report: dict) -> None:
    """Raise EmptySplitError when a split of an ingest report (geodata.ingest.run.IngestReport.to_dict)
    kept no rows: the later stages cannot work on an empty split."""
    for split, rep in (report.get("splits") or {}).items():
        if rep.get("kept_total", 0) > 0:
            continue
        src, n_in = rep.get("csv_path") or report.get("root"), rep.get("n_in_total", 0)
        if n_in == 0:
            what = "holds no data rows (a header only)" if str(src).endswith(".csv") else "holds no samples"
        else:
            what = f"had {n_in} row(s), all quarantined (see {report.get('quarantine_path')})"
        raise EmptySplitError(f"split {split!r} has no rows to work on: {src} {what}; "
                              "the later stages need at least one valid row in every split")


class FeatureFailureError(ValueError):
    """More images of a split failed in the features stage than its ceiling allows."""


def check_feature_failures(split: str, n: int, failed: list[tuple[int, str]], n_failed: int, ceiling: float,
                           data_dir: str, log=None) -> None:
    """Raise FeatureFailureError when ``n_failed`` of a split's ``n`` images could not be read
    and their share is above ``ceiling`` (features.max_bad_fraction); below it, log them.
    ``failed``: the first few (image id, reason)."""
    if not n_failed:
        return
    frac = n_failed / max(n, 1)
    first = "; ".join(f"id {i}: {reason}" for i, reason in failed)
    what = (f"features of split {split!r}: {n_failed} of {n} images could not be read ({frac:.2%}, ceiling "
            f"features.max_bad_fraction={ceiling:g}); first: {first}")
    if frac > ceiling:
        raise FeatureFailureError(f"{what}. The images are read from {data_dir}: fix the folder (or the backbone), "
                                  "then run again with features.retry_failed=true to read the failed images again")
    if log is not None:
        log.warning("%s; their rows are left out of training and evaluation", what)
