"""A trained model packed with everything prediction needs: backbone, head, entity table.

A *bundle* is one folder:

    bundle.json        format version, backbone spec, how training's features were decoded
                       (fast_decode), tau, where it came from
    model.pt           the HierLoc head (hierloc.model.io.save_model)
    entities.parquet   the entity table, rows in the model's order (key, name, lat, lon, ...)
    backbone.pt        the backbone's weights, when they came from a local file

``Predictor`` loads a bundle and answers for images or for precomputed backbone
features: the top-k hierarchical paths with probabilities and coordinates
(hierloc.infer.beam). The MLflow pyfunc model (flows/serving/) and the
``hierloc predict`` tool are thin shells around it.

Images are served as the feature stage read them (no train/serve skew): the backbone is built
with the bundle's ``fast_decode`` (absent in bundles from before it existed: False, the full
decode those models were trained on), callers decode request bytes with
``Predictor.decode_min_side`` (geodata.ingest.image_decode.decode_image ``min_side``), and
``image_features`` runs the feature stage's decode plan (hierloc.features.decode: the worker
part per image, the device part on the batch).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from hierloc.features.backbones import Backbone, load_backbone
from hierloc.infer.beam import beam_search
from hierloc.infer.search import EntityIndex
from hierloc.model.io import load_model

BUNDLE_FORMAT = 1
LEVEL_NAMES = ("country", "region", "subregion", "city")
MAX_BUNDLE_JSON_BYTES = 1 << 20  # bundle.json is a few hundred bytes
_NEEDED_ENTITY_COLUMNS = ("key", "name", "lat", "lon", "level")


def write_bundle(
    out_dir: Path, model_path: Path, entities: pd.DataFrame, backbone: str, pretrained: str | None,
    source: dict | None = None, *, fast_decode: bool,
) -> Path:
    """Write a bundle folder atomically (built beside it, then renamed into place). ``fast_decode``:
    how the feature stage decoded the images the model was trained on (hierloc.features.decode),
    so that serving decodes the same way."""
    if not isinstance(fast_decode, bool):
        raise TypeError(f"fast_decode must be True or False, got {fast_decode!r}")
    out_dir = Path(out_dir)
    missing = [c for c in _NEEDED_ENTITY_COLUMNS if c not in entities.columns]
    if missing:
        raise ValueError(f"entity table lacks columns {missing}")
    model = load_model(model_path)
    if len(entities) != sum(model.level_sizes):
        raise ValueError(f"{model_path} has {sum(model.level_sizes)} entities, the table {len(entities)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copy2(model_path, tmp / "model.pt")
        entities.reset_index(drop=True).to_parquet(tmp / "entities.parquet", index=False)
        weights = None
        if pretrained and Path(pretrained).is_file():
            shutil.copy2(pretrained, tmp / "backbone.pt")
            weights = "backbone.pt"
        meta = {"format": BUNDLE_FORMAT, "backbone": backbone, "backbone_weights": weights,
                "backbone_tag": None if weights or not pretrained else pretrained, "fast_decode": fast_decode,
                "tau": model.tau, "level_sizes": model.level_sizes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source or {}}
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a bundle is an ordinary shared folder
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)  # put the previous bundle back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir



def read_bundle_meta(bundle: Path) -> dict:
    """A bundle's bundle.json: a regular file of at most 1 MiB, a JSON object of this format."""
    meta_path = Path(bundle) / "bundle.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{bundle}: not a hierloc model bundle (no bundle.json)")
    size = meta_path.stat().st_size
    if size > MAX_BUNDLE_JSON_BYTES:
        raise ValueError(f"{meta_path}: {size} bytes, over the {MAX_BUNDLE_JSON_BYTES} a bundle.json may have")
    meta = json.loads(meta_path.read_bytes()[:MAX_BUNDLE_JSON_BYTES + 1])
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: bundle format {found}, this hierloc reads {BUNDLE_FORMAT}")
    return meta


def bundle_weights(bundle: Path, meta: dict) -> Path | None:
    """The bundle's own backbone weights file (field ``backbone_weights``), or None; a name that
    leads out of the bundle folder (absolute, '..', a link outside) is refused."""
    name = meta.get("backbone_weights")
    if not name:
        return None
    root = Path(bundle).resolve()
    path = (root / str(name)).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"{Path(bundle) / 'bundle.json'}: field backbone_weights {name!r} points outside the bundle")
    return path


def bundle_fast_decode(bundle: Path, meta: dict) -> bool:
    """Whether the bundle's features were decoded at reduced scale (field ``fast_decode``); a bundle
    written before the field existed was trained on full decodes: False."""
    value = meta.get("fast_decode", False)
    if not isinstance(value, bool):
        raise ValueError(f"{Path(bundle) / 'bundle.json'}: field fast_decode must be true or false, got {value!r}")
    return value


@dataclass
class Prediction:
    """One query's answer. ``levels``: per level, the picked entity's key, name and
    probability; ``candidates``: the top-k finest-level entities, best first."""

    latitude: float
    longitude: float
    levels: dict[str, dict]
    candidates: list[dict]

    def path(self) -> str:
        names = [self.levels[lvl]["name"] or "-" for lvl in LEVEL_NAMES if lvl in self.levels]
        return " > ".join(names)

    def to_dict(self) -> dict:
        return {"latitude": self.latitude, "longitude": self.longitude, "path": self.path(),
                "levels": self.levels, "candidates": self.candidates}


class Predictor:
    """Backbone + HierLoc head + entity table, ready to answer."""

    def __init__(self, model, entities: pd.DataFrame, backbone: Backbone | None, *, tau: float | None = None,
                 device: str = "cpu", backend: str = "auto") -> None:
        self.model = model.eval().to(device)
        self.entities = entities.reset_index(drop=True)
        self.backbone = backbone
        if backbone is not None:
            backbone.module.to(device)
        self.tau = float(tau if tau is not None else getattr(model, "tau", 1.0))
        self.device = device
        # FAISS runs on the CPU; on a GPU the torch kernel searches where the model runs.
        self.backend = "torch" if backend == "auto" and torch.device(device).type != "cpu" else backend
        self.index = EntityIndex.from_model(self.model, device=device if self.backend == "torch" else "cpu")
        self.feature_dim = int(self.model.norm.mean.shape[0])
        self._key = self.entities["key"].astype(str).to_numpy()
        self._name = self.entities["name"].fillna("").astype(str).to_numpy()
        self._lat = self.entities["lat"].to_numpy(np.float64)
        self._lon = self.entities["lon"].to_numpy(np.float64)

    @classmethod
    def load(cls, bundle: Path, *, device: str = "cpu", backend: str = "auto", with_backbone: bool = True) -> Predictor:
        bundle = Path(bundle)
        meta = read_bundle_meta(bundle)
        model = load_model(bundle / "model.pt")
        entities = pd.read_parquet(bundle / "entities.parquet")
        backbone = None
        if with_backbone:
            weights = bundle_weights(bundle, meta)
            backbone = load_backbone(meta["backbone"], str(weights) if weights else meta.get("backbone_tag"),
                                     fast_decode=bundle_fast_decode(bundle, meta))
        return cls(model, entities, backbone, tau=meta.get("tau"), device=device, backend=backend)

    # --- answering ----------------------------------------------------------
    @property
    def decode_min_side(self) -> int | None:
        """Decode request images with this ``min_side`` (geodata.ingest.image_decode.decode_image): JPEGs
        at the reduced scale the feature stage read them at; None: full resolution (also without a
        backbone, or for a bundle trained on full decodes)."""
        return None if self.backbone is None else self.backbone.decoding.min_side

    @torch.no_grad()
    def image_features(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """PIL images (RGB, decoded with ``decode_min_side``) -> backbone features (B, D), as the feature
        stage computes them: the decode plan's worker part per image, its device part on the batch
        (hierloc.features.decode; the same float32 input as the whole transform on a full decode)."""
        if self.backbone is None:
            raise RuntimeError("this predictor was loaded without its backbone: pass features instead")
        plan, out = self.backbone.decoding, []
        for s in range(0, len(images), batch_size):
            x = torch.stack([plan.worker(im) for im in images[s : s + batch_size]]).to(self.device, non_blocking=True)
            out.append(self.backbone.encode(plan.to_model(x)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.backbone.dim), np.float32)

    def check_features(self, features: np.ndarray) -> np.ndarray:
        """(B, D) float32 features, or ValueError naming the first bad row (shape, NaN/inf)."""
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (B, {self.feature_dim}) for this model, got {feats.shape}")
        bad = ~np.isfinite(feats).all(axis=1)
        if bad.any():
            raise ValueError(f"features of row {int(np.flatnonzero(bad)[0])} hold NaN or inf ({int(bad.sum())} rows)")
        return feats

    def predict_features(self, features: np.ndarray, *, top_k: int = 5, beam_k: int = 10) -> list[Prediction]:
        """Backbone features (B, D) -> one Prediction per row. The candidates are the beam's final
        entities, so at most ``beam_k`` (a larger ``top_k`` does not widen the beam: that would
        change the probabilities and possibly the pick)."""
        res = beam_search(self.model, self.check_features(features), k=beam_k, backend=self.backend, tau=self.tau,
                          index=self.index, device=self.device)
        if (res.picks[:, -1] < 0).any():  # only with a hand-made table where some entity has no children
            b = int(np.flatnonzero(res.picks[:, -1] < 0)[0])
            raise RuntimeError(f"query {b}: the beam found no entity at the finest level; check the entity table")
        out = []
        for b in range(len(res.picks)):
            levels = {}
            for lvl, name in enumerate(LEVEL_NAMES[: res.picks.shape[1]]):
                row = res.picks[b, lvl]
                levels[name] = {"key": self._key[row], "name": self._name[row], "prob": float(res.pick_prob[b, lvl])}
            cands = []
            for j in range(min(top_k, res.top_rows.shape[1])):
                row = res.top_rows[b, j]
                if row < 0:
                    break
                path = res.top_paths[b, j]
                cands.append({"rank": j + 1, "key": self._key[row],
                              "path": " > ".join(self._name[r] or "-" for r in path),
                              "latitude": float(self._lat[row]), "longitude": float(self._lon[row]),
                              "prob": float(res.top_probs[b, j]), "sq_dist": float(res.top_scores[b, j])})
            city = res.picks[b, -1]
            out.append(Prediction(float(self._lat[city]), float(self._lon[city]), levels, cands))
        return out


def predictions_frame(preds: Sequence[Prediction]) -> pd.DataFrame:
    """One row per prediction: coordinates, per-level key/name/prob, and the candidates as JSON."""
    rows = []
    for p in preds:
        row = {"latitude": p.latitude, "longitude": p.longitude, "path": p.path()}
        for lvl, v in p.levels.items():
            row[f"{lvl}_key"], row[f"{lvl}_name"], row[f"{lvl}_prob"] = v["key"], v["name"], v["prob"]
        row["candidates"] = json.dumps(p.candidates)
        rows.append(row)
    return pd.DataFrame(rows)
