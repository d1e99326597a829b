"""GWH-InfoNCE: sanity, formula, weighting and gradients."""

import math

import pytest
import torch

from hierloc import lorentz
from hierloc.loss import GeoWeightedInfoNCE, log_geo_weight


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
