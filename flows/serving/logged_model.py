"""The bundle as an MLflow pyfunc model folder: saved (``save_pyfunc``) or logged to a run
(``log_pyfunc``), as a *model from code* (pyfunc_model.py beside this file): MLflow runs that
file to build the model, so no pickled object is logged (flows/serving/pyfunc.py)."""

from __future__ import annotations

import base64
import io
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec

from flows.serving.pyfunc import DEFAULT_MODEL_CONFIG

_REQUIREMENTS = ("torch", "torchvision", "open_clip_torch", "geoopt", "faiss-cpu", "pandas", "pyarrow", "pillow", "mlflow")
#: The model-from-code file MLflow runs to build the pyfunc (no pickled object is logged).
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


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


def input_example() -> pd.DataFrame:
    """A request as a client sends it, saved with the model (input_example.json and
    serving_input_example.json, shown by the MLflow UI): one small photo, base64 text in the
    ``image`` column. A signature alone does not say which column to send."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (70, 110, 160)).save(buf, "JPEG", quality=85)
    example = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})
    example.columns = pd.Index(["image"], dtype=object)  # MLflow compares the columns with a range: no pandas warning
    return example


def save_pyfunc(bundle: Path, path: Path, model_config: dict | None = None) -> Path:
    """Save the bundle as a pyfunc model folder (no tracking server needed): a model from code
    (MODEL_CODE), the bundle folder as its artifact, ``model_config`` over DEFAULT_MODEL_CONFIG,
    a signature and an input example (without one MLflow warns, in colour codes)."""
    unknown = sorted(set(model_config or {}) - set(DEFAULT_MODEL_CONFIG))
    if unknown:
        raise ValueError(f"unknown model_config keys {unknown}; allowed: {sorted(DEFAULT_MODEL_CONFIG)}")
    mlflow.pyfunc.save_model(path=str(path), python_model=str(MODEL_CODE), artifacts={"bundle": str(bundle)},
                             model_config={**DEFAULT_MODEL_CONFIG, **(model_config or {})},
                             pip_requirements=pip_requirements(), signature=signature(),
                             input_example=input_example())
    return Path(path)

