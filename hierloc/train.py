"""Training from cached backbone features (HIERLOC.md section 7).

AdamW for Euclidean parameters, geoopt's RiemannianAdam for the manifold anchors,
linear warmup then cosine decay, gradient clipping. Every step scores the batch
against ALL entities of every level (the paper's full-table negatives). A
checkpoint is written atomically after every epoch; a run that finds one with the
same configuration resumes from it and ends where an uninterrupted run would
(data order is a function of (seed, epoch), RNG states are saved).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import geoopt
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from hierloc.atomic import atomic_write_path
from hierloc.geo import haversine_km
from hierloc.loss import GeoWeightedInfoNCE, Kernel
from hierloc.model import HierLocModel, ModelConfig

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


class TrainConfig(BaseModel):
    """Optimisation and loss settings. Loss initial values are GAPs: see README."""

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

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


@dataclass
class TrainData:
    """Cached features and labels of the training images.

    features (N, D) float; targets (N, L) int64 index of the image's entity within
    each level (-1 if unknown); latlon_deg (N, 2) the images' true coordinates.
    """

    features: np.ndarray
    targets: np.ndarray
    latlon_deg: np.ndarray


@dataclass
class EntityData:
    """The entity table as arrays, rows ordered by level then index within level."""

    img_feat: np.ndarray  # (N, D) mean training feature per entity
    latlon_deg: np.ndarray  # (N, 2)
    level_sizes: list[int]
    parent_index: np.ndarray  # (N,) row of the parent, -1 at the top level


@dataclass
class TrainResult:
    checkpoint: Path
    model_path: Path
    steps: int
    epochs_run: int
    seconds: float
    final: dict[str, float] = field(default_factory=dict)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def build_model(cfg: ModelConfig, data: TrainData, ents: EntityData) -> HierLocModel:
    feats = torch.as_tensor(data.features, dtype=torch.float32)
    return HierLocModel(
        cfg,
        feat_mean=feats.mean(0),
        feat_std=feats.std(0),
        entity_img_feat=torch.tensor(np.asarray(ents.img_feat), dtype=torch.float32),
        entity_latlon_deg=torch.tensor(np.asarray(ents.latlon_deg), dtype=torch.float32),
        level_sizes=ents.level_sizes,
        parent_index=torch.tensor(np.asarray(ents.parent_index), dtype=torch.long),
    )


def entity_mean_features(
    features: np.ndarray, targets: np.ndarray, level_sizes: list[int]
) -> np.ndarray:
    """Img_i: the mean feature of each entity's training images, (N_total, D).

    targets (N, L) index within level; entities without images get the global mean.
    """
    feats = torch.as_tensor(features, dtype=torch.float64)
    global_mean = feats.mean(0)
    out = []
    for lvl, n in enumerate(level_sizes):
        idx = torch.from_numpy(np.array(targets[:, lvl], dtype=np.int64))  # a copy: parquet arrays are read-only
        ok = idx >= 0
        sums = torch.zeros(n, feats.shape[1], dtype=torch.float64).index_add_(0, idx[ok], feats[ok])
        counts = torch.bincount(idx[ok], minlength=n).double()[:, None]
        out.append(torch.where(counts > 0, sums / counts.clamp_min(1), global_mean))
    return torch.cat(out).float().numpy()


def config_digest(*parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _atomic_save(obj: object, path: Path) -> None:
    with atomic_write_path(path) as tmp:
        torch.save(obj, tmp)


def save_model(model: HierLocModel, path: Path, *, tau: float = 1.0) -> None:
    """Everything needed to rebuild the model for inference, in one file.

    ``tau`` is the loss temperature at the end of training: inference turns beam
    distances into probabilities with it (hierloc.inference.beam_probabilities).
    """
    _atomic_save(
        {"model_config": model.cfg.to_dict(), "level_sizes": model.level_sizes, "state_dict": model.state_dict(),
         "tau": float(tau)},
        path,
    )


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> HierLocModel:
    blob = torch.load(path, map_location=map_location, weights_only=False)
    sd = blob["state_dict"]
    cfg = ModelConfig(**blob["model_config"])
    model = HierLocModel(
        cfg,
        feat_mean=sd["norm.mean"],
        feat_std=sd["norm.std"],
        entity_img_feat=sd["entity_img_feat"],
        entity_latlon_deg=sd["entity_latlon_deg"],
        level_sizes=blob["level_sizes"],
        parent_index=sd["parent_index"],
    )
    model.load_state_dict(sd)
    #: the loss temperature the model was trained to (1.0 for files written before it was saved)
    model.tau = float(blob.get("tau", 1.0))
    return model.eval()


def _param_groups(model: HierLocModel, loss_fn: GeoWeightedInfoNCE, weight_decay: float):
    """Weight decay on weight matrices only: none on biases, scalars, embeddings."""
    decay, no_decay, manifold = [], [], []
    for name, p in list(model.named_parameters()) + [("loss." + n, p) for n, p in loss_fn.named_parameters()]:
        if isinstance(p, geoopt.ManifoldParameter):
            manifold.append(p)
        elif p.ndim >= 2 and name != "anchors":
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups, manifold


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _check_finite(loss: torch.Tensor, per_level: list[torch.Tensor], step: int, loss_fn, model) -> None:
    if torch.isfinite(loss):
        return
    raise FloatingPointError(
        f"non-finite loss at step {step}: per level {[float(x) for x in per_level]}, "
        f"tau={float(loss_fn.tau):.4g}, sigma_km={float(loss_fn.sigma_km):.4g}, "
        f"alpha_img={float(model.log_alpha_img.exp()):.4g}, alpha_node={float(model.log_alpha_node.exp()):.4g}. "
        "Lower the learning rate or train in float64 to investigate; the last checkpoint is intact."
    )


def train(
    data: TrainData,
    ents: EntityData,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    log_fn: LogFn | None = None,
) -> TrainResult:
    """Train and write ``out_dir/checkpoint.pt`` (resumable) and ``out_dir/model.pt``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, data, ents).to(device)
    loss_fn = GeoWeightedInfoNCE(
        betas=cfg.betas, tau=cfg.tau, lam=cfg.lam, sigma_km=cfg.sigma_km,
        kernel=cfg.kernel, learnable=cfg.learnable_loss, weighted=cfg.lam > 0,
    ).to(device)
    groups, manifold = _param_groups(model, loss_fn, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    ropt = geoopt.optim.RiemannianAdam(manifold, lr=cfg.riemannian_lr, stabilize=10) if manifold else None
    n = data.features.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(cfg.warmup_steps, total)) for o in (opt, ropt) if o]

    digest = config_digest(model_cfg.to_dict(), cfg.to_dict(), {"n": n, "levels": ents.level_sizes})
    ckpt_path = out_dir / "checkpoint.pt"
    start_epoch, step = 0, 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["digest"] == digest:
            model.load_state_dict(ck["model"])
            loss_fn.load_state_dict(ck["loss"])
            opt.load_state_dict(ck["opt"])
            if ropt is not None:
                ropt.load_state_dict(ck["ropt"])
                # torch's load_state_dict turns geoopt's int "step" into a float32 tensor, and
                # geoopt then computes its bias corrections in float32: restore the int so a
                # resumed run stays bit-identical to an uninterrupted one.
                for st in ropt.state.values():
                    if torch.is_tensor(st.get("step")):
                        st["step"] = int(st["step"].item())
            for s, sd in zip(sched, ck["sched"]):
                s.load_state_dict(sd)
            torch.set_rng_state(ck["rng_cpu"])
            if device.type == "cuda" and ck.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(ck["rng_cuda"], device)
            start_epoch, step = ck["epoch"], ck["step"]
            log.info("resuming from %s at epoch %d, step %d", ckpt_path, start_epoch, step)
        else:
            log.warning("ignoring checkpoint %s: it was made with another configuration", ckpt_path)

    feats = torch.as_tensor(data.features, dtype=torch.float32)
    targets = torch.tensor(data.targets, dtype=torch.long)  # a copy: parquet-backed arrays are read-only
    latlon = torch.as_tensor(data.latlon_deg, dtype=torch.float32)
    ent_latlon = [torch.as_tensor(ents.latlon_deg, dtype=torch.float32, device=device)[model.level_slice(l)]
                  for l in range(len(ents.level_sizes))]
    use_amp = cfg.amp and device.type == "cuda"
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        # The order depends only on (seed, epoch): a resumed run sees the same batches.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        sums = np.zeros(1 + len(ents.level_sizes))
        for b0 in range(0, n, cfg.batch_size):
            idx = perm[b0 : b0 + cfg.batch_size]
            x, y, ll = feats[idx].to(device), targets[idx].to(device), latlon[idx].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                h = model.encode_entities()
                z = model.encode_images(x)
            sq = [model.sq_dist(z, h[model.level_slice(l)]) for l in range(len(ents.level_sizes))]
            geo = [haversine_km(ll[:, None, 0], ll[:, None, 1], e[None, :, 0], e[None, :, 1]) for e in ent_latlon]
            loss, per_level = loss_fn(sq, y, geo)
            _check_finite(loss, per_level, step, loss_fn, model)
            opt.zero_grad(set_to_none=True)
            if ropt is not None:
                ropt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for g in groups for p in g["params"]] + manifold, cfg.grad_clip
            )
            opt.step()
            if ropt is not None:
                ropt.step()
            for s in sched:
                s.step()
            step += 1
            sums += np.array([loss.item()] + [p.item() for p in per_level])
            if log_fn is not None and step % cfg.log_every == 0:
                log_fn(
                    {"train_loss": loss.item(), "grad_norm": grad_norm.item(), "tau": loss_fn.tau.item(),
                     "lambda": loss_fn.log_lambda.exp().item(), "sigma_km": loss_fn.sigma_km.item(),
                     "lr": sched[0].get_last_lr()[0]},
                    step,
                )
        means = sums / steps_per_epoch
        last = {"epoch_loss": float(means[0])}
        last.update({f"epoch_loss_l{l}": float(v) for l, v in enumerate(means[1:])})
        log.info("epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, means[0])
        if log_fn is not None:
            log_fn({**last, "epoch": epoch + 1}, step)
        _atomic_save(
            {
                "digest": digest, "epoch": epoch + 1, "step": step,
                "model": model.state_dict(), "loss": loss_fn.state_dict(), "opt": opt.state_dict(),
                "ropt": ropt.state_dict() if ropt is not None else None,
                "sched": [s.state_dict() for s in sched], "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            ckpt_path,
        )
    model_path = out_dir / "model.pt"
    save_model(model.cpu(), model_path, tau=float(loss_fn.tau.detach()))
    return TrainResult(
        checkpoint=ckpt_path, model_path=model_path, steps=step,
        epochs_run=cfg.epochs - start_epoch, seconds=time.perf_counter() - t0, final=last,
    )
