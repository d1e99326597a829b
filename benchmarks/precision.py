"""float32 vs float64 in the entity search: distances and rankings far from the origin.

Three parts, each against a float64 baseline computed in the same process:

1. Synthetic: query points at tangent norms 4, 6, 8, 10, 11 (``expmap0`` caps at
   asinh(2^15) ~ 11.09), each with 10 neighbours at distances uniform in [delta, 2 delta],
   delta = 0.01, 0.03, 0.1, 0.3, 1 (d = 128, K = 1). The truth is the float64 distance
   of the float64 points. "float32 search" is what the index does: float32 points, a
   float32 inner product, arcosh in float64. "re-scored" is the search's float64 re-score:
   float64 copies of the float32 points (``lorentz.sq_dist_exact``), so only the float32
   storage of the points remains.
2. A trained model (the embedded demo through the real stage functions, as
   tests/flows/conftest.py builds it): tangent norms reached, and the share of city picks
   where a float32 beam search (FAISS and torch kernel, with and without the re-score)
   differs from a float64 search of the same model (weights in float64, float64 index).
3. Cost: beam search queries/s with and without the re-score on an OSV-5M-sized synthetic
   hierarchy (benchmarks/synthetic.py).

    python benchmarks/precision.py --quick      # small demo model (dim 16, 2 epochs), ~1 min
    python benchmarks/precision.py              # demo-sized model (dim 128, 6k photos, 10 epochs)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import OSV5M_LEVEL_SIZES, make_hierarchy, make_queries  # noqa: E402

from hierloc.geometry import lorentz  # noqa: E402
from hierloc.infer.beam import beam_search  # noqa: E402
from hierloc.infer.search import EntityIndex  # noqa: E402

NORMS = (4.0, 6.0, 8.0, 10.0, 11.0)
DELTAS = (0.01, 0.03, 0.1, 0.3, 1.0)


def neighbours(n: int, m: int, dim: int, norm: float, delta: float, gen: torch.Generator):
    """float64 queries (n, d+1) at tangent norm ``norm`` and m neighbours each (n, m, d+1)
    at geodesic distances uniform in [delta, 2 delta] (K = 1), and those distances."""
    v = torch.randn(n, dim, dtype=torch.float64, generator=gen)
    q = lorentz.expmap0(v / v.norm(dim=1, keepdim=True) * norm, k=1.0)
    qq = q[:, None, :].expand(n, m, dim + 1)
    w = torch.randn(n, m, dim + 1, dtype=torch.float64, generator=gen)
    w = w + lorentz.inner(w, qq, keepdim=True) * qq  # tangent at q: <w, q>_L = 0
    u = w / lorentz.inner(w, w, keepdim=True).sqrt()
    t = delta * (1 + torch.rand(n, m, 1, dtype=torch.float64, generator=gen))
    p = lorentz.projx((torch.cosh(t) * qq + torch.sinh(t) * u)[..., 1:], k=1.0)  # exp_q(t u)
    return q, p


def synthetic_table(n: int, dim: int = 128, m: int = 10) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for norm in NORMS:
        for delta in DELTAS:
            q, p = neighbours(n, m, dim, norm, delta, gen)
            qq = q[:, None, :].expand_as(p)
            d64 = lorentz.sq_dist_exact(qq[..., 1:], p[..., 1:], k=1.0).sqrt()
            q32, p32 = q.float(), p.float()
            ip32 = torch.einsum("bd,bmd->bm", q32, torch.cat([-p32[..., :1], p32[..., 1:]], -1))
            d32 = torch.acosh((-ip32.double()).clamp_min(1.0))  # as the index: float32 ip, arcosh in float64
            dre = lorentz.sq_dist_exact(q32.double()[:, None, 1:].expand(n, m, dim), p32.double()[..., 1:], k=1.0).sqrt()
            nn = d64.argmin(1)
            rows.append((norm, delta, float((d32 - d64).abs().median() / delta), float((d32 - d64).abs().max() / delta),
                         100 * float((ip32.argmax(1) != nn).double().mean()),
                         float((dre - d64).abs().max() / delta), 100 * float((dre.argmin(1) != nn).double().mean())))
    return rows


def train_demo(root: Path, quick: bool) -> tuple[Path, np.ndarray]:
    """The embedded demo through the real stages (tests/flows/conftest.py's recipe): model path, test features."""
    from flows.stages.features import run_features
    from flows.stages.files import split_arrays
    from flows.stages.hierarchy import run_hierarchy
    from flows.stages.ingest import run_ingest
    from flows.stages.train import run_train
    from geodata.demo.build import build_demo_dataset
    from hierloc.model.model import ModelConfig
    from hierloc.train.loop import TrainConfig

    data, work = root / "data", root / "work"
    n_train, n_test = (1200, 150) if quick else (6000, 1000)
    build_demo_dataset(data, n_train=n_train, n_test=n_test, seed=5)
    run_ingest(data, work / "ingest", verify_images="exists")
    run_hierarchy(work / "ingest", work / "hierarchy")
    feats = run_features(data, work / "ingest", work / "features", num_workers=0)
    mcfg = ModelConfig(dim=16, hidden=64) if quick else ModelConfig()
    tcfg = TrainConfig(epochs=2 if quick else 10, batch_size=128, warmup_steps=5, device="cpu")
    trained = run_train(work / "ingest", work / "hierarchy", feats["dirs"], work / "train", mcfg, tcfg)
    test = split_arrays(work / "ingest", work / "hierarchy", Path(feats["dirs"]["test"]), "test")[1]
    return Path(trained["model_path"]), np.asarray(test)


def model_table(model_path: Path, feats: np.ndarray, k: int = 10) -> None:
    from hierloc.model.io import load_model

    model = load_model(model_path).eval()
    m64 = copy.deepcopy(model).double().eval()
    # The location encoder computes in float32 by construction (its matmul would refuse
    # float64 inputs): keep it float32 and hand its output on in float64.
    m64.loc_enc.float().register_forward_hook(lambda _mod, _inp, out: out.double())
    with torch.no_grad():
        h32, z32 = model.encode_entities(), model.encode_images(torch.as_tensor(feats).float())
        h64, z64 = m64.encode_entities(), m64.encode_images(torch.as_tensor(feats).double())
    kk = float(model.curvature.detach())
    print(f"\nmodel: d = {model.cfg.dim}, K = {kk:.3g}, {len(feats)} test photos, entities per level {model.level_sizes}")
    print("| points | tangent norm median | p99 | max |\n|---|---|---|---|")
    for lvl, sl in enumerate(model.level_slice(i) for i in range(len(model.level_sizes))):
        r = lorentz.dist0(h32[sl], k=kk)
        print(f"| entities, level {lvl} | {r.median():.2f} | {r.quantile(.99):.2f} | {r.max():.2f} |")
    r = lorentz.dist0(z32, k=kk)
    print(f"| test queries | {r.median():.2f} | {r.quantile(.99):.2f} | {r.max():.2f} |")

    args = (model.level_sizes, model.parent_index)
    ref = EntityIndex(h64, *args, curvature=kk, dtype=torch.float64).search(z64, k=k, backend="torch")
    same_pts = EntityIndex(h32.double(), *args, curvature=kk, dtype=torch.float64).search(z32.double(), k=k, backend="torch")
    ref_city = ref.rows[:, 0]
    print(f"\nfloat64 search of the float64 model vs of the float32 model's points: city picks differ "
          f"{100 * (same_pts.rows[:, 0] != ref_city).mean():.2f} % (the model's own float32 arithmetic)")
    print(f"nearest city distance (float64): median {np.median(np.sqrt(ref.sq_dist[:, 0])):.3f}, "
          f"gap to the 2nd: median {np.median(np.sqrt(ref.sq_dist[:, 1]) - np.sqrt(ref.sq_dist[:, 0])):.4f}")
    print("| float32 search (k = %d) | city picks differing from the float64 search | vs float64 search of the same float32 points | q/s |" % k)
    print("|---|---|---|---|")
    for backend in ("faiss", "torch"):
        for rescore in (False, True):
            res = beam_search(model, feats, k=k, backend=backend, rescore=rescore, tau=model.tau)
            city = res.picks[:, -1]
            print(f"| {backend}, re-score {'on' if rescore else 'off'} | {100 * (city != ref_city).mean():.2f} % | "
                  f"{100 * (city != same_pts.rows[:, 0]).mean():.2f} % | {res.queries_per_s:,.0f} |")


def cost_table(n_q: int, k: int = 10) -> None:
    h = make_hierarchy(OSV5M_LEVEL_SIZES, dim=128, seed=0)
    index = EntityIndex(h.points(), h.level_sizes, h.parent_index)
    q = make_queries(h, n_q, seed=1)
    print(f"\ncost: OSV-5M-sized synthetic hierarchy {h.level_sizes}, d = 128, {n_q} queries, k = {k}, "
          f"{torch.get_num_threads()} threads (best of 3)")
    print("| backend | q/s re-score off | q/s re-score on | ratio |\n|---|---|---|---|")
    for backend in ("faiss", "torch"):
        index.search(q[:1024], k=k, backend=backend)  # builds the FAISS lists, warms up
        qps = {}
        for rescore in (False, True, False, True, False, True):
            t0 = time.perf_counter()
            index.search(q, k=k, backend=backend, rescore=rescore)
            qps[rescore] = max(qps.get(rescore, 0.0), n_q / (time.perf_counter() - t0))
        print(f"| {backend} | {qps[False]:,.0f} | {qps[True]:,.0f} | {qps[True] / qps[False]:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model and fewer points (about a minute)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch and FAISS (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass

    print("synthetic: errors are |d32 - d64| / delta; 'wrong NN' = nearest of the 10 neighbours differs from float64")
    print("| tangent norm | delta | float32 search: median err | max err | wrong NN | re-scored: max err | wrong NN |")
    print("|---|---|---|---|---|---|---|")
    for norm, delta, med, mx, wrong, re_mx, re_wrong in synthetic_table(500 if args.quick else 2000):
        print(f"| {norm:g} | {delta:g} | {med:.2e} | {mx:.2e} | {wrong:.1f} % | {re_mx:.1e} | {re_wrong:.1f} % |")

    with tempfile.TemporaryDirectory(prefix="hierloc_precision_") as tmp:
        t0 = time.perf_counter()
        model_path, feats = train_demo(Path(tmp), args.quick)
        print(f"\ndemo model trained in {time.perf_counter() - t0:.0f} s")
        model_table(model_path, feats)
    cost_table(20_000 if args.quick else 100_000)


if __name__ == "__main__":
    main()
