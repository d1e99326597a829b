"""Where the real OSV-5M sample lies: $HIERLOC_OSV5M_SAMPLE, else ../shared/osv5m-sample
beside the checkout (as on developers' machines and in CI). Tests read the env var.

Also the two harnesses of the flow tests: a temp MLflow store and a temp Prefect server whose
result records stay in a temp folder (nothing is written into the project folder)."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Prefect's home (its memo file, result records, a temp server's database) and the default MLflow
    # store are a session temp folder, never the project's .prefect/ or mlflow.db, nor a server a
    # developer's shell points at (PREFECT_API_URL, MLFLOW_TRACKING_URI are overridden, not filled
    # in); tests that need their own set them.
    state = Path(tempfile.mkdtemp(prefix="hierloc-tests-"))
    config._hierloc_state = state
    os.environ["PREFECT_HOME"] = str(state / "prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{state / 'mlflow.db'}"
    os.environ.pop("PREFECT_API_URL", None)
    if "HIERLOC_OSV5M_SAMPLE" not in os.environ:
        candidates = [ROOT.parent / "shared" / "osv5m-sample", ROOT / "shared" / "osv5m-sample"]
        found = next((c for c in candidates if (c / "select.csv").exists()), candidates[0])
        os.environ["HIERLOC_OSV5M_SAMPLE"] = str(found)


def pytest_unconfigure(config):
    state = getattr(config, "_hierloc_state", None)
    if state is not None:
        shutil.rmtree(state, ignore_errors=True)


@contextmanager
def _tracking_store(uri: str) -> Iterator[None]:
    """MLFLOW_TRACKING_URI (and mlflow's own setting) pointed at ``uri`` for the block, then restored."""
    import mlflow

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        mlflow.set_tracking_uri(old)


@contextmanager
def _prefect_harness(results_dir: Path) -> Iterator[None]:
    """A temporary Prefect server for the block, with the cached stages' result records written
    under ``results_dir`` (not the project's .prefect/storage)."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(results_dir)}), \
            prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tracking_store():
    """``with tracking_store(uri):`` a temp MLflow store for the block."""
    return _tracking_store


@pytest.fixture(scope="session")
def prefect_harness():
    """``with prefect_harness(results_dir):`` a temp Prefect server whose results stay in ``results_dir``."""
    return _prefect_harness
