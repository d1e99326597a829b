"""The model file (model.pt): build a HierLocModel from training arrays, save it, load it back.

``save_model`` writes everything inference needs in one atomic file; ``load_model``
rebuilds the model from it, upgrading older layouts (``MODEL_FORMAT``) to today's names.
``atomic_torch_save`` is the one atomic ``torch.save`` (also used for checkpoints), and
``load_plain`` the one ``torch.load``: a size-capped regular file, read with
``weights_only=True`` (tensors, numbers, strings, lists, dicts: a crafted file runs no code).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import torch

from hierloc.atomic import atomic_write_path
from hierloc.model.model import HierLocModel, ModelConfig
from hierloc.train.data import EntityData, TrainData, feature_moments

#: Version of the model.pt layout: 1 had a "curvature" buffer (no log_curvature) and no
#: text, attention or spherical-harmonics entries; 2 is the current one.
MODEL_FORMAT = 2

#: The largest model.pt read (also as a warm-start source): a head over a 100k-entity table
#: with 1024-d image and text features is about 1 GB.
MAX_MODEL_FILE_BYTES = 4 << 30
#: The largest training checkpoint read: the model plus the optimisers' moments (about 3x).
MAX_CHECKPOINT_FILE_BYTES = 16 << 30
#: The largest backbone / text-encoder weights file read (a ViT-g/14 in float32 is about 5 GB).
MAX_WEIGHTS_FILE_BYTES = 16 << 30


def build_model(cfg: ModelConfig, data: TrainData, ents: EntityData) -> HierLocModel:
    """A fresh model for these arrays: feature normalisation from ``data.features`` (N, D) (an
    array or a FeatureRows, one streaming pass: feature_moments), entity buffers (Img_i,
    coordinates, parents, texts) from ``ents``."""
    feat_mean, feat_std = feature_moments(data.features)
    return HierLocModel(
        cfg,
        feat_mean=feat_mean,
        feat_std=feat_std,
        entity_img_feat=torch.tensor(np.asarray(ents.img_feat), dtype=torch.float32),
        entity_latlon_deg=torch.tensor(np.asarray(ents.latlon_deg), dtype=torch.float32),
        level_sizes=ents.level_sizes,
        parent_index=torch.tensor(np.asarray(ents.parent_index), dtype=torch.long),
        entity_text_feat=None if ents.text_feat is None else torch.tensor(np.asarray(ents.text_feat), dtype=torch.float32),
    )


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (hierloc.atomic): a crash leaves the old file."""
    with atomic_write_path(path) as tmp:
        torch.save(obj, tmp)


def open_regular(path: str | Path, *, what: str, max_bytes: int) -> int:
    """A read-only descriptor of ``path`` when it is a regular file of at most ``max_bytes``
    (a FIFO is opened without waiting for a writer, then refused, as are devices and folders).
    Raises FileNotFoundError or ValueError naming the file, its size and the cap."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected a {what})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file (a {what} must be one)")
        raise ValueError(f"{path}: {st.st_size:,} bytes, over the {max_bytes:,}-byte cap on a {what}")
    return fd


def _load_error_reason(exc: Exception) -> str:
    """The line of torch's load error that says what was refused (not its advice to retry unsafely)."""
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return (lines[0] if lines else type(exc).__name__)[:300]


def load_plain(path: str | Path, *, what: str, max_bytes: int, map_location: str | torch.device = "cpu") -> dict:
    """The dict that ``torch.save`` wrote to ``path``, read with ``weights_only=True``.

    Only tensors, numbers, strings, lists and dicts come back; a file that needs anything
    else (a pickled object: code that would run on loading) is refused, never loaded with
    the unsafe loader. Only a regular file of at most ``max_bytes`` is read (a FIFO or a
    device is refused without blocking on it). ``what`` names the file's role in errors.
    Raises FileNotFoundError or ValueError naming the file.
    """
    path = Path(path)
    with os.fdopen(open_regular(path, what=what, max_bytes=max_bytes), "rb") as fh:
        try:
            blob = torch.load(fh, map_location=map_location, weights_only=True)
        except Exception as exc:  # UnpicklingError (a non-plain object), RuntimeError (not a torch file), ...
            raise ValueError(
                f"{path}: refused as a {what}: it does not load as plain data (torch.load weights_only=True: "
                f"{_load_error_reason(exc)}). hierloc runs no code from files; every file it writes loads this way. Re-create "
                "it with hierloc, or, for a file you made yourself and trust, torch.save it again holding only "
                "tensors, numbers, strings, lists and dicts") from None
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: not a hierloc {what} (it holds a {type(blob).__name__}, expected a dict)")
    return blob


def save_model(model: HierLocModel, path: Path, *, tau: float = 1.0) -> None:
    """Everything needed to rebuild the model for inference, in one file.

    ``tau`` is the loss temperature at the end of training: inference turns beam
    distances into probabilities with it (hierloc.infer.beam.beam_probabilities).
    The state dict holds every buffer and parameter (text features, attention,
    log curvature, location encoder); ``load_model`` also reads files written before
    those existed (format 1).
    """
    atomic_torch_save(
        {"format": MODEL_FORMAT, "model_config": model.cfg.to_dict(), "level_sizes": model.level_sizes,
         "state_dict": model.state_dict(), "tau": float(tau)},
        path,
    )


def _upgrade_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format-1 state dict in today's names: the fixed K buffer becomes log K."""
    sd = dict(sd)
    if "curvature" in sd and "log_curvature" not in sd:
        sd["log_curvature"] = sd.pop("curvature").float().log()
    return sd


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> HierLocModel:
    blob = load_plain(path, what="model file", max_bytes=MAX_MODEL_FILE_BYTES, map_location=map_location)
    missing = [k for k in ("state_dict", "model_config", "level_sizes") if k not in blob]
    if missing:
        raise ValueError(f"{path}: not a hierloc model file (no {', '.join(missing)})")
    if blob.get("format", 1) > MODEL_FORMAT:
        raise ValueError(f"{path}: model format {blob['format']}, this hierloc reads up to {MODEL_FORMAT}: upgrade hierloc")
    sd = _upgrade_state_dict(blob["state_dict"])
    cfg = ModelConfig(**blob["model_config"])  # fields missing in older files take their defaults (the old behaviour)
    model = HierLocModel(
        cfg,
        feat_mean=sd["norm.mean"],
        feat_std=sd["norm.std"],
        entity_img_feat=sd["entity_img_feat"],
        entity_latlon_deg=sd["entity_latlon_deg"],
        level_sizes=blob["level_sizes"],
        parent_index=sd["parent_index"],
        entity_text_feat=sd.get("entity_text_feat"),
    )
    model.load_state_dict(sd)
    #: the loss temperature the model was trained to (1.0 for files written before it was saved)
    model.tau = float(blob.get("tau", 1.0))
    return model.eval()
