"""The training inputs as arrays: images (``TrainData``) and the entity table (``EntityData``).

``entity_mean_features`` gives each entity its Img_i (HIERLOC.md section 4: the mean
backbone feature of its training images). ``save_arrays`` / ``load_arrays`` are the
on-disk form (two .npz files) read by ``python -m hierloc.train.loop``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hierloc.atomic import atomic_write_path


@dataclass
class TrainData:
    """Cached features and labels of the training images.

    features (N, D) float; targets (N, L) int64 index of the image's entity within
    each level (-1 if unknown); latlon_deg (N, 2) the images' true coordinates.
    """

    features: np.ndarray
    targets: np.ndarray
    latlon_deg: np.ndarray


@dataclass
class EntityData:
    """The entity table as arrays, rows ordered by level then index within level.

    text_feat: (N, D_txt) frozen text embeddings (hierloc.model.text.encode_texts), or None
    for a model without Text_i.
    """

    img_feat: np.ndarray  # (N, D) mean training feature per entity
    latlon_deg: np.ndarray  # (N, 2)
    level_sizes: list[int]
    parent_index: np.ndarray  # (N,) row of the parent, -1 at the top level
    text_feat: np.ndarray | None = None  # (N, D_txt) L2-normalised, or None


def entity_mean_features(
    features: np.ndarray, targets: np.ndarray, level_sizes: list[int]
) -> np.ndarray:
    """Img_i: the mean feature of each entity's training images, (N_total, D).

    targets (N, L) index within level; entities without images get the global mean.
    """
    feats = torch.as_tensor(features, dtype=torch.float64)
    global_mean = feats.mean(0)
    out = []
    for lvl, n in enumerate(level_sizes):
        idx = torch.from_numpy(np.array(targets[:, lvl], dtype=np.int64))  # a copy: parquet arrays are read-only
        ok = idx >= 0
        sums = torch.zeros(n, feats.shape[1], dtype=torch.float64).index_add_(0, idx[ok], feats[ok])
        counts = torch.bincount(idx[ok], minlength=n).double()[:, None]
        out.append(torch.where(counts > 0, sums / counts.clamp_min(1), global_mean))
    return torch.cat(out).float().numpy()


def save_arrays(folder: str | Path, data: TrainData, ents: EntityData) -> Path:
    """Write ``folder/train.npz`` (features, targets, latlon_deg) and ``folder/entities.npz``
    (img_feat, latlon_deg, level_sizes, parent_index, and text_feat when present): the
    input of ``python -m hierloc.train.loop``."""
    folder = Path(folder)
    ent_arrays = {"img_feat": ents.img_feat, "latlon_deg": ents.latlon_deg,
                  "level_sizes": np.asarray(ents.level_sizes, np.int64), "parent_index": ents.parent_index}
    if getattr(ents, "text_feat", None) is not None:
        ent_arrays["text_feat"] = ents.text_feat
    for name, arrays in (
        ("train.npz", {"features": data.features, "targets": data.targets, "latlon_deg": data.latlon_deg}),
        ("entities.npz", ent_arrays),
    ):
        with atomic_write_path(folder / name) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return folder


def load_arrays(folder: str | Path) -> tuple[TrainData, EntityData]:
    """Read what ``save_arrays`` wrote; entities.npz may omit img_feat (then computed from the
    images) and text_feat (a model without Text_i)."""
    folder = Path(folder)
    need = {"train.npz": ("features", "targets", "latlon_deg"), "entities.npz": ("latlon_deg", "level_sizes", "parent_index")}
    loaded = {}
    for name, keys in need.items():
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: write the folder with hierloc.train.data.save_arrays")
        z = dict(np.load(path))
        missing = [k for k in keys if k not in z]
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}: expected {list(keys)}")
        loaded[name] = z
    tr, en = loaded["train.npz"], loaded["entities.npz"]
    data = TrainData(tr["features"].astype(np.float32), tr["targets"].astype(np.int64), tr["latlon_deg"].astype(np.float32))
    sizes = [int(s) for s in en["level_sizes"]]
    img = en.get("img_feat")
    if img is None:
        img = entity_mean_features(data.features, data.targets, sizes)
    ents = EntityData(img, en["latlon_deg"].astype(np.float32), sizes, en["parent_index"].astype(np.int64))
    if "text_feat" in en:
        ents.text_feat = en["text_feat"].astype(np.float32)
    return data, ents
