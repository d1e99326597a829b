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


def apply_offline_defaults() -> None:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def artifact_root() -> str:
    """Artifact folder for new MLflow experiments when the store is a local sqlite file."""
    return (PROJECT_DIR / "mlartifacts").as_uri()
