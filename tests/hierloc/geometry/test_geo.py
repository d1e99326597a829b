"""hierloc.geometry.geo: the haversine against real OSV-5M numbers, numpy/torch agreement, invariants."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hierloc.geometry.geo import (
    EARTH_RADIUS_KM,
    GEOSCORE_SCALE_KM,
    geoscore,
    haversine_km,
    latlon_to_unit,
    unit_to_latlon,
)

SELECT_CSV = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "select.csv"


@pytest.fixture(scope="module")
def select() -> pd.DataFrame:
    return pd.read_csv(SELECT_CSV, dtype=str, keep_default_na=False, na_filter=False)


def _col(frame: pd.DataFrame, name: str) -> np.ndarray:
    return frame[name].astype(float).to_numpy()


def _random_points(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


@pytest.mark.parametrize("suffix", ["_base", ""])
def test_distance_and_score_equal_select_csv(select, suffix):
    dist_col = "distance_base" if suffix else "distance"
    score_col = "score_base" if suffix else "score"
    d = haversine_km(_col(select, f"pred_lat{suffix}"), _col(select, f"pred_lon{suffix}"),
                     _col(select, "true_lat"), _col(select, "true_lon"))
    assert d.dtype == np.float64 and d.shape == (50,)
    np.testing.assert_allclose(d, _col(select, dist_col), rtol=0, atol=1e-6)
    np.testing.assert_allclose(geoscore(d), _col(select, score_col), rtol=0, atol=1e-6)


def test_torch_and_numpy_agree():
    lat1, lon1 = _random_points(np.random.default_rng(0), 1000)
    lat2, lon2 = _random_points(np.random.default_rng(1), 1000)
    d_np = haversine_km(lat1, lon1, lat2, lon2)
    args64 = [torch.from_numpy(x) for x in (lat1, lon1, lat2, lon2)]
    d64 = haversine_km(*args64)
    assert isinstance(d64, torch.Tensor) and d64.dtype == torch.float64
    np.testing.assert_allclose(d64.numpy(), d_np, rtol=0, atol=1e-9)
    d32 = haversine_km(*(a.float() for a in args64))
    assert d32.dtype == torch.float32
    np.testing.assert_allclose(d32.numpy(), d_np, rtol=0, atol=2.0)  # float32 radians: ~1 km
    np.testing.assert_allclose(geoscore(d64).numpy(), geoscore(d_np), rtol=1e-12)
    # mixed inputs go to torch; broadcasting (B, 1) x (1, C) -> (B, C)
    mixed = haversine_km(torch.from_numpy(lat1[:4, None]), lon1[:4, None], lat2[None, :3], lon2[None, :3])
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (4, 3)
    np.testing.assert_allclose(mixed.numpy(), haversine_km(lat1[:4, None], lon1[:4, None], lat2[None, :3], lon2[None, :3]))


def test_torch_haversine_has_gradients_away_from_zero():
    lat = torch.tensor([10.0, -20.0], dtype=torch.float64, requires_grad=True)
    d = haversine_km(lat, torch.tensor([30.0, 40.0]), torch.tensor([11.0, -25.0]), torch.tensor([31.0, 45.0]))
    d.sum().backward()
    assert torch.isfinite(lat.grad).all()


def test_haversine_invariants():
    rng = np.random.default_rng(2)
    lat1, lon1 = _random_points(rng, 500)
    lat2, lon2 = _random_points(rng, 500)
    d = haversine_km(lat1, lon1, lat2, lon2)
    np.testing.assert_allclose(d, haversine_km(lat2, lon2, lat1, lon1), atol=1e-9)  # symmetric
    np.testing.assert_allclose(haversine_km(lat1, lon1, lat1, lon1), 0.0, atol=0)
    np.testing.assert_allclose(haversine_km(lat1, lon1 + 360.0, lat2, lon2), d, atol=1e-6)  # periodic
    # equals R times the angle between unit vectors
    dot = np.clip((latlon_to_unit(lat1, lon1) * latlon_to_unit(lat2, lon2)).sum(-1), -1, 1)
    np.testing.assert_allclose(d, EARTH_RADIUS_KM * np.arccos(dot), atol=1e-6)
    assert np.all((d >= 0) & (d <= np.pi * EARTH_RADIUS_KM + 1e-9))


def test_haversine_edge_cases():
    # antipodes: a can round above 1; the clamp keeps the result finite and = pi R
    antipodal = haversine_km(np.array([0.0, 45.0, 90.0]), np.array([0.0, 10.0, 0.0]),
                             np.array([0.0, -45.0, -90.0]), np.array([180.0, -170.0, 0.0]))
    np.testing.assert_allclose(antipodal, np.pi * EARTH_RADIUS_KM, rtol=1e-12)
    # random antipodes: for ~3% of them a rounds to 1 + 2e-16 (float64) or above 1 (float32)
    lat, lon = _random_points(np.random.default_rng(5), 2000)
    lat_a, lon_a = -lat, np.where(lon > 0, lon - 180.0, lon + 180.0)
    lat_r, dlon_r = np.radians(lat), np.radians(lon_a - lon)
    a_raw = np.sin(np.radians(lat_a - lat) / 2) ** 2 + np.cos(lat_r) ** 2 * np.sin(dlon_r / 2) ** 2
    assert (a_raw > 1).any()  # the clamp is exercised
    # near antipodes sqrt(1 - a) is ill-conditioned: ~1e-4 km of rounding is expected
    np.testing.assert_allclose(haversine_km(lat, lon, lat_a, lon_a), np.pi * EARTH_RADIUS_KM, atol=1e-3)
    d32 = haversine_km(*(torch.from_numpy(x).float() for x in (lat, lon, lat_a, lon_a)))
    assert torch.isfinite(d32).all()
    # across the antimeridian, and at a pole every longitude is the same point
    assert haversine_km(0.0, 179.5, 0.0, -179.5) == pytest.approx(EARTH_RADIUS_KM * np.radians(1.0))
    assert haversine_km(90.0, 0.0, 90.0, 123.0) == pytest.approx(0.0, abs=1e-9)
    assert haversine_km(0.0, 180.0, 0.0, -180.0) == pytest.approx(0.0, abs=1e-9)
    t = haversine_km(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([180.0]))
    assert torch.isfinite(t).all()


def test_geoscore_values():
    assert geoscore(0.0) == 5000.0
    assert geoscore(GEOSCORE_SCALE_KM) == pytest.approx(5000.0 / np.e)
    scores = geoscore(np.linspace(0, 20000, 50))
    assert np.all(np.diff(scores) < 0) and np.all(scores > 0)


def test_unit_vectors_round_trip():
    lat, lon = _random_points(np.random.default_rng(3), 200)
    xyz = latlon_to_unit(lat, lon)
    assert xyz.shape == (200, 3)
    np.testing.assert_allclose(np.linalg.norm(xyz, axis=-1), 1.0, atol=1e-12)
    lat2, lon2 = unit_to_latlon(3.0 * xyz)  # the norm does not matter
    np.testing.assert_allclose(lat2, lat, atol=1e-9)
    np.testing.assert_allclose(lon2, lon, atol=1e-9)
    xyz_t = latlon_to_unit(torch.from_numpy(lat), torch.from_numpy(lon))
    np.testing.assert_allclose(xyz_t.numpy(), xyz, atol=1e-12)
    lat_t, lon_t = unit_to_latlon(xyz_t)
    np.testing.assert_allclose(lat_t.numpy(), lat, atol=1e-9)


def test_numpy_callers_do_not_import_torch():
    code = (
        "import sys, numpy as np; import hierloc.geometry.geo as g, hierloc.infer.metrics;"
        "g.haversine_km(np.zeros(2), np.zeros(2), np.ones(2), np.ones(2));"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
