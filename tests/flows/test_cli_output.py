"""What a user sees: `hierloc run` on a tiny dataset, in a subprocess as `make demo` runs it,
prints the pipeline's own lines and the metrics, and a last line whose `mlflow ui` command
works as printed."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.flows.processes import free_port, stop

ROOT = Path(__file__).resolve().parents[2]
#: Set by importing flows (the test process did): the child must set them itself.
_PROJECT_ENV = ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "PYTHONWARNINGS")
#: Lines that are not the pipeline's: MLflow's and Prefect's own notes, Python warnings, bars.
FOREIGN = {
    "a Python warning": re.compile(r"Warning\b"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
    "an ANSI escape code": re.compile(r"\x1b\["),
    "MLflow's artifact download bar": re.compile(r"Downloading artifacts"),
    "an MLflow log line": re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \w+ mlflow", re.M),
    "Prefect's temporary-server note": re.compile(r"temporary server|prefect\.io/docs"),
    "an MLflow run link": re.compile(r"View (run|experiment) .* at"),
}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """(stdout, stderr of `hierloc run` on a tiny config, its project folder): state in a temp folder."""
    home = tmp_path_factory.mktemp("home")
    cfg = {"data_dir": str(home / "data"), "work_dir": str(home / "work"), "experiment": "quiet",
           "demo_data": {"n_train": 1200, "n_test": 120, "seed": 4}, "features": {"num_workers": 1},
           "model": {"dim": 16, "hidden": 64}, "train": {"epochs": 2, "batch_size": 128, "warmup_steps": 5}}
    (home / "cfg.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in _PROJECT_ENV}
    env.update(HIERLOC_HOME=str(home), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(home / "cfg.json")], cwd=home,
                         env=env, capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout, res.stderr, home


def test_run_prints_only_the_pipelines_lines(cli_run):
    stdout, stderr, _ = cli_run
    out = stdout + stderr
    found = {what: m.group(0) for what, pat in FOREIGN.items() if (m := pat.search(out))}
    assert not found, f"{found}\n{out}"
    assert "Beginning flow run" in out and re.search(r"^geoscore\s+\d", out, re.M)


def test_the_last_line_is_an_mlflow_ui_command_that_works(cli_run):
    out, _, home = cli_run
    last = out.rstrip().splitlines()[-1]
    assert "--workers 1" in last and "--host 127.0.0.1" in last, last
    argv = shlex.split(last.split(":  ", 1)[1].split("   (then", 1)[0])
    store = f"sqlite:///{home / 'mlflow.db'}"
    assert argv[1] == "ui" and argv[argv.index("--backend-store-uri") + 1] == store
    exe = Path(argv[0]) if Path(argv[0]).is_absolute() else home / argv[0]  # as a shell in `home` runs it
    assert exe.is_file() and os.access(exe, os.X_OK) and exe.name == "mlflow"
    run_id = re.search(r"MLflow parent run ([0-9a-f]{32}) in (\S+)", out).group(1)
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    env = {k: v for k, v in os.environ.items() if k not in _PROJECT_ENV}
    env["PATH"] = f"{exe.parent}{os.pathsep}{env.get('PATH', '')}"  # mlflow starts uvicorn by name
    log = open(home / "ui.log", "w")
    proc = subprocess.Popen([str(exe), *argv[1:]], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}",
                                            timeout=5) as r:
                    assert json.loads(r.read())["run"]["info"]["status"] == "FINISHED"
                    break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the printed command did not serve the run:\n{(home / 'ui.log').read_text()[-3000:]}")
                time.sleep(0.5)
    finally:
        stop(proc, log)


def test_the_ui_command_names_the_venvs_mlflow_relative_to_the_project(tmp_path):
    from flows.cli.terminal import mlflow_executable, mlflow_ui_hint

    venv_bin = Path(sys.executable).parent
    project = venv_bin.parent.parent  # <project>/.venv/bin/python
    rel = mlflow_executable(cwd=project)
    assert rel == f"{venv_bin.parent.name}/bin/mlflow" and (project / rel).is_file()
    assert Path(mlflow_executable(cwd=tmp_path)) == venv_bin.absolute() / "mlflow"
    hint = mlflow_ui_hint("sqlite:////srv/my store/mlflow.db", cwd=project)
    assert f"{rel} ui --workers 1 --backend-store-uri 'sqlite:////srv/my store/mlflow.db'" in hint
    assert mlflow_ui_hint("http://127.0.0.1:5078") == "open the MLflow UI at http://127.0.0.1:5078"
