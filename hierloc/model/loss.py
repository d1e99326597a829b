"""Geo-Weighted Hyperbolic InfoNCE (GWH-InfoNCE), HIERLOC.md section 6.

Per level l, with the true entity's squared distance d+ and every other entity k
of that level as a negative with squared distance d-_k:

    L_l = -log( exp(-d+/tau) / (exp(-d+/tau) + sum_k w_k exp(-d-_k/tau)) )
    w_k = 1 + lambda * kernel(g_k / sigma),   g_k = haversine km, image -> entity k

Written as a cross-entropy over logits ``-d/tau + log w`` with ``log w = 0`` on the
positive column, which is exactly the formula above. tau, lambda and sigma are
learnable and stored as logs (always positive). The loss takes distances or points,
never the model: it is its own module, as in open_clip.

Two entry points with the same value:

- ``forward(sq_dists, targets, geo_km)`` / ``level_loss``: the plain formula over
  materialised (B, N) squared distances and haversine matrices (the reference).
- ``forward_points(z, h_levels, targets, img_latlon_deg, ent_latlon_levels, k=, geometry=)``
  / ``level_loss_points``: from points, streamed over chunks of entities
  (``chunked_level_loss``): never more than (B x chunk) logits, distances or weights
  alive at once, also in the backward pass, which recomputes each chunk; equal to
  the plain formula to float32 rounding, values and gradients (tests check both).
  ``naive=True`` runs the plain formula on the same inputs (for tests and benchmarks).

A level where no row has a target (all -1) contributes 0 (not NaN).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from hierloc.geometry import lorentz
from hierloc.model.loss_terms import (  # noqa: F401 (the loss's public names, defined with the other terms)
    CHUNK_ELEMS, PLAIN_MAX_ELEMS, Geometry, Kernel, compiled_plain_level_loss, geo_km_from_unit, level_loss_of,
    log_geo_weight, masked_mean, pairwise_sq_dist, plain_level_loss, unit_xyz,
)


class GeoWeightedInfoNCE(nn.Module):
    """Sum over levels of beta_l * L_l; learnable tau, lambda, sigma shared by levels.

    Args:
        betas: per-level weights beta_l (coarse to fine).
        tau, lam, sigma_km: initial values (GAP in the paper: see docs/method.md).
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
        # Materialised up to this many (B x N_l) elements, streamed above (level_loss_points); the
        # training loop sets it from the device's free memory (hierloc.device.plain_loss_max_elems).
        self.plain_max_elems = PLAIN_MAX_ELEMS
        # The materialised path through torch.compile (fused elementwise work; the training loop
        # turns it on on CUDA: TrainConfig.compile). Same formula, float32 rounding apart.
        self.compiled = False

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
        weights = (self.log_lambda, self.sigma_km) if self.weighted and geo_km is not None else ()
        return level_loss_of(sq_dist, target, geo_km, self.tau, weights, self.kernel)

    def _weight_params(self) -> tuple[torch.Tensor, ...]:
        return (self.log_lambda, self.sigma_km) if self.weighted else ()

    def level_loss_points(
        self,
        z: torch.Tensor,
        h: torch.Tensor,
        target: torch.Tensor,
        img_latlon_deg: torch.Tensor,
        ent_latlon_deg: torch.Tensor,
        *,
        k: torch.Tensor | float = 1.0,
        geometry: Geometry = "lorentz",
        chunk: int | None = None,
        naive: bool = False,
    ) -> torch.Tensor:
        """L_l from points: z (B, D) images, h (N, D) the level's entities, target (B,) in
        [0, N) or -1, img_latlon_deg (B, 2), ent_latlon_deg (N, 2), k the curvature K.

        Streamed over ``chunk`` entities at a time (default CHUNK_ELEMS / B) when B x N is above
        ``self.plain_max_elems`` (PLAIN_MAX_ELEMS, or what the device's memory allows) or ``chunk``
        is given; otherwise, and with ``naive=True``, the (B, N) matrices are materialised and
        ``level_loss`` is called (same values; faster when they fit).
        """
        if naive or (chunk is None and z.shape[0] * h.shape[0] <= self.plain_max_elems):
            fn = compiled_plain_level_loss() if self.compiled and not naive else plain_level_loss
            return fn(z, h, target, img_latlon_deg, ent_latlon_deg, k, self.tau, self._weight_params(),
                      kernel=self.kernel, geometry=geometry)
        per_row = chunked_level_loss(
            z, h, target, unit_xyz(img_latlon_deg), unit_xyz(ent_latlon_deg), k=k, tau=self.tau,
            weight_params=self._weight_params(), kernel=self.kernel, geometry=geometry, chunk=chunk,
        )
        return masked_mean(per_row, target >= 0)

    def forward_points(
        self,
        z: torch.Tensor,
        h_levels: Sequence[torch.Tensor],
        targets: torch.Tensor,
        img_latlon_deg: torch.Tensor,
        ent_latlon_levels: Sequence[torch.Tensor],
        *,
        k: torch.Tensor | float = 1.0,
        geometry: Geometry = "lorentz",
        chunk: int | None = None,
        naive: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Total loss and per-level losses from points (the streamed loss; see level_loss_points).

        z (B, D) image points; h_levels[l] (N_l, D) entity points of level l; targets (B, L)
        local indices per level (-1 ignored); img_latlon_deg (B, 2); ent_latlon_levels[l] (N_l, 2).
        """
        per_level = [
            self.level_loss_points(z, h, targets[:, lvl], img_latlon_deg, ll, k=k, geometry=geometry,
                                   chunk=chunk, naive=naive)
            for lvl, (h, ll) in enumerate(zip(h_levels, ent_latlon_levels))
        ]
        total = sum(b * l for b, l in zip(self.betas, per_level))
        return total, per_level

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


def _chunk_logits(
    z: torch.Tensor, h: torch.Tensor, cols: torch.Tensor, target: torch.Tensor, img_xyz: torch.Tensor,
    ent_xyz: torch.Tensor, k: torch.Tensor, tau: torch.Tensor, weight_params: tuple[torch.Tensor, ...],
    kernel: Kernel, geometry: Geometry,
) -> torch.Tensor:
    """Logits -d/tau + log w of one chunk of entities (B, C); log w = 0 on each row's positive."""
    logits = -pairwise_sq_dist(z, h, geometry=geometry, k=k) / tau
    if weight_params:
        log_lambda, sigma_km = weight_params
        log_w = log_geo_weight(geo_km_from_unit(img_xyz, ent_xyz), log_lambda=log_lambda, sigma_km=sigma_km,
                               kernel=kernel)
        logits = logits + log_w.masked_fill(target[:, None] == cols[None, :], 0.0)
    return logits


class _StreamedInfoNCE(torch.autograd.Function):
    """Per-row loss logsumexp_j(s_ij) - s_i,t_i, streamed over chunks of columns.

    forward: a running (max, sum of exp) per row over the chunks, no autograd.
    backward: recomputes each chunk's logits s with autograd on detached inputs and
    pulls back ds = g_i (softmax_ij - [j = t_i]) through them; memory O(B x chunk).
    """

    @staticmethod
    def forward(ctx, spec: dict, z, h, k, tau, *weight_params):  # noqa: ANN001 (autograd signature)
        target, img_xyz, ent_xyz, chunk = spec["target"], spec["img_xyz"], spec["ent_xyz"], spec["chunk"]
        n, b, dt = h.shape[0], z.shape[0], z.dtype
        run_max = torch.full((b,), -math.inf, dtype=dt, device=z.device)
        run_sum = torch.zeros(b, dtype=dt, device=z.device)
        pos = torch.zeros(b, dtype=dt, device=z.device)
        for s in range(0, n, chunk):
            cols = torch.arange(s, min(n, s + chunk), device=z.device)
            lg = _chunk_logits(z, h[s : s + chunk], cols, target, img_xyz, ent_xyz[s : s + chunk], k, tau,
                               weight_params, spec["kernel"], spec["geometry"]).to(dt)
            new_max = torch.maximum(run_max, lg.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(lg - new_max[:, None]).sum(dim=1)
            run_max = new_max
            hit = (target >= s) & (target < s + len(cols))
            pos = torch.where(hit, lg.gather(1, (target - s).clamp(0, len(cols) - 1)[:, None])[:, 0], pos)
        lse = run_max + torch.log(run_sum)
        ctx.spec = spec
        ctx.save_for_backward(z, h, k, tau, lse, *weight_params)
        return lse - pos

    @staticmethod
    def backward(ctx, g_row):  # noqa: ANN001
        z, h, k, tau, lse, *weight_params = ctx.saved_tensors
        spec = ctx.spec
        target, img_xyz, ent_xyz, chunk = spec["target"], spec["img_xyz"], spec["ent_xyz"], spec["chunk"]
        inputs = [z, k, tau, *weight_params]
        need = list(ctx.needs_input_grad[1:])  # z, h, k, tau, *weight_params
        need_in = [need[0], *need[2:]]
        grads = [torch.zeros_like(t) if nd else None for t, nd in zip(inputs, need_in)]
        g_h = torch.zeros_like(h) if need[1] else None
        n = h.shape[0]
        for s in range(0, n, chunk):
            cols = torch.arange(s, min(n, s + chunk), device=z.device)
            with torch.enable_grad(), torch.autocast(device_type=z.device.type, enabled=False):
                leaves = [t.detach().requires_grad_(nd) for t, nd in zip(inputs, need_in)]
                h_c = h[s : s + chunk].detach().requires_grad_(need[1])
                z_l, k_l, tau_l, *wp_l = leaves
                lg = _chunk_logits(z_l, h_c, cols, target, img_xyz, ent_xyz[s : s + chunk], k_l, tau_l,
                                   tuple(wp_l), spec["kernel"], spec["geometry"]).to(z.dtype)
                d_lg = torch.exp(lg.detach() - lse[:, None])
                d_lg = d_lg - (target[:, None] == cols[None, :]).to(d_lg.dtype)
                d_lg = d_lg * g_row[:, None]
                wrt = [t for t in (*leaves, h_c) if t.requires_grad]
                if not wrt:
                    break
                got = iter(torch.autograd.grad(lg, wrt, grad_outputs=d_lg, allow_unused=True))
            for i, t in enumerate(leaves):
                if t.requires_grad:
                    g = next(got)
                    if g is not None:
                        grads[i] += g
            if h_c.requires_grad:
                g = next(got)
                if g is not None:
                    g_h[s : s + chunk] += g
        g_z, g_k, g_tau, *g_wp = grads
        return (None, g_z, g_h, g_k, g_tau, *g_wp)


def chunked_level_loss(
    z: torch.Tensor,
    h: torch.Tensor,
    target: torch.Tensor,
    img_xyz: torch.Tensor,
    ent_xyz: torch.Tensor,
    *,
    k: torch.Tensor | float,
    tau: torch.Tensor,
    weight_params: tuple[torch.Tensor, ...] = (),
    kernel: Kernel = "laplace",
    geometry: Geometry = "lorentz",
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-row GWH-InfoNCE loss (B,), streamed over chunks of the N entities.

    z (B, D), h (N, D) points; target (B,) in [0, N) or -1 (the row's value is then
    the logsumexp alone: mask it out); img_xyz (B, 3), ent_xyz (N, 3) float64 unit
    vectors (unit_xyz); k the curvature K; tau the temperature; weight_params
    (log_lambda, sigma_km) for the geographic weights, () for plain InfoNCE.
    Computed in float32 (float64 for float64 inputs) whatever the autocast state.
    """
    if kernel not in ("laplace", "gaussian", "inverse"):
        raise ValueError(f"unknown kernel {kernel!r}: expected laplace, gaussian or inverse")
    if h.shape[0] != ent_xyz.shape[0] or z.shape[0] != img_xyz.shape[0] or target.shape != (z.shape[0],):
        raise ValueError(f"shapes disagree: z {tuple(z.shape)}, h {tuple(h.shape)}, target {tuple(target.shape)}, "
                         f"img_xyz {tuple(img_xyz.shape)}, ent_xyz {tuple(ent_xyz.shape)}")
    if chunk is None:
        chunk = max(256, CHUNK_ELEMS // max(1, z.shape[0]))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    z = lorentz._upcast(z)
    k_t = torch.as_tensor(k, dtype=z.dtype, device=z.device)
    spec = {"target": target.long(), "img_xyz": img_xyz, "ent_xyz": ent_xyz, "chunk": int(chunk),
            "kernel": kernel, "geometry": geometry}
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _StreamedInfoNCE.apply(spec, z, h.to(z.dtype), k_t, tau.to(z.dtype),
                                      *(p.to(z.dtype) for p in weight_params))
