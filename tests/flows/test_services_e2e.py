"""The user's path, for real: `make up`'s servers and worker, `prefect deployment run`, the MLflow UI's data.

One module, one set of processes (a Prefect server, an MLflow server, a process worker,
all on 127.0.0.1, state in a temp folder), and the tests in order:

0. `make status` finds the servers on the (free, non-default) ports they were started on,
   and the worker by its heartbeat;
1. `prefect deployment run hierloc-pipeline/demo` completes; MLflow holds the parent run,
   one nested run per stage with its dataset inputs and outputs.json, and the registered
   model with the 'champion' alias;
2. rows and a photo shard are added; `hierloc-retrain/retrain-weekly` ingests only them,
   appends new entities with stable ids, fine-tunes from the champion, and the gate
   promotes (a permissive rule) ...
3. ... or rejects (a strict rule), tagging both versions with the decision and numbers;
4. the worker is killed mid-run; a new worker re-runs the flow, which completes from the
   cached stages;
5. with the MLflow server down the flow fails with a clear error and registers nothing.
Every process started here is stopped at the end.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.flows.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "hierloc-e2e"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    from flows.services.manager import Services

    root = tmp_path_factory.mktemp("services")
    # HIERLOC_PROGRESS_EVERY_S=0: a progress line per step (not per ~10 s), so these short runs log some
    s = Services(project_dir=ROOT, state_dir=root / "run", prefect_home=root / "prefect", mlflow_db=root / "mlflow.db",
                 artifacts_dir=root / "artifacts", prefect_port=free_port(), mlflow_port=free_port(),
                 extra_env={"PREFECT_WORKER_QUERY_SECONDS": "1", "HIERLOC_DASK_SCHEDULER": "sync",
                            "HIERLOC_PROGRESS_EVERY_S": "0"})
    said = io.StringIO()
    try:
        s.up(out=said)
        s.up_said = said.getvalue()  # what `make up` printed, for test_make_up_says_each_step_and_its_seconds
        yield s
    finally:
        s.down()
        assert all(v["pid"] is None for v in s.status().values())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from geodata.demo.build import build_demo_dataset

    data = tmp_path_factory.mktemp("e2e_data") / "data"
    build_demo_dataset(data, n_train=1200, n_test=150, seed=11)
    return data


def _cfg(data: Path, work: Path, experiment: str = "e2e", **over) -> dict:
    cfg = {"data_dir": str(data), "work_dir": str(work), "experiment": experiment,
           "demo_data": {"build_if_missing": False}, "features": {"num_workers": 0},
           "model": {"dim": 16, "hidden": 64}, "train": {"epochs": 2, "batch_size": 128, "warmup_steps": 5},
           "registry": {"name": MODEL}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def _deployment_run(s, name: str, params: dict, timeout_s: int = 420) -> dict:
    """`prefect deployment run NAME --params ... --watch`; returns the flow run (REST JSON)."""
    res = subprocess.run([str(Path(os.sys.executable).parent / "prefect"), "--no-prompt", "deployment", "run", name,
                          "--params", json.dumps(params), "--watch", "--watch-timeout", str(timeout_s),
                          "--watch-interval", "2"], cwd=ROOT, env=s.env(), capture_output=True, text=True,
                         timeout=timeout_s + 60)
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", res.stdout)
    assert m, f"no flow run id in the CLI output:\n{res.stdout}\n{res.stderr}"
    return _flow_run(s, m.group(1))


def _flow_run(s, run_id: str) -> dict:
    with urllib.request.urlopen(f"{s.prefect_api}/flow_runs/{run_id}", timeout=10) as r:
        return json.loads(r.read())


def _logs(s, flow_run_id: str) -> str:
    messages: list[str] = []
    while True:  # pages of 200 (the server's limit), oldest first
        body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "offset": len(messages),
                "sort": "TIMESTAMP_ASC"}
        req = urllib.request.Request(f"{s.prefect_api}/logs/filter", method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            page = [x["message"] for x in json.loads(r.read())]
        messages += page
        if len(page) < 200:
            return "\n".join(messages)


def _client(s):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=s.mlflow_uri, registry_uri=s.mlflow_uri)


def _parent(client, experiment: str, flow: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.flow = '{flow}'", order_by=["attributes.start_time DESC"])
    return runs[0]


def _children(client, parent):
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["stage"]: r for r in runs}


def _completed(fr: dict, s) -> None:
    assert fr["state_type"] == "COMPLETED", f"{fr['state_type']}: {fr['state'].get('message')}\n{_logs(s, fr['id'])[-4000:]}"


def test_make_up_says_each_step_and_its_seconds(services):
    lines = services.up_said.splitlines()
    expected = [rf"starting the Prefect server on 127\.0\.0\.1:{services.prefect_port} \.\.\. ready in \d+ s",
                rf"starting the MLflow server on 127\.0\.0\.1:{services.mlflow_port} \.\.\. ready in \d+ s",
                r"creating the work pool hierloc-process \.\.\. done in \d+ s",
                r"registering the deployments of prefect\.yaml \.\.\. done in \d+ s",
                r"starting a worker for pool hierloc-process \.\.\. started in \d+ s",
                r"up in \d+ s"]
    assert len(lines) == len(expected) and all(re.fullmatch(e, x) for e, x in zip(expected, lines)), lines


def test_deployments_are_registered_with_forms_and_schedule(services):
    deps = {}
    for name in ("hierloc-pipeline/demo", "hierloc-ingest/ingest", "hierloc-hierarchy/hierarchy",
                 "hierloc-features/features", "hierloc-train/train", "hierloc-evaluate/evaluate",
                 "hierloc-retrain/retrain-weekly"):
        with urllib.request.urlopen(f"{services.prefect_api}/deployments/name/{name}", timeout=10) as r:
            deps[name] = json.loads(r.read())
        assert deps[name]["work_pool_name"] == "hierloc-process", name
    crons = [s["schedule"].get("cron") for s in deps["hierloc-retrain/retrain-weekly"]["schedules"]]
    assert crons == ["0 3 * * 1"]
    # the parameter form: pydantic bounds reach the server's schema, so bad values are refused
    schema = deps["hierloc-pipeline/demo"]["parameter_openapi_schema"]
    train = schema["definitions"]["TrainConfig"]["properties"]
    assert train["epochs"]["minimum"] == 1 and "description" in train["lr"]
    bad = subprocess.run([str(Path(os.sys.executable).parent / "prefect"), "--no-prompt", "deployment", "run",
                          "hierloc-pipeline/demo", "--params", json.dumps({"cfg": {"train": {"epochs": 0}}})],
                         cwd=ROOT, env=services.env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "epochs" in bad.stdout + bad.stderr  # refused before any run exists


def _make_status(s, tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m flows.services ARGS` as `make status` runs it from a fresh shell: no PREFECT_PORT /
    MLFLOW_PORT / API addresses in the environment; the project's `.run/` is this module's state folder."""
    home = tmp_path / "project"
    home.mkdir(exist_ok=True)
    if not (home / ".run").exists():
        (home / ".run").symlink_to(s.state_dir, target_is_directory=True)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PREFECT_PORT", "MLFLOW_PORT", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME")}
    return subprocess.run([os.sys.executable, "-m", "flows.services", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "HIERLOC_HOME": str(home), "PYTHONPATH": str(ROOT), **(env or {})}, timeout=120)


def test_status_is_right_on_the_ports_the_servers_were_started_on(services, tmp_path):
    """The servers listen on free ports, not 4200 / 5000: `make status` reads them from `.run/`
    and reports both healthy; the worker is healthy while its process runs and the Prefect
    server has its heartbeat, and not once its process is gone."""
    assert 4200 != services.prefect_port and 5000 != services.mlflow_port
    res = _make_status(services, tmp_path, "status")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    for name, port in (("prefect-server", services.prefect_port), ("mlflow-server", services.mlflow_port)):
        assert st[name] == {"pid": services.running(name), "port": port, "healthy": True}, st
    worker = st["worker"]
    assert worker["healthy"] is True and worker["status"] == "ONLINE" and worker["last_heartbeat"], worker
    assert worker["pid"] == services.running("worker") is not None
    # asking `up` for other ports while these servers run is refused, naming the ports they use
    moved = _make_status(services, tmp_path, "up", env={"PREFECT_PORT": str(free_port())})
    assert moved.returncode == 1 and f"prefect-server already runs on port {services.prefect_port}" in moved.stderr
    services.stop("worker")
    gone = json.loads(_make_status(services, tmp_path, "status").stdout)["worker"]
    assert gone["healthy"] is False and gone["pid"] is None and "not running" in gone["detail"], gone
    services.start_worker()  # waits for its first heartbeat
    assert services.status()["worker"]["healthy"] is True


def test_pipeline_deployment_tracks_lineage_and_registers_champion(services, dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e_work")
    fr = _deployment_run(services, "hierloc-pipeline/demo", {"cfg": _cfg(dataset, work)})
    _completed(fr, services)
    client = _client(services)
    parent = _parent(client, "e2e", "pipeline")
    kids = _children(client, parent)
    assert set(kids) == {"ingest", "hierarchy", "features", "train", "evaluate"}
    assert "geoscore" in parent.data.metrics and parent.data.tags["cached_stages"] == "none"
    # lineage: inputs with digests; later stages name the runs they read from
    ingest_ds = {d.dataset.name: d.dataset.digest for d in kids["ingest"].inputs.dataset_inputs}
    train_ds = {d.dataset.name: d.dataset.digest for d in kids["train"].inputs.dataset_inputs}
    assert set(train_ds) == {"manifest", "entities", "features"} and "osv5m-source" in ingest_ds
    assert kids["train"].data.tags["upstream.hierarchy_run_id"] == kids["hierarchy"].info.run_id
    outputs = json.loads(Path(client.download_artifacts(kids["hierarchy"].info.run_id, "outputs.json",
                                                        str(work))).read_text())
    assert outputs["digest"] == train_ds["entities"]
    # consistent names across runs (the compare view lines them up)
    assert {"train.lr", "model.dim"} <= set(kids["train"].data.params)
    champ = client.get_model_version_by_alias(MODEL, "champion")
    assert champ.run_id == kids["train"].info.run_id and champ.tags["gate.decision"] == "promoted"
    assert champ.tags["manifest_digest"] == train_ds["manifest"]
    # the libraries' lines reach the run's logs: progress within each epoch and of the feature extraction
    logs = _logs(services, fr["id"])
    assert re.search(r"^epoch 1/2: 3/\d+ steps \(\d+%\), [\d.,]+ steps/s, [\d.,]+ samples/s, ETA ", logs, re.M), logs[-4000:]
    assert re.search(r"^epoch 2/2: loss [\d.]+$", logs, re.M) and re.search(r"^features: [\d,]+/[\d,]+ img", logs, re.M)


def _add_rows(data: Path, tmp: Path) -> int:
    """New training rows and their photos in a new shard (another seed of the demo generator)."""
    from geodata.demo.build import build_demo_dataset

    extra = tmp / "extra"
    build_demo_dataset(extra, n_train=400, n_test=20, seed=12)
    new = pd.read_csv(extra / "train.csv", dtype=str, keep_default_na=False)
    with open(data / "train.csv", "a") as fh:
        new.to_csv(fh, header=False, index=False)
    for i, z in enumerate(sorted((extra / "images" / "train").glob("*.zip"))):
        shutil.copy(z, data / "images" / "train" / f"new-{i:02d}.zip")
    return len(new)


def test_retrain_promotes_or_rejects_by_rule(services, dataset, tmp_path_factory):
    client = _client(services)
    work = Path(_parent(client, "e2e", "pipeline").data.params["work_dir"])  # the first run's: incremental from there
    n_new = _add_rows(dataset, tmp_path_factory.mktemp("extra"))
    v_before = client.get_model_version_by_alias(MODEL, "champion").version

    # permissive rule: promoted
    cfg = _cfg(dataset, work, registry={"name": MODEL, "rule": {"min_improvement": -1e9}})
    _completed(_deployment_run(services, "hierloc-retrain/retrain-weekly", {"cfg": cfg, "retrain": {"epochs": 1}}), services)
    parent = _parent(client, "e2e", "retrain")
    kids = _children(client, parent)
    assert parent.data.tags["init_from"] == f"models:/{MODEL}/{v_before}"
    assert kids["ingest"].data.metrics["train_n_in"] == n_new  # only the new rows were parsed
    assert kids["ingest"].data.metrics["test_n_in"] == 0
    assert kids["hierarchy"].data.metrics["n_new_entities"] > 0
    assert kids["train"].data.metrics["n_warm_started_entities"] > 0
    champ = client.get_model_version_by_alias(MODEL, "champion")
    assert champ.version != v_before and champ.tags["gate.decision"] == "promoted"
    old = client.get_model_version(MODEL, v_before)
    assert old.tags[f"gate.vs_v{champ.version}.outcome"].startswith("replaced")

    # strict rule: rejected, alias stays. Nothing new to ingest: ingest and features come from the
    # cache; the hierarchy runs again, as it must: its input 'previous entities' is now v2's table.
    cfg = _cfg(dataset, work, registry={"name": MODEL, "rule": {"min_improvement": 1e9}})
    _completed(_deployment_run(services, "hierloc-retrain/retrain-weekly", {"cfg": cfg, "retrain": {"epochs": 1}}), services)
    parent = _parent(client, "e2e", "retrain")
    assert parent.data.tags["gate"] == "rejected"
    assert parent.data.tags["cached_stages"] == "ingest,features"
    assert client.get_model_version_by_alias(MODEL, "champion").version == champ.version
    rejected = client.get_model_version(MODEL, parent.data.tags["registered_version"])
    assert rejected.tags["gate.decision"] == "rejected" and "min_improvement" in rejected.tags["gate.reason"]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def test_worker_killed_mid_run_then_rerun_completes_from_cache(services, dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e_crash")
    cfg = _cfg(dataset, work, experiment="e2e-crash", train={"epochs": 60})
    client = _client(services)
    proc = subprocess.Popen([str(Path(os.sys.executable).parent / "prefect"), "--no-prompt", "deployment", "run",
                             "hierloc-pipeline/demo", "--params", json.dumps({"cfg": cfg})], cwd=ROOT, env=services.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until training has started (the data stages are done)
        exp = client.get_experiment_by_name("e2e-crash")
        if exp and client.search_runs([exp.experiment_id], "tags.stage = 'train'"):
            break
        time.sleep(1)
    else:
        pytest.fail("training never started")
    worker = services.running("worker")
    for pid in reversed(_descendants(worker)):  # the worker and its flow run: a machine that died
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    services.stop("worker")
    services.start_worker()
    cfg["train"]["epochs"] = 2  # the re-run: same data stages (cached), a short training
    _completed(_deployment_run(services, "hierloc-pipeline/demo", {"cfg": cfg}), services)
    parent = _parent(client, "e2e-crash", "pipeline")
    assert parent.data.tags["cached_stages"] == "ingest,hierarchy,features"
    assert parent.info.status == "FINISHED"


def test_mlflow_down_fails_clearly_and_registers_nothing(services, dataset, tmp_path_factory):
    client = _client(services)
    n_versions = len(client.search_model_versions(f"name = '{MODEL}'"))
    services.stop("mlflow-server")
    try:
        fr = _deployment_run(services, "hierloc-pipeline/demo",
                             {"cfg": _cfg(dataset, tmp_path_factory.mktemp("e2e_down"), experiment="e2e-down")},
                             timeout_s=240)
        assert fr["state_type"] in ("FAILED", "CRASHED")
        assert "does not answer" in _logs(services, fr["id"])
    finally:
        services.start_mlflow()
    assert len(_client(services).search_model_versions(f"name = '{MODEL}'")) == n_versions


def test_hierarchy_deployment_labels_partitions_on_the_dask_task_runner(services, tmp_path_factory):
    """The hierarchy stage alone, from the first pipeline's ingest run, with the GeoNames labeler on a
    LocalCluster: each Parquet partition is a Prefect task run on the flow's DaskTaskRunner."""
    client = _client(services)
    ingest_run = _children(client, _parent(client, "e2e", "pipeline"))["ingest"].info.run_id
    cfg = _cfg(Path("/nonexistent"), tmp_path_factory.mktemp("e2e_dask"),
               hierarchy={"labeler": "geonames", "dask_scheduler": "local"})
    fr = _deployment_run(services, "hierloc-hierarchy/hierarchy", {"cfg": cfg, "upstream": {"ingest": ingest_run}})
    _completed(fr, services)
    req = urllib.request.Request(f"{services.prefect_api}/task_runs/filter", method="POST",
                                 data=json.dumps({"task_runs": {"name": {"like_": "label-partition"}}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        parts = [t for t in json.loads(r.read()) if t["state_type"] == "COMPLETED"]
    assert len(parts) >= 2
    run = client.search_runs([client.get_experiment_by_name("e2e").experiment_id],
                             f"tags.stage = 'hierarchy' and params.labeler = 'geonames'")[0]
    assert run.data.params["dask_task_runner"] == "True" and run.data.tags["upstream.ingest_run_id"] == ingest_run
