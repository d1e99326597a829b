"""GWH-InfoNCE: sanity, formula, weighting and gradients."""

import math

import pytest
import torch

from hierloc.geometry import lorentz
from hierloc.model.loss import GeoWeightedInfoNCE, log_geo_weight


def _points(n, d=8, seed=0):
    return lorentz.expmap0(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), k=1.0)


def test_aligned_beats_shuffled():
    h = _points(32)
    z = lorentz.expmap0(lorentz.logmap0(h, k=1.0) + 0.05 * torch.randn(32, 8), k=1.0)
    loss = GeoWeightedInfoNCE(betas=(1.0,))
    target = torch.arange(32)
    aligned, _ = loss([lorentz.pairwise_sq_dist(z, h, k=1.0)], target[:, None], [torch.full((32, 32), 300.0)])
    shuffled, _ = loss([lorentz.pairwise_sq_dist(z, h, k=1.0)], target.roll(5)[:, None], [torch.full((32, 32), 300.0)])
    assert aligned < shuffled


def test_matches_the_formula():
    torch.manual_seed(0)
    sq = torch.rand(4, 6) * 5
    geo = torch.rand(4, 6) * 2000
    target = torch.tensor([0, 3, 5, 1])
    loss = GeoWeightedInfoNCE(betas=(1.0,), tau=0.7, lam=2.0, sigma_km=300.0)
    got = loss.level_loss(sq, target, geo)
    ref = []
    for i in range(4):
        pos = math.exp(-sq[i, target[i]] / 0.7)
        neg = sum((1 + 2.0 * math.exp(-geo[i, k] / 300.0)) * math.exp(-sq[i, k] / 0.7) for k in range(6) if k != target[i])
        ref.append(-math.log(pos / (pos + neg)))
    assert got.item() == pytest.approx(sum(ref) / 4, rel=1e-5)


def test_unweighted_equals_cross_entropy():
    sq = torch.rand(5, 7)
    target = torch.randint(0, 7, (5,))
    loss = GeoWeightedInfoNCE(betas=(1.0,), lam=0.0, tau=0.5)
    ref = torch.nn.functional.cross_entropy(-sq / 0.5, target)
    assert torch.allclose(loss.level_loss(sq, target, torch.zeros(5, 7)), ref)


def test_near_negatives_weigh_more():
    sq = torch.tensor([[0.5, 1.0, 1.0]])
    target = torch.tensor([0])
    loss = GeoWeightedInfoNCE(betas=(1.0,), lam=1.0, sigma_km=100.0)
    near = loss.level_loss(sq, target, torch.tensor([[0.0, 10.0, 10.0]]))
    far = loss.level_loss(sq, target, torch.tensor([[0.0, 5000.0, 5000.0]]))
    assert near > far


@pytest.mark.parametrize("kernel", ["laplace", "gaussian", "inverse"])
def test_kernels_are_between_1_and_1_plus_lambda(kernel):
    g = torch.tensor([0.0, 10.0, 1e3, 1e5])
    w = log_geo_weight(g, log_lambda=torch.tensor(math.log(3.0)), sigma_km=torch.tensor(100.0), kernel=kernel).exp()
    assert torch.all(w >= 1 - 1e-6) and torch.all(w <= 4 + 1e-6)
    assert torch.all(w[:-1] >= w[1:])  # decreasing with distance


def test_ignored_targets_and_positive_params():
    loss = GeoWeightedInfoNCE(betas=(1.0, 0.5))
    sq = [torch.rand(3, 4), torch.rand(3, 5)]
    targets = torch.tensor([[0, -1], [1, 2], [2, 4]])
    total, per_level = loss(sq, targets, [torch.rand(3, 4) * 100, torch.rand(3, 5) * 100])
    assert torch.isfinite(total) and len(per_level) == 2
    total.backward()
    assert torch.isfinite(loss.log_params.grad).all()
    assert loss.tau > 0 and loss.sigma_km > 0


def test_gradients_finite_for_far_apart_points_float32():
    v = (torch.randn(8, 16) * 8).requires_grad_()
    z = lorentz.expmap0(v, k=1.0)
    h = lorentz.expmap0(-torch.randn(10, 16) * 8, k=1.0)
    loss = GeoWeightedInfoNCE(betas=(1.0,))
    total, _ = loss([lorentz.pairwise_sq_dist(z, h, k=1.0)], torch.randint(0, 10, (8, 1)), [torch.rand(8, 10) * 1e4])
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(v.grad).all()


def test_bad_init_rejected():
    with pytest.raises(ValueError, match="tau > 0"):
        GeoWeightedInfoNCE(tau=0.0)
    with pytest.raises(ValueError, match="unknown kernel"):
        log_geo_weight(torch.zeros(1), log_lambda=torch.zeros(()), sigma_km=torch.ones(()), kernel="cubic")


# --- the streamed loss from points (chunked) against the plain formula ------------------------------
from hierloc.geometry.geo import haversine_km  # noqa: E402
from hierloc.model.loss import geo_km_from_unit, unit_xyz  # noqa: E402


def _problem(seed, b=9, n=37, d=6, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zt = (scale * torch.randn(b, d, generator=g, dtype=dtype)).requires_grad_()
    ht = (scale * torch.randn(n, d, generator=g, dtype=dtype)).requires_grad_()
    target = torch.randint(0, n, (b,), generator=g)
    target[1] = -1  # an ignored row
    target[2] = target[3]  # two rows, one positive
    span = torch.tensor([170.0, 360.0])
    img_ll = torch.rand(b, 2, generator=g) * span - span / 2
    ent_ll = torch.rand(n, 2, generator=g) * span - span / 2
    ent_ll[target[4]] = img_ll[4]  # an image at its entity's exact location
    return zt, ht, target, img_ll, ent_ll


def _loss_and_grads(loss, problem, geometry, k, naive, chunk):
    zt, ht, target, img_ll, ent_ll = problem
    for p in (zt, ht, k, loss.log_params):
        p.grad = None
    z, h = (lorentz.expmap0(zt, k=k), lorentz.expmap0(ht, k=k)) if geometry == "lorentz" else (zt, ht)
    val = loss.level_loss_points(z, h, target, img_ll, ent_ll, k=k, geometry=geometry, chunk=chunk, naive=naive)
    val.backward()
    return [val.detach()] + [p.grad.clone() if p.grad is not None else torch.zeros(()) for p in (zt, ht, k, loss.log_params)]


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
@pytest.mark.parametrize("kernel,lam", [("laplace", 2.0), ("gaussian", 0.5), ("inverse", 3.0), ("laplace", 0.0)])
@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_chunked_equals_naive_values_and_gradients(geometry, kernel, lam, chunk):
    loss = GeoWeightedInfoNCE(betas=(1.0,), tau=0.7, lam=lam, sigma_km=400.0, kernel=kernel)
    k = torch.tensor(1.3, requires_grad=True)
    problem = _problem(0)
    ref = _loss_and_grads(loss, problem, geometry, k, True, None)
    got = _loss_and_grads(loss, problem, geometry, k, False, chunk)
    for name, a, b in zip(["loss", "z", "h", "K", "log tau/lambda/sigma"], ref, got):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5, msg=name)
    assert ref[1].abs().sum() > 0 and ref[2].abs().sum() > 0
    if geometry == "lorentz":
        assert ref[3] != 0  # the curvature gets a gradient through the distances


def test_chunked_equals_naive_in_float64():
    loss = GeoWeightedInfoNCE(betas=(1.0,), tau=0.5, lam=1.0).double()
    k = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    problem = _problem(3, dtype=torch.float64)
    ref, got = (_loss_and_grads(loss, problem, "lorentz", k, naive, 4) for naive in (True, False))
    for a, b in zip(ref, got):
        torch.testing.assert_close(b.double(), a.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("naive", [True, False])
def test_gradients_finite_for_distances_50_to_100_float32(naive):
    # K = 20: the sinh cap allows distances up to 2 * sqrt(20) * asinh(2^15) ~ 99 between opposite points.
    k = torch.tensor(20.0, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    zt = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1) * 45).requires_grad_()
    ht = (-torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1) * 45).requires_grad_()
    z, h = lorentz.expmap0(zt, k=k), lorentz.expmap0(ht, k=k)
    d = lorentz.pairwise_sq_dist(z, h, k=k).sqrt()
    assert d.min() > 50 and d.max() < 100
    loss = GeoWeightedInfoNCE(betas=(1.0,), tau=1.0)
    ll = torch.zeros(8, 2), torch.rand(10, 2) * 50
    val = loss.level_loss_points(z, h, torch.randint(0, 10, (8,), generator=g), *ll, k=k, naive=naive, chunk=3)
    val.backward()
    assert torch.isfinite(val) and val > 0
    for t in (zt.grad, ht.grad, k.grad, loss.log_params.grad):
        assert torch.isfinite(t).all()


def test_level_without_targets_contributes_zero():
    loss = GeoWeightedInfoNCE(betas=(1.0,))
    z, h = _points(4), _points(6, seed=1)
    target = torch.full((4,), -1)
    for naive, chunk in ((True, None), (False, 2)):
        val = loss.level_loss_points(z, h, target, torch.zeros(4, 2), torch.zeros(6, 2), naive=naive, chunk=chunk)
        assert val.item() == 0.0


def test_small_levels_take_the_materialised_path_large_ones_stream(monkeypatch):
    """Same value either way; which path runs depends on B x N against the loss's plain_max_elems
    (PLAIN_MAX_ELEMS by default; the training loop sets it from the device's free memory)."""
    import hierloc.model.loss as L

    loss = GeoWeightedInfoNCE(betas=(1.0,))
    z, h = _points(4), _points(6, seed=1)
    target = torch.tensor([0, 1, 2, 3])
    calls = []
    monkeypatch.setattr(L, "chunked_level_loss", lambda *a, **kw: calls.append(1) or torch.zeros(4))
    loss.level_loss_points(z, h, target, torch.zeros(4, 2), torch.zeros(6, 2))
    assert calls == []
    assert loss.plain_max_elems == L.PLAIN_MAX_ELEMS
    loss.plain_max_elems = 4 * 6 - 1
    loss.level_loss_points(z, h, target, torch.zeros(4, 2), torch.zeros(6, 2))
    assert calls == [1]


def test_forward_points_equals_forward_on_matrices():
    loss = GeoWeightedInfoNCE(betas=(1.0, 0.5), tau=0.8, lam=1.5, sigma_km=250.0)
    z, hs = _points(5), [_points(4, seed=1), _points(7, seed=2)]
    lls = [torch.rand(4, 2) * 60, torch.rand(7, 2) * 60]
    img_ll = torch.rand(5, 2) * 60
    targets = torch.tensor([[0, 1], [1, 6], [3, -1], [2, 0], [0, 2]])
    total, per = loss.forward_points(z, hs, targets, img_ll, lls, k=1.0, chunk=3)
    sq = [lorentz.pairwise_sq_dist(z, h, k=1.0) for h in hs]
    geo = [haversine_km(img_ll[:, None, 0], img_ll[:, None, 1], ll[None, :, 0], ll[None, :, 1]) for ll in lls]
    ref_total, ref_per = loss(sq, targets, geo)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    for a, b in zip(per, ref_per):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_geo_km_from_unit_is_the_official_haversine():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, 2, generator=g, dtype=torch.float64) * torch.tensor([180.0, 360.0]) - torch.tensor([90.0, 180.0])
    b = torch.cat([a[:10] + 1e-4, -a[10:20], torch.rand(30, 2, generator=g, dtype=torch.float64) * 50])
    got = geo_km_from_unit(unit_xyz(a), unit_xyz(b))
    assert got.dtype == torch.float32 and got.min() >= 0
    ref = haversine_km(a[:, None, 0], a[:, None, 1], b[None, :, 0], b[None, :, 1])
    # float64 where it cancels, float32 after: metres off the official value (worst near antipodes,
    # where asin is ill-conditioned), irrelevant next to a kernel scale sigma >= 1 km
    err = (got.double() - ref).abs()
    assert err.max() < 0.05 and (err / ref.clamp_min(1.0)).max() < 1e-4
    assert (got[:10, :10].diagonal() < 0.02).all()  # 1e-4 degree apart: ~11 m, not kilometres


def test_chunked_rejects_bad_shapes_and_kernels():
    from hierloc.model.loss import chunked_level_loss

    z, h = _points(3), _points(5)
    xyz3, xyz5 = unit_xyz(torch.zeros(3, 2)), unit_xyz(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="shapes disagree"):
        chunked_level_loss(z, h, torch.zeros(3, dtype=torch.long), xyz3, xyz3, k=1.0, tau=torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown kernel"):
        chunked_level_loss(z, h, torch.zeros(3, dtype=torch.long), xyz3, xyz5, k=1.0, tau=torch.tensor(1.0),
                           kernel="cubic")
