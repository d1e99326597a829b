"""Training from cached backbone features (HIERLOC.md section 7).

AdamW for Euclidean parameters (weight decay on weight matrices only), geoopt's
RiemannianAdam for manifold parameters (the anchors at a fixed K), linear warmup then
cosine decay, gradient clipping, bf16 autocast on CUDA. Every step scores the batch
against ALL entities of every level (the paper's full-table negatives). With
``entity_refresh_every = k > 1`` the entity table is computed once per k steps and its
gradient accumulated (``TableCycle``): the loss stays exact, the entity branch steps
every k batches. Non-finite losses or gradients stop the run before the optimiser step,
naming the tensor.

A checkpoint is written atomically after every epoch (and every
``checkpoint_every_steps``); a run that finds one with the same configuration resumes
from it and ends where an uninterrupted run would (data order is a function of
(seed, epoch), RNG states are saved per rank). Several processes: torchrun
(hierloc.distributed). Command line: ``python -m hierloc.train --data DIR --out DIR``
(``main``), from arrays written by ``save_arrays``.
"""

from __future__ import annotations

import hashlib
import inspect
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
from torch import nn

from hierloc.atomic import atomic_write_path
from hierloc.distributed import (
    DistContext, all_gather_bytes, all_reduce_mean_, all_reduce_sum, env_ranks, rng_state_blob, set_rng_state_blob,
    setup, shard, teardown,
)
from hierloc.distributed import resolve_device as _resolve_device
from hierloc.geo import haversine_km
from hierloc.lorentz import check_finite
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
    entity_refresh_every: int = Field(
        1, ge=1, le=100_000,
        description="k: steps sharing one entity table (1 = the whole table with autograd every step). "
                    "k > 1: the loss is still exact, the entity branch steps every k batches with the mean "
                    "gradient of the k batches (TableCycle)")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every this many steps (0: epochs only)")

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
    """The entity table as arrays, rows ordered by level then index within level.

    text_feat: (N, D_txt) frozen text embeddings (hierloc.text.encode_texts), or None
    for a model without Text_i.
    """

    img_feat: np.ndarray  # (N, D) mean training feature per entity
    latlon_deg: np.ndarray  # (N, 2)
    level_sizes: list[int]
    parent_index: np.ndarray  # (N,) row of the parent, -1 at the top level
    text_feat: np.ndarray | None = None  # (N, D_txt) L2-normalised, or None


@dataclass
class TrainResult:
    checkpoint: Path
    model_path: Path
    steps: int
    epochs_run: int
    seconds: float
    final: dict[str, float] = field(default_factory=dict)
    steps_run: int = 0  # steps taken by this call (steps - steps_run were done before a resume)


def resolve_device(spec: str) -> torch.device:
    """``auto`` = cuda when present (hierloc.distributed.resolve_device picks a rank's GPU)."""
    return _resolve_device(spec)


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
        entity_text_feat=None if ents.text_feat is None else torch.tensor(np.asarray(ents.text_feat), dtype=torch.float32),
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
    The state dict holds every buffer and parameter (text features, attention,
    log curvature, location encoder); ``load_model`` also reads files written before
    those existed (format 1).
    """
    _atomic_save(
        {"format": MODEL_FORMAT, "model_config": model.cfg.to_dict(), "level_sizes": model.level_sizes,
         "state_dict": model.state_dict(), "tau": float(tau)},
        path,
    )


#: Version of the model.pt layout: 1 had a "curvature" buffer (no log_curvature) and no
#: text, attention or spherical-harmonics entries; 2 is the current one.
MODEL_FORMAT = 2


def _upgrade_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format-1 state dict in today's names: the fixed K buffer becomes log K."""
    sd = dict(sd)
    if "curvature" in sd and "log_curvature" not in sd:
        sd["log_curvature"] = sd.pop("curvature").float().log()
    return sd


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> HierLocModel:
    blob = torch.load(path, map_location=map_location, weights_only=False)
    if blob.get("format", 1) > MODEL_FORMAT:
        raise ValueError(f"{path}: model format {blob['format']}, this hierloc reads up to {MODEL_FORMAT}: upgrade hierloc")
    sd = _upgrade_state_dict(blob["state_dict"])
    cfg = ModelConfig(**blob["model_config"])  # fields missing in older files take their defaults (the old behaviour)
    model = HierLocModel(
        cfg,
        feat_mean=sd["norm.mean"],
        feat_std=sd["norm.std"],
        entity_img_feat=sd["entity_img_feat"],
        entity_latlon_deg=sd["entity_latlon_deg"],
        level_sizes=blob["level_sizes"],
        parent_index=sd["parent_index"],
        entity_text_feat=sd.get("entity_text_feat"),
    )
    model.load_state_dict(sd)
    #: the loss temperature the model was trained to (1.0 for files written before it was saved)
    model.tau = float(blob.get("tau", 1.0))
    return model.eval()


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


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at step ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


# --- the loss of a batch ------------------------------------------------------------------
def _takes_ent_tangent(model: HierLocModel) -> bool:
    """Whether encode_images accepts the precomputed entity tangents (the attention's keys)."""
    return "ent_tangent" in inspect.signature(model.encode_images).parameters


def _encode_images(model: HierLocModel, x: torch.Tensor, ent_tangent: torch.Tensor | None) -> torch.Tensor:
    if ent_tangent is not None and _takes_ent_tangent(model):
        return model.encode_images(x, ent_tangent=ent_tangent)
    return model.encode_images(x)


def naive_batch_loss(
    model: HierLocModel, loss_fn: GeoWeightedInfoNCE, x: torch.Tensor, targets: torch.Tensor, latlon_deg: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The paper's loss written plainly: the reference for tests and benchmarks/train_step.py.

    The entity branch over the whole table with autograd, then per level the (B, N_l)
    squared distances, broadcast haversine km (hierloc.geo) and weights, all materialised.
    x (B, D) features, targets (B, L), latlon_deg (B, 2) -> (total, per-level losses).
    """
    tangent = model.entity_tangent()
    return _plain_loss(model, loss_fn, _encode_images(model, x, tangent), model.to_space(tangent), targets, latlon_deg)


def _plain_loss(model, loss_fn, z, points, targets, latlon_deg) -> tuple[torch.Tensor, list[torch.Tensor]]:
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
        z = _encode_images(model, x, tangent)
    slices = [model.level_slice(lvl) for lvl in range(len(model.level_sizes))]
    ent_ll = model.entity_latlon_deg
    if hasattr(loss_fn, "forward_points"):
        loss, per_level = loss_fn.forward_points(
            z, [points[sl] for sl in slices], targets, latlon_deg, [ent_ll[sl] for sl in slices],
            k=model.curvature, geometry=model.cfg.geometry,
        )
    else:
        loss, per_level = _plain_loss(model, loss_fn, z, points, targets, latlon_deg)
    return z, loss, per_level


# --- NaN / inf guards ---------------------------------------------------------------------
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


# --- the entity table reused over several steps ---------------------------------------
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
        self._rng = b""

    @property
    def active(self) -> bool:
        return self.points is not None

    def _table(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            tangent = self.model.entity_tangent()
        return tangent, self.model.to_space(tangent)

    def start(self) -> None:
        self._rng = rng_state_blob(self.device)
        first = self.table_params is None
        with torch.set_grad_enabled(first):
            tangent, points = self._table()
        if first:
            self.table_params = _leaf_params([points, tangent], list(self.model.parameters()))
        self.tangent = tangent.detach().requires_grad_(_takes_ent_tangent(self.model))
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
            set_rng_state_blob(self._rng, self.device)
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


# --- warm start ----------------------------------------------------------------------
def entity_row_map(old_keys: np.ndarray | list, new_keys: np.ndarray | list) -> np.ndarray:
    """Row of each new entity in the old table, or -1 for a new entity: (N_new,) int64.

    Keys are the stable entity keys (e.g. "FR/IDF/75/Paris"), one per row of each table,
    in table order. Duplicated keys are an error: a key must name one entity.
    """
    old, new = np.asarray(old_keys, dtype=object), np.asarray(new_keys, dtype=object)
    for what, keys in (("old", old), ("new", new)):
        uniq, counts = np.unique(keys.astype(str), return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{what} entity keys are not unique, e.g. {uniq[counts > 1][:5].tolist()}: "
                             "each key must name one entity (rebuild the entity table)")
    where = {k: i for i, k in enumerate(old.tolist())}
    return np.array([where.get(k, -1) for k in new.tolist()], dtype=np.int64)


def warm_start(model: HierLocModel, init_from: str | Path, init_rows: np.ndarray | None = None) -> dict[str, int]:
    """Load a previous model.pt's parameters into ``model`` where they fit; returns counts.

    Every parameter of the same name and shape is copied, and the feature normalisation
    (norm.mean, norm.std: the MLPs were trained on inputs scaled by them). Entity-indexed
    parameters (``is_entity_table``: the anchors) are copied row by row:
    ``new[i] = old[init_rows[i]]`` where ``init_rows[i] >= 0``; new entities (-1) keep
    their fresh initialisation. ``init_rows`` = entity_row_map(old_keys, new_keys); None
    means the tables are identical (same size required). Entity data buffers (features,
    coordinates, parents, texts) always come from the new table.
    """
    blob = torch.load(init_from, map_location="cpu", weights_only=False)
    old_sd, n_old = blob["state_dict"], sum(blob["level_sizes"])
    n_new = sum(model.level_sizes)
    if init_rows is None:
        if n_old != n_new:
            raise ValueError(f"{init_from} has {n_old} entities, the new table {n_new}: pass init_rows="
                             "entity_row_map(old_keys, new_keys)")
        init_rows = np.arange(n_new)
    rows_np = np.asarray(init_rows, dtype=np.int64)
    lo, hi = int(rows_np.min(initial=0)), int(rows_np.max(initial=-1))
    if rows_np.shape != (n_new,) or hi >= n_old or lo < -1:
        raise ValueError(f"init_rows must be ({n_new},) with values in [-1, {n_old}) (entity_row_map), got "
                         f"shape {rows_np.shape}, values in [{lo}, {hi}]")
    rows = torch.from_numpy(rows_np.copy())
    keep = rows >= 0
    counts = {"copied": 0, "rows_copied": int(keep.sum()), "rows_fresh": int((~keep).sum()), "skipped": 0}
    with torch.no_grad():
        for name, p in model.named_parameters():
            old = old_sd.get(name)
            if old is None:
                counts["skipped"] += 1
            elif is_entity_table(name, p, n_new) and old.ndim == p.ndim and old.shape[0] == n_old \
                    and old.shape[1:] == p.shape[1:]:
                p[keep] = old[rows[keep]].to(p)
                counts["copied"] += 1
            elif old.shape == p.shape:
                p.copy_(old)
                counts["copied"] += 1
            else:
                counts["skipped"] += 1
                log.warning("warm start: %s has shape %s in %s, %s here: keeping the fresh one",
                            name, tuple(old.shape), init_from, tuple(p.shape))
        for name in ("norm.mean", "norm.std"):
            buf = model.get_buffer(name)
            if name in old_sd and old_sd[name].shape == buf.shape:
                buf.copy_(old_sd[name])
    return counts


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# --- the loop --------------------------------------------------------------------------
def _level_weights(y_batch: torch.Tensor, y_local: torch.Tensor, ctx: DistContext) -> list[float] | None:
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


def _weighted_total(loss_fn: GeoWeightedInfoNCE, per_level: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    terms = [b * l * w for b, l, w in zip(loss_fn.betas, per_level, weights) if w > 0]
    return sum(terms) if terms else per_level[0].new_zeros(()).requires_grad_()


def _global_metrics(
    per_level: list[torch.Tensor], y_batch: torch.Tensor, y_local: torch.Tensor, betas: torch.Tensor, ctx: DistContext
) -> tuple[torch.Tensor, list[float]]:
    """(total loss, per-level losses) of the global batch: one all-reduce of count-weighted means."""
    vals = torch.stack([l.detach().float() for l in per_level])
    if not ctx.active:
        return (betas.to(vals) * vals).sum(), vals.tolist()
    loc = (y_local >= 0).sum(0).to(vals)
    glob = (y_batch >= 0).sum(0).to(vals)
    # a rank without a valid target at a level has a NaN mean there (0/0) that weighs nothing
    summed = all_reduce_sum(torch.where(loc > 0, vals * loc, torch.zeros_like(vals)), ctx)
    mean = summed / glob.clamp_min(1)
    return (betas.to(mean) * mean).sum(), mean.tolist()


def optimizer_step(
    opt: torch.optim.Optimizer, ropt: torch.optim.Optimizer | None, named: list[tuple[str, torch.nn.Parameter]],
    grad_clip: float, step: int, ctx: DistContext,
) -> float:
    """Average gradients over ranks, check them, clip, step; returns the (pre-clip) gradient norm."""
    with_grad = [(n, p) for n, p in named if p.grad is not None]
    all_reduce_mean_([p for _, p in with_grad], ctx)
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in with_grad], grad_clip)
    if not bool(torch.isfinite(norm)):
        check_grads_finite(with_grad, step)
    opt.step()
    if ropt is not None:
        ropt.step()
    opt.zero_grad(set_to_none=True)
    if ropt is not None:
        ropt.zero_grad(set_to_none=True)
    return float(norm)


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
    ctx, device = setup(cfg.device)
    try:
        return _train(data, ents, model_cfg, cfg, out_dir, log_fn, init_from, init_rows, ctx, device)
    finally:
        teardown(ctx)


def _train(data, ents, model_cfg, cfg, out_dir, log_fn, init_from, init_rows, ctx: DistContext, device) -> TrainResult:
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, data, ents)
    warm = {}
    if init_from is not None:
        counts = warm_start(model, init_from, init_rows)
        log.info("warm start from %s: %s", init_from, counts)
        rows = np.arange(sum(ents.level_sizes)) if init_rows is None else np.asarray(init_rows, np.int64)
        warm = {"init_from": _file_digest(Path(init_from)), "init_rows": hashlib.sha256(rows.tobytes()).hexdigest()[:16]}
    model = model.to(device)
    if ctx.rank > 0:  # own dropout masks per rank; rank 0 keeps the single-process stream
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
    loss_fn = GeoWeightedInfoNCE(
        betas=cfg.betas, tau=cfg.tau, lam=cfg.lam, sigma_km=cfg.sigma_km,
        kernel=cfg.kernel, learnable=cfg.learnable_loss, weighted=cfg.lam > 0,
    ).to(device)
    groups, manifold, _ = param_groups(model, loss_fn, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    ropt = geoopt.optim.RiemannianAdam(manifold, lr=cfg.riemannian_lr, stabilize=10) if manifold else None
    named = [(n, p) for n, p in model.named_parameters()] + [("loss." + n, p) for n, p in loss_fn.named_parameters()]
    n = data.features.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(cfg.warmup_steps, total)) for o in (opt, ropt) if o]

    digest = config_digest(model_cfg.to_dict(), cfg.to_dict(), {"n": n, "levels": ents.level_sizes, **warm})
    ckpt_path = out_dir / "checkpoint.pt"
    start_epoch, start_batch, step = 0, 0, 0
    sums = np.zeros(1 + len(ents.level_sizes))
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck.get("digest") == digest:
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
            if ctx.rank < len(ck["rng"]):
                set_rng_state_blob(ck["rng"][ctx.rank], device)
            else:  # more ranks than the run that wrote it: a fresh, deterministic stream
                torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank + ck["step"])
            start_epoch, start_batch, step = ck["epoch"], ck["batch"], ck["step"]
            sums = np.asarray(ck["sums"], dtype=np.float64)
            log.info("resuming from %s at epoch %d, batch %d, step %d", ckpt_path, start_epoch, start_batch, step)
        else:
            log.warning("ignoring checkpoint %s: it was made with another configuration", ckpt_path)

    def save_checkpoint(epoch: int, batch: int) -> None:
        rng = all_gather_bytes(rng_state_blob(device), ctx)
        if ctx.is_main:
            _atomic_save(
                {"digest": digest, "epoch": epoch, "batch": batch, "step": step, "sums": sums.tolist(),
                 "model": model.state_dict(), "loss": loss_fn.state_dict(), "opt": opt.state_dict(),
                 "ropt": ropt.state_dict() if ropt is not None else None,
                 "sched": [s.state_dict() for s in sched], "rng": rng, "world_size": ctx.world_size},
                ckpt_path,
            )

    feats = torch.as_tensor(data.features, dtype=torch.float32)
    targets = torch.tensor(data.targets, dtype=torch.long)  # a copy: parquet-backed arrays are read-only
    latlon = torch.tensor(data.latlon_deg, dtype=torch.float32)  # a copy: (n, 2) is small, parquet arrays are read-only
    use_amp = cfg.amp and device.type == "cuda"
    cycle = TableCycle(model, device, use_amp) if cfg.entity_refresh_every > 1 else None
    emit = log_fn if ctx.is_main else None
    t0 = t_log = time.perf_counter()
    steps_run, last, log_steps = 0, {}, 0
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t_epoch, epoch_steps, epoch_samples = time.perf_counter(), 0, 0
        # The order depends only on (seed, epoch): a resumed run sees the same batches.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        first = start_batch if epoch == start_epoch else 0
        for b in range(first, steps_per_epoch):
            rows = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            idx = shard(rows, ctx)
            x, y, ll = feats[idx].to(device), targets[idx].to(device), latlon[idx].to(device)
            weights = _level_weights(targets[rows], targets[idx], ctx)
            if cycle is None:  # exact: the whole table with autograd every step
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    tangent = model.entity_tangent()
                points = model.to_space(tangent)
            else:
                if not cycle.active:
                    cycle.start()
                    check_finite("entity table (cached)", cycle.points, step=step)
                tangent, points = cycle.tangent, cycle.points
            z, loss, per_level = batch_loss(model, loss_fn, x, y, ll, points, tangent, amp=use_amp)
            if weights is not None:
                loss = _weighted_total(loss_fn, per_level, weights)
            g_loss, g_levels = _global_metrics(per_level, targets[rows], targets[idx], loss_fn.betas, ctx)
            if not ctx.active:
                g_loss = loss.detach()
            check_step_finite(g_loss, g_levels, {"image points": z, "entity points": points}, step, model, loss_fn)
            loss.backward()
            if cycle is not None:
                cycle.stash()
            grad_norm = optimizer_step(opt, ropt, named, cfg.grad_clip, step, ctx)
            step += 1
            steps_run += 1
            epoch_steps += 1
            epoch_samples += len(rows)
            log_steps += 1
            last_batch = b == steps_per_epoch - 1
            ckpt_now = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0 and not last_batch
            if cycle is not None and (cycle.steps == cfg.entity_refresh_every or last_batch or ckpt_now):
                table_params = set(map(id, cycle.finish()))
                optimizer_step(opt, ropt, [(n_, p) for n_, p in named if id(p) in table_params], cfg.grad_clip, step, ctx)
            for s in sched:
                s.step()
            sums += np.array([float(g_loss)] + g_levels)
            if emit is not None and step % cfg.log_every == 0:
                dt = time.perf_counter() - t_log
                emit({"train_loss": float(g_loss), "grad_norm": grad_norm, "tau": loss_fn.tau.item(),
                      "lambda": loss_fn.log_lambda.exp().item(), "sigma_km": loss_fn.sigma_km.item(),
                      "lr": sched[0].get_last_lr()[0], "steps_per_s": log_steps / dt,
                      "samples_per_s": log_steps * cfg.batch_size / dt}, step)
            if step % cfg.log_every == 0:
                t_log, log_steps = time.perf_counter(), 0
            if ckpt_now:
                save_checkpoint(epoch, b + 1)
        means = sums / steps_per_epoch
        dt = time.perf_counter() - t_epoch
        last = {"epoch_loss": float(means[0])}
        last.update({f"epoch_loss_l{l}": float(v) for l, v in enumerate(means[1:])})
        log.info("epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, means[0])
        if emit is not None:
            emit({**last, "epoch": epoch + 1, "epoch_seconds": dt, "epoch_steps_per_s": epoch_steps / dt,
                  "epoch_samples_per_s": epoch_samples / dt}, step)
        sums = np.zeros_like(sums)
        save_checkpoint(epoch + 1, 0)
    model_path = out_dir / "model.pt"
    if ctx.is_main:
        save_model(model.cpu(), model_path, tau=float(loss_fn.tau.detach()))
    return TrainResult(
        checkpoint=ckpt_path, model_path=model_path, steps=step, epochs_run=cfg.epochs - start_epoch,
        seconds=time.perf_counter() - t0, final=last, steps_run=steps_run,
    )


# --- command line: train from a folder of cached arrays (torchrun-ready) ---------------
def save_arrays(folder: str | Path, data: TrainData, ents: EntityData) -> Path:
    """Write ``folder/train.npz`` (features, targets, latlon_deg) and ``folder/entities.npz``
    (img_feat, latlon_deg, level_sizes, parent_index, and text_feat when present): the
    input of ``python -m hierloc.train``."""
    folder = Path(folder)
    ent_arrays = {"img_feat": ents.img_feat, "latlon_deg": ents.latlon_deg,
                  "level_sizes": np.asarray(ents.level_sizes, np.int64), "parent_index": ents.parent_index}
    if getattr(ents, "text_feat", None) is not None:
        ent_arrays["text_feat"] = ents.text_feat
    for name, arrays in (
        ("train.npz", {"features": data.features, "targets": data.targets, "latlon_deg": data.latlon_deg}),
        ("entities.npz", ent_arrays),
    ):
        with atomic_write_path(folder / name) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return folder


def load_arrays(folder: str | Path) -> tuple[TrainData, EntityData]:
    """Read what ``save_arrays`` wrote; entities.npz may omit img_feat (then computed from the
    images) and text_feat (a model without Text_i)."""
    folder = Path(folder)
    need = {"train.npz": ("features", "targets", "latlon_deg"), "entities.npz": ("latlon_deg", "level_sizes", "parent_index")}
    loaded = {}
    for name, keys in need.items():
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: write the folder with hierloc.train.save_arrays")
        z = dict(np.load(path))
        missing = [k for k in keys if k not in z]
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}: expected {list(keys)}")
        loaded[name] = z
    tr, en = loaded["train.npz"], loaded["entities.npz"]
    data = TrainData(tr["features"].astype(np.float32), tr["targets"].astype(np.int64), tr["latlon_deg"].astype(np.float32))
    sizes = [int(s) for s in en["level_sizes"]]
    img = en.get("img_feat")
    if img is None:
        img = entity_mean_features(data.features, data.targets, sizes)
    ents = EntityData(img, en["latlon_deg"].astype(np.float32), sizes, en["parent_index"].astype(np.int64))
    if "text_feat" in en:
        ents.text_feat = en["text_feat"].astype(np.float32)
    return data, ents


def _json_arg(text: str | None) -> dict:
    if not text:
        return {}
    return json.loads(Path(text).read_text() if text.endswith(".json") and Path(text).exists() else text)


def main(argv: list[str] | None = None) -> TrainResult:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m hierloc.train",
        description="Train HierLoc from cached arrays (see save_arrays). Several processes: "
                    "python -m torch.distributed.run --nproc_per_node N -m hierloc.train --data D --out O",
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
