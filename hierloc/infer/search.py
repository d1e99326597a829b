"""Search over the entity table: beam search down the hierarchy, or flat.

Every ranking here is an inner-product ranking. For the Lorentz model the keys are
the entity points with their time coordinate negated, so ``q . key = <q, h>_L`` and
``d(q, h) = sqrt(K) arcosh(-<q, h>_L / K)`` is decreasing in it: the largest inner
product is the nearest entity (HIERLOC.md section 8, the paper's FAISS trick). For
the Euclidean ablation, a query ``[z, 1]`` against a key ``[2h, -|h|^2]`` gives
``|z|^2 - |z - h|^2``, again largest for the nearest entity. Squared distances are
computed only for the candidates kept.

Beam search (``mode="beam"``): keep the ``k`` best countries, score only the children
of the kept entities at the next level, and so on. Children are found through a CSR
index per level: the entities of each level are stored sorted by their parent's
position, so the children of a kept beam are one contiguous block of keys. The
kernel is vectorised over queries (no Python loop per query): the children of all
kept beams of a chunk of queries are laid out ragged, scored by one gather and a
row-wise dot product, and the best ``k`` per query are taken from a padded matrix.

``backend="faiss"`` runs the same search with FAISS (hierloc.infer.faiss_levels). Both
backends rank by the same inner products; tests check that they agree with brute force.

Scores: ``score="last"`` ranks beams by the final entity's distance (the paper);
``score="sum"`` by the sum of the squared distances along the path (our kernel only:
a sum of distances is not an inner product).

Precision (docs/method.md, benchmarks/precision.py): in float32 the inner product of two
nearby points far from the origin is a difference of two numbers of size ~e^(2|v|), so
its rounding swamps the distance (at tangent norm 6, pair distances 0.1 are ranked wrongly
most of the time). Both backends therefore re-score the k final candidates (``rescore``,
default on): exact float64 distances from float64 copies of the query and the entity
points (``lorentz.sq_dist_exact``), reordered; the squared distances and scores returned
are those float64 values. The pruning of the levels above stays float32; ``dtype=float64``
runs the whole torch kernel in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hierloc.geometry import lorentz
from hierloc.infer.faiss_levels import FaissLevels, has_faiss

Mode = Literal["beam", "flat"]
Backend = Literal["auto", "torch", "faiss"]
BeamScore = Literal["last", "sum"]
Geometry = Literal["lorentz", "euclidean"]


@dataclass
class SearchResult:
    """Top-k final-level results per query, best first.

    rows: (B, k) entity-table rows of the finest level (-1 where fewer than k exist);
    sq_dist: (B, k) squared distance of each of them to the query (inf where -1; float64,
    exact when re-scored); score: (B, k) the ranking score (``sq_dist`` for ``score="last"``, the path sum
    for ``score="sum"``); paths: (B, k, L) entity rows of each result's path, coarse
    to fine (-1 where the row is -1); n_scored: (B,) entities scored per query.
    """

    rows: np.ndarray
    sq_dist: np.ndarray
    score: np.ndarray
    paths: np.ndarray
    n_scored: np.ndarray


def _sq_dist_from_ip(ip: torch.Tensor, geometry: Geometry, curvature: float, q_sqnorm: torch.Tensor | None) -> torch.Tensor:
    """Inner-product scores -> squared distances (same shape); -inf scores give inf."""
    if geometry == "lorentz":
        # -<q,h>_L / K >= 1 on the manifold; rounding can dip below: clamp (as lorentz.dist).
        z = (-ip.double() / curvature).clamp_min(1.0)
        out = curvature * torch.acosh(z).pow(2)
    else:
        out = (q_sqnorm.double()[:, None] - ip.double()).clamp_min(0.0)
    return torch.where(torch.isneginf(ip), torch.full_like(out, math.inf), out)


def _check_search(k: int, batch_size: int, mode: str, backend: str, score: str, device: torch.device) -> None:
    """ValueError naming what is wrong with ``EntityIndex.search``'s arguments."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mode not in ("beam", "flat") or backend not in ("auto", "torch", "faiss") or score not in ("last", "sum"):
        raise ValueError(f"mode {mode!r} / backend {backend!r} / score {score!r}: "
                         "use beam|flat, auto|torch|faiss, last|sum")
    if backend == "faiss" and score != "last":
        raise ValueError("the faiss backend ranks by inner product: only score='last' (use backend='torch')")
    if backend == "faiss" and device.type != "cpu":
        raise ValueError(f"the faiss backend runs on the CPU; this index lives on {device}")


def _sorted_by_parent(rows: torch.Tensor, parent: torch.Tensor, pos_of_row: torch.Tensor, lvl: int,
                      offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Level ``lvl``'s table rows sorted (stably) by their parent's sorted position, and the
    children count of each sorted position of the level above. ``pos_of_row``: (N,) sorted
    position of each table row placed so far (-1: not yet). ValueError naming an entity whose
    parent is not a row of the level above."""
    lo = int(offsets[lvl])
    parent_pos = pos_of_row[parent[rows]]
    if (parent_pos < 0).any() or (parent[rows] < offsets[lvl - 1]).any() or (parent[rows] >= lo).any():
        bad = int(rows[(parent_pos < 0) | (parent[rows] < offsets[lvl - 1]) | (parent[rows] >= lo)][0])
        raise ValueError(f"entity row {bad} (level {lvl}) has parent {int(parent[bad])}, "
                         f"not a row of level {lvl - 1}")
    order = torch.sort(parent_pos, stable=True).indices
    return rows[order], torch.bincount(parent_pos, minlength=int(offsets[lvl] - offsets[lvl - 1]))


class EntityIndex:
    """Entity points prepared for inner-product search, with a children index per level.

    Args:
        points: (N, D) entity points in entity-table order: Lorentz points (time
            coordinate first, geoopt's ``k`` convention) or Euclidean vectors.
        level_sizes: entities per level, coarse to fine (table rows ordered by level).
        parent_index: (N,) table row of each entity's parent, -1 on the top level.
        geometry: "lorentz" or "euclidean"; curvature: K of ``Lorentz(k=K)``.
        dtype: float32 (default; FAISS and the torch kernel) or float64 (torch kernel only).
    """

    def __init__(
        self,
        points: np.ndarray | torch.Tensor,
        level_sizes: list[int],
        parent_index: np.ndarray | torch.Tensor,
        *,
        geometry: Geometry = "lorentz",
        curvature: float = 1.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        pts = torch.as_tensor(points).detach().to(dtype).cpu()
        parent = torch.as_tensor(parent_index).long().cpu()
        n = int(sum(level_sizes))
        if pts.ndim != 2 or pts.shape[0] != n or parent.shape != (n,):
            raise ValueError(f"points must be ({n}, D) and parent_index ({n},) for level sizes {level_sizes}; "
                             f"got {tuple(pts.shape)} and {tuple(parent.shape)}")
        self.geometry, self.curvature = geometry, float(curvature)
        self.level_sizes = [int(s) for s in level_sizes]
        self.offsets = np.cumsum([0, *self.level_sizes])
        if geometry == "lorentz":
            if dtype == torch.float64:  # float32 points' x0 is off the hyperboloid by ~1e-7 x0^2: recompute it
                pts = lorentz.projx(pts[:, 1:], k=curvature)
            keys = torch.cat([-pts[:, :1], pts[:, 1:]], dim=1)
        else:
            keys = torch.cat([2 * pts, -pts.pow(2).sum(1, keepdim=True)], dim=1)
        #: per level: keys sorted by parent position (L, (N_l, D')), table row of each
        #: sorted position, and the CSR pointer over the previous level's sorted positions.
        self.keys: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []
        self.child_ptr: list[torch.Tensor | None] = [None]
        self.child_count: list[torch.Tensor | None] = [None]
        pos_of_row = torch.full((n,), -1, dtype=torch.long)  # sorted position of each table row
        for lvl, size in enumerate(self.level_sizes):
            lo = int(self.offsets[lvl])
            rows = torch.arange(lo, lo + size)
            if lvl > 0:
                rows, counts = _sorted_by_parent(rows, parent, pos_of_row, lvl, self.offsets)
                self.child_count.append(counts)
                self.child_ptr.append(torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
            pos_of_row[rows] = torch.arange(size)
            self.rows.append(rows)
            self.keys.append(keys[rows].contiguous())
        self._parent = parent
        self._pos_of_row = pos_of_row  # table row -> sorted position in its level (the re-score's gather)
        self.device = torch.device(device)
        if self.device.type != "cpu":
            self.keys = [t.to(self.device) for t in self.keys]
            self.rows = [t.to(self.device) for t in self.rows]
            self.child_ptr = [t if t is None else t.to(self.device) for t in self.child_ptr]
            self.child_count = [t if t is None else t.to(self.device) for t in self.child_count]
            self._parent = parent.to(self.device)
            self._pos_of_row = pos_of_row.to(self.device)
        self._faiss = FaissLevels(self.keys, self.level_sizes, self.child_count)  # used on the CPU only

    @classmethod
    def from_model(cls, model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> EntityIndex:
        """Index of a HierLocModel's current entity embeddings."""
        with torch.no_grad():
            h = model.eval().encode_entities()
        return cls(h, model.level_sizes, model.parent_index, geometry=model.cfg.geometry,
                   curvature=float(model.curvature.detach()), device=device, dtype=dtype)

    # --- properties -------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def dim(self) -> int:
        """Dimension of the points (queries have this many columns)."""
        d = self.keys[0].shape[1]
        return d if self.geometry == "lorentz" else d - 1

    def faiss_nbytes(self) -> int:
        """Memory of the FAISS structures built so far (vectors and ids)."""
        return self._faiss.nbytes()

    def nbytes(self) -> int:
        """Memory held by the index (keys, row maps, CSR pointers)."""
        tensors = [*self.keys, *self.rows, *(t for t in self.child_ptr if t is not None),
                   *(t for t in self.child_count if t is not None)]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def _query_keys(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.as_tensor(z).to(self.dtype)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {tuple(z.shape)}")
        if self.geometry == "lorentz" and self.dtype == torch.float64:  # as the keys: x0 from the space part
            z = lorentz.projx(z[:, 1:], k=self.curvature)
        return z if self.geometry == "lorentz" else torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], dim=1)

    # --- search -----------------------------------------------------------
    @torch.no_grad()
    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        *,
        k: int = 10,
        mode: Mode = "beam",
        score: BeamScore = "last",
        backend: Backend = "auto",
        batch_size: int = 2048,
        rescore: bool = True,
    ) -> SearchResult:
        """Top-k finest-level entities for each query point (B, D), best first.

        ``backend="auto"`` takes FAISS on the CPU (when installed, ``score="last"`` and
        float32) and our kernel otherwise (CUDA, ``score="sum"`` or float64). ``rescore``:
        the k final candidates re-ranked by exact float64 distances (module docstring).
        """
        _check_search(k, batch_size, mode, backend, score, self.device)
        if backend == "faiss" and self.dtype != torch.float32:
            raise ValueError("the faiss backend searches float32 keys; this index is float64 (use backend='torch')")
        z = torch.as_tensor(queries).detach().to(self.dtype).to(self.device)
        q = self._query_keys(z)
        q_sqnorm = z.pow(2).sum(1) if self.geometry == "euclidean" else None
        if backend == "auto":
            backend = ("faiss" if self.device.type == "cpu" and score == "last" and self.dtype == torch.float32
                       and has_faiss() else "torch")
        if mode == "flat":  # a dense (chunk, N_level) score matrix: keep it near 256 MB
            batch_size = max(1, min(batch_size, 2**26 // max(self.level_sizes)))
        fn = {("beam", "torch"): self._beam_torch, ("flat", "torch"): self._flat_torch,
              ("beam", "faiss"): self._faiss.beam, ("flat", "faiss"): self._faiss.flat}[(mode, backend)]
        parts = []
        for s in range(0, len(q), batch_size):
            qs = q[s : s + batch_size]
            pos, ip, acc, n_scored = fn(qs, k, score)
            parts.append(self._finish(pos, ip, acc, n_scored, None if q_sqnorm is None else q_sqnorm[s : s + batch_size],
                                      score, qs if rescore else None))
        if not parts:
            empty_i = np.zeros((0, k), np.int64)
            return SearchResult(empty_i, np.zeros((0, k), np.float64), np.zeros((0, k), np.float64),
                                np.zeros((0, k, self.n_levels), np.int64), np.zeros(0, np.int64))
        return SearchResult(*(np.concatenate(p) for p in zip(*parts)))

    def _finish(self, pos, ip, acc, n_scored, q_sqnorm, score, q_rescore=None) -> tuple:
        """Sorted positions of the finest level -> table rows, distances and paths.
        ``q_rescore``: the query keys, to re-rank the candidates by exact float64 distances."""
        last = self.n_levels - 1
        valid = pos >= 0
        rows = torch.where(valid, self.rows[last][pos.clamp_min(0)], torch.full_like(pos, -1))
        dev = rows.device
        paths = torch.full((*rows.shape, self.n_levels), -1, dtype=torch.long, device=dev)
        paths[..., last] = rows
        for lvl in range(last, 0, -1):
            paths[..., lvl - 1] = torch.where(valid, self._parent[paths[..., lvl].clamp_min(0)], paths[..., lvl])
        if q_rescore is not None:
            sq = self._exact_sq(q_rescore, pos, last)
            sc = sq if score == "last" else sum(
                self._exact_sq(q_rescore, self._pos_of_row[paths[..., lvl].clamp_min(0)], lvl) for lvl in range(last + 1))
            sc = torch.where(valid, sc, torch.full_like(sc, math.inf))
            order = torch.sort(sc, dim=1, stable=True).indices  # inf (missing) stays last
            rows, sq, sc = (torch.gather(t, 1, order) for t in (rows, sq, sc))
            paths = torch.gather(paths, 1, order[..., None].expand_as(paths))
        else:
            sq = _sq_dist_from_ip(torch.where(valid, ip, torch.full_like(ip, -math.inf)), self.geometry, self.curvature, q_sqnorm)
            sc = sq if score == "last" else torch.where(valid, acc, torch.full_like(acc, math.inf))
        return tuple(t.cpu().numpy() for t in (rows, sq.double(), sc.double(), paths, n_scored))

    def _exact_sq(self, q: torch.Tensor, pos: torch.Tensor, lvl: int) -> torch.Tensor:
        """float64 squared distances (B, k) of query keys (B, D') to level ``lvl``'s sorted
        positions ``pos`` (B, k), from the stored points (inf where pos is -1)."""
        key = self.keys[lvl][pos.clamp_min(0)]
        if self.geometry == "lorentz":  # space parts only: the time coordinate is recomputed
            sq = lorentz.sq_dist_exact(q[:, None, 1:], key[..., 1:], k=self.curvature)
        else:  # keys are [2h, -|h|^2], queries [z, 1]: halving is exact
            sq = (q[:, None, :-1].double() - key[..., :-1].double() / 2).pow(2).sum(-1)
        return torch.where(pos >= 0, sq, torch.full_like(sq, math.inf))

    def _topk(self, s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Largest k along dim 1, padded with (-inf, -1) when there are fewer columns."""
        kk = min(k, s.shape[1])
        val, idx = torch.topk(s, kk, dim=1, largest=True, sorted=True)
        idx = torch.where(torch.isneginf(val), torch.full_like(idx, -1), idx)
        if kk < k:
            pad = k - kk
            val = torch.cat([val, torch.full((len(s), pad), -math.inf, dtype=val.dtype, device=s.device)], 1)
            idx = torch.cat([idx, torch.full((len(s), pad), -1, dtype=torch.long, device=s.device)], 1)
        return val, idx

    def _level_sq(self, ip: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        q_sqnorm = None if self.geometry == "lorentz" else q[:, :-1].pow(2).sum(1)
        return _sq_dist_from_ip(ip, self.geometry, self.curvature, q_sqnorm).double()

    def _flat_torch(self, q: torch.Tensor, k: int, score: BeamScore):
        """Every entity of every level scored; for ``sum`` the path sums are cumulated down."""
        dev = q.device
        b, last = len(q), self.n_levels - 1
        if score == "last":
            ip = q @ self.keys[last].T
            val, pos = self._topk(ip, k)
            return pos, val, None, torch.full((b,), self.level_sizes[last], dtype=torch.long, device=dev)
        acc = None
        for lvl in range(self.n_levels):
            ip = q @ self.keys[lvl].T
            d = self._level_sq(ip, q)
            if acc is not None:  # sorted position of each entity's parent, in the previous level
                parent_pos = torch.repeat_interleave(torch.arange(self.level_sizes[lvl - 1], device=dev), self.child_count[lvl])
                d = d + acc[:, parent_pos]
            acc = d
        val, pos = self._topk(-acc, k)
        ip_last = torch.gather(ip, 1, pos.clamp_min(0))
        return pos, ip_last, -val, torch.full((b,), sum(self.level_sizes), dtype=torch.long, device=dev)

    def _beam_torch(self, q: torch.Tensor, k: int, score: BeamScore):
        dev = q.device
        b = len(q)
        ip = q @ self.keys[0].T
        n_scored = torch.full((b,), self.level_sizes[0], dtype=torch.long, device=dev)
        if score == "sum":
            d = self._level_sq(ip, q)
            acc_val, pos = self._topk(-d, k)
            acc = -acc_val
            val = torch.gather(ip, 1, pos.clamp_min(0))
        else:
            val, pos = self._topk(ip, k)
            acc = None
        rows_b = torch.arange(b, device=dev)
        for lvl in range(1, self.n_levels):
            valid = pos >= 0
            p = pos.clamp_min(0)
            counts = torch.where(valid, self.child_count[lvl][p], 0)  # (B, kb)
            starts = self.child_ptr[lvl][p]
            total = counts.sum(1)  # (B,)
            n_scored += total
            width = int(total.max()) if b else 0
            if width == 0:
                pos = torch.full((b, k), -1, dtype=torch.long, device=dev)
                val = torch.full((b, k), -math.inf, dtype=q.dtype, device=dev)
                continue
            # Ragged layout: the children of every kept beam, beam after beam, query
            # after query; j is a candidate's column in its query's padded row.
            kb = counts.shape[1]
            cnt = counts.reshape(-1)
            n_cand = int(total.sum())
            ar = torch.arange(n_cand, device=dev)
            cand = torch.repeat_interleave(starts.reshape(-1) - (cnt.cumsum(0) - cnt), cnt) + ar
            flat_q = torch.repeat_interleave(rows_b, total)
            j = ar - torch.repeat_interleave(total.cumsum(0) - total, total)
            s = (self.keys[lvl].index_select(0, cand) * q.index_select(0, flat_q)).sum(1)
            if score == "sum":
                beam = torch.repeat_interleave(torch.arange(b * kb, device=dev), cnt) - flat_q * kb
            padded = torch.full((b, width), -math.inf, dtype=q.dtype, device=dev)
            padded[flat_q, j] = s
            cand_pad = torch.full((b, width), -1, dtype=torch.long, device=dev)
            cand_pad[flat_q, j] = cand
            if score == "sum":
                parent_acc = torch.full((b, width), math.inf, dtype=torch.float64, device=dev)
                parent_acc[flat_q, j] = acc[flat_q, beam]
                neg_total, sel = self._topk(-(self._level_sq(padded, q) + parent_acc), k)
                acc = -neg_total
                val = torch.gather(padded, 1, sel.clamp_min(0))
            else:
                val, sel = self._topk(padded, k)
            pos = torch.where(sel >= 0, torch.gather(cand_pad, 1, sel.clamp_min(0)), torch.full_like(sel, -1))
        return pos, val, acc, n_scored
