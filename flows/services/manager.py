"""The services of `make up` and their processes: start, record, find, stop (see the package's docstring)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import psutil

from flows.settings import OFFLINE_DEFAULTS, PROJECT_DIR
from flows.services.health import http_ok, worker_state
from flows.services.steps import Steps
from geodata.atomic import write_text_atomic

POOL = "hierloc-process"
#: start order; `down` stops in reverse
SERVICES = ("prefect-server", "mlflow-server", "worker")


#: How far apart two readings of one process's start time may be (psutil's create_time is the start in
#: clock ticks since boot plus the boot time, which /proc/stat recomputes from the wall clock).
START_TIME_SLACK_S = 2.0


class ServiceError(RuntimeError):
    pass


@dataclass
class Services:
    """Where the servers listen and keep their state. Tests use their own ports and folders."""

    project_dir: Path = PROJECT_DIR
    state_dir: Path | None = None  # pids, logs, env (default project_dir/.run)
    prefect_home: Path | None = None  # default project_dir/.prefect
    mlflow_db: Path | None = None  # default project_dir/mlflow.db
    artifacts_dir: Path | None = None  # default mlartifacts/ beside mlflow_db
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pool: str = POOL
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = Path(self.project_dir).resolve()
        self.project_dir = p
        self.state_dir = Path(self.state_dir or p / ".run")
        self.prefect_home = Path(self.prefect_home or p / ".prefect")
        self.mlflow_db = Path(self.mlflow_db or p / "mlflow.db")
        self.artifacts_dir = Path(self.artifacts_dir or self.mlflow_db.parent / "mlartifacts")  # beside the store

    # --- addresses -----------------------------------------------------------
    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        """The environment of every process started here (and of `.run/env`)."""
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, **OFFLINE_DEFAULTS}
        env.update({
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # mlflow starts uvicorn by name
            "HIERLOC_HOME": str(self.project_dir),
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.prefect_port),
            "PREFECT_UI_API_URL": self.prefect_api,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            **self.extra_env,
        })
        return env

    # --- process bookkeeping ---------------------------------------------------
    def _pid_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def record(self, name: str) -> dict | None:
        """What `up` recorded of the process of service ``name`` while it still runs, else None."""
        f = self._pid_file(name)
        if not f.exists():
            return None
        try:
            rec = json.loads(f.read_text())
            proc = psutil.Process(rec["pid"])
            # the same process: same start time (a recycled pid has another), still running the same command.
            # psutil adds the boot time read from /proc/stat at each call, which moves with the wall clock
            # (a second either way after an NTP adjustment): compared within START_TIME_SLACK_S.
            same = (abs(proc.create_time() - rec["create_time"]) <= START_TIME_SLACK_S
                    and proc.cmdline()[: len(rec["argv"])] == rec["argv"])
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):  # gone, a zombie, or not our record
            return None
        return rec if same else None

    def running(self, name: str) -> int | None:
        """The pid of service ``name`` if the process `up` started still runs, else None."""
        rec = self.record(name)
        return rec["pid"] if rec else None

    def recorded_port(self, name: str) -> int | None:
        """The port the running server ``name`` was started on (``--port N`` in its recorded
        command line), else None."""
        argv = (self.record(name) or {}).get("argv") or []
        ports = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--port"]
        return int(ports[-1]) if ports and ports[-1].isdigit() else None

    def adopt_running_ports(self) -> dict[str, int]:
        """Take the ports of the servers `up` started and that still run (from ``.run/``), whatever
        this object was built with: `status` and a second `up` then talk to them on any ports.
        Returns {service: port} of those taken."""
        taken = {}
        for name, attr in (("prefect-server", "prefect_port"), ("mlflow-server", "mlflow_port")):
            port = self.recorded_port(name)
            if port is not None:
                setattr(self, attr, port)
                taken[name] = port
        return taken

    def _start(self, name: str, argv: list[str]) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file(name), "ab")
        proc = subprocess.Popen(argv, cwd=self.project_dir, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        # Popen returns once the child has exec'd; the kernel shows a script's interpreter in its
        # argv: record what it reports, with the start time, to recognise the process later.
        try:
            seen = psutil.Process(proc.pid)
            record = {"pid": proc.pid, "create_time": seen.create_time(), "argv": seen.cmdline()}
        except psutil.Error:  # exited at once: recorded as started, `running` finds it gone
            record = {"pid": proc.pid, "create_time": None, "argv": argv}
        self._pid_file(name).write_text(json.dumps(record))
        return proc.pid

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> bool:
        """Stop service ``name`` (its whole process group: a worker's flow runs go with it)."""
        pid = self.running(name)
        self._pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _reap(pid)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return True

    # --- readiness ---------------------------------------------------------------
    def _wait_http(self, name: str, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.running(name) is None:
                raise ServiceError(f"{name} exited while starting; see {self.log_file(name)}:\n{_tail(self.log_file(name))}")
            if http_ok(url):
                return
            time.sleep(0.5)
        raise ServiceError(f"{name} did not answer {url} within {timeout_s:.0f} s; see {self.log_file(name)}")

    def _check_port_free(self, name: str, port: int) -> None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise ServiceError(f"port {port} on 127.0.0.1 is taken by a process `up` did not start, so {name} "
                                   "cannot listen there: stop it, or choose other ports (PREFECT_PORT=... "
                                   "MLFLOW_PORT=... make up)")

    # --- the three services ------------------------------------------------------
    def start_prefect(self, timeout_s: float = 180.0) -> None:
        if self.running("prefect-server") is None:
            self._check_port_free("the Prefect server", self.prefect_port)
            self.prefect_home.mkdir(parents=True, exist_ok=True)
            self._start("prefect-server", [_exe("prefect"), "server", "start", "--host", "127.0.0.1",
                                           "--port", str(self.prefect_port)])
        self._wait_http("prefect-server", self.prefect_api + "/health", timeout_s)

    def start_mlflow(self, timeout_s: float = 120.0) -> None:
        if self.running("mlflow-server") is None:
            self._check_port_free("the MLflow server", self.mlflow_port)
            self.artifacts_dir.mkdir(parents=True, exist_ok=True)
            self._start("mlflow-server", [
                _exe("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                "--backend-store-uri", f"sqlite:///{self.mlflow_db}", "--artifacts-destination", str(self.artifacts_dir),
                "--workers", "1"])
        self._wait_http("mlflow-server", self.mlflow_uri + "/health", timeout_s)

    def prefect(self, *args: str, timeout_s: float = 300.0) -> str:
        """Run the prefect CLI against this server; raise with its output if it fails."""
        res = subprocess.run([_exe("prefect"), "--no-prompt", *args], cwd=self.project_dir, env=self.env(),
                             capture_output=True, text=True, timeout=timeout_s)
        if res.returncode != 0:
            raise ServiceError(f"prefect {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res.stdout

    def create_pool(self) -> None:
        """The process work pool (replaced if it exists)."""
        self.prefect("work-pool", "create", self.pool, "--type", "process", "--overwrite")

    def register_deployments(self) -> None:
        """Every deployment of prefect.yaml."""
        self.prefect("deploy", "--all", "--prefect-file", str(self.project_dir / "prefect.yaml"))

    @property
    def worker_name(self) -> str:
        """The name the worker `up` starts has in Prefect (its heartbeats are recorded under it)."""
        return f"{self.pool}-worker"

    def start_worker(self, timeout_s: float = 180.0) -> int:
        """Start the worker (if not running) and wait for its first heartbeat on the Prefect server."""
        pid = self.running("worker")
        if pid is None:
            pid = self._start("worker", [_exe("prefect"), "worker", "start", "--pool", self.pool, "--type", "process",
                                         "--name", self.worker_name])
        deadline = time.monotonic() + timeout_s
        while not self.worker_state()["healthy"]:
            if self.running("worker") is None:
                raise ServiceError(f"the worker exited while starting; see {self.log_file('worker')}:\n"
                                   f"{_tail(self.log_file('worker'))}")
            if time.monotonic() > deadline:
                raise ServiceError(f"the worker sent no heartbeat to {self.prefect_api} within {timeout_s:.0f} s; "
                                   f"see {self.log_file('worker')}")
            time.sleep(1.0)
        return pid

    def worker_state(self) -> dict:
        """See flows.services.health.worker_state."""
        return worker_state(self)

    def up(self, out: TextIO | None = None) -> None:
        """Everything, saying on ``out`` (default stdout) what it does and how long each step took."""
        self.adopt_running_ports()
        steps = Steps(out)
        with steps.step(self._starting("prefect-server", f"the Prefect server on 127.0.0.1:{self.prefect_port}")):
            self.start_prefect()
        with steps.step(self._starting("mlflow-server", f"the MLflow server on 127.0.0.1:{self.mlflow_port}")):
            self.start_mlflow()
        with steps.step(f"creating the work pool {self.pool}", "done"):
            self.create_pool()
        with steps.step("registering the deployments of prefect.yaml", "done"):
            self.register_deployments()
        with steps.step(self._starting("worker", f"a worker for pool {self.pool}"), "started"):
            self.start_worker()
        self.write_env_file()
        steps.say(f"up in {steps.total_s():.0f} s")

    def _starting(self, name: str, what: str) -> str:
        pid = self.running(name)
        return f"starting {what}" if pid is None else f"{what}: running already (pid {pid})"

    def down(self, timeout_s: float = 15.0) -> list[str]:
        """SIGTERM to every service at once, SIGKILL to any still running after ``timeout_s``."""
        pids = {name: self.running(name) for name in SERVICES}
        for name, pid in pids.items():
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        stopped = [name for name in reversed(SERVICES) if pids[name] is not None]
        for name in stopped:
            self.stop(name, timeout_s=timeout_s)
        (self.state_dir / "env").unlink(missing_ok=True)
        return stopped

    def write_env_file(self) -> Path:
        env = self.env()
        keys = ("HIERLOC_HOME", "PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DO_NOT_TRACK",
                "PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE")
        venv = Path(sys.executable).parent / "activate"
        lines = ["# source me: the venv and the addresses of the servers `make up` started"]
        if venv.exists():
            lines.append(f". {shlex.quote(str(venv))}")
        lines += [f"export {k}={shlex.quote(env[k])}" for k in keys]  # a path with spaces or $ stays one word
        path = self.state_dir / "env"
        write_text_atomic("\n".join(lines) + "\n", path)
        return path

    def status(self) -> dict[str, dict]:
        """Each service's pid (None: not running) and health: a server answers its health
        check on the port it was started on (from ``.run/``); the worker, see worker_state."""
        self.adopt_running_ports()
        out = {name: {"pid": self.running(name), "port": port, "healthy": http_ok(url)} for name, port, url in (
            ("prefect-server", self.prefect_port, self.prefect_api + "/health"),
            ("mlflow-server", self.mlflow_port, self.mlflow_uri + "/health"))}
        out["worker"] = self.worker_state()
        return out


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own exited child (tests start the servers in-process);
    otherwise a zombie would look alive to killpg(pid, 0)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _exe(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
