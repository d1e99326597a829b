"""Resumable training checkpoints: one atomic file holding everything a run needs to go on.

A checkpoint is keyed by the digest of the run's configuration (hierloc.digest.digest_of): ``load_checkpoint``
restores the model, loss, optimisers, LR schedules and this rank's RNG state from a file
with the same digest (and ignores one made with another configuration), so a resumed
run ends where an uninterrupted one would. ``save_checkpoint`` gathers every rank's RNG
state and writes on rank 0 only, atomically (a crash mid-write leaves the last one).
A checkpoint holds plain data only (tensors, numbers, strings, lists, dicts; the RNG states
as uint8 tensors) and is read with ``torch.load(weights_only=True)`` (hierloc.model.io.load_plain).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hierloc.train.distributed import DistContext, all_gather_rng_states, set_rng_state
from hierloc.model.loss import GeoWeightedInfoNCE
from hierloc.model.model import HierLocModel
from hierloc.model.io import MAX_CHECKPOINT_FILE_BYTES, atomic_torch_save, load_plain
from hierloc.train.optim import Optimisers

log = logging.getLogger(__name__)


_KEYS = ("epoch", "batch", "step", "sums", "model", "loss", "opt", "ropt", "sched", "rng")


@dataclass
class Position:
    """Where the loop stands: the next (epoch, batch) to run, steps taken, and the running
    sums of the epoch's (total, per-level) losses, shape (1 + L,)."""

    epoch: int
    batch: int
    step: int
    sums: np.ndarray


def save_checkpoint(
    path: Path, *, digest: str, pos: Position, model: HierLocModel, loss_fn: GeoWeightedInfoNCE,
    optims: Optimisers, ctx: DistContext, device: torch.device,
) -> None:
    """Every rank calls this (the RNG states are gathered); rank 0 writes ``path`` atomically."""
    rng = all_gather_rng_states(device, ctx)
    if ctx.is_main:
        atomic_torch_save(
            {"digest": digest, "epoch": pos.epoch, "batch": pos.batch, "step": pos.step, "sums": pos.sums.tolist(),
             "model": model.state_dict(), "loss": loss_fn.state_dict(), "opt": optims.opt.state_dict(),
             "ropt": optims.ropt.state_dict() if optims.ropt is not None else None,
             "sched": [s.state_dict() for s in optims.sched], "rng": rng, "world_size": ctx.world_size},
            path,
        )


def load_checkpoint(
    path: Path, *, digest: str, model: HierLocModel, loss_fn: GeoWeightedInfoNCE, optims: Optimisers,
    ctx: DistContext, device: torch.device, seed: int,
) -> Position | None:
    """Restore the state saved in ``path`` into the given objects and return where to go on;
    None (nothing restored) when ``path`` is absent or was made with another ``digest``.

    A rank beyond the world size of the run that wrote it gets a fresh, deterministic RNG
    stream from (seed, rank, step), and so does every rank when the file holds its RNG state
    as the pickled bytes earlier versions wrote (never unpickled; the run goes on, not
    bit-identical to an uninterrupted one). Files hierloc did not write are refused (load_plain).
    """
    if not path.exists():
        return None
    ck = load_plain(path, what="training checkpoint", max_bytes=MAX_CHECKPOINT_FILE_BYTES, map_location=device)
    if ck.get("digest") != digest:
        log.warning("ignoring checkpoint %s: it was made with another configuration", path)
        return None
    missing = [k for k in _KEYS if k not in ck]
    if missing:
        raise ValueError(f"{path}: not a hierloc training checkpoint (no {', '.join(missing)}): delete it to start afresh")
    model.load_state_dict(ck["model"])
    loss_fn.load_state_dict(ck["loss"])
    optims.opt.load_state_dict(ck["opt"])
    if optims.ropt is not None:
        optims.ropt.load_state_dict(ck["ropt"])
        # torch's load_state_dict turns geoopt's int "step" into a float32 tensor, and
        # geoopt then computes its bias corrections in float32: restore the int so a
        # resumed run stays bit-identical to an uninterrupted one.
        for st in optims.ropt.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = int(st["step"].item())
    for s, sd in zip(optims.sched, ck["sched"]):
        s.load_state_dict(sd)
    rng = ck["rng"][ctx.rank] if ctx.rank < len(ck["rng"]) else None
    if isinstance(rng, dict):
        set_rng_state(rng, device)
    else:  # more ranks than the run that wrote it, or an old pickled state: a fresh, deterministic stream
        if rng is not None:
            log.warning("%s: its RNG state is in the old pickled form, which hierloc does not unpickle: resuming "
                        "with a fresh random stream (the result will differ from an uninterrupted run)", path)
        torch.manual_seed(seed + 1_000_003 * ctx.rank + ck["step"])
    pos = Position(ck["epoch"], ck["batch"], ck["step"], np.asarray(ck["sums"], dtype=np.float64))
    log.info("resuming from %s at epoch %d, batch %d, step %d", path, pos.epoch, pos.batch, pos.step)
    return pos
