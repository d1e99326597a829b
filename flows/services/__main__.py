"""`python -m flows.services up|down|status` (the Makefile's up, down and status)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import flows.services
from flows.services.manager import Services, ServiceError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.services", description=flows.services.__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "down", "status"))
    # a string default goes through type=int, as if given on the command line
    ap.add_argument("--prefect-port", type=int, default=os.environ.get("PREFECT_PORT") or None, help="default 4200")
    ap.add_argument("--mlflow-port", type=int, default=os.environ.get("MLFLOW_PORT") or None, help="default 5000")
    args = ap.parse_args(argv)
    s = Services(prefect_port=args.prefect_port or 4200, mlflow_port=args.mlflow_port or 5000)
    # the servers `up` started listen where they were started: say so rather than look elsewhere
    asked = {"prefect-server": args.prefect_port, "mlflow-server": args.mlflow_port}
    moved = {n: p for n, p in s.adopt_running_ports().items() if asked[n] not in (None, p)}
    if args.command == "up":
        try:
            if moved:
                raise ServiceError("; ".join(f"{n} already runs on port {p}" for n, p in moved.items())
                                   + ": `make down` first to move it")
            s.up()
        except ServiceError as exc:
            print(f"make up failed: {exc}", file=sys.stderr)
            return 1
        print(f"Prefect UI  {s.prefect_ui}\nMLflow UI   {s.mlflow_uri}\nworker      pool {s.pool} (log {s.log_file('worker')})\n"
              f"then:       . {s.state_dir / 'env'} && prefect deployment run 'hierloc-pipeline/demo'")
    elif args.command == "down":
        stopped = s.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        print(json.dumps(s.status(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
