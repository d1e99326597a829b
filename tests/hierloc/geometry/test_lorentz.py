"""Lorentz maths against geoopt's Lorentz(k) and its invariants, float32 and float64."""

import geoopt
import pytest
import torch

from hierloc.geometry import lorentz

CASES = [(seed, dtype, k) for seed in (0, 1) for dtype in (torch.float32, torch.float64) for k in (0.5, 1.0, 2.0)]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}  # invariants
# geoopt clamps norms at 1e-8 and recomputes x0 differently: ~1e-7 relative even in float64.
REF_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}


def _tangent(seed, dtype, n=64, d=16, scale=0.7):
    # |v| ~ 2.8: inside the sinh cap for every K tested; far points are tested separately.
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("seed,dtype,k", CASES)
def test_expmap0_matches_geoopt_and_stays_on_manifold(seed, dtype, k):
    v = _tangent(seed, dtype)
    x = lorentz.expmap0(v, k=k)
    ref = geoopt.Lorentz(k=k).expmap0(torch.cat([torch.zeros_like(v[:, :1]), v], dim=1).double())
    torch.testing.assert_close(x.double(), ref, rtol=REF_TOL[dtype], atol=REF_TOL[dtype])
    # On the hyperboloid: <x, x>_L = -K (relative to x0^2, which is what float keeps).
    err = (lorentz.inner(x, x) + k) / x[:, 0].pow(2)
    assert err.abs().max() < TOL[dtype]


@pytest.mark.parametrize("seed,dtype,k", CASES)
def test_logmap0_inverts_expmap0_and_norm_is_dist0(seed, dtype, k):
    v = _tangent(seed, dtype)
    x = lorentz.expmap0(v, k=k)
    torch.testing.assert_close(lorentz.logmap0(x, k=k), v, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    torch.testing.assert_close(lorentz.logmap0(x, k=k).norm(dim=-1), lorentz.dist0(x, k=k), rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("seed,dtype,k", CASES)
def test_distances_match_geoopt(seed, dtype, k):
    x = lorentz.expmap0(_tangent(seed, dtype, n=8), k=k)
    y = lorentz.expmap0(_tangent(seed + 10, dtype, n=5), k=k)
    ref = geoopt.Lorentz(k=k).dist(x.double()[:, None, :], y.double()[None, :, :])
    sq = lorentz.pairwise_sq_dist(x, y, k=k)
    tol = REF_TOL[dtype]
    torch.testing.assert_close(sq.double(), ref.pow(2), rtol=tol, atol=tol)
    torch.testing.assert_close(lorentz.dist(x[:, None], y[None], k=k).double(), ref, rtol=tol, atol=tol)
    # symmetric, zero on the diagonal, triangle inequality
    dxx = lorentz.dist(x[:, None], x[None], k=k)
    # self-distance floor: the arcosh clamp at 1 + eps gives sqrt(K) * sqrt(2 eps); in float32
    # rounding of x0^2 adds noise of order sqrt(x0^2 * 1e-7), hence the looser bound
    floor = (k * 2 * (1e-5 if dtype == torch.float32 else 1e-7)) ** 0.5
    assert torch.allclose(dxx, dxx.T) and dxx.diagonal().abs().max() < (0.02 if dtype == torch.float32 else 1.5 * floor)
    a, b, c = x[0], x[1], x[2]
    assert lorentz.dist(a, c, k=k) <= lorentz.dist(a, b, k=k) + lorentz.dist(b, c, k=k) + 1e-5


def test_origin_and_zero_vector():
    o = lorentz.expmap0(torch.zeros(3, 4), k=2.0)
    assert torch.allclose(o, torch.tensor([[2.0**0.5, 0, 0, 0, 0]] * 3))
    assert torch.all(lorentz.logmap0(o, k=2.0) == 0)


def test_tangent_norm_is_capped_beyond_asinh_2_15():
    v = torch.zeros(1, 3, dtype=torch.float64)
    v[0, 0] = 100.0
    x = lorentz.expmap0(v, k=1.0)
    assert lorentz.dist0(x, k=1.0).item() == pytest.approx(lorentz.MAX_TANGENT_NORM, rel=1e-9)


def test_huge_tangent_vectors_stay_finite_in_float32():
    v = torch.randn(4, 8) * 1e4
    x = lorentz.expmap0(v, k=1.0)
    assert torch.isfinite(x).all()
    assert torch.isfinite(lorentz.pairwise_sq_dist(x, x, k=1.0)).all()


def test_sq_dist_gradient_finite_for_identical_and_far_points():
    v = torch.randn(6, 8, requires_grad=True)
    x = lorentz.expmap0(v * torch.tensor([[0.0], [0.01], [1.0], [5.0], [10.0], [20.0]]), k=1.0)
    sq = lorentz.pairwise_sq_dist(x, x.detach(), k=1.0)
    sq.sum().backward()
    assert torch.isfinite(v.grad).all()


def test_bf16_autocast_keeps_float32_distances():
    x = lorentz.expmap0(torch.randn(4, 8), k=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sq = lorentz.pairwise_sq_dist(x.bfloat16(), x.bfloat16(), k=1.0)
    assert sq.dtype == torch.float32


def test_poincare_image_inside_ball():
    x = lorentz.expmap0(torch.randn(100, 3) * 3, k=2.0)
    p = lorentz.to_poincare(x, k=2.0)
    assert (p.norm(dim=-1) < 2.0**0.5).all()


def test_check_finite_passes_finite_and_names_the_bad_tensor():
    lorentz.check_finite("ok", torch.randn(3, 4))
    lorentz.check_finite("ints are never NaN", torch.arange(3))
    t = torch.tensor([[1.0, -2.5, float("nan")], [float("inf"), 3.0, float("-inf")]])
    with pytest.raises(FloatingPointError) as err:
        lorentz.check_finite("image points z", t, step=17, context="curvature=1.0")
    msg = str(err.value)
    for part in ("image points z at step 17", "shape (2, 3)", "1 NaN", "1 +inf", "1 -inf", "first bad index (0, 2)",
                 "[-2.5, 3]", "curvature=1.0"):
        assert part in msg, (part, msg)
    with pytest.raises(FloatingPointError, match=r"loss is not finite: shape \(\).*finite values in none"):
        lorentz.check_finite("loss", torch.tensor(float("nan")))


@pytest.mark.parametrize("norm", [0.5, 4.0, 11.0])
@pytest.mark.parametrize("delta", [1e-3, 0.05, 1.0])
def test_sq_dist_exact_matches_50_digits_far_from_the_origin(norm, delta):
    """(delta: the tangent perturbation.) sq_dist_exact against mpmath at 50 digits on the same float64 inputs, where the float64
    inner product (lorentz.dist) loses its digits: at norm 11 it is ~e^22/4 minus a sum as large."""
    mpmath = pytest.importorskip("mpmath")
    g = torch.Generator().manual_seed(int(norm * 100 + delta * 1e4))
    k = 1.7
    v = torch.randn(8, 6, dtype=torch.float64, generator=g)
    x = lorentz.expmap0(v / v.norm(dim=1, keepdim=True) * norm, k=k)
    w = torch.randn(8, 6, dtype=torch.float64, generator=g)
    y = lorentz.expmap0((v / v.norm(dim=1, keepdim=True) * norm) + delta * w / w.norm(dim=1, keepdim=True), k=k)
    got = lorentz.sq_dist_exact(x[:, 1:], y[:, 1:], k=k)
    mpmath.mp.dps = 50
    kk = mpmath.mpf(k)
    for i in range(len(x)):
        xs, ys = [mpmath.mpf(float(t)) for t in x[i, 1:]], [mpmath.mpf(float(t)) for t in y[i, 1:]]
        x0 = mpmath.sqrt(kk + sum(t * t for t in xs))
        y0 = mpmath.sqrt(kk + sum(t * t for t in ys))
        z = (x0 * y0 - sum(a * b for a, b in zip(xs, ys))) / kk
        want = kk * mpmath.acosh(z) ** 2
        assert abs(float(got[i]) - float(want)) <= 1e-12 * float(want)
    if norm == 11.0 and delta == 1e-3:  # pair distances ~0.06: the plain float64 formula is 1000x worse
        plain = lorentz.dist(x, y, k=k).pow(2)
        assert ((plain - got).abs() / got).max() > 1e-9
