"""Training from cached backbone features (HIERLOC.md section 7): the config and the loop.

AdamW for Euclidean parameters (weight decay on weight matrices only), geoopt's
RiemannianAdam for manifold parameters (the anchors at a fixed K), linear warmup then
cosine decay, gradient clipping, bf16 autocast on CUDA (hierloc.train.optim). Every step scores
the batch against ALL entities of every level (the paper's full-table negatives,
hierloc.train.batch_loss). With ``entity_refresh_every = k > 1`` the entity table is computed
once per k steps and its gradient accumulated (hierloc.train.table_cycle): the loss stays exact,
the entity branch steps every k batches. No host read inside a step: non-finite losses or gradients
stop the run at the next logging point or checkpoint, naming step and tensor (train.finite_checks).

A checkpoint is written atomically after every epoch (and every
``checkpoint_every_steps``); a run that finds one with the same configuration resumes
from it and ends where an uninterrupted run would (data order is a function of
(seed, epoch), RNG states are saved per rank: hierloc.train.checkpoint). Several processes:
torchrun (hierloc.train.distributed). Warm start: hierloc.train.warm_start. Command line:
``python -m hierloc.train.loop --data DIR --out DIR`` (``main``), from arrays written by
``save_arrays`` (hierloc.train.data). The model file: hierloc.model.io.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from hierloc.device import entity_chunk_rows, plain_loss_max_elems, return_large_frees
from hierloc.digest import digest_of
from hierloc.model.io import build_model, save_model
from hierloc.model.loss import PLAIN_MAX_ELEMS, GeoWeightedInfoNCE, Kernel
from hierloc.model.model import ENTITY_CHUNK, ModelConfig
from hierloc.progress import Progress
from hierloc.train.batch_loss import batch_loss, global_metrics, level_weights, weighted_total
from hierloc.train.checkpoint import Position, load_checkpoint, save_checkpoint
from hierloc.train.data import EntityData, TrainData, load_arrays
from hierloc.train.distributed import DistContext, env_ranks, setup, shard, teardown
from hierloc.train.finite_checks import FiniteWatch, scalar_tensors
from hierloc.train.optim import make_optimisers, optimizer_step
from hierloc.train.table_cycle import TableCycle
from hierloc.train.warm_start import warm_start, warm_start_digest

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


class TrainConfig(BaseModel):
    """Optimisation and loss settings. Loss initial values are GAPs: see docs/method.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(256, ge=1, le=1_000_000)
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate (Euclidean parameters)")
    riemannian_lr: float = Field(1e-2, gt=0, le=10.0, description="RiemannianAdam learning rate (anchors)")
    weight_decay: float = Field(1e-4, ge=0, le=1.0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = cuda when present")
    amp: bool = Field(True, description="bf16 autocast on CUDA (hyperbolic maths stays float32)")
    tau: float = Field(1.0, gt=0, description="initial temperature")
    lam: float = Field(1.0, ge=0, description="initial lambda of the geographic weights; 0 = plain InfoNCE")
    sigma_km: float = Field(500.0, gt=0, description="initial kernel scale (km)")
    kernel: Kernel = "laplace"
    learnable_loss: bool = Field(True, description="learn tau, lambda, sigma")
    betas: tuple[float, ...] = Field((1.0, 1.0, 1.0, 1.0), min_length=1, description="per-level loss weights")
    log_every: int = Field(20, ge=1, description="steps between logged training metrics")
    entity_refresh_every: int = Field(
        1, ge=1, le=100_000,
        description="k: steps sharing one entity table (1 = the whole table with autograd every step). "
                    "k > 1: the loss is still exact, the entity branch steps every k batches with the mean "
                    "gradient of the k batches (TableCycle)")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every this many steps (0: epochs only)")
    max_steps: int | None = Field(
        None, ge=1, le=1_000_000_000,
        description="budget: stop after this many optimiser steps in all (resumed ones count); None = no budget. "
                    "The LR schedule spans the budgeted steps; the smaller of max_steps and max_samples wins")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="the materialised loss through torch.compile (fused elementwise kernels): auto = on CUDA")
    max_samples: int | None = Field(
        None, ge=1, le=10**13,
        description="budget in samples: stop after ceil(max_samples / batch_size) steps; None = no budget")

    def to_dict(self) -> dict:
        """The JSON form; an unset budget and the default ``compile`` are left out, so configs
        without them keep their digests (and their run folders and checkpoints)."""
        d = self.model_dump(mode="json")
        d = {k: v for k, v in d.items() if not (k in ("max_steps", "max_samples") and v is None)}
        return {k: v for k, v in d.items() if k != "compile" or v != "auto"}

    def budget_steps(self) -> int | None:
        """The step budget (the smaller of max_steps and ceil(max_samples / batch_size)); None: no budget."""
        caps = [c for c in (self.max_steps, self.max_samples and -(-self.max_samples // self.batch_size)) if c]
        return min(caps) if caps else None


@dataclass
class TrainResult:
    """What ``train`` wrote (checkpoint, model) and did (steps, seconds, last epoch's losses)."""

    checkpoint: Path
    model_path: Path
    steps: int
    epochs_run: int
    seconds: float
    final: dict[str, float] = field(default_factory=dict)
    steps_run: int = 0  # steps taken by this call (steps - steps_run were done before a resume)
    budgeted: bool = False  # TrainConfig.max_steps / max_samples set: the run stops at ``stop_step``
    stop_step: int = 0  # the step the run ends at: the budget, else epochs x steps per epoch


def train(
    data: TrainData,
    ents: EntityData,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    log_fn: LogFn | None = None,
    *,
    init_from: str | Path | None = None,
    init_rows: np.ndarray | None = None,
) -> TrainResult:
    """Train and write ``out_dir/checkpoint.pt`` (resumable) and ``out_dir/model.pt``.

    Under torchrun (RANK/WORLD_SIZE set) every process runs this same call: the process
    group is initialised (nccl on CUDA, gloo on CPU), each rank takes a disjoint shard of
    every global batch of ``cfg.batch_size`` rows, gradients are averaged over ranks,
    and only rank 0 writes the checkpoint, the model and calls ``log_fn``; every rank
    resumes from ``out_dir/checkpoint.pt``, so ``out_dir`` must be shared (one node).

    Warm start: ``init_from`` a previous model.pt, ``init_rows`` from entity_row_map
    (see ``warm_start``); the source file's hash and the row map are part of the
    checkpoint digest, so a resume never mixes two warm starts (or one with a cold run).
    """
    out_dir = Path(out_dir)
    return_large_frees()  # per-step tensors of tens of MB go back to the OS (hierloc.device)
    ctx, device = setup(cfg.device)
    try:
        return _train(data, ents, model_cfg, cfg, out_dir, log_fn, init_from, init_rows, ctx, device)
    finally:
        teardown(ctx)


def _train(data, ents, model_cfg, cfg, out_dir, log_fn, init_from, init_rows, ctx: DistContext, device) -> TrainResult:
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    loop = _Loop(data, ents, model_cfg, cfg, out_dir / "checkpoint.pt", log_fn if ctx.is_main else None,
                 init_from, init_rows, ctx, device)
    last, seconds = loop.run()
    model_path = out_dir / "model.pt"
    if ctx.is_main:
        save_model(loop.model.cpu(), model_path, tau=float(loop.loss_fn.tau.detach()))
    return TrainResult(
        checkpoint=loop.ckpt_path, model_path=model_path, steps=loop.step, epochs_run=loop.epochs_run,
        seconds=seconds, final=last, steps_run=loop.steps_run, budgeted=cfg.budget_steps() is not None,
        stop_step=loop.stop_step,
    )


class _Loop:
    """The training loop of one ``train`` call on one rank (every rank runs the same one).

    Built in the order the RNG draws depend on: the model (warm-started when asked), the loss,
    the optimisers; a checkpoint with the same digest then restores them and where the run
    stands: ``start`` the next (epoch, batch), ``step`` the steps taken, ``sums`` the epoch's
    running (total, per-level) losses. ``emit`` is the log function (rank 0 only, else None).
    """

    def __init__(self, data: TrainData, ents: EntityData, model_cfg: ModelConfig, cfg: TrainConfig, ckpt_path: Path,
                 emit: LogFn | None, init_from, init_rows, ctx: DistContext, device: torch.device) -> None:
        self.cfg, self.ckpt_path, self.emit, self.ctx, self.device = cfg, ckpt_path, emit, ctx, device
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg, data, ents)
        warm = {}
        if init_from is not None:
            counts = warm_start(model, init_from, init_rows)
            log.info("warm start from %s: %s", init_from, counts)
            warm = warm_start_digest(init_from, init_rows, sum(ents.level_sizes))
        self.model = model.to(device)
        if ctx.rank > 0:  # own dropout masks per rank; rank 0 keeps the single-process stream
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
        self.loss_fn = GeoWeightedInfoNCE(
            betas=cfg.betas, tau=cfg.tau, lam=cfg.lam, sigma_km=cfg.sigma_km,
            kernel=cfg.kernel, learnable=cfg.learnable_loss, weighted=cfg.lam > 0,
        ).to(device)
        # from the device's free memory (the CPU keeps its constants): materialised loss matrices and the
        # entity MLP in one piece on a roomy GPU (hierloc.device); the loss compiled on CUDA by default
        self.loss_fn.plain_max_elems = plain_loss_max_elems(device, PLAIN_MAX_ELEMS)
        self.loss_fn.compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
        width = self.model.ent_mlp[0].in_features + 4 * model_cfg.hidden
        self.model.entity_chunk = entity_chunk_rows(device, sum(ents.level_sizes), width, ENTITY_CHUNK)
        self.n = data.features.shape[0]
        self.steps_per_epoch = math.ceil(self.n / cfg.batch_size)
        # a budget ends the run early; the warmup + cosine schedule spans the steps it will run
        self.stop_step = min(self.steps_per_epoch * cfg.epochs, cfg.budget_steps() or math.inf)
        self.optims = make_optimisers(
            self.model, self.loss_fn, lr=cfg.lr, riemannian_lr=cfg.riemannian_lr, weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps, total_steps=self.stop_step,
        )
        self.named = [(n, p) for n, p in self.model.named_parameters()] + \
            [("loss." + n, p) for n, p in self.loss_fn.named_parameters()]

        self.digest = digest_of([model_cfg.to_dict(), cfg.to_dict(), {"n": self.n, "levels": ents.level_sizes, **warm}])
        pos = load_checkpoint(ckpt_path, digest=self.digest, seed=cfg.seed, **self._state())
        if pos is None:
            pos = Position(0, 0, 0, np.zeros(1 + len(ents.level_sizes)))
        self.start, self.step = (pos.epoch, pos.batch), pos.step
        self.sums = torch.as_tensor(np.asarray(pos.sums, np.float64), device=device)  # the epoch's, on the device
        self.watch = FiniteWatch(device)  # non-finite steps, recorded on the device, checked at log points

        self.feats = data.batch_source()  # a tensor, or a FeatureRows gathered per batch from its memory map
        self.targets = torch.tensor(data.targets, dtype=torch.long)  # a copy: parquet-backed arrays are read-only
        self.latlon = torch.tensor(data.latlon_deg, dtype=torch.float32)  # a copy: (n, 2) is small, parquet arrays are read-only
        self.use_amp = cfg.amp and device.type == "cuda"
        self.cycle = TableCycle(self.model, device, self.use_amp) if cfg.entity_refresh_every > 1 else None
        self.steps_run = self.log_steps = self.epochs_run = 0
        self.t_log = 0.0

    def _state(self) -> dict:
        return dict(model=self.model, loss_fn=self.loss_fn, optims=self.optims, ctx=self.ctx, device=self.device)

    def checkpoint(self, epoch: int, batch: int) -> None:
        self.watch.check()  # never a checkpoint after a non-finite step
        save_checkpoint(self.ckpt_path, digest=self.digest,
                        pos=Position(epoch, batch, self.step, self.sums.cpu().numpy()), **self._state())

    def run(self) -> tuple[dict[str, float], float]:
        """Every epoch left; returns the last epoch's mean losses and the seconds taken."""
        t0 = self.t_log = time.perf_counter()
        start_epoch, start_batch = self.start
        last = {}
        for epoch in range(start_epoch, self.cfg.epochs):
            if self.step >= self.stop_step:  # the budget is spent (a rerun of a finished budgeted run)
                break
            last = self._epoch(epoch, start_batch if epoch == start_epoch else 0)
            self.epochs_run += 1
        self.watch.check()
        return last, time.perf_counter() - t0

    def _epoch(self, epoch: int, first: int) -> dict[str, float]:
        """Batches ``first``.. of one epoch (a checkpoint every ``checkpoint_every_steps``), then its
        mean losses, logged, and a checkpoint at its end. A budget that ends mid-epoch ends it
        there the same way (means over its batches run, a fractional "epoch", the checkpoint)."""
        cfg = self.cfg
        self.model.train()
        t_epoch, epoch_steps, epoch_samples = time.perf_counter(), 0, 0
        end = min(self.steps_per_epoch, first + self.stop_step - self.step)  # batches first..end-1 run
        # The order depends only on (seed, epoch): a resumed run sees the same batches.
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        # steps, samples/s and the epoch's ETA: a bar on a terminal, else a log line every ~10 s (rank 0)
        bar = Progress(end - first, f"epoch {epoch + 1}/{cfg.epochs}", unit="steps",
                       items_unit="samples", logger=log) if self.ctx.is_main else None
        try:
            for b in range(first, end):
                rows = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                ckpt_now = self._step(rows, last_batch=b == end - 1)
                epoch_steps += 1
                epoch_samples += len(rows)
                if bar is not None:
                    bar.update(1, items=len(rows))
                if ckpt_now:
                    self.checkpoint(epoch, b + 1)
        finally:
            if bar is not None:
                bar.close()
        self.watch.check()
        means = self.sums.cpu().numpy() / max(1, end)
        dt = time.perf_counter() - t_epoch
        last = {"epoch_loss": float(means[0])}
        last.update({f"epoch_loss_l{l}": float(v) for l, v in enumerate(means[1:])})
        log.info("epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, means[0])
        if self.emit is not None:
            self.emit({**last, "epoch": epoch + 1 if end == self.steps_per_epoch else epoch + end / self.steps_per_epoch,
                       "epoch_seconds": dt, "epoch_steps_per_s": epoch_steps / dt,
                       "epoch_samples_per_s": epoch_samples / dt}, self.step)
        self.sums = torch.zeros_like(self.sums)
        self.checkpoint(*((epoch + 1, 0) if end == self.steps_per_epoch else (epoch, end)))
        return last

    def _step(self, rows: torch.Tensor, *, last_batch: bool) -> bool:
        """One optimiser step on the global batch ``rows``; the entity branch steps too when its
        table cycle ends (the k-th step, the epoch's last batch, a checkpoint). Returns whether
        to checkpoint after it."""
        cfg, cycle = self.cfg, self.cycle
        g_loss, g_levels, grad_norm = self._forward_backward(rows)  # device tensors: no host read in a step
        self.step += 1
        self.steps_run += 1
        self.log_steps += 1
        ckpt_now = bool(cfg.checkpoint_every_steps) and self.step % cfg.checkpoint_every_steps == 0 and not last_batch
        if cycle is not None and (cycle.steps == cfg.entity_refresh_every or last_batch or ckpt_now):
            table_params = set(map(id, cycle.finish()))
            _, names, norms = optimizer_step(self.optims.opt, self.optims.ropt,
                                             [(n_, p) for n_, p in self.named if id(p) in table_params],
                                             cfg.grad_clip, self.ctx)
            self.watch.observe_grads(self.step - 1, names, norms)
        for s in self.optims.sched:
            s.step()
        self.sums += torch.cat([g_loss.reshape(1), g_levels]).double()
        if self.step % cfg.log_every == 0:
            self._log_step(g_loss, grad_norm)
        return ckpt_now

    def _forward_backward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's shard of ``rows``: loss, backward, the (Euclidean and manifold) optimiser
        step. Returns the global loss, per-level losses and the gradient norm (device tensors)."""
        ctx, cycle, model, loss_fn = self.ctx, self.cycle, self.model, self.loss_fn
        idx = shard(rows, ctx)
        # non_blocking: a blocking host-to-device copy waits for the device's queue to drain
        x, y, ll = (t[idx].to(self.device, non_blocking=True) for t in (self.feats, self.targets, self.latlon))
        weights = level_weights(self.targets[rows], self.targets[idx], ctx)
        fresh = self.cycle is None or not self.cycle.active
        tangent, points = self._entity_table()
        z, loss, per_level = batch_loss(model, loss_fn, x, y, ll, points, tangent, amp=self.use_amp)
        if weights is not None:
            loss = weighted_total(loss_fn, per_level, weights)
        g_loss, g_levels = global_metrics(per_level, self.targets[rows], self.targets[idx], loss_fn.betas, ctx)
        if not ctx.active:
            g_loss = loss.detach()
        named = {"image points": z, **({"entity points": points} if fresh else {})}  # a cached table: checked once
        self.watch.observe_loss(self.step, g_loss, g_levels, named, scalar_tensors(model, loss_fn))
        loss.backward()
        if cycle is not None:
            cycle.stash()
        grad_norm, names, norms = optimizer_step(self.optims.opt, self.optims.ropt, self.named, self.cfg.grad_clip, ctx)
        self.watch.observe_grads(self.step, names, norms)
        return g_loss, g_levels, grad_norm

    def _entity_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tangent, points) of every entity: computed with autograd (exact, every step), or the
        table cycle's cached one (``entity_refresh_every > 1``)."""
        if self.cycle is None:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                tangent = self.model.entity_tangent()
            return tangent, self.model.to_space(tangent)
        if not self.cycle.active:
            self.cycle.start()
        return self.cycle.tangent, self.cycle.points

    def _log_step(self, g_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The training metrics every ``log_every`` steps, with the speed since the last ones; the
        non-finite checks of the steps since the last ones (the host waits for the device here)."""
        self.watch.check()
        if self.emit is not None:
            dt = time.perf_counter() - self.t_log
            loss_fn, sched = self.loss_fn, self.optims.sched
            self.emit({"train_loss": float(g_loss), "grad_norm": float(grad_norm), "tau": loss_fn.tau.item(),
                       "lambda": loss_fn.log_lambda.exp().item(), "sigma_km": loss_fn.sigma_km.item(),
                       "lr": sched[0].get_last_lr()[0], "steps_per_s": self.log_steps / dt,
                       "samples_per_s": self.log_steps * self.cfg.batch_size / dt}, self.step)
        self.t_log, self.log_steps = time.perf_counter(), 0


# --- command line: train from a folder of cached arrays (save_arrays; torchrun-ready) ---
def _json_arg(text: str | None) -> dict:
    if not text:
        return {}
    return json.loads(Path(text).read_text() if text.endswith(".json") and Path(text).exists() else text)


def main(argv: list[str] | None = None) -> TrainResult:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m hierloc.train.loop",
        description="Train HierLoc from cached arrays (see save_arrays). Several processes: "
                    "python -m torch.distributed.run --nproc_per_node N -m hierloc.train.loop --data D --out O",
    )
    ap.add_argument("--data", required=True, help="folder with train.npz and entities.npz")
    ap.add_argument("--out", required=True, help="run folder: checkpoint.pt, model.pt (resumes if present)")
    ap.add_argument("--model-config", default=None, help="ModelConfig as JSON text or a .json file")
    ap.add_argument("--train-config", default=None, help="TrainConfig as JSON text or a .json file")
    ap.add_argument("--init-from", default=None, help="warm start: a previous model.pt")
    ap.add_argument("--init-rows", default=None, help="warm start: .npy row map from entity_row_map")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data, ents = load_arrays(args.data)
    rows = np.load(args.init_rows) if args.init_rows else None

    def log_fn(metrics: dict[str, float], step: int) -> None:
        print(json.dumps({"step": step, **metrics}), flush=True)

    res = train(data, ents, ModelConfig(**_json_arg(args.model_config)), TrainConfig(**_json_arg(args.train_config)),
                Path(args.out), log_fn=log_fn, init_from=args.init_from, init_rows=rows)
    if env_ranks()[0] == 0:
        print(json.dumps({"model_path": str(res.model_path), "steps": res.steps, "seconds": res.seconds, **res.final}),
              flush=True)
    return res


if __name__ == "__main__":
    main()
