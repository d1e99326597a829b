"""The trained model as an MLflow pyfunc: backbone + head + entity table, served by `mlflow models serve`.

Input: a DataFrame with one of the columns
- ``image``: the photo's bytes, or the bytes base64-encoded (what a JSON request carries),
  at most ``max_image_bytes`` (SERVED_MAX_IMAGE_BYTES) before decoding;
- ``features``: precomputed backbone features (a list of floats per row);
- ``path``: a photo file inside the folder named by the model config's ``path_root``, set
  when the model is served (``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"path_root": "/srv/photos"}'
  mlflow models serve ...``, or ``mlflow.pyfunc.load_model(uri, model_config={"path_root": ...})``).
  Without it the column is refused. Relative paths are taken inside that folder; a path
  that resolves outside it (``..``, a link), is missing, or is not a regular file gets one
  uniform error (which says nothing about whether it exists); a file over
  ``max_image_bytes`` is not read.
Photos (``image``, ``path``) are decoded as the model's training features were: JPEGs at the
reduced scale the bundle's ``fast_decode`` implies (Predictor.decode_min_side), the transform
split as in the feature stage (Predictor.image_features).
Output: one row per input row (hierloc.infer.predictor.predictions_frame): latitude,
longitude, path, <level>_key / _name / _prob, candidates (JSON), and ``error``
(empty when the row was answered; a bad row does not fail the batch, its other fields are
None, which the scoring server writes as JSON ``null``).

The model is logged as a *model from code* (flows/serving/pyfunc_model.py, which builds a
``HierLocPyfunc``; flows/serving/logged_model.py): loading it unpickles nothing. Its only artifact is the bundle folder
(hierloc/infer/predictor.py): bundle.json, model.pt (read with torch.load(weights_only=True)),
entities.parquet, and the backbone's weights when they came from a local file; its settings
are plain values in MLmodel's model_config. ``mlflow.pyfunc.load_model("runs:/<id>/model")``
needs nothing else from the run.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from geodata.ingest.image_decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from hierloc.infer.predictor import Predictor, predictions_frame

INPUT_COLUMNS = ("path", "image", "features")
OUTPUT_COLUMNS = ("latitude", "longitude", "path", *(f"{lvl}_{f}" for lvl in ("country", "region", "subregion", "city")
                                                      for f in ("key", "name", "prob")), "candidates")

#: The largest photo the served model reads, per row (``image`` bytes, or a ``path`` file):
#: checked before decoding. OSV-5M photos are under 1 MB; a 100-megapixel JPEG is about 30 MB.
SERVED_MAX_IMAGE_BYTES = 32 << 20
#: The pyfunc's settings (MLmodel's model_config); each can be overridden when the model is
#: loaded or served. ``path_root`` "" = the ``path`` column is off.
DEFAULT_MODEL_CONFIG = {"top_k": 5, "beam_k": 10, "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
                        "max_image_bytes": SERVED_MAX_IMAGE_BYTES, "path_root": ""}
_PATH_REFUSED = "path refused: not a regular file inside the folder this model serves photos from"


class PathRefused(ValueError):
    """A ``path`` row the served model does not open (one message for every reason)."""


def _as_bytes(value, max_bytes: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        if len(value) > 4 * (max_bytes // 3 + 1) + 4:  # base64 of more than max_bytes: not decoded
            raise ValueError(f"image of about {len(value) * 3 // 4:,} bytes, over the {max_bytes:,}-byte cap "
                             "on a served photo (model_config max_image_bytes)")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the image column holds a string that is not base64") from None
    else:
        raise ValueError(f"the image column holds {type(value).__name__}, expected bytes or base64 text")
    if len(data) > max_bytes:
        raise ValueError(f"image of {len(data):,} bytes, over the {max_bytes:,}-byte cap on a served photo "
                         "(model_config max_image_bytes)")
    return data


def read_served_path(value, root: Path | None, max_bytes: int) -> bytes:
    """The bytes of the photo that a ``path`` row names, read only from a regular file inside
    ``root`` (resolved: links and ``..`` cannot leave it) of at most ``max_bytes``.

    Raises PathRefused with the same message whether the path is outside ``root``, missing,
    a folder, a FIFO or a device: a client learns nothing about the server's other files.
    """
    if root is None:
        raise PathRefused("the path column is off for this model: send the photo's bytes in the image column, or "
                          "serve the model with a folder of photos (model_config path_root, e.g. "
                          "MLFLOW_PYFUNC_INFERENCE_CONFIG='{\"path_root\": \"/srv/photos\"}')")
    if not isinstance(value, str) or not value or "\x00" in value:
        raise PathRefused(_PATH_REFUSED)
    try:
        real = (root / value).resolve(strict=True)  # an absolute value replaces root, and is checked below
    except (OSError, RuntimeError, ValueError):
        raise PathRefused(_PATH_REFUSED) from None
    if not real.is_relative_to(root):
        raise PathRefused(_PATH_REFUSED)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError:
        raise PathRefused(_PATH_REFUSED) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # checked before fdopen, which refuses a folder with its own error
        os.close(fd)
        raise PathRefused(_PATH_REFUSED)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_bytes + 1) if st.st_size <= max_bytes else b""
        if st.st_size > max_bytes or len(data) > max_bytes:
            raise ValueError(f"{value}: over the {max_bytes:,}-byte cap on a served photo (model_config max_image_bytes)")
    return data


class HierLocPyfunc(PythonModel):
    """pyfunc wrapper around hierloc.infer.predictor.Predictor; settings from the model config."""

    def __init__(self) -> None:  # the settings come from the model config, in load_context
        cfg = DEFAULT_MODEL_CONFIG
        self.top_k, self.beam_k = int(cfg["top_k"]), int(cfg["beam_k"])
        self.max_image_pixels, self.max_image_bytes = int(cfg["max_image_pixels"]), int(cfg["max_image_bytes"])
        self.path_root: Path | None = None
        self.predictor: Predictor | None = None

    def load_context(self, context) -> None:
        cfg = {**DEFAULT_MODEL_CONFIG, **(getattr(context, "model_config", None) or {})}
        self.top_k, self.beam_k = int(cfg["top_k"]), int(cfg["beam_k"])
        self.max_image_pixels, self.max_image_bytes = int(cfg["max_image_pixels"]), int(cfg["max_image_bytes"])
        root = str(cfg.get("path_root") or "").strip()
        self.path_root = None
        if root:
            self.path_root = Path(root).expanduser().resolve()
            if not self.path_root.is_dir():
                raise ValueError(f"model_config path_root={root!r} is not a folder: name the folder whose photos "
                                 "the path column may read, or leave it empty to refuse that column")
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
        min_side = self.predictor.decode_min_side  # photos decoded as the model's training features were
        feats: list[np.ndarray | None] = [None] * len(df)
        images, image_rows = [], []
        for i, value in enumerate(df[col].tolist()):
            try:
                if col == "features":
                    feats[i] = self.predictor.check_features(np.asarray(value, dtype=np.float32)[None])[0]
                elif col == "path":
                    data = read_served_path(value, self.path_root, self.max_image_bytes)
                    images.append(decode_image(data, str(value), self.max_image_pixels, min_side=min_side))
                    image_rows.append(i)
                else:
                    data = _as_bytes(value, self.max_image_bytes)
                    images.append(decode_image(data, f"row {i}", self.max_image_pixels, min_side=min_side))
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
        return json_safe(out)


def json_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each missing value (a failed row's fields) as None: MLflow's scoring server
    writes a DataFrame's NaN as a bare ``NaN``, which is not JSON, and None as ``null``. Only
    columns holding a missing value become object columns; a batch that all succeeded keeps its
    float columns."""
    holes = [c for c in frame.columns if frame[c].isna().any()]
    if holes:
        frame = frame.copy()
        for c in holes:
            frame[c] = frame[c].astype(object).where(frame[c].notna(), None)
    return frame

