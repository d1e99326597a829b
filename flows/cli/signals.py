"""What `hierloc run` does around the flow when SIGTERM comes: stop cleanly.

SIGTERM: the flow's task is interrupted where it is (Prefect turns the signal into an
exception inside the running task: training keeps its last atomic checkpoint, and the next
run resumes from it), the MLflow runs end as KILLED, the CLI exits with 143 and the
interpreter's exit handlers stop the servers this process started (Prefect's temporary
server). Should that take longer than GRACE_S (a SIGTERM to the whole process group kills
the temporary server too, and Prefect then retries reporting the crash to it), or a second
SIGTERM come, the servers and worker processes are stopped and the process exits at once.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

#: seconds between SIGTERM and the forced exit (under the usual 20 s before a SIGKILL)
GRACE_S = 12.0
EXIT_SIGTERM = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""


def _servers() -> list:
    """Prefect's temporary API servers this process started (child processes), if any."""
    module = sys.modules.get("prefect.server.api.server")  # not imported: no server was started
    server_cls = getattr(module, "SubprocessASGIServer", None)
    return list(getattr(server_cls, "_instances", {}).values())


def _stop_servers() -> None:
    for server in _servers():
        try:
            if getattr(server, "server_process", None) is not None:
                server.stop()
        except Exception:  # noqa: BLE001  (best effort on the way out)
            pass


def _servers_gone() -> bool:
    """True when every temporary server this process started has exited (a SIGTERM to the
    whole process group): no API is left to report to, so there is nothing to wait for."""
    procs = [getattr(s, "server_process", None) for s in _servers()]
    procs = [p for p in procs if p is not None]
    return bool(procs) and all(p.poll() is not None for p in procs)


def _force_exit(why: str = "forced after the grace period") -> None:
    """Stop the servers and the worker processes this process started, and exit 143 now."""
    import multiprocessing

    _stop_servers()
    for child in multiprocessing.active_children():  # Dask workers, data loader workers
        child.terminate()
    sys.stderr.write(f"error: stopped by SIGTERM ({why})\n")
    sys.stderr.flush()
    os._exit(EXIT_SIGTERM)


def _watch(rfd: int, grace_s: float) -> None:
    """Sees every SIGTERM, whichever Python handler takes it (Prefect installs its own while a
    flow runs and reports the crash to its API before handing the signal on): forces the exit
    ``grace_s`` after the first, soon after the API server died with its process group, or at
    a second SIGTERM."""
    deadline, why = None, None
    while True:
        timeout = None if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
        ready, _, _ = select.select([rfd], [], [], timeout)
        if ready:
            data = os.read(rfd, 64)
            n = data.count(bytes([signal.SIGTERM]))
            if n and deadline is not None or n > 1:
                _force_exit("a second SIGTERM")
            if n:
                deadline = time.monotonic() + grace_s
        if deadline is not None:
            if why is None and _servers_gone():  # let the interrupted task unwind (atomic writes clean up), then go
                deadline, why = min(deadline, time.monotonic() + 2.0), "its API server is gone"
            if time.monotonic() >= deadline:
                _force_exit(why or "forced after the grace period")


@contextmanager
def stop_on_sigterm(grace_s: float = GRACE_S) -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (Prefect's own handler,
    installed while a flow runs, hands the signal back to this one when the flow has crashed),
    and the block exits with 143. A watcher thread (signal.set_wakeup_fd) forces the exit when
    that takes longer than ``grace_s``, or the API server is gone, or at a second SIGTERM.
    After the block (the report) SIGTERM exits at once. The handler stays installed to the end
    of the process: the temporary server lives until then."""
    inside = [True]

    def handler(signum, frame) -> None:
        if not inside[0]:
            _force_exit("at once")
        raise Terminated()

    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.signal(signal.SIGTERM, handler)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(rfd, grace_s), name="sigterm-watch", daemon=True).start()
    try:
        yield
    except Terminated:
        sys.stderr.write("error: stopped by SIGTERM; the finished stages are cached and training resumes from its "
                         "last checkpoint on the next run\n")
        raise SystemExit(EXIT_SIGTERM) from None
    finally:
        inside[0] = False

