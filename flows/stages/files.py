"""What the stages share on disk: atomic JSON and Parquet writes, the manifests, the entity
table, and one split's features aligned with its targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from flows.stages.data_dir import SPLITS
from flows.stages.faults import EmptySplitError
from geodata.atomic import write_parquet_atomic, write_text_atomic
from geodata.labels.targets import SplitTargets, split_targets
from geodata.osv5m import UNIQUE_COLUMNS
from hierloc.features.views import open_features, resolve_feature_dir


def write_json(obj: dict, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2, default=str), path)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), path)


def manifest_path(ingest_dir: Path, split: str) -> Path:
    return Path(ingest_dir) / "manifest" / f"{split}.parquet"


def read_manifest(path: Path, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One manifest (a folder of Parquet parts); only ``columns``, those it has, when given."""
    import pyarrow.dataset as pads

    keep = None if columns is None else [c for c in columns if c in pads.dataset(path).schema.names]
    return pd.read_parquet(path, columns=keep)


def read_manifests(ingest_dir: Path, columns: tuple[str, ...] | None = None) -> dict[str, pd.DataFrame]:
    """Every split's manifest (only ``columns``, those a manifest has, when given: at OSV-5M size
    the 40 string columns of 5M rows take tens of GB as Python strings); EmptySplitError names a
    split without rows."""
    manifests = {}
    for split in SPLITS:  # a manifest is a folder of Parquet parts
        path = manifest_path(ingest_dir, split)
        manifests[split] = read_manifest(path, columns)
    for split in (s for s, m in manifests.items() if m.empty):
        raise EmptySplitError(f"split {split!r} has no rows to work on: {manifest_path(ingest_dir, split)} "
                              f"is empty (see {Path(ingest_dir) / 'ingest_report.json'})")
    return manifests


def load_entities(hierarchy_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(hierarchy_dir) / "entities.parquet")


#: The manifest columns training and evaluation read (the rest, 30 string columns, stay on disk).
SPLIT_COLUMNS = ("id", "latitude", "longitude", "country", *UNIQUE_COLUMNS)


def split_arrays(ingest_dir: Path, hierarchy_dir: Path, feature_dir: Path, split: str,
                 require_targets: bool = False) -> SplitTargets:
    """Features, per-level targets and coordinates of one split, aligned by image id
    (geodata.labels.targets.split_targets: rows without features dropped and counted; with
    ``require_targets`` also rows without an entity at some level). The features stay on disk:
    a FeatureRows over the memory-mapped shards (hierloc.features.rows); the NaN check streams."""
    m = read_manifest(manifest_path(ingest_dir, split), SPLIT_COLUMNS)
    a = pd.read_parquet(Path(hierarchy_dir) / f"assignments_{split}.parquet")
    feats = open_features(resolve_feature_dir(Path(feature_dir)), m["id"].to_numpy(np.int64))  # KeyError if missing
    return split_targets(m, a, feats, require_targets)
