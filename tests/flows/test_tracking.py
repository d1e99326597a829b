"""Where MLflow puts a run's artifacts: beside the tracking store the settings name, never a fixed folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.settings import PROJECT_DIR, artifact_root


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield tmp_path / "store"
    mlflow.set_tracking_uri(old)


def test_artifacts_follow_the_tracking_store_not_the_project(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.tracking.runs import tracked_run

    before = _files(PROJECT_DIR / "mlartifacts")
    (tmp_path / "note.txt").write_text("hello")
    with tracked_run("artifacts-follow", "stage") as run:
        run.artifact(tmp_path / "note.txt")
        run.json({"a": 1}, "outputs.json")
    exp = MlflowClient().get_experiment_by_name("artifacts-follow")
    assert exp.artifact_location == (store / "mlartifacts").as_uri()
    written = _files(store / "mlartifacts")
    assert {p.name for p in written} == {"note.txt", "outputs.json"}
    assert _files(PROJECT_DIR / "mlartifacts") == before  # nothing written into the project folder


def test_artifact_root_rules(tmp_path):
    assert artifact_root(f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}") == (tmp_path / "x" / "mlartifacts").as_uri()
    assert artifact_root(f"sqlite:///{PROJECT_DIR / 'mlflow.db'}") == (PROJECT_DIR / "mlartifacts").as_uri()
    assert artifact_root("http://127.0.0.1:5000") is None and artifact_root("sqlite:///:memory:") is None
