"""hierloc's and geodata's log lines (progress, epochs, stage summaries) in each Prefect run's logs.

The libraries log through the standard ``logging`` loggers under "hierloc" and "geodata" (they
never import Prefect): their progress lines (hierloc.progress, geodata.progress) included. Each
flow calls ``route_library_logs()`` first; from then on INFO and up from both reach the run's
logs (the Prefect UI, ``prefect flow-run logs``) as well as the console, as
PREFECT_LOGGING_EXTRA_LOGGERS would if it were set before Prefect is imported. Lines logged
outside a flow or task run (a command after its flow, a test) stay on the console only, with no
"attempted to send logs to the API without a flow run id" warning.
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

LIBRARY_LOGGERS = ("hierloc", "geodata")


class RunLogHandler(APILogHandler):
    """Prefect's run-log handler, for records logged inside a flow or task run only."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is None and TaskRunContext.get() is None and not getattr(record, "flow_run_id", None):
            return
        super().emit(record)


def route_library_logs(level: int = logging.INFO) -> None:
    """``level`` and up from the library loggers into the current run's logs (idempotent)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
            logger.addHandler(RunLogHandler())
