"""NaN / inf guards of a training step: stop before the optimiser step, naming what went bad.

``check_step_finite`` looks at the loss (and, only when it is bad, at the loss's input
tensors); ``check_grads_finite`` names every parameter with a non-finite gradient.
Both leave the last checkpoint intact and say what to change.
"""

from __future__ import annotations

import torch

from hierloc.geometry.lorentz import check_finite
from hierloc.model.loss import GeoWeightedInfoNCE
from hierloc.model.model import HierLocModel


def _scalars(model: HierLocModel, loss_fn: GeoWeightedInfoNCE) -> dict[str, float]:
    out = dict(model.scalars()) if hasattr(model, "scalars") else {
        "alpha_img": float(model.log_alpha_img.exp()), "alpha_node": float(model.log_alpha_node.exp()),
        "curvature": float(model.curvature)}
    with torch.no_grad():
        out.update(tau=float(loss_fn.tau), sigma_km=float(loss_fn.sigma_km))
        out["lambda"] = float(loss_fn.log_lambda.exp())
    return out


def check_step_finite(
    total: torch.Tensor, per_level: list[float], tensors: dict[str, torch.Tensor], step: int,
    model: HierLocModel, loss_fn: GeoWeightedInfoNCE,
) -> None:
    """Stop before an optimiser step on a non-finite loss, naming the first non-finite input tensor.

    total: the (global) loss; per_level: its per-level values; tensors: named inputs of the
    loss (image points, entity table), checked in order only when the loss is bad.
    """
    if bool(torch.isfinite(total)):
        return
    context = (f"Per-level losses {[round(v, 4) for v in per_level]}; scalars "
               f"{ {k: round(v, 6) for k, v in _scalars(model, loss_fn).items()} }; the last checkpoint is intact.")
    for name, t in tensors.items():
        check_finite(name, t, step=step, context=context)
    raise FloatingPointError(
        f"loss at step {step} is {float(total)} although its inputs are finite: an overflow inside the loss. "
        f"{context} Lower the learning rate or the initial temperature."
    )


def check_grads_finite(named_params: list[tuple[str, torch.nn.Parameter]], step: int) -> None:
    """Raise (before the optimiser step) if a gradient holds NaN or inf, naming every such parameter."""
    bad = []
    for name, p in named_params:
        g = p.grad
        if g is not None and not bool(torch.isfinite(g).all()):
            bad.append(f"{name} {tuple(g.shape)}: {int(g.isnan().sum())} NaN, {int(g.isinf().sum())} inf")
    if bad:
        raise FloatingPointError(
            f"non-finite gradients at step {step} (the optimiser step was not taken; the last checkpoint "
            f"is intact): {'; '.join(bad)}. Lower the learning rate or grad_clip, or train in float64 to investigate."
        )
