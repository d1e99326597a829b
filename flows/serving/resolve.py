"""Which bundle a command means: a folder, a saved MLflow model, an MLflow model URI, or the
last export (``hierloc predict`` / ``hierloc evaluate``, and the retrain flow's champion)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from flows.errors import plain_reason
from flows.stages.export import latest_bundle
from flows.tracking.lineage import tracking_problem


def _is_mlflow_uri(model: str) -> bool:
    return model.startswith(("runs:/", "models:/")) or "://" in model


def resolve_bundle(model: str | None, work_dir: Path) -> Path:
    """The bundle folder that ``model`` names, for ``hierloc predict`` / ``evaluate``.

    ``model`` is one of: a bundle folder (holds bundle.json); a saved MLflow model folder
    (MLmodel + artifacts/bundle, what save_pyfunc writes); an MLflow model URI
    (``runs:/<run_id>/model``, ``models:/<name>/<version>``, or any artifact URI),
    downloaded from the current tracking store into a temporary folder removed at exit;
    or None: the bundle the last pipeline run exported under ``work_dir``
    (flows.stages.export.latest_bundle). Raises FileNotFoundError / ValueError saying what to do.
    """
    import atexit
    import shutil

    if model is None:
        found = latest_bundle(Path(work_dir))
        if found is None:
            raise FileNotFoundError(
                f"no trained model found ({Path(work_dir) / 'export' / 'latest.json'} is missing or points at no "
                "bundle): run `make demo` (or `hierloc demo`) to train one, or pass --model with a bundle folder "
                "or an MLflow model URI such as runs:/<run_id>/model")
        return found
    path = Path(model).expanduser()
    if not path.exists() and _is_mlflow_uri(model):
        store = mlflow.get_tracking_uri()
        problem = tracking_problem(store) if model.startswith(("runs:/", "models:/")) else None
        if problem is not None:  # asked once, not retried for minutes by MLflow's client
            raise ValueError(f"cannot download the MLflow model {model}: the tracking server at {store} does not "
                             f"answer ({problem}); start it (`make up`) or set MLFLOW_TRACKING_URI")
        tmp = Path(tempfile.mkdtemp(prefix="hierloc-model-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(tmp)))
        except Exception as exc:  # MlflowException, OSError, ...: say which store was asked
            raise ValueError(
                f"cannot download the MLflow model {model} from the tracking store {store} "
                f"({plain_reason(exc)}); check the run id / model name, or set MLFLOW_TRACKING_URI") from exc
        path = local
    if (path / "bundle.json").is_file():
        return path
    if (path / "MLmodel").is_file():
        # save_model copies the bundle to artifacts/<its folder name> and records that path in MLmodel
        from mlflow.models import Model

        flavor = Model.load(str(path / "MLmodel")).flavors.get("python_function", {})
        rel = (flavor.get("artifacts") or {}).get("bundle", {}).get("path")
        inner = (path / rel).resolve() if rel else None
        if inner is not None and inner.is_relative_to(path.resolve()) and (inner / "bundle.json").is_file():
            return inner
        raise ValueError(f"{model}: an MLflow model, but not a hierloc one (its MLmodel names no 'bundle' artifact "
                         "holding bundle.json); pass a model logged by the hierloc pipeline")
    if not path.exists():
        raise FileNotFoundError(f"{model}: no such folder; pass a bundle folder (work/export/<digest>), "
                                "a saved MLflow model folder, or an MLflow model URI such as runs:/<run_id>/model")
    raise ValueError(f"{model}: neither a hierloc bundle (no bundle.json) nor an MLflow model folder (no MLmodel); "
                     "pass work/export/<digest> or runs:/<run_id>/model")

