"""The entity table reused over k consecutive training steps (``entity_refresh_every = k > 1``).

Computing the whole entity table with autograd every step costs as much as the rest of
the step; ``TableCycle`` computes it once per k steps, keeps the exact full-table loss,
and gives the entity branch one optimiser step with the mean gradient of the k batches
(details in the class docstring; benchmarks/train_step.py measures it).
"""

from __future__ import annotations

import torch

from hierloc.train.batch_loss import takes_ent_tangent
from hierloc.train.distributed import rng_state, set_rng_state
from hierloc.model.model import HierLocModel


def _leaf_params(outputs: list[torch.Tensor], params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters (of ``params``, in that order) that ``outputs`` depend on, from the autograd graph."""
    found, seen = set(), set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None:
            found.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return [p for p in params if id(p) in found]


class TableCycle:
    """The entity table shared by up to k = ``entity_refresh_every`` consecutive steps.

    ``start``: the table (tangents (N, d) and points) is computed once, without autograd
    after the first cycle, and every step of the cycle uses it as a leaf tensor: the loss
    is the exact full-table loss at the current parameters (the table parameters do not
    move within a cycle), and the gradient w.r.t. the table accumulates.
    ``stash`` (after each backward): direct gradients of table parameters (e.g. a learnt
    curvature through the image branch) are moved aside, so the per-step optimiser step
    only moves the image branch and the loss scalars.
    ``finish``: the table is recomputed with autograd under the RNG state of ``start``
    (the same dropout masks: activation checkpointing across steps), the accumulated
    gradient is pushed through the entity branch once, and the table parameters get the
    mean of the cycle's gradients, ready for one optimiser step.

    Table parameters are those the table depends on, read off the autograd graph of the
    first table (entity MLP, location encoder, anchors, alpha_node, and a learnt K).
    """

    def __init__(self, model: HierLocModel, device: torch.device, amp: bool) -> None:
        self.model, self.device, self.amp = model, device, amp
        self.table_params: list[torch.nn.Parameter] | None = None
        self.points: torch.Tensor | None = None
        self.tangent: torch.Tensor | None = None
        self.steps = 0
        self._acc: dict[int, torch.Tensor] = {}
        self._rng: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.points is not None

    def _table(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            tangent = self.model.entity_tangent()
        return tangent, self.model.to_space(tangent)

    def start(self) -> None:
        self._rng = rng_state(self.device)
        first = self.table_params is None
        with torch.set_grad_enabled(first):
            tangent, points = self._table()
        if first:
            self.table_params = _leaf_params([points, tangent], list(self.model.parameters()))
        self.tangent = tangent.detach().requires_grad_(takes_ent_tangent(self.model))
        self.points = points.detach().requires_grad_()
        self.steps, self._acc = 0, {}

    def stash(self) -> None:
        for p in self.table_params:
            if p.grad is not None:
                prev = self._acc.get(id(p))
                self._acc[id(p)] = p.grad if prev is None else prev.add_(p.grad)
                p.grad = None
        self.steps += 1

    def finish(self) -> list[torch.nn.Parameter]:
        """Table parameters with their cycle-mean gradients set (the cycle is closed)."""
        for p in self.table_params:
            p.grad = self._acc.get(id(p))
        outs, grads = [], []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                   device_type=self.device.type):
            set_rng_state(self._rng, self.device)
            tangent, points = self._table()
        for out, leaf in ((points, self.points), (tangent, self.tangent)):
            if leaf.grad is not None:
                outs.append(out)
                grads.append(leaf.grad)
        if outs:
            torch.autograd.backward(outs, grads)
        for p in self.table_params:
            if p.grad is not None:
                p.grad /= self.steps
        self.points = self.tangent = None
        self._acc = {}
        return self.table_params
