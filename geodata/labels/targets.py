"""The entity assignments as learning targets: one split's rows aligned with its features,
and the majority-country baseline the model has to clear.

Arrays only (numpy, pandas): the features are a (N, D) float array here, whatever computed them,
or any lazy matrix with ``finite_mask()`` and ``subset(mask)`` (hierloc.features.rows.FeatureRows,
memory-mapped shards): then no feature is copied, only the kept rows' positions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from geodata.osv5m import LEVELS


class SplitTargets(NamedTuple):
    """One split's usable rows: manifest (n rows), features (n, D) (an array, or a lazy matrix
    when one was given), targets (n, L) int64
    index within each level (-1: no entity), latlon (n, 2) float32 degrees, and n_dropped
    (a tuple, in that order)."""

    manifest: pd.DataFrame
    features: np.ndarray  # or a lazy matrix (finite_mask / subset)
    targets: np.ndarray
    latlon: np.ndarray
    n_dropped: int


def split_targets(manifest: pd.DataFrame, assignments: pd.DataFrame, features,
                  require_targets: bool = False) -> SplitTargets:
    """Features, per-level targets and coordinates of one split, aligned by row.

    manifest, assignments (geodata.labels.hierarchy.assign_images: <level>_index columns) and
    features (N, D) hold the same N images in the same order. Images whose features could not
    be computed (NaN) are dropped and counted; with ``require_targets`` also images without an
    entity at some level (unassigned by a labeler). ``features``: an (N, D) array, or a lazy
    matrix with ``finite_mask()`` (N,) bool (streamed) and ``subset(mask)`` (no copy).
    """
    lazy = hasattr(features, "finite_mask") and hasattr(features, "subset")
    ok = features.finite_mask() if lazy else np.isfinite(features).all(axis=1)
    if require_targets:  # training needs an entity at every level; evaluation keeps every row
        ok &= (assignments[[f"{lvl}_index" for lvl in LEVELS]].to_numpy() >= 0).all(axis=1)
    feats = features.subset(ok) if lazy else features[ok]
    m, a = manifest[ok].reset_index(drop=True), assignments[ok].reset_index(drop=True)
    targets = a[[f"{lvl}_index" for lvl in LEVELS]].to_numpy(np.int64)
    latlon = m[["latitude", "longitude"]].to_numpy(np.float32)
    return SplitTargets(m, feats, targets, latlon, int((~ok).sum()))


def majority_accuracy(train_labels: pd.Series, test_labels: pd.Series) -> float:
    """The bar to clear: the accuracy of always answering the most frequent training label
    (NaN without test rows)."""
    majority = train_labels.value_counts().index[0] if len(train_labels) else ""
    return float((test_labels == majority).mean()) if len(test_labels) else float("nan")
