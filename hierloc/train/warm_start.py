"""Warm start: begin training from a previous model.pt, entity rows matched by stable key.

``entity_row_map`` maps the new table's rows to the old one's by entity key;
``warm_start`` copies every parameter that fits (entity-indexed ones row by row);
``warm_start_digest`` names the source file and the row map, for the checkpoint digest.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from hierloc.model.model import HierLocModel
from hierloc.model.io import MAX_MODEL_FILE_BYTES, load_plain
from hierloc.train.optim import is_entity_table

log = logging.getLogger(__name__)


def entity_row_map(old_keys: np.ndarray | list, new_keys: np.ndarray | list) -> np.ndarray:
    """Row of each new entity in the old table, or -1 for a new entity: (N_new,) int64.

    Keys are the stable entity keys (e.g. "FR/IDF/75/Paris"), one per row of each table,
    in table order. Duplicated keys are an error: a key must name one entity.
    """
    old, new = np.asarray(old_keys, dtype=object), np.asarray(new_keys, dtype=object)
    for what, keys in (("old", old), ("new", new)):
        uniq, counts = np.unique(keys.astype(str), return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{what} entity keys are not unique, e.g. {uniq[counts > 1][:5].tolist()}: "
                             "each key must name one entity (rebuild the entity table)")
    where = {k: i for i, k in enumerate(old.tolist())}
    return np.array([where.get(k, -1) for k in new.tolist()], dtype=np.int64)


def warm_start(model: HierLocModel, init_from: str | Path, init_rows: np.ndarray | None = None) -> dict[str, int]:
    """Load a previous model.pt's parameters into ``model`` where they fit; returns counts.

    Every parameter of the same name and shape is copied, and the feature normalisation
    (norm.mean, norm.std: the MLPs were trained on inputs scaled by them). Entity-indexed
    parameters (``is_entity_table``: the anchors) are copied row by row:
    ``new[i] = old[init_rows[i]]`` where ``init_rows[i] >= 0``; new entities (-1) keep
    their fresh initialisation. ``init_rows`` = entity_row_map(old_keys, new_keys); None
    means the tables are identical (same size required). Entity data buffers (features,
    coordinates, parents, texts) always come from the new table.
    """
    blob = load_plain(init_from, what="warm-start model file", max_bytes=MAX_MODEL_FILE_BYTES)
    if "state_dict" not in blob or "level_sizes" not in blob:
        raise ValueError(f"{init_from}: not a hierloc model file (no state_dict / level_sizes): warm start "
                         "from a model.pt written by hierloc")
    old_sd, n_old = blob["state_dict"], sum(blob["level_sizes"])
    n_new = sum(model.level_sizes)
    rows = torch.from_numpy(_row_map(init_from, init_rows, n_old, n_new).copy())
    keep = rows >= 0
    counts = {"copied": 0, "rows_copied": int(keep.sum()), "rows_fresh": int((~keep).sum()), "skipped": 0}
    with torch.no_grad():
        for name, p in model.named_parameters():
            old = old_sd.get(name)
            if old is None:
                counts["skipped"] += 1
            elif is_entity_table(name, p, n_new) and old.ndim == p.ndim and old.shape[0] == n_old \
                    and old.shape[1:] == p.shape[1:]:
                p[keep] = old[rows[keep]].to(p)
                counts["copied"] += 1
            elif old.shape == p.shape:
                p.copy_(old)
                counts["copied"] += 1
            else:
                counts["skipped"] += 1
                log.warning("warm start: %s has shape %s in %s, %s here: keeping the fresh one",
                            name, tuple(old.shape), init_from, tuple(p.shape))
        for name in ("norm.mean", "norm.std"):
            buf = model.get_buffer(name)
            if name in old_sd and old_sd[name].shape == buf.shape:
                buf.copy_(old_sd[name])
    return counts


def _row_map(init_from: str | Path, init_rows: np.ndarray | None, n_old: int, n_new: int) -> np.ndarray:
    """``init_rows`` checked against both tables, (n_new,) int64; None: the identity (same size required)."""
    if init_rows is None:
        if n_old != n_new:
            raise ValueError(f"{init_from} has {n_old} entities, the new table {n_new}: pass init_rows="
                             "entity_row_map(old_keys, new_keys)")
        init_rows = np.arange(n_new)
    rows_np = np.asarray(init_rows, dtype=np.int64)
    lo, hi = int(rows_np.min(initial=0)), int(rows_np.max(initial=-1))
    if rows_np.shape != (n_new,) or hi >= n_old or lo < -1:
        raise ValueError(f"init_rows must be ({n_new},) with values in [-1, {n_old}) (entity_row_map), got "
                         f"shape {rows_np.shape}, values in [{lo}, {hi}]")
    return rows_np


def _file_digest(path: Path) -> str:
    """16 hex digits of the sha256 of the whole file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def warm_start_digest(init_from: str | Path, init_rows: np.ndarray | None, n_entities: int) -> dict[str, str]:
    """Short hashes of the source model file and of the row map (None: the identity over
    ``n_entities`` rows), so a resume never mixes two warm starts (or one with a cold run)."""
    rows = np.arange(n_entities) if init_rows is None else np.asarray(init_rows, np.int64)
    return {"init_from": _file_digest(Path(init_from)), "init_rows": hashlib.sha256(rows.tobytes()).hexdigest()[:16]}
