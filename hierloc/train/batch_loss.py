"""The loss of a training batch against the whole entity table (HIERLOC.md section 6).

``batch_loss`` is the training step's loss, streamed over chunks of entities;
``naive_batch_loss`` the paper's loss written plainly (the reference for tests and
benchmarks/train_step.py). On several ranks, ``level_weights`` / ``weighted_total``
make the averaged gradient that of the global batch and ``global_metrics`` gives the
global batch's loss values (hierloc.train.distributed).
"""

from __future__ import annotations

import inspect

import torch

from hierloc.train.distributed import DistContext, all_reduce_sum
from hierloc.geometry.geo import haversine_km
from hierloc.model.loss import GeoWeightedInfoNCE
from hierloc.model.model import HierLocModel


def takes_ent_tangent(model: HierLocModel) -> bool:
    """Whether encode_images accepts the precomputed entity tangents (the attention's keys)."""
    return "ent_tangent" in inspect.signature(model.encode_images).parameters


def encode_images(model: HierLocModel, x: torch.Tensor, ent_tangent: torch.Tensor | None) -> torch.Tensor:
    """Image points (B, d+1) of features x (B, D), reusing the entity tangents (N, d) when the model takes them."""
    if ent_tangent is not None and takes_ent_tangent(model):
        return model.encode_images(x, ent_tangent=ent_tangent)
    return model.encode_images(x)


def naive_batch_loss(
    model: HierLocModel, loss_fn: GeoWeightedInfoNCE, x: torch.Tensor, targets: torch.Tensor, latlon_deg: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The paper's loss written plainly: the reference for tests and benchmarks/train_step.py.

    The entity branch over the whole table with autograd, then per level the (B, N_l)
    squared distances, broadcast haversine km (hierloc.geometry.geo) and weights, all materialised.
    x (B, D) features, targets (B, L), latlon_deg (B, 2) -> (total, per-level losses).
    """
    tangent = model.entity_tangent()
    return plain_loss(model, loss_fn, encode_images(model, x, tangent), model.to_space(tangent), targets, latlon_deg)


def plain_loss(model, loss_fn, z, points, targets, latlon_deg) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss from materialised (B, N_l) squared distances and haversine km per level."""
    slices = [model.level_slice(lvl) for lvl in range(len(model.level_sizes))]
    ll, e = latlon_deg, model.entity_latlon_deg
    sq = [model.sq_dist(z, points[sl]) for sl in slices]
    geo = [haversine_km(ll[:, None, 0], ll[:, None, 1], e[sl][None, :, 0], e[sl][None, :, 1]) for sl in slices]
    return loss_fn(sq, targets, geo)


def batch_loss(
    model: HierLocModel, loss_fn: GeoWeightedInfoNCE, x: torch.Tensor, targets: torch.Tensor,
    latlon_deg: torch.Tensor, points: torch.Tensor, tangent: torch.Tensor | None, *, amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Loss of a batch against a given entity table: (image points z, total, per-level losses).

    x (B, D), targets (B, L), latlon_deg (B, 2); points (N, d+1) / tangent (N, d): the
    entity table (with autograd, or a cached leaf); the tangents are the attention's keys
    (None: the model computes its own). The loss is streamed over chunks of entities
    (GeoWeightedInfoNCE.forward_points: never more than B x chunk distances, haversines
    or weights alive, in the forward or the backward pass); a loss module without it
    gets the plain (B, N_l) matrices.
    """
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        z = encode_images(model, x, tangent)
    slices = [model.level_slice(lvl) for lvl in range(len(model.level_sizes))]
    ent_ll = model.entity_latlon_deg
    if hasattr(loss_fn, "forward_points"):
        loss, per_level = loss_fn.forward_points(
            z, [points[sl] for sl in slices], targets, latlon_deg, [ent_ll[sl] for sl in slices],
            k=model.curvature, geometry=model.cfg.geometry,
        )
    else:
        loss, per_level = plain_loss(model, loss_fn, z, points, targets, latlon_deg)
    return z, loss, per_level


def level_weights(y_batch: torch.Tensor, y_local: torch.Tensor, ctx: DistContext) -> list[float] | None:
    """Per-level factors that make the ranks' averaged gradient that of the global batch mean.

    Rank r's level-l mean covers c_lr valid targets of the C_l in the global batch, so it
    is weighted W c_lr / C_l (0 where c_lr = 0: that level is left out on this rank).
    None on one process (factor 1: the loss as it is).
    """
    if not ctx.active:
        return None
    glob = (y_batch >= 0).sum(0).tolist()
    loc = (y_local >= 0).sum(0).tolist()
    return [ctx.world_size * c / g if g else 0.0 for c, g in zip(loc, glob)]


def weighted_total(loss_fn: GeoWeightedInfoNCE, per_level: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_l beta_l w_l loss_l over the levels this rank holds (w_l > 0), with ``level_weights``."""
    terms = [b * l * w for b, l, w in zip(loss_fn.betas, per_level, weights) if w > 0]
    return sum(terms) if terms else per_level[0].new_zeros(()).requires_grad_()


def global_metrics(
    per_level: list[torch.Tensor], y_batch: torch.Tensor, y_local: torch.Tensor, betas: torch.Tensor, ctx: DistContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, per-level losses (L,)) of the global batch, as device tensors (no host read):
    one all-reduce of count-weighted means on several ranks."""
    vals = torch.stack([l.detach().float() for l in per_level])
    if not ctx.active:
        return (betas.to(vals) * vals).sum(), vals
    loc = (y_local >= 0).sum(0).to(vals.device, non_blocking=True).to(vals)
    glob = (y_batch >= 0).sum(0).to(vals.device, non_blocking=True).to(vals)
    # a rank without a valid target at a level has a NaN mean there (0/0) that weighs nothing
    summed = all_reduce_sum(torch.where(loc > 0, vals * loc, torch.zeros_like(vals)), ctx)
    mean = summed / glob.clamp_min(1)
    return (betas.to(mean) * mean).sum(), mean
