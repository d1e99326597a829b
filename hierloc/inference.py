"""Inference: beam search down the entity hierarchy (HIERLOC.md section 8).

Score the countries, keep the best k, score only the children of the kept ones at
the next level, and so on; the best-scoring city beam wins, and its path gives the
per-level picks. Vectorised over queries: a kept-parent mask per level, no Python
loop per query. Scores are squared distances (lower is better); with
``score="sum"`` a beam's score adds its ancestors' squared distances, with
``score="last"`` only the entity's own distance counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hierloc.model import HierLocModel

BeamScore = Literal["sum", "last"]


@dataclass
class BeamResult:
    """picks: (B, L) entity-table rows of the winning path, coarse to fine;
    pick_score: (B,) its score; top_rows / top_scores: (B, k) the best k final-level
    beams, best first (rows are -1 where fewer than k candidates existed)."""

    picks: np.ndarray
    pick_score: np.ndarray
    top_rows: np.ndarray
    top_scores: np.ndarray


def _beam_chunk(
    model: HierLocModel, z: torch.Tensor, h: torch.Tensor, k: int, score: BeamScore
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_levels = len(model.level_sizes)
    b = z.shape[0]
    prev_score: torch.Tensor | None = None  # (B, N_{l-1}), +inf where not kept
    for lvl in range(n_levels):
        sl = model.level_slice(lvl)
        d = model.sq_dist(z, h[sl])  # (B, N_l)
        if prev_score is not None:
            parent_local = model.parent_index[sl] - model.level_offsets[lvl - 1]
            inherited = prev_score[:, parent_local]  # inf for children of dropped beams
            d = torch.where(torch.isinf(inherited), inherited, d + inherited if score == "sum" else d)
        kk = min(k, d.shape[1])
        top_val, top_idx = torch.topk(d, kk, dim=1, largest=False)
        if lvl < n_levels - 1:
            prev_score = torch.full_like(d, float("inf")).scatter_(1, top_idx, top_val)
    top_rows = top_idx + model.level_offsets[n_levels - 1]
    top_rows = torch.where(torch.isinf(top_val), torch.full_like(top_rows, -1), top_rows)
    # Walk the winner's parents up to the root for the per-level picks.
    picks = torch.empty(b, n_levels, dtype=torch.long, device=z.device)
    picks[:, -1] = top_rows[:, 0]
    for lvl in range(n_levels - 1, 0, -1):
        picks[:, lvl - 1] = model.parent_index[picks[:, lvl]]
    return picks, top_rows, top_val


@torch.no_grad()
def beam_search(
    model: HierLocModel,
    features: torch.Tensor | np.ndarray,
    *,
    k: int = 10,
    score: BeamScore = "last",
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> BeamResult:
    """Beam search for every row of ``features`` (B, D): frozen backbone features."""
    model = model.eval().to(device)
    feats = torch.as_tensor(features)
    h = model.encode_entities()
    outs = []
    for start in range(0, feats.shape[0], batch_size):
        z = model.encode_images(feats[start : start + batch_size].to(device))
        outs.append(_beam_chunk(model, z, h, k, score))
    if not outs:
        empty = np.zeros((0, len(model.level_sizes)), dtype=np.int64)
        return BeamResult(empty, np.zeros(0), np.zeros((0, k), np.int64), np.zeros((0, k)))
    picks, top_rows, top_val = (torch.cat(parts).cpu().numpy() for parts in zip(*outs))
    return BeamResult(picks=picks, pick_score=top_val[:, 0], top_rows=top_rows, top_scores=top_val)
