"""`hierloc run` as a user runs it: a bad --config is one error line; SIGTERM stops it cleanly.

The SIGTERM test runs the real CLI in a subprocess on a tiny demo dataset (its own Prefect
home, a temp sqlite MLflow store), sends SIGTERM once training has checkpointed, and checks
that the process exits within 20 s with 143, that every process it started is gone, that the
MLflow runs say KILLED, and that the next run reuses the cached stages and resumes training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app

ROOT = Path(__file__).resolve().parents[2]


# --- --config -----------------------------------------------------------------------
@pytest.mark.parametrize("cfg, line", [
    ({"trian": {"epochs": 2}}, "unknown key 'trian' at the top level; allowed there: data_dir, work_dir, experiment,"),
    ({"train": {"epochs": 2, "lrr": 0.1}}, "unknown key 'lrr' in 'train'; allowed there: epochs, batch_size, lr,"),
    ({"registry": {"rule": {"metrc": "geoscore"}}}, "unknown key 'metrc' in 'registry.rule'; allowed there: "),
])
def test_an_unknown_config_key_is_one_error_line_naming_the_allowed_keys(tmp_path, cfg, line):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["run", "--config", str(path)], catch_exceptions=False)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and line in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_a_config_that_is_not_json_is_one_error_line(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"train": ')
    res = CliRunner().invoke(app, ["run", "--config", str(path)], catch_exceptions=False)
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {path}: not valid JSON")


# --- SIGTERM --------------------------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def _cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`hierloc ...` in its own session (process group), so the test can clean up all it leaves."""
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the process group the test started (a hung run, an orphaned server)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _setup(tmp_path: Path, epochs: int) -> dict:
    """A tiny demo dataset, its config file, and the environment of the CLI (temp Prefect home and MLflow store)."""
    from geodata.demo.build import build_demo_dataset

    build_demo_dataset(tmp_path / "data", n_train=300, n_test=30, seed=2)
    cfg = {"data_dir": str(tmp_path / "data"), "work_dir": str(tmp_path / "work"), "experiment": "sigterm",
           "ingest": {"verify_images": "exists"}, "features": {"num_workers": 0}, "model": {"dim": 16, "hidden": 64},
           "train": {"epochs": epochs, "batch_size": 32, "warmup_steps": 5, "checkpoint_every_steps": 2},
           "registry": {"enabled": False}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "mlflow").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_"))}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    return env


def _wait_for(text: str, log: Path, proc: subprocess.Popen, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None and text in log.read_text(), f"never saw {text!r}:\n{log.read_text()[-3000:]}"


def test_sigterm_during_training_exits_cleanly_and_the_next_run_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    epochs = 12
    env = _setup(tmp_path, epochs)
    uri = env["MLFLOW_TRACKING_URI"]
    project = {p: _files(ROOT / p) for p in ("mlartifacts", ".prefect")}

    log = tmp_path / "run1.log"
    proc = _cli(["run", "--config", str(tmp_path / "cfg.json")], env, log)
    try:
        # "epoch 2/" is logged after epoch 1's closing checkpoint was written: the resume point is then
        # at least one whole epoch in, whatever the timing ("epoch 1/" comes just before that checkpoint)
        _wait_for(f"epoch 2/{epochs}", log, proc)
        started = _descendants(proc.pid)
        assert started, "no server process found under the CLI (Prefect's temporary server)"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        took = time.monotonic() - t0
        time.sleep(0.5)
        left = [p for p in started if _alive(p)]
    finally:
        _kill_group(proc)
    out = log.read_text()
    assert rc == 128 + signal.SIGTERM and took < 20, (rc, took, out[-3000:])
    assert "error: stopped by SIGTERM" in out and "Traceback" not in out
    assert not left, "processes the run started are still running"
    ckpt = list((tmp_path / "work" / "train").glob("*/checkpoint.pt"))
    assert len(ckpt) == 1 and not list(ckpt[0].parent.glob(".*.tmp"))

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sigterm")
    status = {r.data.tags["stage"]: r.info.status for r in client.search_runs([exp.experiment_id])}
    assert status == {"pipeline": "KILLED", "ingest": "FINISHED", "hierarchy": "FINISHED", "features": "FINISHED",
                      "train": "KILLED"}
    assert exp.artifact_location == (tmp_path / "mlflow" / "mlartifacts").as_uri()

    log2 = tmp_path / "run2.log"
    rerun = _cli(["run", "--config", str(tmp_path / "cfg.json")], env, log2)
    try:
        assert rerun.wait(timeout=400) == 0, log2.read_text()[-3000:]
    finally:
        _kill_group(rerun)
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'", order_by=["attributes.start_time DESC"])
    assert runs[0].data.tags["cached_stages"] == "ingest,hierarchy,features"
    train = client.get_run(runs[0].data.tags["train_run_id"]).data.metrics
    per_epoch = -(-int(train["n_train"]) // 32)
    assert 1 <= epochs - train["epochs_run"] and train["steps"] == epochs * per_epoch  # resumed after >= 1 epoch
    assert {p: _files(ROOT / p) for p in project} == project  # nothing written into the project folder
    records = sorted((tmp_path / "prefect" / "storage").iterdir())  # the cached stages' results: JSON, no pickle
    assert len(records) == 3 and all(json.loads(r.read_text())["metadata"]["serializer"]["type"] == "json" for r in records)


def test_sigterm_to_the_whole_process_group_exits_within_20_s(tmp_path):
    """`kill -TERM -<pgid>` (a service manager, a terminal's job control): Prefect's temporary
    server dies with the group, and Prefect would retry reporting the crash to it for minutes."""
    env = _setup(tmp_path, epochs=50)
    log = tmp_path / "run.log"
    proc = _cli(["run", "--config", str(tmp_path / "cfg.json")], env, log)
    try:
        _wait_for("epoch 1/50", log, proc)
        started = _descendants(proc.pid)  # before the signal: once the CLI exits, its children are reparented
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t0
        time.sleep(0.5)
        left = [p for p in started if _alive(p)]
    finally:
        _kill_group(proc)
    assert rc == 128 + signal.SIGTERM and took < 20, (rc, took, log.read_text()[-3000:])
    assert not left and "error: stopped by SIGTERM" in log.read_text()
    ckpt = list((tmp_path / "work" / "train").glob("*/checkpoint.pt"))
    assert len(ckpt) == 1 and not list(ckpt[0].parent.glob(".*.tmp"))
