"""Geo-Weighted Hyperbolic InfoNCE (GWH-InfoNCE), HIERLOC.md section 6.

Per level l, with the true entity's squared distance d+ and every other entity k
of that level as a negative with squared distance d-_k:

    L_l = -log( exp(-d+/tau) / (exp(-d+/tau) + sum_k w_k exp(-d-_k/tau)) )
    w_k = 1 + lambda * kernel(g_k / sigma),   g_k = haversine km, image -> entity k

Written as a cross-entropy over logits ``-d/tau + log w`` with ``log w = 0`` on the
positive column, which is exactly the formula above. tau, lambda and sigma are
learnable and stored as logs (always positive). The loss takes distances, never
the model: it is its own module, as in open_clip.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Kernel = Literal["laplace", "gaussian", "inverse"]


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


class GeoWeightedInfoNCE(nn.Module):
    """Sum over levels of beta_l * L_l; learnable tau, lambda, sigma shared by levels.

    Args:
        betas: per-level weights beta_l (coarse to fine).
        tau, lam, sigma_km: initial values (GAP in the paper: see README).
        kernel: geographic weighting kernel.
        learnable: train tau/lambda/sigma (else fixed buffers).
        weighted: False gives plain InfoNCE (w_k = 1; the paper's lambda = 0 ablation).
    """

    def __init__(
        self,
        betas: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        tau: float = 1.0,
        lam: float = 1.0,
        sigma_km: float = 500.0,
        kernel: Kernel = "laplace",
        learnable: bool = True,
        weighted: bool = True,
    ) -> None:
        super().__init__()
        if min(tau, sigma_km) <= 0 or lam < 0:
            raise ValueError(f"need tau > 0, sigma_km > 0, lam >= 0; got {tau}, {sigma_km}, {lam}")
        self.kernel: Kernel = kernel
        self.weighted = weighted and lam > 0
        self.register_buffer("betas", torch.tensor(list(betas), dtype=torch.float32))
        init = torch.tensor(
            [math.log(tau), math.log(max(lam, 1e-12)), math.log(sigma_km)], dtype=torch.float32
        )
        if learnable:
            self.log_params = nn.Parameter(init)
        else:
            self.register_buffer("log_params", init)

    @property
    def tau(self) -> torch.Tensor:
        # Clamped so a runaway temperature cannot make logits overflow (MERU clamps too).
        return self.log_params[0].clamp(math.log(1e-3), math.log(100.0)).exp()

    @property
    def log_lambda(self) -> torch.Tensor:
        return self.log_params[1].clamp(max=math.log(1e3))

    @property
    def sigma_km(self) -> torch.Tensor:
        # Between 1 km and half the Earth's circumference.
        return self.log_params[2].clamp(0.0, math.log(20_000.0)).exp()

    def level_loss(
        self, sq_dist: torch.Tensor, target: torch.Tensor, geo_km: torch.Tensor | None
    ) -> torch.Tensor:
        """L_l averaged over the batch: sq_dist (B, N), target (B,) in [0, N) or -1 (ignored),
        geo_km (B, N) haversine km from each image to each entity (None: unweighted)."""
        logits = -sq_dist.float() / self.tau
        if self.weighted and geo_km is not None:
            log_w = log_geo_weight(
                geo_km.float(), log_lambda=self.log_lambda, sigma_km=self.sigma_km, kernel=self.kernel
            )
            valid = target >= 0
            # The positive's own term is exp(-d+/tau), unweighted: zero its log-weight.
            pos_mask = F.one_hot(target.clamp_min(0), sq_dist.shape[1]).bool() & valid[:, None]
            logits = logits + log_w.masked_fill(pos_mask, 0.0)
        return F.cross_entropy(logits, target, ignore_index=-1)

    def forward(
        self,
        sq_dists: Sequence[torch.Tensor],
        targets: torch.Tensor,
        geo_km: Sequence[torch.Tensor | None],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Total loss and per-level losses. targets (B, L) local entity indices per level."""
        per_level = [
            self.level_loss(d, targets[:, lvl], geo_km[lvl]) for lvl, d in enumerate(sq_dists)
        ]
        total = sum(b * l for b, l in zip(self.betas, per_level))
        return total, per_level
