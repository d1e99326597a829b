"""Is each service of `make up` healthy: a server answers its health check; the worker runs and
Prefect has heard from it since it started."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import datetime

from flows.errors import plain_reason


def post_json(url: str, body: dict, timeout_s: float = 5.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def worker_state(svc) -> dict:
    """The worker's process and what the Prefect server last heard from it: healthy when the
    process `up` started runs, has sent a heartbeat since it started, and the server counts
    it ONLINE (a heartbeat within three intervals, 30 s each by default); ``detail``: why not.
    ``svc``: the flows.services.manager.Services whose worker it is."""
    rec = svc.record("worker")
    state = {"pid": rec and rec["pid"], "healthy": False, "name": svc.worker_name, "pool": svc.pool,
             "status": None, "last_heartbeat": None, "detail": "" if rec else "its process is not running"}
    try:  # the pool's workers (Prefect filters them by heartbeat and status, not by name)
        workers = post_json(f"{svc.prefect_api}/work_pools/{svc.pool}/workers/filter", {})
    except (urllib.error.URLError, OSError, ValueError) as exc:  # HTTPError: it answered (no such pool, ...)
        why = (f"answered HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError)
               else f"does not answer ({plain_reason(exc)})")
        state["detail"] = f"the Prefect server at {svc.prefect_api} {why}"
        return state
    mine = next((w for w in workers if w.get("name") == svc.worker_name), {})
    state.update(status=mine.get("status"), last_heartbeat=mine.get("last_heartbeat_time"))
    beat = datetime.fromisoformat(mine["last_heartbeat_time"]).timestamp() if state["last_heartbeat"] else None
    since_start = beat is not None and rec is not None and beat >= (rec.get("create_time") or 0) - 1.0
    state["healthy"] = since_start and state["status"] == "ONLINE"
    if rec and not state["healthy"]:
        state["detail"] = ("its process runs but has sent no heartbeat since it started" if not since_start
                           else f"its process runs; Prefect counts it {state['status']}")
    return state
