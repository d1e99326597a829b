"""Great-circle geometry on the sphere: THE haversine of the project, GeoScore, unit vectors.

Every function takes numpy arrays (or Python scalars) and returns numpy float64, or takes
torch tensors and returns tensors in the inputs' float dtype, on their device; the namespace
is picked from the inputs (any tensor -> torch). Inputs broadcast. Angles are degrees.

The haversine and GeoScore are the official OSV-5M formulas (metrics/utils.py of
gastruc/osv5m): R = 6371 km, a = sin^2(dlat/2) + cos(lat1) cos(lat2) sin^2(dlon/2),
d = 2 R atan2(sqrt(a), sqrt(1 - a)); GeoScore = 5000 exp(-d / 1492.7).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

#: Mean Earth radius of the OSV-5M haversine (km).
EARTH_RADIUS_KM = 6371.0
#: Decay length of the GeoScore (km): 5000 * exp(-d / GEOSCORE_SCALE_KM).
GEOSCORE_SCALE_KM = 1492.7
#: Maximum GeoScore (a prediction at distance 0).
GEOSCORE_MAX = 5000.0

Array = Any  # np.ndarray | torch.Tensor | float


def _namespace(*xs: Array) -> tuple[ModuleType, list[Array]]:
    """(numpy or torch, the inputs as float arrays of that namespace).

    torch is looked up, not imported: if it was never imported no input can be a tensor,
    so numpy-only callers (metrics, the scoring CLI) do not pay torch's import time.
    numpy: float64. torch: the promoted float dtype of the tensor inputs (default dtype if
    none is floating), on the first tensor's device. The functions used below (sin, cos,
    sqrt, arctan2, clip, deg2rad, rad2deg, hypot, exp, stack with axis=) exist in both.
    """
    torch = sys.modules.get("torch")
    tensors = [x for x in xs if torch is not None and isinstance(x, torch.Tensor)]
    if not tensors:
        return np, [np.asarray(x, dtype=np.float64) for x in xs]
    dtype = torch.get_default_dtype()
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    if floats:
        dtype = floats[0]
        for d in floats[1:]:
            dtype = torch.promote_types(dtype, d)
    return torch, [torch.as_tensor(x, dtype=dtype, device=tensors[0].device) for x in xs]


def haversine_km(lat1_deg: Array, lon1_deg: Array, lat2_deg: Array, lon2_deg: Array) -> Array:
    """Great-circle distance (km) between points 1 and 2, official OSV-5M formula.

    (...) x 4, broadcast -> (...). numpy: float64; torch: the inputs' float dtype.
    Range [0, pi * 6371] = [0, 20015.09] km. Near antipodes sqrt(1 - a) is ill-conditioned
    (float64: ~1e-4 km of rounding), as in the official code.
    """
    xp, deg = _namespace(lat1_deg, lon1_deg, lat2_deg, lon2_deg)
    lat1, lon1, lat2, lon2 = (xp.deg2rad(x) for x in deg)
    dlat, dlon = lat2 - lat1, lon2 - lon1
    a = xp.sin(dlat / 2) ** 2 + xp.cos(lat1) * xp.cos(lat2) * xp.sin(dlon / 2) ** 2
    # rounding pushes a to 1 + 2e-16 for ~3% of antipodal pairs: sqrt(1 - a) would be NaN
    a = xp.clip(a, 0.0, 1.0)
    return 2 * EARTH_RADIUS_KM * xp.arctan2(xp.sqrt(a), xp.sqrt(1 - a))


def geoscore(dist_km: Array) -> Array:
    """GeoGuessr-style score 5000 * exp(-d / 1492.7) per distance: (...) -> (...), in (0, 5000]."""
    xp, (d,) = _namespace(dist_km)
    return GEOSCORE_MAX * xp.exp(-d / GEOSCORE_SCALE_KM)


def latlon_to_unit(lat_deg: Array, lon_deg: Array) -> Array:
    """Unit vectors (cos lat cos lon, cos lat sin lon, sin lat): (...) x 2, broadcast -> (..., 3)."""
    xp, deg = _namespace(lat_deg, lon_deg)
    lat, lon = (xp.deg2rad(x) for x in deg)
    lat, lon = (np.broadcast_arrays if xp is np else xp.broadcast_tensors)(lat, lon)
    return xp.stack([xp.cos(lat) * xp.cos(lon), xp.cos(lat) * xp.sin(lon), xp.sin(lat)], axis=-1)


def unit_to_latlon(xyz: Array) -> tuple[Array, Array]:
    """Direction of vectors (..., 3), any norm -> (lat_deg, lon_deg), each (...).

    lat in [-90, 90], lon in [-180, 180]. atan2 ignores the norm, so nothing is
    normalised; the zero vector maps to (0, 0).
    """
    xp, (v,) = _namespace(xyz)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return xp.rad2deg(xp.arctan2(z, xp.hypot(x, y))), xp.rad2deg(xp.arctan2(y, x))
