"""Errors as the user reads them: the file (or URI) and the reason, no Python reprs, no tracebacks
of our own errors on the terminal, and no minutes of retries against a server that is down."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from flows.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))
#: Python's view of things: '<_io.BytesIO object at 0x7f...>', 'NewConnectionError(...)', 'HTTPConnectionPool(...)'
PYTHON_REPR = re.compile(r"<[^<>\n]* at 0x[0-9a-fA-F]+>|\b[A-Z]\w*(Error|Exception|Pool|Connection)\(")
_PROJECT_ENV = ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _cli(args: list[str], home: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in _PROJECT_ENV}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=home, capture_output=True, text=True,
                          env={**clean, "HIERLOC_HOME": str(home), "PYTHONPATH": str(ROOT), **env}, timeout=timeout)


def test_predict_names_the_photo_and_the_reason(demo_bundle, tmp_path):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("a text file named like a photo")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(PHOTOS[0].read_bytes()[:3000])
    for extra in ([], ["--json"]):
        res = CliRunner().invoke(app, ["predict", str(not_image), str(truncated), "--model", str(demo_bundle), *extra],
                                 catch_exceptions=False)
        assert res.exit_code == 2
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        assert errors[0].startswith(f"error: {not_image}: cannot decode image") and "not a known image format" in errors[0]
        assert errors[1].startswith(f"error: {truncated}: cannot decode image") and "truncated" in errors[1]
        assert not PYTHON_REPR.search(res.stderr + res.stdout), res.stderr
        if extra:
            assert [d["error"] for d in json.loads(res.stdout)] == [e.split(": ", 2)[2] for e in errors]


def test_predict_from_a_tracking_server_that_is_down_fails_at_once_and_plainly(tmp_path):
    """MLflow's client retries a refused connection for minutes and then reports the chain of
    urllib3 objects; the command asks once and says which server and why."""
    store = f"http://127.0.0.1:{_closed_port()}"
    model = "runs:/0123456789abcdef0123456789abcdef/model"
    t0 = time.monotonic()
    res = _cli(["predict", "--model", model, str(PHOTOS[0])], tmp_path, timeout=120, MLFLOW_TRACKING_URI=store)
    assert time.monotonic() - t0 < 60
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line == (f"error: cannot download the MLflow model {model}: the tracking server at {store} does not "
                    "answer ([Errno 111] Connection refused); start it (`make up`) or set MLFLOW_TRACKING_URI")


def test_a_failed_run_ends_with_one_error_line_and_prefect_keeps_the_traceback(tmp_path):
    missing = tmp_path / "no-such-data"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"data_dir": str(missing), "work_dir": str(tmp_path / "work"),
                               "demo_data": {"build_if_missing": False}}))
    res = _cli(["run", "--config", str(cfg)], tmp_path, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the pipeline failed: data folder {missing}: found neither layout"), last
    assert "Traceback" not in out and "╭" not in out and "\x1b[" not in out, out
    assert not PYTHON_REPR.search(last)
    with sqlite3.connect(tmp_path / ".prefect" / "prefect.db") as db:  # the run's log, as Prefect's UI shows it
        logged = [m for (m,) in db.execute("SELECT message FROM log WHERE message LIKE 'Encountered exception%'")]
    assert logged and "Traceback (most recent call last)" in logged[0] and str(missing) in logged[0]


def test_plain_reason_keeps_the_reason_and_drops_pythons_view():
    import requests
    from PIL import UnidentifiedImageError

    from flows.errors import plain_reason

    with_repr = UnidentifiedImageError("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b0e50>")
    assert plain_reason(with_repr) == "cannot identify image file"
    try:  # the chain a refused connection raises through requests and urllib3
        requests.get(f"http://127.0.0.1:{_closed_port()}/health", timeout=5)
    except requests.ConnectionError as exc:
        assert plain_reason(exc) == "[Errno 111] Connection refused"
    assert plain_reason(KeyError()) == "KeyError"
