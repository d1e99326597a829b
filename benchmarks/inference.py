"""Search throughput at OSV-5M size: HierLoc beam and flat search vs retrieval, in one process.

The paper's efficiency table (HIERLOC.md section 8) on this machine's CPU threads:

- a synthetic entity hierarchy of OSV-5M's size (233 / 4.9k / 29k / 210k, heavy-tailed
  fan-out: benchmarks/synthetic.py), d=128 on the hyperboloid (d+1 = 129 floats per entity);
- queries: points near random cities (the backbone and the image MLP are excluded, as
  in the paper's timing: features given);
- HierLoc beam k=10 with FAISS (IVF whose lists are the children of each parent) and with
  our torch kernel; flat search over all 210k cities;
- retrieval: exact inner-product search (FAISS IndexFlatIP) over 4.9M synthetic image
  embeddings of the paper's retrieval size: 128 floats, which is what its 2.56 GB for
  4.9M embeddings and 1.28 GFLOPs/query imply.

Every row reports queries/s, the memory the method's index holds, and GFLOPs/query
(2 x dimension x vectors scored). Ratios are against retrieval in the same run.

    python benchmarks/inference.py --quick          # full hierarchy, 200k retrieval set, < 1 min
    python benchmarks/inference.py                  # 4.9M retrieval set (~2.5 GB of RAM)

Last line: ``beam_qps: <number>`` (the default backend on this machine).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import OSV5M_LEVEL_SIZES, make_hierarchy, make_queries  # noqa: E402

from hierloc.infer.search import EntityIndex  # noqa: E402

RETRIEVAL_DIM = 128


def timed(fn, n_queries: int, repeat: int = 1) -> tuple[float, object]:
    """Best of ``repeat`` runs: (queries/s, result of the last run)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return n_queries / best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k retrieval set and fewer queries (under a minute)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch and FAISS (default 2)")
    ap.add_argument("--retrieval-n", type=int, default=None, help="retrieval set size (default 4.9M, quick 200k)")
    ap.add_argument("--queries", type=int, default=None, help="beam queries (default 210,122 as OSV-5M test; quick 50k)")
    ap.add_argument("--k", type=int, default=10, help="beam width (paper: 10)")
    args = ap.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    n_ret = args.retrieval_n or (200_000 if args.quick else 4_900_000)
    n_q = args.queries or (50_000 if args.quick else 210_122)
    n_torch, n_flat, n_ret_q = min(n_q, 20_000), 2_000 if args.quick else 5_000, 200 if args.quick else 500

    t0 = time.perf_counter()
    h = make_hierarchy(OSV5M_LEVEL_SIZES, dim=128, seed=0)
    index = EntityIndex(h.points(), h.level_sizes, h.parent_index)
    q = make_queries(h, n_q, seed=1)
    print(f"hierarchy {h.level_sizes}, max fan-out per level {[int(h.fanout(l).max()) for l in (1, 2, 3)]}, "
          f"built in {time.perf_counter() - t0:.1f} s; {args.threads} threads; {n_q} queries")
    d_keys = index.keys[0].shape[1]
    rows = []

    # HierLoc beam, FAISS backend (the default on a CPU).
    index.search(q[:2048], k=args.k, backend="faiss")  # builds the IVF lists, warms up
    qps, res = timed(lambda: index.search(q, k=args.k, backend="faiss", batch_size=8192), n_q, repeat=2)
    beam_flops = 2 * d_keys * res.n_scored.mean()
    rows.append(("HierLoc beam k=%d, FAISS" % args.k, n_q, qps, index.faiss_nbytes() + index.nbytes() - sum(
        t.numel() * t.element_size() for t in index.keys), beam_flops))
    beam_faiss_qps, beam_rows = qps, res.rows

    # HierLoc beam, our torch kernel.
    index.search(q[:1024], k=args.k, backend="torch")
    qps, res_t = timed(lambda: index.search(q[:n_torch], k=args.k, backend="torch", batch_size=2048), n_torch, repeat=2)
    rows.append(("HierLoc beam k=%d, torch kernel" % args.k, n_torch, qps, index.nbytes(), 2 * d_keys * res_t.n_scored.mean()))
    agree = float((res_t.rows[:, 0] == beam_rows[:n_torch, 0]).mean())

    # HierLoc flat: every city scored.
    qps, res_f = timed(lambda: index.search(q[:n_flat], k=args.k, mode="flat", backend="faiss"), n_flat)
    rows.append(("HierLoc flat (all cities), FAISS", n_flat, qps, h.level_sizes[-1] * d_keys * 4, 2 * d_keys * h.level_sizes[-1]))
    beam_vs_flat_top1 = float((res_f.rows[:, 0] == beam_rows[:n_flat, 0]).mean())

    # Retrieval baseline: exact search over n_ret image embeddings.
    rng = np.random.default_rng(2)
    t0 = time.perf_counter()
    flat_ip = faiss.IndexFlatIP(RETRIEVAL_DIM)
    for s in range(0, n_ret, 500_000):  # in chunks: FAISS keeps its own copy
        flat_ip.add(rng.standard_normal((min(500_000, n_ret - s), RETRIEVAL_DIM), dtype=np.float32))
    build_s = time.perf_counter() - t0
    rq = rng.standard_normal((n_ret_q, RETRIEVAL_DIM), dtype=np.float32)
    flat_ip.search(rq[:8], 1)
    qps, _ = timed(lambda: flat_ip.search(rq, 1), n_ret_q)
    rows.append((f"retrieval, {n_ret / 1e6:.1f}M x {RETRIEVAL_DIM} (FAISS flat)", n_ret_q, qps,
                 flat_ip.ntotal * RETRIEVAL_DIM * 4, 2 * RETRIEVAL_DIM * n_ret))
    retrieval_qps = qps
    if n_ret != 4_900_000:  # scale to the full 4.9M set: exact search time is linear in its size
        rows.append(("retrieval, 4.9M (linear extrapolation)", None, qps * n_ret / 4_900_000,
                     4_900_000 * RETRIEVAL_DIM * 4, 2 * RETRIEVAL_DIM * 4_900_000))
        retrieval_qps = qps * n_ret / 4_900_000

    print(f"\nretrieval set built in {build_s:.1f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    print(f"\n| method | queries | queries/s | index GB | GFLOPs/query | vs retrieval (4.9M) |")
    print("|---|---|---|---|---|---|")
    for name, n, qps, nbytes, flops in rows:
        print(f"| {name} | {n if n is not None else '-'} | {qps:,.0f} | {nbytes / 1e9:.3f} | {flops / 1e9:.4f} | "
              f"{qps / retrieval_qps:,.1f}x |")
    print(f"\nentities scored per query (beam): {res.n_scored.mean():.0f} of {sum(h.level_sizes):,}")
    print(f"top-1 agreement, torch kernel vs FAISS: {100 * agree:.2f} %; beam vs flat (exact nearest city): "
          f"{100 * beam_vs_flat_top1:.1f} %")
    print(f"paper (GPU, 210k queries): beam 13,345 q/s, flat 16,383 q/s, retrieval 294 q/s")
    print(f"beam_vs_retrieval: {beam_faiss_qps / retrieval_qps:.1f}")
    print(f"beam_qps: {beam_faiss_qps:.0f}")


if __name__ == "__main__":
    main()
