"""The FAISS backend of hierloc.infer.search's ``EntityIndex`` (``backend="faiss"``, CPU only).

A flat inner-product index for the top level and, below it, an IVF index per level whose
inverted lists are the children of each entity of the level above, searched with the kept
beams as the pre-assigned lists. The keys are the index's, sorted by parent position, so a
FAISS id is a sorted position; both search functions return what the torch kernels return:
(sorted positions (B, k), inner products (B, k), None, entities scored (B,)).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch


def has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class FaissLevels:
    """FAISS structures over one index's per-level keys, each built on first use.

    keys: per level (N_l, D') CPU tensors sorted by parent position; level_sizes: N_l;
    child_count: per level (N_{l-1},) children of each sorted position above (None on top).
    """

    def __init__(self, keys: list[torch.Tensor], level_sizes: list[int], child_count: list[torch.Tensor | None]):
        self.keys, self.level_sizes, self.child_count = keys, level_sizes, child_count
        self._flats: dict[int, object] = {}
        self._ivfs: dict[int, tuple] = {}
        self._lock = threading.Lock()

    @property
    def n_levels(self) -> int:
        return len(self.level_sizes)

    def _flat_index(self, lvl: int):
        """FAISS flat inner-product index over one level (built on first use)."""
        import faiss

        if lvl not in self._flats:
            index = faiss.IndexFlatIP(self.keys[lvl].shape[1])
            index.add(np.ascontiguousarray(self.keys[lvl].numpy(), dtype=np.float32))
            self._flats[lvl] = index
        return self._flats[lvl]

    def _ivf_index(self, lvl: int):
        """FAISS IVF index over level ``lvl`` >= 1 whose inverted lists are the children of
        each entity of the level above (built on first use). Searched pre-assigned only."""
        import faiss

        if lvl not in self._ivfs:
            x = np.ascontiguousarray(self.keys[lvl].numpy(), dtype=np.float32)
            d, nlist = x.shape[1], self.level_sizes[lvl - 1]
            quantizer = faiss.IndexFlatIP(d)  # never used: every search is pre-assigned
            ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.is_trained = True
            parent_pos = np.repeat(np.arange(nlist, dtype=np.int64), self.child_count[lvl].numpy())
            ids = np.arange(len(x), dtype=np.int64)  # FAISS ids are sorted positions
            ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(parent_pos))
            self._ivfs[lvl] = (ivf, quantizer)  # the IVF does not own its quantizer: keep it alive
        return self._ivfs[lvl][0]

    def nbytes(self) -> int:
        """Memory of the FAISS structures built so far (vectors and ids)."""
        total = sum(ix.ntotal * ix.d * 4 for ix in self._flats.values())
        total += sum(ivf.ntotal * (ivf.code_size + 8) for ivf, _ in self._ivfs.values())
        return int(total)

    def flat(self, q: torch.Tensor, k: int, score: str):
        """Every entity of the finest level scored (``score`` is always "last" here)."""
        flat = self._flat_index(self.n_levels - 1)
        val, pos = flat.search(np.ascontiguousarray(q.numpy()), k)
        return _from_faiss(val, pos) + (None, torch.full((len(q),), self.level_sizes[-1], dtype=torch.long))

    def beam(self, q: torch.Tensor, k: int, score: str):
        """Beam search down the levels (``score`` is always "last" here)."""
        with self._lock:  # nprobe is set on the shared IVF indexes: one search at a time
            return self._beam_locked(q, k)

    def _beam_locked(self, q: torch.Tensor, k: int):
        x = np.ascontiguousarray(q.numpy())
        val, pos = self._flat_index(0).search(x, k)
        n_scored = torch.full((len(q),), self.level_sizes[0], dtype=torch.long)
        for lvl in range(1, self.n_levels):
            ivf = self._ivf_index(lvl)
            # Never more probes than lists: FAISS answers nothing at all when asked to.
            nprobe = min(k, self.level_sizes[lvl - 1])
            assign = np.ascontiguousarray(pos[:, :nprobe], dtype=np.int64)
            ivf.nprobe = nprobe
            kept = torch.as_tensor(assign)
            n_scored += torch.where(kept >= 0, self.child_count[lvl][kept.clamp_min(0)], 0).sum(1)
            val, pos = ivf.search_preassigned(x, k, assign, np.zeros(assign.shape, np.float32))
        return _from_faiss(val, pos) + (None, n_scored)


def _from_faiss(val: np.ndarray, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """FAISS answers as torch (positions long, inner products float; -inf where FAISS found none, -1)."""
    pos_t = torch.as_tensor(pos).long()
    val_t = torch.where(pos_t >= 0, torch.as_tensor(val).float(), torch.tensor(-math.inf))
    return pos_t, val_t
