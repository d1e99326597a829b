"""The search part of benchmarks/gpu.py: HierLoc beam search and the paper's retrieval baseline.

- beam search k=10 over a synthetic entity table (benchmarks/synthetic.py: OSV-5M's sizes, heavy-tailed
  fan-out, d=128 on the hyperboloid; queries near random cities, features given as in the paper's
  timing): the torch kernel on the device (hierloc.infer.search.EntityIndex, backend "torch") and FAISS
  on the CPU with every core (backend "faiss"), and the share of queries whose top-1 city is the same;
- exact retrieval, the paper's baseline (benchmarks/inference.py): the top-1 inner product over
  4.9M x 128 random image embeddings on the same device, fp32 (TF32 as torch's setting says) and bf16,
  over chunks of the database so that no score matrix exceeds SCORE_ELEMS elements.

Timings drain the device's queue before and after (gpu_common.timed); every search runs once
untimed first (kernel selection, FAISS's IVF lists, CUDA's lazy initialisation).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import guard, timed  # noqa: E402
from synthetic import make_hierarchy, make_queries  # noqa: E402

from hierloc.infer.search import EntityIndex  # noqa: E402

BEAM_K = 10  # the paper's beam width
RETRIEVAL_DIM = 128  # the paper's 2.56 GB for 4.9M embeddings (benchmarks/inference.py)
SCORE_ELEMS = 1 << 28  # the largest (queries x database chunk) score matrix: 1 GiB of float32
FAISS_BATCH = 8192  # queries per FAISS call (as benchmarks/inference.py)


@torch.no_grad()
def exact_topk(db: torch.Tensor, queries: torch.Tensor, k: int = 1, *, max_elems: int = SCORE_ELEMS) -> torch.Tensor:
    """Rows (nq, k) of ``db`` (N, D) with the largest inner products with each query (nq, D), best first.

    Scores are computed in ``db``'s dtype (bf16 for the bf16 baseline), over blocks of at most
    1,024 queries x ``max_elems // 1024`` database rows; each block's top k is merged into the
    running top k (float32 values). Asynchronous on CUDA: nothing here waits for the device.
    """
    n = db.shape[0]
    q_block = max(1, min(len(queries), 1024))
    chunk = max(k, max_elems // q_block)
    out = []
    for s in range(0, len(queries), q_block):
        qs = queries[s : s + q_block]
        best_v = best_i = None
        for c in range(0, n, chunk):
            block = qs @ db[c : c + chunk].T
            v, i = block.topk(min(k, block.shape[1]), dim=1)
            v, i = v.float(), i + c
            if best_v is not None:
                v, j = torch.cat([best_v, v], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        out.append(best_i)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long, device=db.device)


def retrieval_rates(n: int, n_queries: int, device: torch.device, *, k: int = 1, seed: int = 2) -> dict:
    """Queries/s of exact top-k retrieval over ``n`` x RETRIEVAL_DIM random embeddings on ``device``,
    fp32 then bf16 (the bf16 copy made after the fp32 run; the fp32 one freed first), and how
    often the bf16 top-1 is the fp32 one."""
    gen = torch.Generator(device=device).manual_seed(seed)
    db = torch.randn(n, RETRIEVAL_DIM, device=device, generator=gen)
    q = torch.randn(n_queries, RETRIEVAL_DIM, device=device, generator=gen)
    out = {"n": n, "dim": RETRIEVAL_DIM, "k": k, "queries": n_queries, "device": str(device),
           "tf32": bool(torch.backends.cuda.matmul.allow_tf32), "score_elems_max": SCORE_ELEMS}
    exact_topk(db, q[:64], k)  # warm-up
    secs, top32 = timed(lambda: exact_topk(db, q, k), device)
    out["fp32_qps"] = n_queries / secs
    db16, q16 = db.to(torch.bfloat16), q.to(torch.bfloat16)
    del db
    exact_topk(db16, q16[:64], k)
    secs, top16 = timed(lambda: exact_topk(db16, q16, k), device)
    out["bf16_qps"] = n_queries / secs
    out["bf16_top1_agreement"] = float((top16[:, 0] == top32[:, 0]).float().mean())
    return out


def beam_rates(levels: tuple[int, ...], n_queries: int, device: torch.device, *, threads: int,
               batch_size: int, retrieval_n: int, retrieval_queries: int) -> dict:
    """The beam rows: the torch kernel on ``device``, FAISS on ``threads`` CPU threads, their top-1
    agreement, and the retrieval baseline; each part records its own failure in ``errors``."""
    t0 = time.perf_counter()
    h = make_hierarchy(tuple(levels), dim=128, seed=0)
    points, q = h.points(), make_queries(h, n_queries, seed=1)
    out: dict = {"levels": h.level_sizes, "entities": int(sum(h.level_sizes)), "queries": n_queries, "k": BEAM_K,
                 "build_s": time.perf_counter() - t0, "errors": {}}
    top1 = {}
    with guard(out["errors"], "torch kernel"):
        index = EntityIndex(points, h.level_sizes, h.parent_index, device=device)
        index.search(q[:batch_size], k=BEAM_K, backend="torch", batch_size=batch_size)  # warm-up
        secs, res = timed(lambda: index.search(q, k=BEAM_K, backend="torch", batch_size=batch_size), device)
        out["torch"] = {"device": str(device), "batch_size": batch_size, "seconds": secs, "qps": n_queries / secs,
                        "scored_per_query": float(res.n_scored.mean())}
        top1["torch"] = res.rows[:, 0]
        del index
    with guard(out["errors"], "faiss"):
        import faiss

        faiss.omp_set_num_threads(threads)
        index = EntityIndex(points, h.level_sizes, h.parent_index, device="cpu")
        index.search(q[:2048], k=BEAM_K, backend="faiss")  # builds the IVF lists
        secs, res = timed(lambda: index.search(q, k=BEAM_K, backend="faiss", batch_size=FAISS_BATCH), "cpu")
        out["faiss"] = {"device": "cpu", "threads": threads, "seconds": secs, "qps": n_queries / secs}
        top1["faiss"] = res.rows[:, 0]
        del index
    if len(top1) == 2:
        out["top1_agreement"] = float(np.mean(top1["torch"] == top1["faiss"]))
    with guard(out["errors"], "retrieval"):
        out["retrieval"] = retrieval_rates(retrieval_n, retrieval_queries, device)
    return out
