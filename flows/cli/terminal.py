"""What a pipeline command shows besides the pipeline's own lines: Prefect's notes about its
temporary server and the tracebacks of our own errors kept out, and a last line with the
MLflow UI command that works as printed."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

#: Prefect logs these (INFO, on its top logger "prefect") when a command runs without a Prefect
#: server and starts a temporary one; the second line of the first is a link to its docs.
_TEMPORARY_SERVER_NOTES = ("Starting temporary server on ", "Stopping temporary server on ")
#: mlflow ui's own default port.
UI_PORT = 5000


class _NoTemporaryServerNotes(logging.Filter):
    """Drops Prefect's temporary-server notes (only those: a logger's filter sees only the records
    logged on that logger itself, so flow and task run lines, which propagate from the
    ``prefect.flow_runs`` / ``prefect.task_runs`` children, pass untouched)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not str(record.msg).startswith(_TEMPORARY_SERVER_NOTES)


class _OwnErrorsWithoutTraceback(logging.Filter):
    """On the terminal only: a log record carrying an error of our own (its class defined in
    flows, geodata or hierloc, raised with a message that names the file and what to do),
    which the flow engine logs with its traceback, is left out: the command's last line says
    it. Prefect's log of the run keeps it whole (its API handler sits on the run's logger and
    has formatted the record before it propagates to the terminal's handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or type(exc).__module__.split(".")[0] not in ("flows", "geodata", "hierloc")


def quiet_prefect() -> None:
    """Keep Prefect's temporary-server notes, and the tracebacks of our own errors, off the
    terminal (idempotent; call after importing prefect, which sets up its logging)."""
    logger = logging.getLogger("prefect")
    if not any(isinstance(f, _NoTemporaryServerNotes) for f in logger.filters):
        logger.addFilter(_NoTemporaryServerNotes())
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _OwnErrorsWithoutTraceback) for f in handler.filters):
            handler.addFilter(_OwnErrorsWithoutTraceback())


def mlflow_executable(cwd: Path | None = None) -> str:
    """The ``mlflow`` script of the environment running this command (the project's
    ``.venv/bin/mlflow``), as a path that works from ``cwd`` in a shell whose PATH lacks the venv:
    relative (``.venv/bin/mlflow``) when under ``cwd``, else absolute; else ``mlflow`` from PATH."""
    local = Path(sys.executable).parent / "mlflow"  # not resolved: the venv's python is a link out of it
    if not local.is_file():
        return shutil.which("mlflow") or "mlflow"
    cwd = Path(cwd or os.getcwd()).absolute()
    try:
        return str(local.absolute().relative_to(cwd))  # has a slash: the shell runs it from cwd, not PATH
    except ValueError:
        return str(local.absolute())


def mlflow_ui_hint(tracking_uri: str, cwd: Path | None = None) -> str:
    """The line saying how to see the runs: a tracking server's address, or for a local store
    (sqlite, a folder) the ``mlflow ui`` command on that store, runnable as printed: one
    worker (mlflow's default of four takes 30 s and 3.6 GB to start on a 2-core machine),
    on loopback only."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open the MLflow UI at {tracking_uri}"
    argv = [mlflow_executable(cwd), "ui", "--workers", "1", "--backend-store-uri", tracking_uri,
            "--host", "127.0.0.1", "--port", str(UI_PORT)]
    return f"open the MLflow UI with:  {shlex.join(argv)}   (then http://127.0.0.1:{UI_PORT})"
