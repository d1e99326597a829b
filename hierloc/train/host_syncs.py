"""Find the operations that would make the host wait for a CUDA device, on any device (CPU too).

On a GPU, ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()`` / ``.numpy()`` and ops
whose output shape depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean
indexing) block the host until the device has caught up: the kernel queue drains and the GPU
idles while Python runs. The training step must have none between logging points (issue 15).

On the CPU these calls cost nothing and look the same as reads of host tensors (the loop's
permutation, the optimiser's step counters, which torch keeps on the host on CUDA too), so
``HostSyncs`` tells them apart by *where a tensor would live on a GPU*: it seeds a set of
device tensors (model parameters and buffers, optimiser state but its step counters, and
whatever the caller names, e.g. a batch after its ``.to(device)``), follows every aten op
(an output of an op with a device input is a device tensor) and records each sync-causing
call on a device tensor with the Python line that made it.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

#: aten ops that read a device value on the host (item, float, bool, int) or size their output by the data.
_SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
#: Tensor methods that copy to the host (on the CPU they are no-ops that never reach aten).
_HOST_METHODS = {"tolist", "numpy", "cpu"}


@dataclass
class Sync:
    """One host sync: what (an aten op or a Tensor method) and where (the innermost line outside torch)."""

    what: str
    where: str


@dataclass
class HostSyncs:
    """Context manager recording host syncs on device tensors (module docstring).

    ``HostSyncs(device_tensors)``: the tensors that would live on the GPU (see ``training_tensors``).
    Inside the block, ``syncs`` fills with ``Sync`` records; ``mark(t)`` adds tensors made outside
    aten (e.g. a batch moved with ``.to(device)``, a no-op on the CPU).
    """

    seeds: Iterable[torch.Tensor] = ()
    syncs: list[Sync] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._dev = WeakIdKeyDictionary()
        self.mark(*self.seeds)
        self._modes = (_Dispatch(self), _Function(self))

    def mark(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._dev[t] = True

    def on_device(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t in self._dev

    def record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename
                  and not f.filename.endswith("host_syncs.py")]
        where = f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        self.syncs.append(Sync(what, where))

    def __enter__(self) -> HostSyncs:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        dev = any(self.owner.on_device(t) for t in flat)
        if dev and (func in _SYNC_OPS or (func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())))):
            self.owner.record(str(func))
        out = func(*args, **kwargs)
        if dev:
            self.owner.mark(*tree_flatten(out)[0])
        return out


class _Function(TorchFunctionMode):
    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_METHODS and args and self.owner.on_device(args[0]):
            self.owner.record(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


def training_tensors(modules: Iterable[torch.nn.Module], optims: Iterable[torch.optim.Optimizer | None]) -> list:
    """Parameters, buffers and optimiser state of a run: what lives on the GPU when training there.
    The optimisers' ``step`` counters are left out: torch keeps them on the host unless
    ``capturable`` (reading them is no device sync)."""
    out = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    for opt in optims:
        if opt is None:
            continue
        for state in opt.state.values():
            out += [v for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)]
    return out


def step_syncs(loop, batches: Iterable[torch.Tensor]) -> list[Sync]:
    """The host syncs of a training loop's (hierloc.train.loop._Loop) steps over ``batches`` (row
    indices, one step each; none the last of its epoch), with its model, loss and optimiser state
    as the device tensors."""
    seeds = training_tensors([loop.model, loop.loss_fn], [loop.optims.opt, loop.optims.ropt])
    with HostSyncs(seeds) as hs:
        for rows in batches:
            loop._step(rows, last_batch=False)
    return hs.syncs
