"""Inference: image features -> hyperboloid point -> ranked entities per level (HIERLOC.md section 8).

One interface, whatever the model's insides: ``predict_rows`` takes frozen backbone
features, encodes them with the model's image branch, and searches the entity
table (hierloc.infer.search: beam search by default, flat as an option; FAISS or our own
kernel). It returns the top-k paths with their squared distances and calibrated
probabilities: a softmax over the k beams of ``-score / tau`` where tau is the
temperature the loss learned (the model's own scale of "how far is unlikely"). The
probability of an entity at a coarser level is the sum over the beams whose path
goes through it, so a country's probability is never below its best city's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from hierloc.features.rows import CHUNK_ROWS, feature_chunks
from hierloc.model.model import HierLocModel
from hierloc.infer.search import Backend, BeamScore, EntityIndex, Mode


@dataclass
class BeamResult:
    """Per query (B queries, k results, L levels), best first.

    picks: (B, L) entity rows of the winning path, coarse to fine; pick_score: (B,)
    its score; pick_prob: (B, L) probability of each picked entity (summed over the
    beams through it); top_rows: (B, k) finest-level rows (-1 where fewer than k);
    top_scores: (B, k) their ranking scores (squared distance for ``score="last"``);
    top_paths: (B, k, L) their paths; top_probs: (B, k) softmax over the beams;
    n_scored: (B,) entities scored; seconds: search time, backbone excluded.
    """

    picks: np.ndarray
    pick_score: np.ndarray
    pick_prob: np.ndarray
    top_rows: np.ndarray
    top_scores: np.ndarray
    top_paths: np.ndarray
    top_probs: np.ndarray
    n_scored: np.ndarray
    seconds: float

    @property
    def queries_per_s(self) -> float:
        return len(self.picks) / self.seconds if self.seconds > 0 else math.inf


def beam_probabilities(scores: np.ndarray, tau: float) -> np.ndarray:
    """softmax(-score / tau) over each row (B, k); inf scores (missing beams) get 0."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logits = -np.asarray(scores, dtype=np.float64) / tau
    finite = np.isfinite(logits)
    logits = np.where(finite, logits, -np.inf)
    top = np.max(np.where(finite, logits, -np.inf), axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(finite, np.exp(logits - top), 0.0)
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def path_probabilities(paths: np.ndarray, probs: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Probability of each picked entity: sum of the beams through it. (B,k,L),(B,k),(B,L) -> (B,L)."""
    through = paths == picks[:, None, :]  # (B, k, L)
    return (through * probs[:, :, None]).sum(axis=1)


@torch.no_grad()
def encode_queries(model: HierLocModel, features: torch.Tensor | np.ndarray, *, batch_size: int = 4096,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Backbone features (B, D_img) -> points of the model's space (B, d+1), on the CPU.

    With cross-modal attention the entity tangents (the keys) are computed once for
    all batches (the model caches them across calls until its weights change).
    """
    model = model.eval().to(device)
    feats = torch.as_tensor(features)
    ent_tangent = model.cached_entity_tangent() if model.attn is not None and len(feats) else None
    out = [model.encode_images(feats[s : s + batch_size].to(device), ent_tangent=ent_tangent).float().cpu()
           for s in range(0, len(feats), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.cfg.dim + (model.cfg.geometry == "lorentz"))


def _backend_and_index(model: HierLocModel, backend: Backend, device, index: EntityIndex | None
                       ) -> tuple[Backend, EntityIndex]:
    """The backend ``auto`` means on ``device`` and the index to search (built from the model when None)."""
    if backend == "auto" and torch.device(device).type != "cpu":
        backend = "torch"  # FAISS runs on the CPU here; the torch kernel runs where the model runs
    if index is None:
        index = EntityIndex.from_model(model, device=device if backend == "torch" else "cpu")
    return backend, index


@torch.no_grad()
def beam_search(
    model: HierLocModel,
    features: torch.Tensor | np.ndarray,
    *,
    k: int = 10,
    score: BeamScore = "last",
    mode: Mode = "beam",
    backend: Backend = "auto",
    batch_size: int = 2048,
    device: str | torch.device = "cpu",
    tau: float = 1.0,
    index: EntityIndex | None = None,
    rescore: bool = True,
) -> BeamResult:
    """Search the entity table for every row of ``features`` (B, D): frozen backbone features.

    ``index`` reuses an EntityIndex built once (EntityIndex.from_model); without it
    one is built here from the model's current entity embeddings. ``rescore``: the k final
    candidates re-ranked by exact float64 distances (EntityIndex.search).
    """
    backend, index = _backend_and_index(model, backend, device, index)
    z = encode_queries(model, features, device=device)
    t0 = time.perf_counter()
    res = index.search(z, k=k, mode=mode, score=score, backend=backend, batch_size=batch_size,
                       rescore=rescore)
    seconds = time.perf_counter() - t0
    probs = beam_probabilities(res.score, tau)
    picks = res.paths[:, 0, :]
    return BeamResult(
        picks=picks, pick_score=res.score[:, 0], pick_prob=path_probabilities(res.paths, probs, picks),
        top_rows=res.rows, top_scores=res.score, top_paths=res.paths, top_probs=probs,
        n_scored=res.n_scored, seconds=seconds,
    )


def beam_search_chunks(
    model: HierLocModel,
    features,
    *,
    chunk_rows: int = CHUNK_ROWS,
    prepare=None,
    backend: Backend = "auto",
    device: str | torch.device = "cpu",
    index: EntityIndex | None = None,
    **kwargs,
) -> BeamResult:
    """``beam_search`` over (N, D) features block by block (an array or a FeatureRows, so a test
    split is never wholly in memory): one EntityIndex for every block, the small per-row results
    concatenated; the same result as one call. ``prepare``: applied to each float32 block first
    (e.g. Predictor.check_features)."""
    backend, index = _backend_and_index(model, backend, device, index)  # once for every block
    parts = [beam_search(model, prepare(block) if prepare is not None else block, backend=backend, device=device,
                         index=index, **kwargs) for block in feature_chunks(features, chunk_rows)]
    if not parts:  # no rows: one empty call gives the right shapes
        empty = np.zeros((0, features.shape[1]), np.float32)
        parts = [beam_search(model, empty, backend=backend, device=device, index=index, **kwargs)]
    return BeamResult(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("picks", "pick_score", "pick_prob", "top_rows", "top_scores", "top_paths", "top_probs",
                          "n_scored")}, seconds=sum(p.seconds for p in parts))
