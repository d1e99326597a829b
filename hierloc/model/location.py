"""Location encoders: (lat, lon) degrees -> a trainable feature, Coords_i of HIERLOC.md section 4.

Two fixed bases, each followed by a trainable two-layer MLP (GELU):

- ``rff``: random Fourier features of the unit vector at several fixed scales
  (seeded, stored as a buffer): sin/cos of ``xyz @ b``.
- ``sh``: real spherical harmonics Y_lm up to degree L, (L+1)^2 functions, computed in
  closed form by the fully normalised associated-Legendre recurrence (the basis of
  Russwurm et al. 2024, "Geographic location encoding with spherical harmonics").
  They are orthonormal on the sphere (integral of Y_lm Y_l'm' = delta), smooth, and
  resolve about 20000 km / L; no poles artefacts, unlike sin/cos of raw lat/lon.

Conventions of ``spherical_harmonics``: colatitude theta = 90 deg - lat, azimuth
phi = lon; no Condon-Shortley phase, so for m > 0
Y_lm = sqrt(2) N_lm P_l^m(cos theta) cos(m phi), Y_l,-m = sqrt(2) N_lm P_l^m(cos theta) sin(m phi),
Y_l0 = N_l0 P_l(cos theta), i.e. sqrt(2) (-1)^m Re / Im of scipy's complex ``sph_harm_y``.
Columns are ordered l = 0..L, and within l, m = -l..l.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hierloc.geometry.geo import latlon_to_unit


def sh_index(l: int, m: int) -> int:
    """Column of Y_lm in ``spherical_harmonics``' output (l >= 0, -l <= m <= l)."""
    return l * l + l + m


def spherical_harmonics(lat_deg: torch.Tensor, lon_deg: torch.Tensor, degree: int) -> torch.Tensor:
    """Real orthonormal spherical harmonics up to ``degree``: (...) x 2 -> (..., (degree+1)^2).

    Computed in float64 (the recurrence loses ~l ulps; float32 would make high
    degrees noisy near the poles) and returned in float32.
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    theta = torch.deg2rad(90.0 - lat_deg.double())
    phi = torch.deg2rad(lon_deg.double())
    x, s = torch.cos(theta), torch.sin(theta)  # s >= 0 since theta in [0, pi]
    out: list[torch.Tensor | None] = [None] * (degree + 1) ** 2
    # Fully normalised P-bar_lm = N_lm P_l^m (no Condon-Shortley phase), column by column in m.
    p_mm = torch.full_like(x, 1.0 / math.sqrt(4.0 * math.pi))
    for m in range(degree + 1):
        if m > 0:
            p_mm = math.sqrt((2 * m + 1) / (2 * m)) * s * p_mm
        cos_m, sin_m = (torch.cos(m * phi), torch.sin(m * phi)) if m > 0 else (None, None)
        p_prev, p_cur = None, p_mm
        for l in range(m, degree + 1):
            if l == m + 1:
                p_prev, p_cur = p_cur, math.sqrt(2 * m + 3) * x * p_cur
            elif l > m + 1:
                a = math.sqrt((4 * l * l - 1) / (l * l - m * m))
                b = math.sqrt(((l - 1) ** 2 - m * m) / (4 * (l - 1) ** 2 - 1))
                p_prev, p_cur = p_cur, a * (x * p_cur - b * p_prev)
            if m == 0:
                out[sh_index(l, 0)] = p_cur
            else:
                out[sh_index(l, m)] = math.sqrt(2.0) * p_cur * cos_m
                out[sh_index(l, -m)] = math.sqrt(2.0) * p_cur * sin_m
    return torch.stack(out, dim=-1).float()


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class LocationEncoder(nn.Module):
    """Random Fourier features location encoder: (lat, lon) degrees (..., 2) -> (..., out_dim).

    Random Fourier features of the unit vector at several fixed scales (fixed,
    seeded), followed by a trainable two-layer MLP.
    """

    def __init__(self, out_dim: int, freqs: int, scales: tuple[float, ...], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        b = torch.cat([torch.randn(3, freqs, generator=g) * s for s in scales], dim=1)
        self.register_buffer("b", b)
        self.mlp = _mlp(2 * b.shape[1], out_dim)

    def forward(self, latlon_deg: torch.Tensor) -> torch.Tensor:
        xyz = latlon_to_unit(latlon_deg[..., 0], latlon_deg[..., 1])
        proj = xyz.float() @ self.b
        return self.mlp(torch.cat([proj.sin(), proj.cos()], dim=-1))


class SphericalHarmonicsEncoder(nn.Module):
    """Spherical-harmonics location encoder: (lat, lon) degrees (..., 2) -> (..., out_dim).

    The (degree+1)^2 real harmonics (fixed), followed by a trainable two-layer MLP.

    The basis of the last input tensor is cached (the same tensor object, not modified
    in place since): the model calls this on its constant entity table every step, and
    the float64 recurrence costs more than the MLP after it.
    """

    def __init__(self, out_dim: int, degree: int) -> None:
        super().__init__()
        self.degree = int(degree)
        self.mlp = _mlp((self.degree + 1) ** 2, out_dim)
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def basis(self, latlon_deg: torch.Tensor) -> torch.Tensor:
        """(..., 2) -> (..., (degree+1)^2), no gradient (the harmonics are fixed)."""
        # Holding the input keeps its storage alive, so identity + version is a safe key.
        if self._cache is None or self._cache[0] is not latlon_deg or self._cache[1] != latlon_deg._version:
            with torch.no_grad():
                b = spherical_harmonics(latlon_deg[..., 0], latlon_deg[..., 1], self.degree).to(latlon_deg.device)
            self._cache = (latlon_deg, latlon_deg._version, b)
        return self._cache[2]

    def forward(self, latlon_deg: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.basis(latlon_deg))
