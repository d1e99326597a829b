"""The entity assignments as learning targets: one split's rows aligned with its features,
and the majority-country baseline the model has to clear.

Arrays only (numpy, pandas): the features are a (N, D) float array here, whatever computed them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from geodata.osv5m import LEVELS


class SplitTargets(NamedTuple):
    """One split's usable rows: manifest (n rows), features (n, D), targets (n, L) int64
    index within each level (-1: no entity), latlon (n, 2) float32 degrees, and n_dropped
    (a tuple, in that order)."""

    manifest: pd.DataFrame
    features: np.ndarray
    targets: np.ndarray
    latlon: np.ndarray
    n_dropped: int


def split_targets(manifest: pd.DataFrame, assignments: pd.DataFrame, features: np.ndarray,
                  require_targets: bool = False) -> SplitTargets:
    """Features, per-level targets and coordinates of one split, aligned by row.

    manifest, assignments (geodata.labels.hierarchy.assign_images: <level>_index columns) and
    features (N, D) hold the same N images in the same order. Images whose features could not
    be computed (NaN) are dropped and counted; with ``require_targets`` also images without an
    entity at some level (unassigned by a labeler).
    """
    ok = np.isfinite(features).all(axis=1)
    if require_targets:  # training needs an entity at every level; evaluation keeps every row
        ok &= (assignments[[f"{lvl}_index" for lvl in LEVELS]].to_numpy() >= 0).all(axis=1)
    m, a, feats = manifest[ok].reset_index(drop=True), assignments[ok].reset_index(drop=True), features[ok]
    targets = a[[f"{lvl}_index" for lvl in LEVELS]].to_numpy(np.int64)
    latlon = m[["latitude", "longitude"]].to_numpy(np.float32)
    return SplitTargets(m, feats, targets, latlon, int((~ok).sum()))


def majority_accuracy(train_labels: pd.Series, test_labels: pd.Series) -> float:
    """The bar to clear: the accuracy of always answering the most frequent training label
    (NaN without test rows)."""
    majority = train_labels.value_counts().index[0] if len(train_labels) else ""
    return float((test_labels == majority).mean()) if len(test_labels) else float("nan")
