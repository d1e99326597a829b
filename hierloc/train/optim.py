"""The optimisers of a training run (HIERLOC.md section 7) and their step.

AdamW for Euclidean parameters, with weight decay on weight matrices only
(``param_groups``); geoopt's RiemannianAdam for manifold parameters (the anchors at a
fixed K); linear warmup then cosine decay (``lr_lambda``); ``optimizer_step`` averages
gradients over ranks, clips them and steps, reading nothing back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import geoopt
import torch
from torch import nn

from hierloc.train.distributed import DistContext, all_reduce_mean_
from hierloc.model.loss import GeoWeightedInfoNCE
from hierloc.model.model import HierLocModel


def is_entity_table(name: str, p: torch.Tensor, n_entities: int) -> bool:
    """An entity-indexed parameter: registered on the model itself (no '.' in its name: the
    anchors, not a layer's weight) with one row per entity, shape (N_entities, ...)."""
    return "." not in name and p.ndim >= 1 and p.shape[0] == n_entities


_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


def param_groups(
    model: HierLocModel, loss_fn: GeoWeightedInfoNCE, weight_decay: float
) -> tuple[list[dict], list[torch.nn.Parameter], dict[str, list[str]]]:
    """AdamW groups, RiemannianAdam parameters, and the names in each (for logs and tests).

    Weight decay only on weight matrices: none on biases and scalars (ndim < 2), the
    entity rows (anchors: embeddings) and embedding / normalisation layers. geoopt
    ManifoldParameters (anchors on a fixed-K hyperboloid) go to RiemannianAdam.
    """
    n_ent = sum(model.level_sizes)
    no_decay_names = {
        f"{mn}.{pn}" if mn else pn
        for mn, m in model.named_modules() if isinstance(m, _NO_DECAY_MODULES)
        for pn, _ in m.named_parameters(recurse=False)
    }
    named = [(n, p, n) for n, p in model.named_parameters()]
    named += [("loss." + n, p, None) for n, p in loss_fn.named_parameters()]
    names: dict[str, list[str]] = {"decay": [], "no_decay": [], "manifold": []}
    decay, no_decay, manifold = [], [], []
    for name, p, model_name in named:
        if isinstance(p, geoopt.ManifoldParameter):
            kind, dest = "manifold", manifold
        elif p.ndim >= 2 and name not in no_decay_names and not (
            model_name is not None and is_entity_table(model_name, p, n_ent)
        ):
            kind, dest = "decay", decay
        else:
            kind, dest = "no_decay", no_decay
        names[kind].append(name)
        dest.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups, manifold, names


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at step ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class Optimisers:
    """AdamW (``opt``), RiemannianAdam (``ropt``, None without manifold parameters) and one
    LR schedule per optimiser (``sched``, in that order): what a checkpoint saves."""

    opt: torch.optim.Optimizer
    ropt: torch.optim.Optimizer | None
    sched: list[torch.optim.lr_scheduler.LambdaLR]


def make_optimisers(
    model: HierLocModel, loss_fn: GeoWeightedInfoNCE, *, lr: float, riemannian_lr: float, weight_decay: float,
    warmup_steps: int, total_steps: int,
) -> Optimisers:
    """The optimisers of ``model`` and ``loss_fn``, each with warmup + cosine decay over ``total_steps``."""
    groups, manifold, _ = param_groups(model, loss_fn, weight_decay)
    opt = torch.optim.AdamW(groups, lr=lr)
    ropt = geoopt.optim.RiemannianAdam(manifold, lr=riemannian_lr, stabilize=10) if manifold else None
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(warmup_steps, total_steps)) for o in (opt, ropt) if o]
    return Optimisers(opt, ropt, sched)


def clip_grads(params: list[torch.nn.Parameter], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip gradients to a total norm of ``max_norm``, without a host read: (total norm, per-parameter
    norms (P,)). The same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (per-tensor norms, their
    norm, grads times min(max_norm / (total + 1e-6), 1)), bit for bit on one device and dtype."""
    grads = [p.grad for p in params]
    norms = torch.stack(torch._foreach_norm(grads, 2.0))
    total = torch.linalg.vector_norm(norms, 2.0)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total, norms


def optimizer_step(
    opt: torch.optim.Optimizer, ropt: torch.optim.Optimizer | None, named: list[tuple[str, torch.nn.Parameter]],
    grad_clip: float, ctx: DistContext,
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Average gradients over ranks, clip, step. Returns (pre-clip total gradient norm, the names of
    the parameters with a gradient, their norms): device tensors, never read on the host here
    (hierloc.train.finite_checks.FiniteWatch checks them at logging points)."""
    with_grad = [(n, p) for n, p in named if p.grad is not None]
    params = [p for _, p in with_grad]
    all_reduce_mean_(params, ctx)
    if params:
        total, norms = clip_grads(params, grad_clip)
    else:
        total, norms = torch.zeros(()), torch.zeros(0)
    opt.step()
    if ropt is not None:
        ropt.step()
    opt.zero_grad(set_to_none=True)
    if ropt is not None:
        ropt.zero_grad(set_to_none=True)
    return total, [n for n, _ in with_grad], norms
