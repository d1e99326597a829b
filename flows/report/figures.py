"""The evaluation at a glance: the figures the evaluate stage writes beside its metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from flows.report.charts import country_confusion, error_cdf, level_accuracy_bars
from flows.report.embeddings import poincare_disk
from flows.report.maps import error_map


def write_figures(fig_dir: Path, model, ents: pd.DataFrame, truth: pd.DataFrame, preds: pd.DataFrame,
                  metrics: dict) -> dict:
    """The evaluation at a glance: error map and CDF, per-level accuracy, country confusion,
    and the entity embeddings in the Poincare disk. Returns the disk's mean radius per level."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    error_map(truth["latitude"], truth["longitude"], preds["latitude"], preds["longitude"], fig_dir / "error_map.png")
    error_cdf(preds["dist_km"], fig_dir / "error_cdf.png")
    level_accuracy_bars(metrics, fig_dir / "level_accuracy.png")
    pred_cc = preds["pick_country"].astype(str).str.split("|").str[0]
    country_confusion(truth["country"].astype(str), pred_cc, fig_dir / "country_confusion.png")
    if model is None:  # a baseline without entity embeddings
        return {}
    with torch.no_grad():
        points = model.eval().encode_entities().cpu().numpy()
    _, radii = poincare_disk(points, ents["level"].to_numpy(np.int64), float(model.curvature.detach()),
                             fig_dir / "poincare_disk.png", geometry=model.cfg.geometry)
    return radii
