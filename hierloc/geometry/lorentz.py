"""Lorentz (hyperboloid) model of hyperbolic space, as pure tensor functions.

Convention (geoopt's ``Lorentz(k=K)``, stated once here and used everywhere):
points are ``x in R^(d+1)`` with the time coordinate first and
``<x, x>_L = -K``, where ``<x, y>_L = -x0*y0 + sum_i xi*yi``. The curvature is
``-1/K``; the origin is ``o = (sqrt(K), 0, ..., 0)``; distances are
``d(x, y) = sqrt(K) * arcosh(-<x, y>_L / K)``.

Tangent vectors at the origin have a zero time coordinate, so functions here take
and return only their ``d`` space components. Every function computes in at least
float32, also under bf16/fp16 autocast, because the hyperboloid loses precision
fast (x0 grows like exp(|v|)).
"""

from __future__ import annotations

import math

import torch

#: sinh/cosh arguments are capped here: exp(asinh(2^15)) is ~6.5e4, far from
#: float32 overflow, and points further out carry no usable precision (MERU does the same).
MAX_TANGENT_NORM = math.asinh(2.0**15)


def _eps(dtype: torch.dtype) -> float:
    # Smallest margin above 1 for arcosh: its derivative 1/sqrt(z^2-1) is finite there.
    return 1e-7 if dtype == torch.float64 else 1e-5


def _k(k: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(k, dtype=like.dtype, device=like.device)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def time_coord(x_space: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """Time coordinate that puts a space part on the hyperboloid: (..., d) -> (..., 1)."""
    x_space = _upcast(x_space)
    return torch.sqrt(_k(k, x_space) + x_space.pow(2).sum(-1, keepdim=True))


def projx(x_space: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """Lift space components onto the hyperboloid: (..., d) -> (..., d+1)."""
    x_space = _upcast(x_space)
    return torch.cat([time_coord(x_space, k=k), x_space], dim=-1)


def inner(x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
    """Lorentz inner product, elementwise over leading dims: (..., d+1) x (..., d+1) -> (...)."""
    prod = x * y
    out = prod[..., 1:].sum(-1, keepdim=keepdim) - (
        prod[..., :1] if keepdim else prod[..., 0]
    )
    return out


def pairwise_inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """All Lorentz inner products: (B, d+1) x (N, d+1) -> (B, N).

    One matmul: negating y's time coordinate turns the dot product into <x, y>_L
    (the trick the paper uses for FAISS inner-product search).
    """
    y_neg = torch.cat([-y[:, :1], y[:, 1:]], dim=-1)
    return x @ y_neg.T


def expmap0(v_space: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """Exponential map at the origin: tangent space part (..., d) -> point (..., d+1).

    exp_o(v) = (R cosh(|v|/R), R sinh(|v|/R) v/|v|), R = sqrt(K).
    """
    v_space = _upcast(v_space)
    with torch.autocast(device_type=v_space.device.type, enabled=False):
        kk = _k(k, v_space)
        r = torch.sqrt(kk)
        norm = v_space.norm(dim=-1, keepdim=True)
        # A zero vector maps to the origin: the clamp only avoids 0/0 in v/|v|.
        norm_safe = norm.clamp_min(1e-12)
        # Cap the angle so sinh/cosh stay finite in float32 (see MAX_TANGENT_NORM).
        theta = (norm / r).clamp_max(MAX_TANGENT_NORM)
        space = r * torch.sinh(theta) * v_space / norm_safe
        # The time coordinate is recomputed from the space part so the point lies
        # exactly on the hyperboloid, whatever rounding sinh did.
        return projx(space, k=kk)


def logmap0(x: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """Logarithmic map at the origin: point (..., d+1) -> tangent space part (..., d).

    log_o(x) = R arcosh(x0/R) x_space / |x_space|, R = sqrt(K).
    """
    x = _upcast(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        kk = _k(k, x)
        r = torch.sqrt(kk)
        space = x[..., 1:]
        space_norm = space.norm(dim=-1, keepdim=True)
        # Recompute x0 from the space part: cheaper to trust than a drifted x0, and
        # it makes arcosh's argument >= 1 by construction (clamped for rounding).
        z = (time_coord(space, k=kk) / r).clamp_min(1.0 + _eps(x.dtype))
        # At the origin space_norm is 0; the clamp avoids 0/0 and gives 0 there.
        return r * torch.acosh(z) * space / space_norm.clamp_min(1e-12)


def dist(x: torch.Tensor, y: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """Geodesic distance, elementwise: (..., d+1) x (..., d+1) -> (...)."""
    x, y = _upcast(x), _upcast(y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        kk = _k(k, x)
        # -<x,y>/K >= 1 on the manifold; rounding can push it below: clamp.
        z = (-inner(x, y) / kk).clamp_min(1.0 + _eps(x.dtype))
        return torch.sqrt(kk) * torch.acosh(z)


def dist0(x: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """Distance to the origin: (..., d+1) -> (...). Equals |logmap0(x)|."""
    x = _upcast(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        kk = _k(k, x)
        r = torch.sqrt(kk)
        z = (time_coord(x[..., 1:], k=kk)[..., 0] / r).clamp_min(1.0 + _eps(x.dtype))
        return r * torch.acosh(z)


def pairwise_sq_dist(x: torch.Tensor, y: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """Squared geodesic distances between all pairs: (B, d+1) x (N, d+1) -> (B, N).

    The loss uses squared distances (HIERLOC.md section 6). The gradient of
    K*arcosh(z)^2 tends to 2K as z -> 1, so it stays finite for identical points.
    """
    x, y = _upcast(x), _upcast(y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        kk = _k(k, x)
        z = (-pairwise_inner(x, y.to(x.dtype)) / kk).clamp_min(1.0 + _eps(x.dtype))
        return kk * torch.acosh(z).pow(2)


def sq_dist_exact(x_space: torch.Tensor, y_space: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """Squared geodesic distance from space parts only, elementwise, in float64: (..., d) x (..., d) -> (...).

    Accurate to float64 rounding at every distance and tangent norm (the search's
    re-score, hierloc.infer.search). ``-<x,y>_L/K = 1 + u`` with
    ``u = (|xs - ys|^2 - (x0 - y0)^2) / (2K)``, the time coordinates recomputed from
    the space parts and ``x0 - y0 = (xs - ys).(xs + ys) / (x0 + y0)``: no difference of
    two large numbers, whereas ``-<x,y>_L`` itself is ~x0*y0 (~e^(2|v|)) minus a sum
    of the same size. ``arcosh(1 + u) = log1p(u + sqrt(u (u + 2)))``.
    """
    xs, ys = x_space.double(), y_space.to(x_space.device).double()
    kk = torch.as_tensor(k, dtype=torch.float64, device=xs.device)
    x0, y0 = time_coord(xs, k=kk)[..., 0], time_coord(ys, k=kk)[..., 0]
    diff = xs - ys
    dt = (diff * (xs + ys)).sum(-1) / (x0 + y0)
    u = ((diff.pow(2).sum(-1) - dt.pow(2)) / (2 * kk)).clamp_min(0.0)  # >= 0 up to rounding: clamp
    return kk * torch.log1p(u + torch.sqrt(u * (u + 2))).pow(2)


def to_poincare(x: torch.Tensor, *, k: torch.Tensor | float) -> torch.Tensor:
    """Map hyperboloid points to the Poincare ball of radius sqrt(K): (..., d+1) -> (..., d)."""
    x = _upcast(x)
    r = torch.sqrt(_k(k, x))
    return r * x[..., 1:] / (x[..., :1] + r)


def check_finite(name: str, tensor: torch.Tensor, *, step: int | None = None, context: str = "") -> None:
    """Raise FloatingPointError if ``tensor`` holds NaN or +-inf; return None otherwise.

    The message names the tensor, the step (when given), its shape, how many values
    are NaN / +inf / -inf, the first bad index and the range of the finite values, and
    ``context`` (e.g. the model's scalars). One ``isfinite().all()`` (one device sync)
    when everything is finite; the diagnostic is only computed on failure.
    """
    t = tensor.detach()
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return
    t = t.float()
    bad = ~torch.isfinite(t)
    first = tuple(int(i) for i in torch.nonzero(bad)[0]) if t.ndim else ()
    finite = t[~bad]
    rng = f"[{finite.min().item():.4g}, {finite.max().item():.4g}]" if finite.numel() else "none"
    where = f" at step {step}" if step is not None else ""
    raise FloatingPointError(
        f"{name}{where} is not finite: shape {tuple(t.shape)}, {int(torch.isnan(t).sum())} NaN, "
        f"{int(torch.isposinf(t).sum())} +inf, {int(torch.isneginf(t).sum())} -inf of {t.numel()} values; "
        f"first bad index {first}; finite values in {rng}. {context + ' ' if context else ''}"
        "Lower the learning rate, check the input features, or train in float64 to find the first bad operation."
    )
