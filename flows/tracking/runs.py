"""MLflow runs for the pipeline: one parent run per pipeline run, a nested run per stage.

Uses MlflowClient with explicit run ids (never the fluent 'active run', which is
thread-local while Prefect may run tasks in worker threads).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from flows.settings import artifact_root

PARENT_TAG = "mlflow.parentRunId"


def experiment_id(name: str) -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # the artifacts follow the tracking store (a sqlite file: mlartifacts/ beside it), never a fixed folder
    return client.create_experiment(name, artifact_location=artifact_root(mlflow.get_tracking_uri()))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lr": 0.001, ...} for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Run:
    """A handle on one MLflow run; every call names the run id explicitly."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def params(self, params: dict) -> None:
        for key, value in flatten(params).items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        for key, value in flatten(metrics).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def artifact_dir(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def json(self, obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, name)
            Path(p).write_text(json.dumps(obj, indent=2, default=str))
            self.client.log_artifact(self.run_id, p)

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)


@contextmanager
def tracked_run(experiment: str, name: str, parent_run_id: str | None = None, tags: dict | None = None) -> Iterator[Run]:
    """Start a run (nested under parent_run_id if given); FINISHED, FAILED or (interrupted) KILLED at exit."""
    client = MlflowClient()
    run_tags = {"mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        run_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id(experiment), run_name=name, tags=run_tags)
    status = "FAILED"
    try:
        yield Run(client, run.info.run_id)
        status = "FINISHED"
    except Exception:
        raise
    except BaseException:  # SIGTERM, Ctrl-C: stopped, not failed
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run.info.run_id, status)
