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
from mlflow.pyfunc import PythonModel

from geodata.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image, open_photo
from hierloc.predictor import Predictor, predictions_frame

INPUT_COLUMNS = ("path", "image", "features")
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
                    feats[i] = np.asarray(value, dtype=np.float32)
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
        out = pd.DataFrame(index=range(len(df)))
        if ok:
            preds = self.predictor.predict_features(np.stack([feats[i] for i in ok]), top_k=top_k, beam_k=self.beam_k)
            answered = predictions_frame(preds)
            answered.index = ok
            out = out.join(answered)
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


def save_pyfunc(bundle: Path, path: Path) -> Path:
    """Save the bundle as a pyfunc model folder (no tracking server needed)."""
    mlflow.pyfunc.save_model(path=str(path), python_model=HierLocPyfunc(), artifacts={"bundle": str(bundle)},
                             pip_requirements=pip_requirements())
    return Path(path)
