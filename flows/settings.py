"""Where the project keeps its state, and the environment that keeps it offline."""

from __future__ import annotations

import os
from pathlib import Path

#: Project folder: HIERLOC_HOME, else the checkout this package lives in.
PROJECT_DIR = Path(os.environ.get("HIERLOC_HOME", Path(__file__).resolve().parents[1]))
DATA_DIR = PROJECT_DIR / "data"
DEMO_DATA_DIR = DATA_DIR / "demo"
WORK_DIR = DATA_DIR / "work"

OFFLINE_DEFAULTS = {
    "PREFECT_HOME": str(PROJECT_DIR / ".prefect"),
    "DO_NOT_TRACK": "true",  # must be the word "true" for MLflow
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_TRACKING_URI": f"sqlite:///{PROJECT_DIR / 'mlflow.db'}",
    "HF_HUB_OFFLINE": "1",
}

#: What keeps a terminal to the pipeline's own lines: MLflow's INFO logs ("Creating initial
#: MLflow database tables...") and its "Downloading artifacts" tqdm bars (a model saved from
#: local files is "downloaded" too) off at their source, as `mlflow demo` does; its warnings stay.
QUIET_DEFAULTS = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # read when mlflow is imported
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # "View run ... at: http://..." per finished run
}


def apply_offline_defaults() -> None:
    """OFFLINE_DEFAULTS and QUIET_DEFAULTS into the environment, where not already set."""
    for key, value in {**OFFLINE_DEFAULTS, **QUIET_DEFAULTS}.items():
        os.environ.setdefault(key, value)


def artifact_root(tracking_uri: str) -> str | None:
    """Artifact folder for new MLflow experiments: for a local sqlite store, ``mlartifacts/``
    beside the database file (the project's default store: the project's ``mlartifacts/``);
    None for any other store (a server or a file store: its own default)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    db = make_url(tracking_uri).database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return (Path(db).expanduser().resolve().parent / "mlartifacts").as_uri()
