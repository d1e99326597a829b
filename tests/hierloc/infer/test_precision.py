"""float32 rankings far from the origin are wrong; the float64 re-score (and a float64 index) are right.

Near points at tangent norm 9: their Lorentz inner product is ~e^18/4 ~ 1.6e7 minus a sum
of the same size, so float32 rounding (~1 in the inner product) swamps pair distances of
0.01-0.1. The index re-scores its k final candidates from float64 copies of the points.
"""

import numpy as np
import pytest
import torch

from hierloc.geometry import lorentz
from hierloc.infer.faiss_levels import has_faiss
from hierloc.infer.search import EntityIndex

K = 1.7  # not 1, so a forgotten K shows
BACKENDS = ["torch", "faiss"] if has_faiss() else ["torch"]


def _exp_at(x: torch.Tensor, v: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Points at geodesic distance ``dist`` from x (..., d+1) in random tangent directions v (float64)."""
    r = K**0.5
    w = v + lorentz.inner(v, x, keepdim=True) / K * x  # tangent at x: <w, x>_L = 0
    u = w / lorentz.inner(w, w, keepdim=True).sqrt()
    return lorentz.projx((torch.cosh(dist / r) * x + r * torch.sinh(dist / r) * u)[..., 1:], k=K)


def far_cluster(n_cities=12, n_q=60, norm=9.0, dim=32, seed=0):
    """One country, n_cities cities 0.02-0.1 from a centre at tangent norm ``norm``, queries
    0.03 from the centre: float64 points (cities, queries), the index's float32 copies."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(dim, dtype=torch.float64, generator=g)
    centre = lorentz.expmap0(c / c.norm() * norm, k=K)
    cities = _exp_at(centre.expand(n_cities, -1), torch.randn(n_cities, dim + 1, dtype=torch.float64, generator=g),
                     0.02 + 0.08 * torch.rand(n_cities, 1, dtype=torch.float64, generator=g))
    qs = _exp_at(centre.expand(n_q, -1), torch.randn(n_q, dim + 1, dtype=torch.float64, generator=g),
                 torch.full((n_q, 1), 0.03, dtype=torch.float64))
    pts = torch.cat([lorentz.expmap0(torch.zeros(1, dim, dtype=torch.float64), k=K), cities])  # the country: the origin
    return pts.float(), qs.float()


def brute_sq(q32: torch.Tensor, pts32: torch.Tensor) -> np.ndarray:
    """float64 brute force from the definition on float64 copies (time coordinates recomputed)."""
    q, p = lorentz.projx(q32.double()[:, 1:], k=K), lorentz.projx(pts32.double()[:, 1:], k=K)
    return (K * torch.acosh((-lorentz.pairwise_inner(q, p) / K).clamp_min(1.0)).pow(2)).numpy()


def _index(pts, n_cities, dtype=torch.float32):
    return EntityIndex(pts, [1, n_cities], np.r_[-1, np.zeros(n_cities, np.int64)], curvature=K, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["beam", "flat"])
def test_float32_ranking_is_wrong_far_out_and_the_rescore_is_right(backend, mode):
    pts, qs = far_cluster()
    idx = _index(pts, 12)
    ref = brute_sq(qs, pts)[:, 1:]  # (Q, 12) city distances
    ref_order = np.argsort(ref, axis=1, kind="stable") + 1  # table rows, nearest first
    raw = idx.search(qs, k=12, mode=mode, backend=backend, rescore=False)
    assert (raw.rows[:, 0] != ref_order[:, 0]).mean() > 0.3  # the float32 inner product picks wrongly
    res = idx.search(qs, k=12, mode=mode, backend=backend)  # re-score on by default
    np.testing.assert_array_equal(res.rows, ref_order)  # every rank, not only the top
    # The float64 brute force itself cancels ~1e-16 * e^18 / 4 in the inner product: atol 1e-9.
    np.testing.assert_allclose(res.sq_dist, np.take_along_axis(ref, ref_order - 1, 1), rtol=1e-6, atol=1e-9)
    assert res.sq_dist.dtype == np.float64
    np.testing.assert_array_equal(res.paths[..., 0], 0)
    np.testing.assert_array_equal(res.paths[..., 1], res.rows)


def test_sum_score_is_rescored_along_the_path():
    pts, qs = far_cluster(seed=1)
    ref = brute_sq(qs, pts)
    res = _index(pts, 12).search(qs, k=12, score="sum", backend="torch")
    want = ref[:, :1] + np.take_along_axis(ref, res.rows, 1)  # country + city, exact
    np.testing.assert_allclose(res.score, want, rtol=1e-6, atol=1e-9)
    assert (np.diff(res.score, axis=1) >= 0).all()
    np.testing.assert_array_equal(res.rows, np.argsort(ref[:, 1:], axis=1, kind="stable") + 1)


def test_euclidean_rescore_is_exact_where_the_expanded_form_cancels():
    # [z, 1] . [2h, -|h|^2] = |z|^2 - |z - h|^2 with |h| ~ 1e3: float32 keeps ~0.06 of it.
    rng = np.random.default_rng(2)
    centre = rng.normal(size=16)
    centre *= 1000 / np.linalg.norm(centre)
    cities = (centre + 0.02 * rng.normal(size=(12, 16))).astype(np.float32)
    qs = (centre + 0.02 * rng.normal(size=(40, 16))).astype(np.float32)
    pts = np.vstack([np.zeros((1, 16), np.float32), cities])
    idx = EntityIndex(pts, [1, 12], np.r_[-1, np.zeros(12, np.int64)], geometry="euclidean")
    ref = ((qs.astype(np.float64)[:, None] - cities.astype(np.float64)[None]) ** 2).sum(-1)
    raw = idx.search(qs, k=12, backend="torch", rescore=False)
    assert (raw.rows[:, 0] != ref.argmin(1) + 1).mean() > 0.3
    res = idx.search(qs, k=12, backend="torch")
    np.testing.assert_array_equal(res.rows, np.argsort(ref, axis=1, kind="stable") + 1)
    np.testing.assert_allclose(res.sq_dist, np.sort(ref, axis=1), rtol=1e-9)


def test_float64_index_finds_what_float32_pruning_misses():
    """The re-score only reorders the k kept: when float32 drops the nearest from the
    top k, only a float64 search finds it."""
    pts, qs = far_cluster(n_cities=60, n_q=80, norm=10.0, seed=3)
    ref = brute_sq(qs, pts)[:, 1:]
    nearest = ref.argmin(1) + 1
    f32 = _index(pts, 60).search(qs, k=3, backend="torch")
    assert (f32.rows[:, 0] != nearest).mean() > 0.2
    idx64 = _index(pts.double(), 60, dtype=torch.float64)
    for rescore in (False, True):
        res = idx64.search(qs.double(), k=3, rescore=rescore)  # auto: the torch kernel
        np.testing.assert_array_equal(res.rows[:, 0], nearest)
    with pytest.raises(ValueError, match="float64"):
        idx64.search(qs.double(), k=3, backend="faiss")
    with pytest.raises(ValueError, match="dtype"):
        EntityIndex(pts, [1, 60], np.r_[-1, np.zeros(60, np.int64)], dtype=torch.float16)


def test_rescore_keeps_missing_beams_last():
    pts, qs = far_cluster(n_cities=4, n_q=5)
    res = _index(pts, 4).search(qs, k=6, backend="torch")
    assert (res.rows[:, 4:] == -1).all() and np.isinf(res.sq_dist[:, 4:]).all()
    assert (res.rows[:, :4] >= 1).all() and np.isfinite(res.sq_dist[:, :4]).all()
