"""Content digests, MLflow dataset inputs, and stage outputs carried between stages by run id.

Every stage run logs what it read with ``mlflow.log_input`` (name, digest, source) and
what it wrote as an ``outputs.json`` artifact: the folders and content digests of its
outputs. A later stage reads its inputs from that artifact, named by the earlier run's
id, so a model can be traced back to the exact data and hierarchy it came from:
model version -> train run -> (ingest, hierarchy, features run ids and digests) ->
the raw dataset's digest and folder.

The digests double as Prefect cache keys (flows/tasks.py): a stage whose inputs
and parameters have the same digests as an earlier, finished run is not run again.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from flows.errors import plain_reason

OUTPUTS = "outputs.json"
_CHUNK = 8 << 20


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer: nothing has been run or registered."""


def hash_file(path: Path, h: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    """Feed a file's bytes into ``h`` (a new sha256 if None), streaming (bounded memory)."""
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h


def files_digest(paths: Iterable[Path], root: Path | None = None) -> str:
    """Digest of the contents (and relative names) of files, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        hash_file(p, h)
    return h.hexdigest()[:16]


def source_digest(data_dir: Path) -> str:
    """Fingerprint of a dataset folder (OSV-5M CSVs + image shards, or the WebDataset copy):
    the top-level CSVs by content, every other file by (relative path, size, mtime). Shards are
    fingerprinted by metadata, not hashed: hashing ~250 GB of zips every run would cost more
    than the ingest itself (the ingest hashes what it reads; geodata.ingest.incremental). A shard
    rewritten in place with the same size and mtime is the one change this does not see."""
    data_dir = Path(data_dir)
    h = hashlib.sha256()
    csvs = sorted(data_dir.glob("*.csv"))
    for csv in csvs:
        h.update(csv.name.encode() + b"\0")
        hash_file(csv, h)
    for dirpath, dirnames, filenames in os.walk(data_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p in csvs or name.startswith("."):
                continue
            st = p.stat()
            h.update(f"{p.relative_to(data_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --- MLflow -----------------------------------------------------------------------
def log_dataset(client: MlflowClient, run_id: str, name: str, digest: str, source: str | Path,
                context: str) -> None:
    """Record one input of a run (shown under "Datasets used" in the MLflow UI)."""
    ds = MetaDataset(LocalArtifactDatasetSource(str(source)), name=name, digest=digest)
    client.log_inputs(run_id, [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])])


def load_outputs(run_id: str) -> dict:
    """The ``outputs.json`` a stage run logged: its output folders and digests."""
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{OUTPUTS}")
    except Exception as exc:  # MlflowException, OSError: say which run and store
        raise ValueError(f"run {run_id} has no readable {OUTPUTS} in the tracking store {mlflow.get_tracking_uri()} "
                         f"({plain_reason(exc)}): pass the id of a finished hierloc stage run") from exc


def features_fast_decode(outputs: dict) -> bool:
    """Whether a features run decoded JPEGs at reduced scale (what the export records, so serving decodes
    alike): its outputs' ``fast_decode``; for outputs written before that field, the run's logged
    parameter (logged since reduced-scale decoding exists), else False (a run from before it: full decodes)."""
    if "fast_decode" in outputs:
        return bool(outputs["fast_decode"])
    run_id = outputs.get("run_id")
    if not run_id:
        return False
    try:
        logged = MlflowClient().get_run(run_id).data.params.get("fast_decode", "False")
    except Exception as exc:  # MlflowException, OSError: say which run and store
        raise ValueError(f"features run {run_id}: cannot read its parameters in {mlflow.get_tracking_uri()} "
                         f"({plain_reason(exc)}) to tell how its images were decoded") from exc
    if logged not in ("True", "False"):
        raise ValueError(f"features run {run_id}: parameter fast_decode is {logged!r}, expected True or False")
    return logged == "True"


def latest_stage_run(experiment: str, stage: str) -> str:
    """The newest FINISHED run of ``stage`` in ``experiment`` that logged its outputs."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        runs = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=20)
        for run in runs:
            if run.data.tags.get("outputs") == OUTPUTS:
                return run.info.run_id
    raise ValueError(f"no finished '{stage}' run in MLflow experiment {experiment!r} ({mlflow.get_tracking_uri()}): "
                     f"run that stage first, or pass its run id")


def tracking_problem(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the tracking server at ``uri`` cannot be used ('[Errno 111] Connection refused',
    'HTTP 503'), or None when it answers its health check or ``uri`` is a local store (sqlite,
    a folder), which needs no server. Asks once: MLflow's own client retries for minutes."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            return None if 200 <= r.status < 300 else f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return plain_reason(exc)


def check_tracking(timeout_s: float = 5.0) -> str:
    """Fail fast, before any work, when the tracking server is down (a sqlite/file store
    needs no server). Returns the tracking URI."""
    uri = mlflow.get_tracking_uri()
    problem = tracking_problem(uri, timeout_s)
    if problem is None:
        return uri
    raise TrackingUnavailable(
        f"the MLflow tracking server at {uri} does not answer ({problem}); nothing was run or registered. "
        "Start it with `make up` (or point MLFLOW_TRACKING_URI at a running server) and run again.")
