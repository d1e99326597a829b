"""Entity search: our kernel, FAISS and a float64 brute force rank the same; beam == flat when k covers all."""

import numpy as np
import pytest
import torch

from hierloc.geometry import lorentz
from hierloc.infer.beam import beam_probabilities, path_probabilities
from hierloc.infer.search import EntityIndex

K = 1.7  # a curvature other than 1, so a forgotten K shows


def skewed_hierarchy(sizes=(5, 30, 90, 400), dim=6, seed=0, geometry="lorentz"):
    """Random hierarchy with heavy-tailed fan-out; points near their parents."""
    rng = np.random.default_rng(seed)
    off = np.cumsum([0, *sizes])
    parent = np.full(off[-1], -1, dtype=np.int64)
    v = np.zeros((off[-1], dim))
    v[: sizes[0]] = rng.normal(size=(sizes[0], dim))
    for lvl in range(1, len(sizes)):
        w = rng.lognormal(0, 1.2, sizes[lvl - 1])
        local = np.repeat(np.arange(sizes[lvl - 1]), 1 + rng.multinomial(sizes[lvl] - sizes[lvl - 1], w / w.sum()))
        rng.shuffle(local)  # children are not stored grouped by parent in the entity table
        parent[off[lvl] : off[lvl + 1]] = off[lvl - 1] + local
        v[off[lvl] : off[lvl + 1]] = 1.3 * v[off[lvl - 1] + local] + 0.4 * rng.normal(size=(sizes[lvl], dim))
    q = v[off[-2] + rng.integers(0, sizes[-1], 300)] + 0.5 * rng.normal(size=(300, dim))
    if geometry == "lorentz":
        pts = lorentz.expmap0(torch.tensor(v), k=K).float().numpy()
        qs = lorentz.expmap0(torch.tensor(q), k=K).float().numpy()
    else:
        pts, qs = v.astype(np.float32), q.astype(np.float32)
    return list(sizes), parent, pts, qs


def brute_sq_dist(q, pts, geometry):
    """float64 squared distances (B, N), straight from the definitions."""
    q, pts = q.astype(np.float64), pts.astype(np.float64)
    if geometry == "euclidean":
        return ((q[:, None, :] - pts[None]) ** 2).sum(-1)
    ip = -q[:, :1] * pts[None, :, 0] + q[:, 1:] @ pts[:, 1:].T
    return K * np.arccosh(np.maximum(-ip / K, 1.0)) ** 2


def brute_beam(q, pts, sizes, parent, k, score):
    """Per-query reference beam search in float64 (a plain loop: slow, obviously right)."""
    off = np.cumsum([0, *sizes])
    d = brute_sq_dist(q, pts, "lorentz" if pts.shape[1] == q.shape[1] and np.all(pts[:, 0] > 0) else "euclidean")
    out = []
    for b in range(len(q)):
        cand = list(range(off[0], off[1]))
        acc = {r: d[b, r] for r in cand}
        for lvl in range(1, len(sizes)):
            kept = sorted(cand, key=lambda r: acc[r])[:k]
            cand = [r for r in range(off[lvl], off[lvl + 1]) if parent[r] in set(kept)]
            acc = {r: d[b, r] + (acc[parent[r]] if score == "sum" else 0.0) for r in cand}
        out.append(sorted(cand, key=lambda r: acc[r])[:k])
    return out


def assert_same_ranking(rows, ref_rows, d, tol=1e-4):
    """Equal rankings; a swap is tolerated only between near-tied entities (float32 rounding)."""
    for b, (got, want) in enumerate(zip(rows, ref_rows)):
        got = [r for r in got if r >= 0]
        assert len(got) == len(want), b
        for g, w in zip(got, want):
            assert g == w or abs(d[b, g] - d[b, w]) <= tol * (1 + d[b, w]), (b, got, want)


@pytest.fixture(scope="module", params=["lorentz", "euclidean"])
def case(request):
    sizes, parent, pts, q = skewed_hierarchy(geometry=request.param)
    idx = EntityIndex(pts, sizes, parent, geometry=request.param, curvature=K)
    return request.param, sizes, parent, pts, q, idx


@pytest.mark.parametrize("k", [1, 3, 10])
def test_beam_matches_brute_force_torch_and_faiss(case, k):
    geometry, sizes, parent, pts, q, idx = case
    ref = brute_beam(q, pts, sizes, parent, k, "last")
    d = brute_sq_dist(q, pts, geometry)
    backends = ["torch", "faiss"]
    results = {be: idx.search(q, k=k, backend=be, batch_size=37) for be in backends}
    for be in backends:
        assert_same_ranking(results[be].rows, ref, d)
    agree = (results["torch"].rows == results["faiss"].rows).mean()
    assert agree > 0.99  # only near-ties may differ between the two float32 kernels


def test_beam_sum_score_matches_brute_force(case):
    geometry, sizes, parent, pts, q, idx = case
    res = idx.search(q[:80], k=4, score="sum", backend="torch")
    ref = brute_beam(q[:80], pts, sizes, parent, 4, "sum")
    d = brute_sq_dist(q[:80], pts, geometry)
    path_sum = np.zeros_like(d)
    for b in range(len(ref)):
        for r in range(d.shape[1]):
            x, s = r, 0.0
            while x >= 0:
                s, x = s + d[b, x], parent[x]
            path_sum[b, r] = s
    assert_same_ranking(res.rows, ref, path_sum)
    np.testing.assert_allclose(res.score[:, 0], path_sum[np.arange(80), res.rows[:, 0]], rtol=1e-4)


@pytest.mark.parametrize("score", ["last", "sum"])
def test_beam_equals_flat_when_k_covers_everything(case, score):
    _, sizes, _, _, q, idx = case
    k = max(sizes)
    beam = idx.search(q, k=k, mode="beam", score=score, backend="torch")
    flat = idx.search(q, k=k, mode="flat", score=score, backend="torch")
    # Far down the list, float32 rounding (a matmul here, a row-wise dot there) may swap near-ties.
    assert np.array_equal(beam.rows[:, :10], flat.rows[:, :10])
    s = np.full((len(q), sum(sizes)), np.inf)
    np.put_along_axis(s, flat.rows, flat.score, 1)
    assert_same_ranking(beam.rows, flat.rows, s, tol=1e-5)
    np.testing.assert_allclose(np.sort(beam.score, 1), np.sort(flat.score, 1), rtol=1e-4, atol=1e-4)


def test_flat_faiss_equals_flat_torch(case):
    geometry, _, _, pts, q, idx = case
    a = idx.search(q, k=5, mode="flat", backend="torch")
    b = idx.search(q, k=5, mode="flat", backend="faiss")
    off = sum(idx.level_sizes[:-1])
    d = brute_sq_dist(q, pts, geometry)
    ref = np.argsort(d[:, off:], axis=1, kind="stable")[:, :5] + off
    assert_same_ranking(a.rows, ref, d)
    assert_same_ranking(b.rows, ref, d)


def test_paths_distances_and_counts(case):
    geometry, sizes, parent, pts, q, idx = case
    res = idx.search(q, k=3, backend="torch")
    d = brute_sq_dist(q, pts, geometry)
    np.testing.assert_allclose(res.sq_dist, np.take_along_axis(d, res.rows, 1), rtol=2e-3, atol=1e-4)
    assert np.all(np.diff(res.sq_dist, axis=1) >= -1e-4 * (1 + res.sq_dist[:, 1:]))
    for lvl in range(len(sizes) - 1, 0, -1):
        assert np.array_equal(parent[res.paths[..., lvl]], res.paths[..., lvl - 1])
    # Entities scored: all countries, then the children of the kept beams.
    assert np.all(res.n_scored >= sizes[0]) and np.all(res.n_scored < sum(sizes))


def test_missing_beams_are_padded_not_invented():
    # Two countries, one region each, one city each: a beam of 5 has only 2 results.
    pts = lorentz.expmap0(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), k=1.0).numpy()
    idx = EntityIndex(pts, [2, 2, 2], np.array([-1, -1, 0, 1, 2, 3]))
    for be in ("torch", "faiss"):
        res = idx.search(pts[4:5], k=5, backend=be)
        assert list(res.rows[0]) == [4, 5, -1, -1, -1] or list(res.rows[0]) == [5, 4, -1, -1, -1]
        assert np.isinf(res.sq_dist[0, 2:]).all() and (res.paths[0, 2:] == -1).all()
        assert res.rows[0, 0] == 4  # the query is city 4 itself


def test_bad_inputs_are_refused():
    pts = lorentz.expmap0(torch.randn(4, 3), k=1.0).numpy()
    with pytest.raises(ValueError, match="parent"):
        EntityIndex(pts, [2, 2], np.array([-1, -1, 3, 0]))  # a parent on the same level
    idx = EntityIndex(pts, [2, 2], np.array([-1, -1, 0, 0]))
    with pytest.raises(ValueError, match=r"queries must be \(B, 4\)"):
        idx.search(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="score='last'"):
        idx.search(pts, score="sum", backend="faiss")
    with pytest.raises(ValueError, match="k must be"):
        idx.search(pts, k=0)


def test_index_memory_is_the_keys_plus_small_maps():
    sizes, parent, pts, _ = skewed_hierarchy()
    idx = EntityIndex(pts, sizes, parent)
    # keys as large as the points, plus one int64 row map and two int64 CSR arrays per entity at most
    assert pts.nbytes <= idx.nbytes() <= pts.nbytes + 3 * 8 * len(pts)


def test_probabilities_are_a_distribution_and_coarser_levels_are_likelier(case):
    _, _, _, _, q, idx = case
    res = idx.search(q, k=10, backend="torch")
    probs = beam_probabilities(res.score, tau=0.5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-9)
    assert np.all(np.diff(probs, axis=1) <= 1e-12)  # best beam, highest probability
    picks = res.paths[:, 0, :]
    level_p = path_probabilities(res.paths, probs, picks)
    assert np.all(np.diff(level_p, axis=1) <= 1e-12)  # country >= region >= subregion >= city
    np.testing.assert_allclose(level_p[:, -1], probs[:, 0])
    # A colder temperature sharpens: the top beam's probability grows.
    assert np.all(beam_probabilities(res.score, tau=0.05)[:, 0] >= probs[:, 0] - 1e-12)


def test_probabilities_ignore_missing_beams():
    p = beam_probabilities(np.array([[1.0, 2.0, np.inf], [np.inf, np.inf, np.inf]]), tau=1.0)
    np.testing.assert_allclose(p[0], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0])
    assert (p[1] == 0).all()
    with pytest.raises(ValueError, match="tau"):
        beam_probabilities(p, tau=0.0)


def test_bad_search_arguments_are_refused():
    pts = lorentz.expmap0(torch.randn(4, 3), k=1.0).numpy()
    idx = EntityIndex(pts, [2, 2], np.array([-1, -1, 0, 0]))
    for kwargs in ({"mode": "greedy"}, {"backend": "annoy"}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="must be|use beam"):
            idx.search(pts, **kwargs)
