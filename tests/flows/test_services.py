"""Process bookkeeping of `make up` / `make down`, without the servers (tests/flows/test_services_e2e.py runs them)."""

import json
import os
import socket
import sys

import pytest

from flows.services.manager import Services, ServiceError


@pytest.fixture
def svc(tmp_path):
    return Services(project_dir=tmp_path, state_dir=tmp_path / "run", prefect_port=1, mlflow_port=2)


def test_stop_kills_what_it_started_and_only_that(svc):
    pid = svc._start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert svc.running("sleeper") == pid
    rec = json.loads(svc._pid_file("sleeper").read_text())
    svc._pid_file("sleeper").write_text(json.dumps({"pid": pid, "argv": ["something", "else"]}))
    assert svc.running("sleeper") is None  # a pid that runs another command is not ours: never signalled
    assert not svc.stop("sleeper")
    os.kill(pid, 0)  # still alive
    svc._pid_file("sleeper").write_text(json.dumps(rec))
    assert svc.stop("sleeper", timeout_s=5)
    assert svc.running("sleeper") is None and not svc._pid_file("sleeper").exists()
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            os.waitpid(pid, os.WNOHANG)


def test_a_start_time_moved_by_a_clock_adjustment_is_still_ours(svc):
    """psutil's start time is ticks since boot plus /proc/stat's boot time, which follows the wall
    clock: a second's drift between the record and a later reading must not disown a running server
    (it made `make up` report MLflow as exited while it ran); a start a minute off is another process."""
    pid = svc._start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = json.loads(svc._pid_file("sleeper").read_text())
        for drift, ours in ((1.0, True), (-1.0, True), (60.0, False)):
            svc._pid_file("sleeper").write_text(json.dumps({**rec, "create_time": rec["create_time"] + drift}))
            assert (svc.running("sleeper") == pid) is ours, drift
    finally:
        svc._pid_file("sleeper").write_text(json.dumps(rec))
        svc.stop("sleeper", timeout_s=5)


def test_a_port_taken_by_someone_else_is_a_clear_error(svc):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        svc.prefect_port = s.getsockname()[1]
        with pytest.raises(ServiceError, match=f"port {svc.prefect_port} on 127.0.0.1 is taken"):
            svc.start_prefect(timeout_s=5)


def test_env_points_every_tool_at_the_loopback_servers(svc):
    env = svc.env()
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:1/api" and env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:2"
    assert env["PREFECT_HOME"] == str(svc.prefect_home) and env["DO_NOT_TRACK"] == "true"
    svc.state_dir.mkdir(parents=True)
    text = svc.write_env_file().read_text()
    assert "export PREFECT_API_URL=http://127.0.0.1:1/api" in text
    assert svc.down() == [] and not (svc.state_dir / "env").exists()


def test_env_file_values_survive_spaces_quotes_and_dollars(tmp_path):
    """`.run/env` is sourced by a shell: each value comes back exactly, never split or expanded."""
    import subprocess

    odd = tmp_path / "my project $HOME `id` it's"
    svc = Services(project_dir=odd, state_dir=tmp_path / "run", prefect_home=tmp_path / "pre fect;$PATH",
                   prefect_port=1, mlflow_port=2)
    svc.state_dir.mkdir(parents=True)
    env_file = svc.write_env_file()
    out = subprocess.run(["bash", "-c", '. "$1" >/dev/null 2>&1; printf "%s\\n" "$HIERLOC_HOME" "$PREFECT_HOME"',
                          "bash", str(env_file)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
                         timeout=30)
    assert out.stdout.splitlines() == [str(odd.resolve()), str(tmp_path / "pre fect;$PATH")], out


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_steps_say_what_is_being_done_and_how_long_it_took():
    """`make up`'s lines (flows.services.steps.Steps): the step's text as it starts, its outcome and seconds at its end."""
    import io

    from flows.services.steps import Steps

    out, clock = io.StringIO(), _Clock()
    steps = Steps(out, clock=clock)
    with steps.step("starting the Prefect server on 127.0.0.1:4200"):
        assert out.getvalue() == "starting the Prefect server on 127.0.0.1:4200 ... "  # said before the wait
        clock.t += 12.4
    with pytest.raises(ServiceError, match="no answer"):
        with steps.step("registering the deployments", "done"):
            clock.t += 3
            raise ServiceError("no answer")
    steps.say(f"up in {steps.total_s():.0f} s")
    assert out.getvalue().splitlines() == ["starting the Prefect server on 127.0.0.1:4200 ... ready in 12 s",
                                           "registering the deployments ... failed after 3 s", "up in 15 s"]
