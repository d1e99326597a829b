"""What every report figure shares: a Matplotlib figure on an explicit Agg canvas, its atomic
PNG write, the input checks, and the level names and error range the figures use.

Figures are ``matplotlib.figure.Figure`` objects on an explicit Agg canvas: no pyplot, no
backend switch, no global state, safe in worker threads. Each public plot (maps.py,
charts.py, embeddings.py) validates its inputs (ValueError naming the argument), writes its
PNG atomically (temp file in the same folder, then os.replace) and returns the Path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from geodata.atomic import atomic_write_path
from hierloc.geometry.geo import EARTH_RADIUS_KM

LEVEL_NAMES: tuple[str, ...] = ("country", "region", "subregion", "city")
DPI = 120
#: Error colour/axis range (km): errors under 1 km share one colour; the top is half the equator.
ERROR_RANGE_KM = (1.0, float(np.pi * EARTH_RADIUS_KM))


def new_figure(width_in: float, height_in: float) -> Figure:
    """A constrained-layout figure at the saved DPI (what is measured on it is what is written)."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically (geodata.atomic)."""
    path = Path(path)
    with atomic_write_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=DPI)
    return path


def finite_floats(values: Any, name: str, *, n: int | None = None) -> np.ndarray:
    """``values`` as a finite 1-D float64 array of length ``n`` (if given), else ValueError."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name}: length {len(a)} does not match the {n} true points")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(f"{name}: {bad.size} non-finite values, first at index {bad[0]}")
    return a


def checked_latlon(lat_deg: Any, lon_deg: Any, prefix: str, *, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    lat = finite_floats(lat_deg, f"{prefix}lat_deg", n=n)
    lon = finite_floats(lon_deg, f"{prefix}lon_deg", n=len(lat) if n is None else n)
    if np.abs(lat).max(initial=0.0) > 90.0 or np.abs(lon).max(initial=0.0) > 180.0:
        raise ValueError(f"{prefix}lat_deg/lon_deg: outside [-90, 90] x [-180, 180] degrees")
    return lat, lon

