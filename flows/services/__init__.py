"""Local Prefect and MLflow servers, a process work pool, the deployments and a worker: `make up` / `make down`.

    python -m flows.services up       # start (or find running) everything, deploy prefect.yaml
    python -m flows.services down     # stop exactly the processes `up` started
    python -m flows.services status

Both servers bind to 127.0.0.1 only; their state lives in the project folder:
``.prefect/`` (Prefect's database and results), ``mlflow.db`` + ``mlartifacts/`` (the same
store `make demo` writes, so its runs show up in the UI), ``.run/`` (pid files, logs, and
``.run/env``, which a shell sources to talk to these servers).

Every process is started in its own session; its pid is recorded with its start time and
command line (psutil: the kernel's view), and `down` signals a pid only while the process
with that pid has the same start time and still runs that command (a recycled pid is never
killed).
"""
