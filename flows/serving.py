"""The trained model as an MLflow pyfunc: backbone + head + entity table, served by `mlflow models serve`.

Input: a DataFrame with one of the columns
- ``path``: a photo file path readable by the server,
- ``image``: the photo's bytes, or the bytes base64-encoded (what a JSON request carries),
- ``features``: precomputed backbone features (a list of floats per row).
Output: one row per input row (hierloc.predictor.predictions_frame): latitude,
longitude, path, <level>_key / _name / _prob, candidates (JSON), and ``error``
(empty when the row was answered; a bad row does not fail the batch).

The model's artifacts are the bundle folder (hierloc/predictor.py), so a logged
model is self-contained: ``mlflow.pyfunc.load_model("runs:/<id>/model")`` needs
nothing else from the run.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ParamSchema, ParamSpec

from geodata.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image, open_photo
from hierloc.predictor import Predictor, predictions_frame

INPUT_COLUMNS = ("path", "image", "features")
OUTPUT_COLUMNS = ("latitude", "longitude", "path", *(f"{lvl}_{f}" for lvl in ("country", "region", "subregion", "city")
                                                      for f in ("key", "name", "prob")), "candidates")
_REQUIREMENTS = ("torch", "torchvision", "open_clip_torch", "geoopt", "faiss-cpu", "pandas", "pyarrow", "pillow", "mlflow")


def _as_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the image column holds a string that is not base64") from None
    raise ValueError(f"the image column holds {type(value).__name__}, expected bytes or base64 text")


class HierLocPyfunc(PythonModel):
    """pyfunc wrapper around hierloc.predictor.Predictor."""

    def __init__(self, top_k: int = 5, beam_k: int = 10, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.top_k, self.beam_k, self.max_image_pixels = top_k, beam_k, max_image_pixels
        self.predictor: Predictor | None = None

    def load_context(self, context) -> None:
        self.predictor = Predictor.load(Path(context.artifacts["bundle"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if self.predictor is None:  # called without load_context (e.g. the object itself)
            self.load_context(context)
        df = pd.DataFrame(model_input)
        cols = [c for c in INPUT_COLUMNS if c in df.columns]
        if not cols:
            raise ValueError(f"input needs one of the columns {list(INPUT_COLUMNS)}, got {list(df.columns)}")
        col = cols[0]
        top_k = int((params or {}).get("top_k", self.top_k))
        errors = [""] * len(df)
        feats: list[np.ndarray | None] = [None] * len(df)
        images, image_rows = [], []
        for i, value in enumerate(df[col].tolist()):
            try:
                if col == "features":
                    feats[i] = self.predictor.check_features(np.asarray(value, dtype=np.float32)[None])[0]
                elif col == "path":
                    images.append(open_photo(Path(value), self.max_image_pixels))
                    image_rows.append(i)
                else:
                    images.append(decode_image(_as_bytes(value), f"row {i}", self.max_image_pixels))
                    image_rows.append(i)
            except Exception as exc:  # one bad row is reported, the batch goes on
                errors[i] = f"{type(exc).__name__}: {exc}"
        if images:
            for i, f in zip(image_rows, self.predictor.image_features(images)):
                feats[i] = f
        ok = [i for i, f in enumerate(feats) if f is not None]
        out = pd.DataFrame(index=range(len(df)), columns=list(OUTPUT_COLUMNS))  # the same columns when all fail
        if ok:
            preds = self.predictor.predict_features(np.stack([feats[i] for i in ok]), top_k=top_k, beam_k=self.beam_k)
            answered = predictions_frame(preds)
            answered.index = ok
            out = out[[]].join(answered)
        out["error"] = errors
        return out


def pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment (what this process runs with)."""
    reqs = []
    for name in _REQUIREMENTS:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    try:
        reqs.append(f"hierloc=={metadata.version('hierloc')}")
    except metadata.PackageNotFoundError:
        pass
    return reqs


def log_pyfunc(client, run_id: str, bundle: Path, name: str = "model") -> str:
    """Log the bundle as a pyfunc model under ``name`` in the run (explicit run id, no
    fluent active run: Prefect may run tasks in threads); returns ``runs:/<id>/<name>``."""
    with tempfile.TemporaryDirectory() as tmp:
        save_pyfunc(bundle, Path(tmp) / name)
        client.log_artifacts(run_id, str(Path(tmp) / name), name)
    return f"runs:/{run_id}/{name}"


def signature() -> ModelSignature:
    """No fixed input schema (one of several input columns), but a declared ``top_k`` param
    (MLflow drops params that the signature does not declare)."""
    return ModelSignature(inputs=None, outputs=None, params=ParamSchema([ParamSpec("top_k", "long", 5)]))


def save_pyfunc(bundle: Path, path: Path) -> Path:
    """Save the bundle as a pyfunc model folder (no tracking server needed)."""
    mlflow.pyfunc.save_model(path=str(path), python_model=HierLocPyfunc(), artifacts={"bundle": str(bundle)},
                             pip_requirements=pip_requirements(), signature=signature())
    return Path(path)


def _is_mlflow_uri(model: str) -> bool:
    return model.startswith(("runs:/", "models:/")) or "://" in model


def resolve_bundle(model: str | None, work_dir: Path) -> Path:
    """The bundle folder that ``model`` names, for ``hierloc predict`` / ``evaluate``.

    ``model`` is one of: a bundle folder (holds bundle.json); a saved MLflow model folder
    (MLmodel + artifacts/bundle, what save_pyfunc writes); an MLflow model URI
    (``runs:/<run_id>/model``, ``models:/<name>/<version>``, or any artifact URI),
    downloaded from the current tracking store into a temporary folder removed at exit;
    or None: the bundle the last pipeline run exported under ``work_dir``
    (flows.stages.latest_bundle). Raises FileNotFoundError / ValueError saying what to do.
    """
    import atexit
    import shutil

    from flows.stages import latest_bundle

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
        tmp = Path(tempfile.mkdtemp(prefix="hierloc-model-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(tmp)))
        except Exception as exc:  # MlflowException, OSError, ...: say which store was asked
            raise ValueError(
                f"cannot download the MLflow model {model} from the tracking store {mlflow.get_tracking_uri()} "
                f"({type(exc).__name__}: {exc}); check the run id / model name, or set MLFLOW_TRACKING_URI") from exc
        path = local
    if (path / "bundle.json").is_file():
        return path
    if (path / "MLmodel").is_file():
        # save_model copies the bundle to artifacts/<its folder name> and records that path in MLmodel
        from mlflow.models import Model

        flavor = Model.load(str(path / "MLmodel")).flavors.get("python_function", {})
        rel = (flavor.get("artifacts") or {}).get("bundle", {}).get("path")
        inner = path / rel if rel else None
        if inner is not None and (inner / "bundle.json").is_file():
            return inner
        raise ValueError(f"{model}: an MLflow model, but not a hierloc one (its MLmodel names no 'bundle' artifact "
                         "holding bundle.json); pass a model logged by the hierloc pipeline")
    if not path.exists():
        raise FileNotFoundError(f"{model}: no such folder; pass a bundle folder (work/export/<digest>), "
                                "a saved MLflow model folder, or an MLflow model URI such as runs:/<run_id>/model")
    raise ValueError(f"{model}: neither a hierloc bundle (no bundle.json) nor an MLflow model folder (no MLmodel); "
                     "pass work/export/<digest> or runs:/<run_id>/model")
