"""Data-parallel training across processes: torchrun's environment, batch shards, gradient all-reduce.

Launch several processes with torchrun (one per GPU, or several on a CPU with gloo)::

    python -m torch.distributed.run --nproc_per_node 2 -m hierloc.train.loop --data DIR --out DIR

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``setup`` reads
them and initialises the process group (nccl on CUDA, gloo on the CPU) unless the caller
already did. Without them (a plain ``python`` call) everything here is a no-op on one
process, so the training loop has a single code path.

Every rank holds the whole model and computes the same entity table; each takes a
disjoint shard of every global batch (``shard``: rows rank, rank + W, ... of the batch,
as torch's DistributedSampler splits its permutation), and gradients are averaged with
one flat all-reduce (``all_reduce_mean_``). This is what DistributedDataParallel does,
done by hand because a training step calls several model methods (no single forward
for DDP's hooks) and some parameters step on a different schedule than others
(hierloc.train.loop's ``entity_refresh_every``); a parameter without a gradient on a rank
contributes zeros, so nothing waits on unused parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from hierloc.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank in [0, world_size); local_rank picks its GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process initialised the group and destroys it in teardown

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes checkpoints, the model and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_ranks(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when absent."""
    env = os.environ if env is None else env
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (torchrun sets them): {e}") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world}): launch through torchrun")
    return rank, world, local


def setup(device_spec: str = "auto") -> tuple[DistContext, torch.device]:
    """Read torchrun's environment, initialise the process group if needed, pick the device."""
    if dist.is_available() and dist.is_initialized():  # the caller set it up (and tears it down)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = env_ranks()[2] if "LOCAL_RANK" in os.environ else rank
        ctx = DistContext(rank, world, local, owns_group=False)
    else:
        rank, world, local = env_ranks()
        ctx = DistContext(rank, world, local, owns_group=world > 1)
    device = resolve_device(device_spec, ctx.local_rank if ctx.active else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ctx.owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ctx.rank, world_size=ctx.world_size)
    return ctx, device


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(rows: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's part of a global batch (B,) -> (ceil or floor of B / W,): rows r, r + W, ..."""
    return rows[ctx.rank :: ctx.world_size]


def all_reduce_mean_(params: Iterable[torch.Tensor], ctx: DistContext) -> None:
    """Average ``p.grad`` over ranks in place, one flat all-reduce; a missing gradient counts as zeros.

    Every rank must pass the same parameters in the same order (same model, same groups).
    """
    params = list(params)
    if not ctx.active or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    off = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[off : off + n].view_as(p.grad))
        off += n


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of a tensor over ranks (a copy; the input itself on one process)."""
    if not ctx.active:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_tensor(t: torch.Tensor, ctx: DistContext, device: torch.device) -> list[torch.Tensor]:
    """Every rank's ``t`` (the same shape and dtype on every rank), in rank order, on the CPU.

    A plain tensor all-gather (no pickled objects cross between ranks); ``device`` is the
    run's device (nccl gathers CUDA tensors, gloo CPU ones).
    """
    if not ctx.active:
        return [t.cpu()]
    t = t.to(device)
    out = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states as uint8 tensors: ``cpu`` and, on CUDA, ``cuda`` (plain
    tensors, so a checkpoint holding them loads with ``torch.load(weights_only=True)``)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore states saved by ``rng_state`` (a ``cuda`` entry only on a CUDA device)."""
    torch.set_rng_state(state["cpu"].cpu().to(torch.uint8))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8), device)


def all_gather_rng_states(device: torch.device, ctx: DistContext) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``rng_state``, in rank order (for a checkpoint), gathered as one flat
    uint8 tensor per rank: the CPU state, then the CUDA state on a CUDA device."""
    mine = rng_state(device)
    flat = torch.cat([mine["cpu"], mine["cuda"]]) if "cuda" in mine else mine["cpu"]
    n_cpu = mine["cpu"].numel()
    out = []
    for t in all_gather_tensor(flat, ctx, device):
        st = {"cpu": t[:n_cpu].clone()}
        if "cuda" in mine:
            st["cuda"] = t[n_cpu:].clone()
        out.append(st)
    return out
