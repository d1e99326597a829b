"""What `hierloc run` does around the flow: read the config with one-line errors, and stop
cleanly on SIGTERM.

SIGTERM: the flow's task is interrupted where it is (Prefect turns the signal into an
exception inside the running task: training keeps its last atomic checkpoint, and the next
run resumes from it), the MLflow runs end as KILLED, the CLI exits with 143 and the
interpreter's exit handlers stop the servers this process started (Prefect's temporary
server). Should that take longer than GRACE_S, or a second SIGTERM come, the servers are
stopped and the process exits at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: seconds between SIGTERM and the forced exit (under the usual 20 s before a SIGKILL)
GRACE_S = 12.0
EXIT_SIGTERM = 128 + signal.SIGTERM


class ConfigError(ValueError):
    """A --config file that is not valid JSON, or holds unknown keys or bad values."""


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""


def _model_at(model, loc: tuple) -> type | None:
    """The pydantic model class at the nested field path ``loc`` of ``model``."""
    from pydantic import BaseModel

    for name in loc:
        field = getattr(model, "model_fields", {}).get(name)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(model, err: dict) -> str:
    loc = tuple(str(p) for p in err.get("loc", ()))
    where = "at the top level" if len(loc) <= 1 else f"in '{'.'.join(loc[:-1])}'"
    if err.get("type") == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"unknown key '{loc[-1] if loc else ''}' {where}; allowed there: {allowed}"
    return f"'{'.'.join(loc)}': {err.get('msg')} (got {err.get('input')!r})"


def load_config(path: Path | None, overrides: dict):
    """PipelineConfig from a JSON file and command-line overrides; ConfigError with one line
    per problem (an unknown key names the keys allowed where it stands)."""
    from pydantic import ValidationError

    from flows.params import PipelineConfig

    data: dict = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{path or 'config'}: {_describe(PipelineConfig, e)}" for e in exc.errors()))


def load_config_or_exit(path: Path | None, overrides: dict):
    """load_config, or one ``error:`` line per problem on stderr and exit code 2 (no traceback)."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        sys.stderr.write("".join(f"error: {line}\n" for line in str(exc).splitlines()))
        raise SystemExit(2) from None


def _stop_servers() -> None:
    """Stop Prefect's temporary API server if this process started one (it is a child process)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except Exception:  # noqa: BLE001  (no Prefect server code: nothing started)
        return
    for server in list(getattr(SubprocessASGIServer, "_instances", {}).values()):
        try:
            server.stop()
        except Exception:  # noqa: BLE001  (best effort on the way out)
            pass


def _force_exit() -> None:
    _stop_servers()
    sys.stderr.write("error: stopped by SIGTERM (forced after the grace period)\n")
    sys.stderr.flush()
    os._exit(EXIT_SIGTERM)


@contextmanager
def stop_on_sigterm(grace_s: float = GRACE_S) -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (Prefect's own handler,
    installed while a flow runs, hands the signal back to this one when the flow has crashed);
    a watchdog exits the process ``grace_s`` later if it is still alive, a second SIGTERM at once."""
    state = {"n": 0}

    def handler(signum, frame) -> None:
        state["n"] += 1
        if state["n"] > 1:
            _force_exit()
        timer = threading.Timer(grace_s, _force_exit)
        timer.daemon = True
        timer.start()
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Terminated:
        # the handler stays: a second SIGTERM on the way out forces the exit
        sys.stderr.write("error: stopped by SIGTERM; the finished stages are cached and training resumes from its "
                         "last checkpoint on the next run\n")
        raise SystemExit(EXIT_SIGTERM) from None
    signal.signal(signal.SIGTERM, previous)
