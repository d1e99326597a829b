"""The training inputs as arrays: images (``TrainData``) and the entity table (``EntityData``).

``entity_mean_features`` gives each entity its Img_i (HIERLOC.md section 4: the mean
backbone feature of its training images) and ``feature_moments`` the per-dimension mean and
std the model normalises with, both in one streaming pass: the features may be an in-memory
array or a FeatureRows over memory-mapped shards (hierloc.features.rows), never copied whole.
``save_arrays`` / ``load_arrays`` are the on-disk form (two .npz files) read by
``python -m hierloc.train.loop``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hierloc.atomic import atomic_write_path
from hierloc.features.rows import feature_chunks

#: Rows per block of the streaming passes: a block is widened to float64 (16,384 x 768: 100 MB).
STAT_CHUNK_ROWS = 16_384


@dataclass
class TrainData:
    """Cached features and labels of the training images.

    features (N, D) float, an array or a FeatureRows (memory-mapped, gathered per batch);
    targets (N, L) int64 index of the image's entity within each level (-1 if unknown);
    latlon_deg (N, 2) the images' true coordinates.
    """

    features: np.ndarray
    targets: np.ndarray
    latlon_deg: np.ndarray

    def batch_source(self):
        """What the training loop indexes with a (b,) torch index to get a float32 (b, D) batch: the
        array as one tensor, or a FeatureRows left on disk (each batch gathered from the map)."""
        if isinstance(self.features, (np.ndarray, torch.Tensor)):
            return torch.as_tensor(self.features, dtype=torch.float32)
        return _TorchRows(self.features)


class _TorchRows:
    """A FeatureRows indexed like a tensor: ``rows[idx]`` -> float32 (b, D) tensor."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.rows.take(np.asarray(idx, np.int64)))


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
    features, targets: np.ndarray, level_sizes: list[int], chunk_rows: int = STAT_CHUNK_ROWS
) -> np.ndarray:
    """Img_i: the mean feature of each entity's training images, (N_total, D) float32.

    features (N, D) an array or a FeatureRows, read once in blocks of ``chunk_rows``; sums in
    float64 per level (the entity table's size, never (N, D) float64). targets (N, L) index
    within level; entities without images get the global mean.
    """
    targets = np.asarray(targets)
    dim = features.shape[1]
    sums = [torch.zeros(n, dim, dtype=torch.float64) for n in level_sizes]
    total, start = torch.zeros(dim, dtype=torch.float64), 0
    for block in feature_chunks(features, chunk_rows):
        x = torch.from_numpy(block).double()
        total += x.sum(0)
        for lvl, n in enumerate(level_sizes):
            idx = torch.from_numpy(np.array(targets[start : start + len(block), lvl], dtype=np.int64))
            ok = idx >= 0
            if bool(ok.all()):  # training rows all have targets: no masked copy of the block
                sums[lvl].index_add_(0, idx, x)
            else:
                sums[lvl].index_add_(0, idx[ok], x[ok])
        start += len(block)
    global_mean = total / start  # NaN without rows, as the mean of nothing
    out = []
    for lvl, n in enumerate(level_sizes):
        idx = np.asarray(targets[:, lvl], np.int64)
        counts = torch.from_numpy(np.bincount(idx[idx >= 0], minlength=n)).double()[:, None]
        out.append(torch.where(counts > 0, sums[lvl] / counts.clamp_min(1), global_mean))
    return torch.cat(out).float().numpy()


def feature_moments(features, chunk_rows: int = STAT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (unbiased, as torch.std) of (N, D) features, float32 (D,) each,
    in one pass over blocks (an array or a FeatureRows): float64 block moments merged by Chan's
    formula (no E[x^2] - E[x]^2 cancellation)."""
    dim = features.shape[1]
    n, mean, m2 = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    for block in feature_chunks(features, chunk_rows):
        x = torch.from_numpy(block).double()
        nb, mb = len(x), x.mean(0)
        delta = mb - mean
        mean = mean + delta * (nb / (n + nb))
        m2 = m2 + ((x - mb) ** 2).sum(0) + delta**2 * (n * nb / (n + nb))
        n += nb
    if n == 0:
        nan = torch.full((dim,), float("nan"))
        return nan, nan.clone()
    std = (m2 / (n - 1)).sqrt() if n > 1 else torch.full((dim,), float("nan"), dtype=torch.float64)
    return mean.float(), std.float()


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
