"""Faulty and hostile inputs through the real flows (Prefect server in a temp database, results
in a temp folder, a temp sqlite MLflow store): a user's data folder is never written to, a
WebDataset folder stays one, cached results are JSON and a planted pickle record is never
read, an empty split fails at once with its name, deterministic failures are not retried."""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

SMALL = {"n_train": 30, "n_test": 10, "seed": 1}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tracking_store, prefect_harness):
    """A temp MLflow store and Prefect server; Prefect's result files under a temp folder."""
    root = tmp_path_factory.mktemp("hostile")
    with tracking_store(f"sqlite:///{root / 'mlflow.db'}"), prefect_harness(root / "results"):
        yield root


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A tiny demo release, copied by the tests that need one."""
    from geodata.demo.build import build_demo_dataset

    out = tmp_path_factory.mktemp("demo_src") / "data"
    build_demo_dataset(out, **SMALL)
    return out


def _cfg(data: Path, work: Path, experiment: str, **over):
    from flows.params import PipelineConfig

    cfg = {"data_dir": str(data), "work_dir": str(work), "experiment": experiment,
           "demo_data": {"n_train": 10, "n_test": 10, "seed": 2}, "ingest": {"verify_images": "exists"}}
    cfg.update(over)
    return PipelineConfig.model_validate(cfg)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (hidden ones included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_folder(demo: Path, dest: Path) -> Path:
    """A user's release folder without train.csv: test.csv, their own shards and a note."""
    (dest / "images" / "train").mkdir(parents=True)
    (dest / "images" / "test").mkdir(parents=True)
    shutil.copy(demo / "test.csv", dest / "test.csv")
    for split in ("train", "test"):
        shutil.copy(demo / "images" / split / "00.zip", dest / "images" / split / "00.zip")
    shutil.copy(demo / "images" / "train" / "00.zip", dest / "images" / "train" / "07.zip")  # another shard
    (dest / "notes.txt").write_text("my data; do not touch")
    return dest


def _ingest_runs(experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.stage = 'ingest'")


# --- 1. the data folder ---------------------------------------------------------------
def test_a_user_folder_without_train_csv_is_untouched_and_named_in_the_error(env, demo, tmp_path):
    from flows.pipeline import ingest_flow

    user = _user_folder(demo, tmp_path / "release")
    before = _tree(user)
    with pytest.raises(ValueError) as err:  # flows.stages.data_dir.DataDirError
        ingest_flow(_cfg(user, tmp_path / "work", "user-folder"))
    msg = str(err.value)
    assert str(user) in msg and "train.csv and test.csv" in msg and "train/*.tar" in msg
    assert type(err.value).__name__ == "DataDirError" and "images/" in msg and "nothing was written here" in msg
    assert _tree(user) == before  # byte for byte, the extra shard included
    assert _ingest_runs("user-folder") == []  # nothing was ingested


def test_demo_data_cli_refuses_a_folder_it_did_not_write(demo, tmp_path):
    from flows.cli.main import app

    user = _user_folder(demo, tmp_path / "release")
    before = _tree(user)
    res = CliRunner().invoke(app, ["demo-data", "--out", str(user), "--n-train", "10", "--n-test", "10"],
                             catch_exceptions=False)
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {user} is not empty") and ".hierloc-demo" in res.stderr
    assert _tree(user) == before


def _wds_folder(demo: Path, dest: Path) -> int:
    """The demo release as a WebDataset copy: {split}/00000.tar of <id>.jpg + <id>.json + <id>.street_clip.npy."""
    from geodata.ingest.webdataset import write_shard

    for split in ("train", "test"):
        rows = pd.read_csv(demo / f"{split}.csv", dtype=str, keep_default_na=False)
        with zipfile.ZipFile(demo / "images" / split / "00.zip") as zf:
            samples = []
            for r in rows.to_dict("records"):
                meta = {**r, "id": int(r["id"]), "latitude": float(r["latitude"]), "longitude": float(r["longitude"])}
                samples.append({"key": r["id"], "json": meta, "jpg": zf.read(f"{r['id']}.jpg"),
                                "npy": {"street_clip": np.full(4, float(len(samples)), np.float32)}})
        write_shard(dest / split / "00000.tar", samples)
    return len(pd.read_csv(demo / "train.csv", usecols=["id"]))


def test_a_webdataset_folder_runs_as_a_webdataset(env, demo, tmp_path):
    from flows.pipeline import ingest_flow

    wds = tmp_path / "wds"
    n_train = _wds_folder(demo, wds)
    before = _tree(wds)
    out = ingest_flow(_cfg(wds, tmp_path / "work", "wds-folder"))
    report = json.loads((Path(out["dir"]) / "ingest_report.json").read_text())
    assert report["layout"] == "webdataset" and report["splits"]["train"]["kept_total"] == n_train
    assert _tree(wds) == before and not (wds / "train.csv").exists()


def test_an_absent_folder_gets_the_demo_and_the_project_demo_folder_is_rebuilt(env, tmp_path, monkeypatch):
    from flows.pipeline import ingest_flow
    from geodata.demo.folder import DEMO_MARKER

    absent = tmp_path / "new"
    out = ingest_flow(_cfg(absent, tmp_path / "work-new", "absent-folder"))
    assert (absent / "train.csv").is_file() and (absent / DEMO_MARKER).is_file()
    assert json.loads((Path(out["dir"]) / "ingest_report.json").read_text())["splits"]["train"]["kept_total"] == 10

    # The project's own demo folder, as an older build left it (no marker, no train.csv, a stale shard): rebuilt.
    own = tmp_path / "project" / "data" / "demo"
    (own / "images" / "train").mkdir(parents=True)
    (own / "test.csv").write_text("id\n1\n")
    (own / "images" / "train" / "03.zip").write_bytes(b"stale")
    monkeypatch.setattr("flows.settings.DEMO_DATA_DIR", own)
    out = ingest_flow(_cfg(own, tmp_path / "work-own", "own-folder"))
    assert (own / "train.csv").is_file() and (own / DEMO_MARKER).is_file()
    assert sorted(p.name for p in (own / "images" / "train").iterdir()) == ["00.zip"]  # the stale shard is gone


def test_folders_the_demo_may_and_may_not_be_built_in(tmp_path):
    from flows.stages.data_dir import DataDirError, demo_target

    (tmp_path / "empty").mkdir()
    assert demo_target(tmp_path / "empty") is False and demo_target(tmp_path / "absent") is False
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "train.csv").write_text("id\n")
    assert demo_target(tmp_path / "csv") is None
    with pytest.raises(DataDirError, match="looked for train/\\*.tar and test/\\*.tar .*it holds train.csv"):
        demo_target(tmp_path / "csv", layout="webdataset")  # an explicit layout is checked alone, never built
    with pytest.raises(DataDirError, match="it does not exist"):
        demo_target(tmp_path / "absent", build_if_missing=False)


# --- 2. JSON results ----------------------------------------------------------------------
class _Payload:
    """What a planted pickle record would run on load: here, create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def record_serializer(path: Path) -> str | None:
    """The serializer type a Prefect result record file names, read as plain JSON."""
    try:
        return json.loads(path.read_bytes())["metadata"]["serializer"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


def test_cached_results_are_json_and_a_planted_pickle_record_is_never_read(env, demo, tmp_path):
    from flows.pipeline import ingest_flow

    data = tmp_path / "data"
    shutil.copytree(demo, data)
    cfg = _cfg(data, tmp_path / "work", "json-results")
    first = ingest_flow(cfg)
    second = ingest_flow(cfg)
    assert second["run_id"] == first["run_id"]  # a cache hit: no new ingest run
    records = [p for p in (env / "results").iterdir() if p.is_file() and record_serializer(p) is not None]
    mine = [p for p in records if first["run_id"] in p.read_text()]
    assert len(mine) == 1 and record_serializer(mine[0]) == "json"
    doc = json.loads(mine[0].read_text())
    assert json.loads(doc["result"])["run_id"] == first["run_id"]  # the result itself is plain JSON

    marker = tmp_path / "payload-ran"
    doc["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle", "picklelib_version": None}
    doc["result"] = base64.encodebytes(pickle.dumps(_Payload(marker))).decode()
    mine[0].write_text(json.dumps(doc))
    third = ingest_flow(cfg)
    assert not marker.exists()  # the pickle never ran
    assert third["run_id"] != first["run_id"]  # not taken from the planted record: the stage ran again
    assert record_serializer(mine[0]) == "json" and record_serializer(mine[0].with_name(mine[0].name + ".refused")) == "pickle"

    # A record that names the JSON serializer but a decoder of its own: Prefect would import and call
    # it on every object of the result (here subprocess.run(["touch", marker])). Set aside, never read.
    marker = tmp_path / "decoder-ran"
    doc = json.loads(mine[0].read_text())
    doc["metadata"]["serializer"]["object_decoder"] = "subprocess.run"
    doc["result"] = json.dumps({"touch": 0, str(marker): 0})
    mine[0].write_text(json.dumps(doc))
    fourth = ingest_flow(cfg)
    assert not marker.exists()  # the decoder never ran
    assert fourth["run_id"] not in (first["run_id"], third["run_id"])  # the stage ran again
    refused = json.loads(mine[0].with_name(mine[0].name + ".refused").read_text())
    assert refused["metadata"]["serializer"]["object_decoder"] == "subprocess.run"


# --- 3. empty splits and retries -----------------------------------------------------------
def test_a_header_only_csv_fails_at_ingest_naming_the_split_without_retries(env, demo, tmp_path):
    from flows.pipeline import ingest_flow

    data = tmp_path / "data"
    shutil.copytree(demo, data)
    header = (data / "train.csv").read_text().splitlines()[0]
    (data / "train.csv").write_text(header + "\n")
    with pytest.raises(ValueError, match=rf"split 'train' has no rows to work on: {data / 'train.csv'} holds no data rows"):
        ingest_flow(_cfg(data, tmp_path / "work", "header-only"))
    assert [r.info.status for r in _ingest_runs("header-only")] == ["FAILED"]  # one try: a retry cannot fix it


def test_a_missing_file_is_not_retried(env, demo, tmp_path):
    from flows.pipeline import ingest_flow

    data = tmp_path / "data"
    shutil.copytree(demo, data)
    (data / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="test.csv"):
        ingest_flow(_cfg(data, tmp_path / "work", "missing-test"))
    assert len(_ingest_runs("missing-test")) == 1  # was 3: two retries of the same FileNotFoundError


def test_the_hierarchy_stage_names_an_empty_split(demo, tmp_path):
    """A hierarchy run alone, on an ingest whose train split is empty: the split, not KeyError 'latitude'."""
    from flows.stages.hierarchy import run_hierarchy
    from geodata.ingest.run import ingest_osv5m

    data = tmp_path / "data"
    shutil.copytree(demo, data)
    (data / "train.csv").write_text((data / "train.csv").read_text().splitlines()[0] + "\n")
    ingest_osv5m(data, tmp_path / "ingest", verify_images="none")
    with pytest.raises(ValueError, match=r"split 'train' has no rows to work on: .*manifest/train.parquet is empty"):
        run_hierarchy(tmp_path / "ingest", tmp_path / "hierarchy")


def test_only_transient_failures_are_retried(env):
    from prefect import flow, task

    from flows.stages.faults import is_transient, retry_transient

    tries: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky(kind: str) -> str:
        tries.append(kind)
        if kind == "network" and tries.count(kind) == 1:
            raise ConnectionResetError("connection reset by peer")
        if kind == "bad value":
            raise ValueError("latitude out of range")
        return "ok"

    @flow
    def run(kind: str) -> str:
        return flaky(kind)

    assert run("network") == "ok" and tries.count("network") == 2
    with pytest.raises(ValueError):
        run("bad value")
    assert tries.count("bad value") == 1

    import sqlite3

    from mlflow.exceptions import MlflowException

    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as exc:
            raise MlflowException("store error") from exc
    except MlflowException as wrapped:
        assert is_transient(wrapped)
    assert is_transient(TimeoutError()) and is_transient(OSError(5, "Input/output error"))
    assert not any(is_transient(e) for e in (FileNotFoundError("x"), PermissionError("x"), KeyError("latitude")))
