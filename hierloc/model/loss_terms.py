"""The terms of the GWH-InfoNCE loss as functions of tensors (hierloc.model.loss puts them together).

Squared distances in the model's space, great-circle km from unit vectors, the log geographic
weights, the per-level loss from materialised (B, N) matrices (``level_loss_of``) and from points
(``plain_level_loss``), and that function through ``torch.compile`` (``compiled_plain_level_loss``):
on a GPU the materialised level is some 40 elementwise kernels forward and backward over (B, N)
matrices, which the compiler fuses into a few.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F

from hierloc.geometry import lorentz
from hierloc.geometry.geo import EARTH_RADIUS_KM, latlon_to_unit

log = logging.getLogger(__name__)

Kernel = Literal["laplace", "gaussian", "inverse"]
Geometry = Literal["lorentz", "euclidean"]

#: Default number of (B x chunk) elements per chunk of the streamed loss (16 MiB of float32).
CHUNK_ELEMS = 1 << 22
#: Up to this many (B x N_l) elements a level is computed on materialised matrices (fast, ~70 MB
#: per float32 matrix); above, it is streamed over chunks (bounded memory, recomputed in backward).
PLAIN_MAX_ELEMS = 1 << 24


def pairwise_sq_dist(z: torch.Tensor, h: torch.Tensor, *, geometry: Geometry, k: torch.Tensor | float) -> torch.Tensor:
    """Squared distances between all pairs in the model's space: (B, D) x (N, D) -> (B, N), float32+.

    lorentz: K arcosh(-<z,h>_L / K)^2 (hierloc.geometry.lorentz); euclidean: |z - h|^2 (k ignored).
    """
    if geometry == "lorentz":
        return lorentz.pairwise_sq_dist(z, h, k=k)
    if geometry != "euclidean":
        raise ValueError(f"unknown geometry {geometry!r}: expected lorentz or euclidean")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, h = lorentz._upcast(z), lorentz._upcast(h).to(lorentz._upcast(z).dtype)
        # The expanded form can round below zero for near-identical points: clamp.
        return (z.pow(2).sum(-1, keepdim=True) - 2 * z @ h.T + h.pow(2).sum(-1)).clamp_min(0.0)


def unit_xyz(latlon_deg: torch.Tensor) -> torch.Tensor:
    """(..., 2) degrees -> unit vectors (..., 3) in float64 (for geo_km_from_unit)."""
    ll = latlon_deg.double()
    return latlon_to_unit(ll[..., 0], ll[..., 1])


def geo_km_from_unit(a_xyz: torch.Tensor, b_xyz: torch.Tensor) -> torch.Tensor:
    """Great-circle km between all pairs of unit vectors: (B, 3) x (N, 3) float64 -> (B, N) float32.

    One matmul: the chord c = |a - b| gives the haversine's a = c^2 / 4 and
    d = 2 R asin(c / 2), the official OSV-5M formula (hierloc.geometry.geo.haversine_km) to float32
    precision. The dot product and 1 - a.b are float64 because 1 - a.b cancels: in
    float32 points a few km apart would be off by kilometres.
    """
    dot = a_xyz.double() @ b_xyz.double().T
    # Only 1 - a.b cancels; after it float32 keeps full relative precision, so sqrt and asin
    # run in float32 (twice as fast on CPUs). Rounding can put |a.b| a hair above 1: clamp.
    half_chord_sq = ((1.0 - dot) * 0.5).float().clamp_(0.0, 1.0)
    return (2.0 * EARTH_RADIUS_KM) * torch.asin(half_chord_sq.sqrt_())


def log_geo_weight(
    dist_km: torch.Tensor, *, log_lambda: torch.Tensor, sigma_km: torch.Tensor, kernel: Kernel
) -> torch.Tensor:
    """log w = log(1 + lambda * kernel(g / sigma)) for geographic distances g: (...) -> (...).

    laplace: exp(-g/sigma) (the paper's); gaussian: exp(-g^2 / (2 sigma^2));
    inverse: 1 / (1 + g/sigma). Computed as softplus(log lambda + log kernel), stable
    for any g.
    """
    ratio = dist_km / sigma_km
    if kernel == "laplace":
        log_kernel = -ratio
    elif kernel == "gaussian":
        log_kernel = -0.5 * ratio.pow(2)
    elif kernel == "inverse":
        log_kernel = -torch.log1p(ratio)
    else:
        raise ValueError(f"unknown kernel {kernel!r}: expected laplace, gaussian or inverse")
    return F.softplus(log_lambda + log_kernel)


def level_loss_of(sq_dist: torch.Tensor, target: torch.Tensor, geo_km: torch.Tensor | None, tau: torch.Tensor,
                  weight_params: tuple[torch.Tensor, ...], kernel: Kernel) -> torch.Tensor:
    """L_l averaged over the batch: sq_dist (B, N), target (B,) in [0, N) or -1 (ignored), geo_km
    (B, N) km from each image to each entity, weight_params (log_lambda, sigma_km), or () and geo_km
    None for plain InfoNCE."""
    logits = -sq_dist.float() / tau
    if weight_params and geo_km is not None:
        log_lambda, sigma_km = weight_params
        log_w = log_geo_weight(geo_km.float(), log_lambda=log_lambda, sigma_km=sigma_km, kernel=kernel)
        valid = target >= 0
        # The positive's own term is exp(-d+/tau), unweighted: zero its log-weight.
        pos_mask = F.one_hot(target.clamp_min(0), sq_dist.shape[1]).bool() & valid[:, None]
        logits = logits + log_w.masked_fill(pos_mask, 0.0)
    per_row = F.cross_entropy(logits, target, ignore_index=-1, reduction="none")
    return masked_mean(per_row, target >= 0)


def plain_level_loss(z: torch.Tensor, h: torch.Tensor, target: torch.Tensor, img_latlon_deg: torch.Tensor,
                     ent_latlon_deg: torch.Tensor, k: torch.Tensor | float, tau: torch.Tensor,
                     weight_params: tuple[torch.Tensor, ...], *, kernel: Kernel, geometry: Geometry) -> torch.Tensor:
    """L_l from points on materialised (B, N) matrices: z (B, D), h (N, D), target (B,),
    img_latlon_deg (B, 2), ent_latlon_deg (N, 2); weight_params as in ``level_loss_of``."""
    sq = pairwise_sq_dist(z, h, geometry=geometry, k=k)
    geo = geo_km_from_unit(unit_xyz(img_latlon_deg), unit_xyz(ent_latlon_deg)) if weight_params else None
    return level_loss_of(sq, target, geo, tau, weight_params, kernel)


_COMPILED: dict[str, object] = {}


def compiled_plain_level_loss():
    """``plain_level_loss`` through torch.compile (built once per process; a batch of another size
    recompiles once with dynamic shapes). Where the compiler cannot run (no C++ compiler for the
    CPU backend, an unsupported GPU), the first call warns and returns the eager function's value."""
    if "fn" not in _COMPILED:
        compiled = torch.compile(plain_level_loss)

        def guarded(*args, **kwargs):
            if _COMPILED.get("broken"):
                return plain_level_loss(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 (any compiler failure: fall back, loudly)
                log.warning("torch.compile of the loss failed (%s: %s); the eager loss is used instead",
                            type(exc).__name__, exc)
                _COMPILED["broken"] = True
                return plain_level_loss(*args, **kwargs)

        _COMPILED["fn"] = guarded
    return _COMPILED["fn"]


def masked_mean(per_row: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of per_row (B,) over valid rows; 0 when there is none (cross_entropy would give NaN)."""
    return (per_row * valid).sum() / valid.sum().clamp_min(1)
