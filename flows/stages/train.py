"""Stage 4, train: the model on the train split's cached features; the run folder is keyed
by configuration and data, so a rerun resumes from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flows.stages.files import load_entities, split_arrays
from geodata.labels.hierarchy import parent_rows
from geodata.osv5m import LEVELS
from hierloc.digest import digest_of
from hierloc.model.model import ModelConfig
from hierloc.train.data import EntityData, TrainData, entity_mean_features
from hierloc.train.loop import TrainConfig, train
from hierloc.train.warm_start import entity_row_map


def entity_text_features(ents: pd.DataFrame, spec: str, pretrained: str | None = None, batch_size: int = 256,
                         device: str = "cpu") -> np.ndarray:
    """Text_i of every entity: the text tower on "name, parent, ..., country" (hierloc.model.text)."""
    from hierloc.model.text import encode_texts, entity_texts

    texts = entity_texts(ents["name"].fillna("").astype(str).tolist(), parent_rows(ents))
    return encode_texts(texts, spec=spec, pretrained=pretrained, batch_size=batch_size, device=device)


def _warm_start_rows(init_from: Path | None, init_entities: Path | None, ents: pd.DataFrame) -> np.ndarray | None:
    """Row of each entity in the entity table ``init_from`` was trained with (-1: new), or None."""
    if init_from is None:
        return None
    old_keys = pd.read_parquet(init_entities, columns=["key"])["key"].to_numpy() if init_entities else None
    if old_keys is None:
        raise ValueError(f"a warm start from {init_from} needs the entity table it was trained with (init_entities)")
    return entity_row_map(old_keys, ents["key"].to_numpy())


def budget_tags(cfg: TrainConfig) -> dict[str, str]:
    """The train run's MLflow tags that tell a budgeted run (train.max_steps / max_samples) apart."""
    steps = cfg.budget_steps()
    if steps is None:
        return {"hierloc.budgeted": "false"}
    return {"hierloc.budgeted": "true", "hierloc.budget_steps": str(steps),
            "hierloc.max_steps": str(cfg.max_steps), "hierloc.max_samples": str(cfg.max_samples)}


def run_train(
    ingest_dir: Path, hierarchy_dir: Path, feature_dirs: dict[str, str], out_root: Path,
    model_cfg: ModelConfig, train_cfg: TrainConfig, log_fn=None, *,
    init_from: Path | None = None, init_entities: Path | None = None, data_key: dict | None = None,
    text: dict | None = None,
) -> dict:
    """Train on the train split; the run folder is keyed by config + data so reruns resume.

    ``init_from``/``init_entities``: warm start from an earlier model.pt and its entity table
    (a fine-tune from the champion): parameters are copied, entity rows matched by stable key,
    new entities start fresh. ``data_key``: content digests of the inputs (the pipeline's), so a
    folder whose content changed trains in a new run folder instead of resuming a stale one.
    ``text``: {"spec", "pretrained", "batch_size"} to give the entities Text_i (hierloc.model.text), or None.
    """
    _, feats, targets, latlon, dropped = split_arrays(ingest_dir, hierarchy_dir, Path(feature_dirs["train"]), "train",
                                                      require_targets=True)
    ents = load_entities(hierarchy_dir)
    level_sizes = [int((ents["level"] == i).sum()) for i in range(len(LEVELS))]
    ent_data = EntityData(
        img_feat=entity_mean_features(feats, targets, level_sizes),
        latlon_deg=ents[["lat", "lon"]].to_numpy(np.float32),
        level_sizes=level_sizes,
        parent_index=parent_rows(ents),
        text_feat=entity_text_features(ents, **text) if text else None,
    )
    data = TrainData(feats, targets, latlon)
    init_rows = _warm_start_rows(init_from, init_entities, ents)
    key = data_key or {"features": feature_dirs["train"], "hierarchy": str(hierarchy_dir)}
    run_dir = Path(out_root) / digest_of([model_cfg.to_dict(), train_cfg.to_dict(), key,
                                          {"init_from": str(init_from) if init_from else None, "text": text}])
    res = train(data, ent_data, model_cfg, train_cfg, run_dir, log_fn=log_fn, init_from=init_from, init_rows=init_rows)
    return {"model_path": str(res.model_path), "checkpoint": str(res.checkpoint), "run_dir": str(run_dir),
            "steps": res.steps, "steps_run": res.steps_run, "epochs_run": res.epochs_run, "seconds": res.seconds,
            "budgeted": res.budgeted, "budget_steps": train_cfg.budget_steps(),
            "n_train": int(len(feats)), "dropped_no_features_or_entity": dropped,
            "n_warm_started_entities": int((init_rows >= 0).sum()) if init_rows is not None else 0, **res.final}
