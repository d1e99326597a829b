"""NaN / inf guards of a training run, kept on the device: ``FiniteWatch``.

A GPU step that asks the host whether its loss is finite waits for the whole step to finish
(a stream sync): the kernel queue drains and the GPU idles. So every step only *records*, on
the device, the first non-finite step since the last check (its loss, which of the loss's
inputs and which gradients were bad, the per-level losses and the learnt scalars); the
training loop ``check``s at logging points, before every checkpoint and at the end of the
run (one host read each), and raises there, naming the step, the tensor or the parameters.
Nothing is written after a bad step, so the last checkpoint is intact.
"""

from __future__ import annotations

import math

import torch


def scalar_tensors(model: torch.nn.Module, loss_fn: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The learnt scalars of a run as 0-d device tensors (no host read)."""
    out = dict(model.scalar_tensors())  # HierLocModel's curvature, alpha_img, alpha_node
    out.update(tau=loss_fn.tau, sigma_km=loss_fn.sigma_km)
    out["lambda"] = loss_fn.log_lambda.exp()
    return {k: v.detach().float().reshape(()) for k, v in out.items()}


def _counts(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return torch.stack([t.isnan().sum(), t.isposinf().sum(), t.isneginf().sum()])


class _Record:
    """The first bad step of one kind of observation, and a snapshot of its values there."""

    def __init__(self, device: torch.device, size: int) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.snap = torch.zeros(size, dtype=torch.float64, device=device)
        self.shapes: dict[str, tuple] = {}

    def update(self, bad: torch.Tensor, step: int, snap: torch.Tensor) -> None:
        take = bad & (self.first < 0)
        self.first = torch.where(take, step, self.first)
        self.snap = torch.where(take, snap.to(self.snap), self.snap)


class FiniteWatch:
    """Device-side record of non-finite losses and gradients (module docstring).

    ``observe_loss(step, total, per_level, tensors, scalars)``: ``total`` the (global) loss,
    ``per_level`` its per-level values (L,), ``tensors`` named inputs of the loss (image points,
    entity points: counted only to name the culprit), ``scalars`` from ``scalar_tensors``.
    ``observe_grads(step, names, norms)``: per-parameter gradient norms (non-finite where a
    gradient holds NaN or inf). ``check()`` raises FloatingPointError for the earliest bad step.
    A step is bad when its (global) loss or a gradient norm is not finite: every rank sees the
    same values there, so all ranks stop at the same check.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._loss: dict[tuple, _Record] = {}
        self._grads: dict[tuple[str, ...], _Record] = {}

    def observe_loss(self, step: int, total: torch.Tensor, per_level: torch.Tensor, tensors: dict[str, torch.Tensor],
                     scalars: dict[str, torch.Tensor]) -> None:
        key = (len(per_level), tuple(tensors), tuple(scalars))
        parts = [total.detach().reshape(1).double(), per_level.detach().double()]
        parts += [_counts(t).double() for t in tensors.values()]
        parts += [torch.stack(list(scalars.values())).double()]
        snap = torch.cat(parts)
        rec = self._loss.setdefault(key, _Record(self.device, len(snap)))
        rec.update(~torch.isfinite(total.detach()), step, snap)
        rec.shapes = {name: tuple(t.shape) for name, t in tensors.items()}

    def observe_grads(self, step: int, names: list[str], norms: torch.Tensor) -> None:
        rec = self._grads.setdefault(tuple(names), _Record(self.device, len(names)))
        rec.update(~torch.isfinite(norms).all(), step, norms)

    def check(self) -> None:
        """Raise for the earliest recorded bad step (one host read); return if there is none."""
        records = [("loss", k, r) for k, r in self._loss.items()] + [("grads", k, r) for k, r in self._grads.items()]
        if not records:
            return
        firsts = torch.stack([r.first for _, _, r in records]).tolist()
        bad = [(f, i) for i, f in enumerate(firsts) if f >= 0]
        if not bad:
            return
        step, i = min(bad)  # a loss record comes first: a bad loss makes bad gradients at the same step
        kind, key, rec = records[i]
        snap = rec.snap.tolist()
        if kind == "grads":
            _raise_grads(step, key, snap)
        _raise_loss(step, key, snap, rec.shapes)


def _raise_loss(step: int, key: tuple, snap: list[float], shapes: dict[str, tuple]) -> None:
    n_levels, names, scalar_names = key
    total, levels = snap[0], snap[1 : 1 + n_levels]
    counts = snap[1 + n_levels : 1 + n_levels + 3 * len(names)]
    scalars = dict(zip(scalar_names, snap[1 + n_levels + 3 * len(names) :]))
    context = (f"Per-level losses {[round(v, 4) for v in levels]}; scalars "
               f"{ {k: round(v, 6) for k, v in scalars.items()} }; nothing was written after this step, "
               "the last checkpoint is intact.")
    advice = ("Lower the learning rate, check the input features, or train in float64 to find the first "
              "bad operation.")
    for j, name in enumerate(names):
        nan, pinf, ninf = (int(c) for c in counts[3 * j : 3 * j + 3])
        if nan or pinf or ninf:
            shape = shapes.get(name, ())
            raise FloatingPointError(
                f"{name} at step {step} is not finite: shape {shape}, {nan} NaN, {pinf} +inf, {ninf} -inf of "
                f"{math.prod(shape)} values. {context} {advice}")
    raise FloatingPointError(
        f"loss at step {step} is {total} although its inputs are finite: an overflow inside the loss. "
        f"{context} Lower the learning rate or the initial temperature.")


def _raise_grads(step: int, names: tuple[str, ...], norms: list[float]) -> None:
    bad = [f"{n}: gradient norm {v}" for n, v in zip(names, norms) if not math.isfinite(v)]
    raise FloatingPointError(
        f"non-finite gradients at step {step} (nothing was written after this step; the last checkpoint is "
        f"intact): {'; '.join(bad)}. Lower the learning rate or grad_clip, or train in float64 to investigate.")

