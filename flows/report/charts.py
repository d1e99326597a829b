"""Evaluation charts (PNG): the error CDF, accuracy per level, the country confusion.

Figures as in flows/report/figure.py: explicit Agg canvas, checked inputs, atomic PNG writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.report.figure import ERROR_RANGE_KM, LEVEL_NAMES, finite_floats, new_figure, save_png


def error_cdf(
    dist_km: Any, path: str | os.PathLike[str], *, thresholds_km: Sequence[float] = (1, 25, 200, 750, 2500)
) -> Path:
    """Fraction of queries with error <= x (km, log x axis) from (N,) errors; the fraction is
    annotated at each threshold (inclusive, d <= t)."""
    d = np.sort(finite_floats(dist_km, "dist_km"))
    if d.size == 0:
        raise ValueError("dist_km is empty: no errors to plot a CDF of")
    if d[0] < 0:
        raise ValueError(f"dist_km: negative distance {d[0]} km")
    thresholds = finite_floats(thresholds_km, "thresholds_km")
    if (thresholds <= 0).any():
        raise ValueError(f"thresholds_km={tuple(thresholds_km)}: must be > 0 km for a log axis")
    floor_km = 0.1  # zero errors sit at the left edge of the log axis
    frac = np.arange(1, d.size + 1) / d.size
    fig = new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    ax.step(np.r_[floor_km, np.maximum(d, floor_km)], np.r_[0.0, frac], where="post", color="C0")
    for t in thresholds:
        f = float(np.mean(d <= t))
        ax.axvline(t, color="0.6", linestyle="--", linewidth=0.8)
        ax.plot([t], [f], "o", color="C1", markersize=4)
        ax.annotate(f"{100 * f:.1f}% <= {t:g} km", (t, 0.98), xytext=(3, 0), textcoords="offset points",
                    rotation=90, va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(floor_km, max(ERROR_RANGE_KM[1], d[-1]))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("error (km)")
    ax.set_ylabel("fraction of queries with error <= x")
    ax.set_title(f"Error CDF, {d.size} queries, median {np.median(d):.1f} km")
    ax.grid(alpha=0.3, which="both")
    return save_png(fig, path)


def level_accuracy_bars(metrics: Mapping[str, float], path: str | os.PathLike[str]) -> Path:
    """Grouped bars (%) per level of ``acc_<level>`` (reverse-geocoded, the official metric) and
    ``pick_acc_<level>`` (beam-search pick), fractions in [0, 1]; missing keys skipped, NaN as n/a."""
    series = (("acc", "reverse-geocoded (official)"), ("pick_acc", "beam-search pick"))
    levels = [lv for lv in LEVEL_NAMES if any(f"{p}_{lv}" in metrics for p, _ in series)]
    if not levels:
        raise ValueError(f"metrics has no acc_<level> or pick_acc_<level> for {LEVEL_NAMES}; keys: {sorted(metrics)}")
    used = [(p, label) for p, label in series if any(f"{p}_{lv}" in metrics for lv in levels)]
    fig = new_figure(1.6 * len(levels) + 2.5, 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(used)
    for j, (prefix, label) in enumerate(used):
        present = [f"{prefix}_{lv}" in metrics for lv in levels]
        values = np.array([float(metrics.get(f"{prefix}_{lv}", np.nan)) for lv in levels])
        if (np.abs(values - 0.5) > 0.5).any():  # NaN compares False: allowed
            raise ValueError(f"{prefix}_<level> values {values.tolist()}: fractions must lie in [0, 1]")
        x = np.arange(len(levels)) + (j - (len(used) - 1) / 2) * width
        bars = ax.bar(x, np.nan_to_num(100 * values), width, label=label, color=f"C{j}")
        texts = [f"{100 * v:.1f}%" if np.isfinite(v) else "n/a" * has for v, has in zip(values, present)]
        ax.bar_label(bars, labels=texts, fontsize=8)
    ax.set_xticks(np.arange(len(levels)), levels)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per level")
    ax.legend(loc="upper right", fontsize=8)
    return save_png(fig, path)


def _codes(values: Any, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=object)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of country codes, got shape {a.shape}")
    s = pd.Series(a, dtype=object)
    return s.where(s.notna(), "?").astype(str).to_numpy()  # None/NaN -> "?" ("NA" is Namibia)


def confusion_table(true_cc: Any, pred_cc: Any, *, top: int = 15) -> tuple[list[str], np.ndarray, int]:
    """Row-normalised confusion of the ``top`` most frequent true countries (ties by code).

    (N,) x 2 codes -> (labels (k,), fractions (k, k + 1) whose last column is "other"
    (predictions outside the k), number of queries whose truth is among the k).
    """
    t, p = _codes(true_cc, "true_cc"), _codes(pred_cc, "pred_cc")
    if len(t) != len(p) or len(t) == 0:
        raise ValueError(f"true_cc/pred_cc: need equal non-zero lengths, got {len(t)} and {len(p)}")
    if top < 1:
        raise ValueError(f"top={top}: must be >= 1")
    codes, counts = np.unique(t, return_counts=True)
    labels = codes[np.argsort(-counts, kind="stable")[:top]].tolist()
    index = pd.Index(labels)
    rows, cols = index.get_indexer(t), index.get_indexer(p)
    keep = rows >= 0
    table = np.zeros((len(labels), len(labels) + 1))
    np.add.at(table, (rows[keep], np.where(cols[keep] >= 0, cols[keep], len(labels))), 1.0)
    return labels, table / table.sum(axis=1, keepdims=True), int(keep.sum())


def country_confusion(true_cc: Any, pred_cc: Any, path: str | os.PathLike[str], *, top: int = 15) -> Path:
    """Heat map (row %) of :func:`confusion_table`: rows true country, columns predicted + "other"."""
    labels, frac, covered = confusion_table(true_cc, pred_cc, top=top)
    k = len(labels)
    fig = new_figure(0.5 * k + 3.0, 0.45 * k + 2.2)
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), v in np.ndenumerate(frac):
        if v >= 0.005:
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    ax.set_xticks(np.arange(k + 1), [*labels, "other"], rotation=90)
    ax.set_yticks(np.arange(k), labels)
    ax.set_xlabel("predicted country")
    ax.set_ylabel("true country")
    n = len(np.asarray(true_cc, dtype=object))
    ax.set_title(f"Country confusion (row %), top {k} true countries = {100 * covered / n:.0f}% of {n}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the row")
    return save_png(fig, path)

