"""The retrieval baseline (the paper's "SC Retrieval", HIERLOC.md sections 8-9).

Predict the location of the training image whose backbone feature is nearest to the
query's: cosine similarity (features L2-normalised, so an inner product), exact search
with a FAISS flat index (a numpy matmul when FAISS is missing). The cost the paper
contrasts with HierLoc: memory and time grow with the number of training images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    # A zero feature (e.g. a blank image) has no direction: it stays zero and matches nothing better.
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class RetrievalResult:
    """rows: (B, k) training rows, most similar first; similarity: (B, k) cosine; seconds: search time."""

    rows: np.ndarray
    similarity: np.ndarray
    seconds: float


class RetrievalIndex:
    """Exact cosine nearest neighbours over training features (N, D)."""

    def __init__(self, features: np.ndarray, *, use_faiss: bool = True) -> None:
        feats = np.asarray(features)
        if feats.ndim != 2 or len(feats) == 0:
            raise ValueError(f"features must be a non-empty (N, D) array, got shape {feats.shape}")
        if not np.isfinite(feats).all():
            raise ValueError("features hold NaN or inf: drop the images whose features failed first")
        self._x = _normalise(feats)
        self._faiss = None
        if use_faiss:
            try:
                import faiss
            except ImportError:
                faiss = None
            if faiss is not None:
                self._faiss = faiss.IndexFlatIP(self._x.shape[1])
                self._faiss.add(self._x)

    @property
    def nbytes(self) -> int:
        return int(self._x.nbytes * (2 if self._faiss is not None else 1))

    def search(self, queries: np.ndarray, k: int = 1, batch_size: int = 4096) -> RetrievalResult:
        q = _normalise(np.asarray(queries))
        if q.ndim != 2 or q.shape[1] != self._x.shape[1]:
            raise ValueError(f"queries must be (B, {self._x.shape[1]}), got {q.shape}")
        k = min(k, len(self._x))
        t0 = time.perf_counter()
        if self._faiss is not None:
            sim, rows = self._faiss.search(q, k)
        else:
            parts = []
            for s in range(0, len(q), batch_size):
                scores = q[s : s + batch_size] @ self._x.T
                idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
                parts.append((np.take_along_axis(scores, idx, 1), idx))
            sim = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, k), np.float32)
            rows = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, k), np.int64)
        return RetrievalResult(rows.astype(np.int64), sim.astype(np.float32), time.perf_counter() - t0)
