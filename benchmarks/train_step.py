"""Training steps/s at OSV-5M's entity-table size: our step vs the naive one, in one process.

- a synthetic entity hierarchy of OSV-5M's size (233 / 4.9k / 29k / 210k, heavy-tailed
  fan-out: benchmarks/synthetic.py), d_img = 1024 cached features (Img_i per entity and
  per image), the default model (d = 128, hidden 512, anchors), full-table negatives;
- NAIVE: the paper's loss written plainly (hierloc.train.batch_loss.naive_batch_loss): the entity
  branch over all 244k entities with autograd every step, then per level the (B, N_l)
  distances, broadcast haversine km and weights materialised, one optimiser step;
- OURS: hierloc.train.loop's step with ``entity_refresh_every = k`` (TableCycle): per cycle of
  k steps the table is computed once without autograd (``start``), each step runs the
  image branch and the streamed loss (GeoWeightedInfoNCE.forward_points) against it
  and steps the image branch (``step``), and the accumulated table gradient goes through
  the entity branch once (``finish``, then the entity branch's optimiser step). The loss
  is the exact full-table loss at every step; the entity branch steps every k batches.
  Each phase is timed on real cycles (after a warm-up cycle), and a k-step cycle costs
  start + k * step + finish: steps/s = k / that (--quick also times whole cycles as a check).
- Timing: rounds (3 with --quick, 1 at full size) that interleave every measurement, the
  roofline matmul included, each keeping its fastest: on this shared machine the load of
  other processes comes in spells, and interleaving exposes all measurements to the same.
- GFLOP/s: matmul FLOPs (forward and backward) counted by torch.utils.flop_counter on
  the same calls at two small tables (1/64 and 1/32 of the entities) and extrapolated
  linearly in N, which is exact (every matmul of a step is constant or linear in the
  number of entities; --quick prints a direct count as a check). Counting is kept out of
  the timed calls: its per-op overhead would slow the many small ops of the streamed
  loss. Against a plain torch matmul of the entity MLP's first layer shape
  (N x (d_img + hidden) @ (d_img + hidden) x hidden): this machine's roofline.

    python benchmarks/train_step.py --quick        # 1/16 of the table, under a minute
    python benchmarks/train_step.py                # 244k entities (~7 min, ~11 GB RAM on 2 cores)

Last line: ``train_step_vs_naive: <ratio>`` (ours at k = --refresh / naive, steps/s, the
largest batch).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import OSV5M_LEVEL_SIZES, skewed_parents  # noqa: E402

import geoopt  # noqa: E402

from hierloc.model.loss import GeoWeightedInfoNCE  # noqa: E402
from hierloc.model.model import ModelConfig  # noqa: E402
from hierloc.model.io import build_model  # noqa: E402
from hierloc.train.batch_loss import batch_loss, naive_batch_loss  # noqa: E402
from hierloc.train.data import EntityData, TrainData  # noqa: E402
from hierloc.train.distributed import DistContext  # noqa: E402
from hierloc.train.optim import optimizer_step, param_groups  # noqa: E402
from hierloc.train.table_cycle import TableCycle  # noqa: E402


def synthetic_problem(levels: list[int], n_img: int, d_img: int, seed: int = 0) -> tuple[TrainData, EntityData]:
    """Heavy-tailed hierarchy (synthetic.skewed_parents), random coordinates and features."""
    rng = np.random.default_rng(seed)
    off = np.cumsum([0, *levels])
    parent = np.full(off[-1], -1, dtype=np.int64)
    for lvl in range(1, len(levels)):
        parent[off[lvl] : off[lvl + 1]] = off[lvl - 1] + skewed_parents(levels[lvl], levels[lvl - 1], rng)
    leaf = rng.integers(0, levels[-1], n_img)
    targets = np.zeros((n_img, len(levels)), dtype=np.int64)
    targets[:, -1] = leaf
    for lvl in range(len(levels) - 2, -1, -1):
        targets[:, lvl] = parent[off[lvl + 1] + targets[:, lvl + 1]] - off[lvl]
    latlon = np.c_[rng.uniform(-60, 70, off[-1]), rng.uniform(-180, 180, off[-1])].astype(np.float32)
    feats = rng.standard_normal((n_img, d_img), dtype=np.float32)
    ent_feat = rng.standard_normal((off[-1], d_img), dtype=np.float32)  # Img_i: any frozen feature costs the same
    return TrainData(feats, targets, latlon[off[-2] + leaf]), EntityData(ent_feat, latlon, levels, parent)


class Bench:
    def __init__(self, data: TrainData, ents: EntityData) -> None:
        torch.manual_seed(0)
        self.model = build_model(ModelConfig(), data, ents).train()
        self.loss_fn = GeoWeightedInfoNCE()
        groups, manifold, _ = param_groups(self.model, self.loss_fn, 1e-4)
        self.opt = torch.optim.AdamW(groups, lr=1e-4)
        self.ropt = geoopt.optim.RiemannianAdam(manifold, lr=1e-3, stabilize=10)
        self.named = list(self.model.named_parameters()) + [("loss." + n, p) for n, p in self.loss_fn.named_parameters()]
        self.x = torch.as_tensor(data.features)
        self.y = torch.as_tensor(data.targets)
        self.ll = torch.as_tensor(data.latlon_deg)
        self.cycle = TableCycle(self.model, torch.device("cpu"), amp=False)
        self.ctx = DistContext()
        self.cursor = 0

    def batch(self, b: int) -> tuple[torch.Tensor, ...]:
        s = self.cursor % (len(self.x) - b + 1)
        self.cursor += b
        return self.x[s : s + b], self.y[s : s + b], self.ll[s : s + b]

    def naive_step(self, b: int) -> float:
        x, y, ll = self.batch(b)
        loss, _ = naive_batch_loss(self.model, self.loss_fn, x, y, ll)
        loss.backward()
        optimizer_step(self.opt, self.ropt, self.named, 1.0, self.ctx)
        return float(loss.detach())

    def exact_step(self, b: int) -> float:
        """entity_refresh_every = 1: the whole table with autograd, the streamed loss, one step."""
        x, y, ll = self.batch(b)
        tangent = self.model.entity_tangent()
        _, loss, _ = batch_loss(self.model, self.loss_fn, x, y, ll, self.model.to_space(tangent), tangent)
        loss.backward()
        optimizer_step(self.opt, self.ropt, self.named, 1.0, self.ctx)
        return float(loss.detach())

    def our_step(self, b: int) -> float:
        x, y, ll = self.batch(b)
        _, loss, _ = batch_loss(self.model, self.loss_fn, x, y, ll, self.cycle.points, self.cycle.tangent)
        loss.backward()
        self.cycle.stash()
        optimizer_step(self.opt, self.ropt, self.named, 1.0, self.ctx)
        return float(loss.detach())

    def finish(self) -> None:
        table = set(map(id, self.cycle.finish()))
        optimizer_step(self.opt, self.ropt, [(n, p) for n, p in self.named if id(p) in table], 1.0, self.ctx)


def timed(fn, repeat: int = 1) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn`` (the machine is shared: the
    minimum is the least disturbed measurement)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def counted(fn) -> int:
    """Matmul FLOPs (forward and backward) of one call of ``fn``."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def phase_flops(levels: list[int], d_img: int, batches: list[int]) -> dict[tuple[str, int], int]:
    """FLOPs of each phase (naive step, start, our step, finish) on a table of ``levels``."""
    data, ents = synthetic_problem(levels, 2 * max(batches), d_img)
    bench = Bench(data, ents)
    bench.cycle.start()  # finds the table's parameters
    bench.our_step(min(batches))
    bench.finish()
    out = {("start", 0): counted(bench.cycle.start)}
    out.update({("step", b): counted(lambda b=b: bench.our_step(b)) for b in batches})
    out[("finish", 0)] = counted(bench.finish)
    out.update({("naive", b): counted(lambda b=b: bench.naive_step(b)) for b in batches})
    out.update({("exact", b): counted(lambda b=b: bench.exact_step(b)) for b in batches})
    return out


def extrapolated_flops(levels: list[int], d_img: int, batches: list[int]) -> dict[tuple[str, int], float]:
    """phase_flops at the size ``levels``, from two tables of 1/64 and 1/32 of it (linear in N)."""
    small = [[max(1, s // div) for s in levels] for div in (64, 32)]
    (f1, n1), (f2, n2) = ((phase_flops(lv, d_img, batches), sum(lv)) for lv in small)
    n = sum(levels)
    return {key: f1[key] + (f2[key] - f1[key]) * (n - n1) / (n2 - n1) for key in f1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1/16 of the entity table and more repeats (under a minute)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--levels", type=int, nargs="+", default=None, help="entities per level (default OSV-5M's)")
    ap.add_argument("--d-img", type=int, default=1024)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                    help="also time our exact step (k = 1; default: with --quick only, it costs as much as naive)")
    ap.add_argument("--refresh", type=int, default=16, help="k = entity_refresh_every of OUR step (default 16)")
    ap.add_argument("--naive-steps", type=int, default=None, help="timed naive steps per batch size and round (default 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps of ours per batch size and round (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = args.levels or ([max(1, s // 16) for s in OSV5M_LEVEL_SIZES] if args.quick else list(OSV5M_LEVEL_SIZES))
    naive_steps = args.naive_steps or 1
    our_steps = args.steps or 2
    k = args.refresh

    t0 = time.perf_counter()
    flops = extrapolated_flops(levels, args.d_img, args.batches)
    print(f"FLOPs counted on 1/64 and 1/32 of the table in {time.perf_counter() - t0:.1f} s")
    if args.quick:
        direct = phase_flops(levels, args.d_img, args.batches)
        worst = max(abs(flops[key] / direct[key] - 1) for key in direct)
        print(f"check: extrapolated FLOPs differ from a direct count by at most {100 * worst:.3f} %")
    t0 = time.perf_counter()
    data, ents = synthetic_problem(levels, max(4 * max(args.batches), 1024), args.d_img)
    bench = Bench(data, ents)
    n_ent, hidden = sum(levels), bench.model.cfg.hidden
    print(f"entities {levels} ({n_ent:,}), d_img {args.d_img}, d {bench.model.cfg.dim}, hidden {hidden}, "
          f"{args.threads} threads, torch {torch.__version__}; built in {time.perf_counter() - t0:.1f} s")
    exact = args.quick if args.exact is None else args.exact
    rounds = 3 if args.quick else 1
    # Warm-up: one naive step (allocations; --quick only: at full size one step is ~a minute)
    # and one cycle of ours (finds the table's parameters).
    if args.quick:
        bench.naive_step(min(args.batches))
    bench.cycle.start()
    bench.our_step(min(args.batches))
    bench.finish()

    # Rounds that interleave every measurement, so that each one samples the same spells of
    # load from other processes on this shared machine; each keeps its fastest.
    best: dict = {}

    def keep(key, seconds: float) -> None:
        best[key] = min(best.get(key, float("inf")), seconds)

    a, w = torch.randn(n_ent, args.d_img + hidden), torch.randn(args.d_img + hidden, hidden)
    for _ in range(rounds):
        keep("matmul", timed(lambda: a @ w, 2))
        for b in args.batches:
            keep(("naive", b), timed(lambda b=b: bench.naive_step(b), naive_steps))
            if exact:
                keep(("exact", b), timed(lambda b=b: bench.exact_step(b), naive_steps))
        keep("start", timed(bench.cycle.start))
        for b in args.batches:
            keep(("step", b), timed(lambda b=b: bench.our_step(b), our_steps))
        keep("finish", timed(bench.finish))
    peak = 2 * a.shape[0] * a.shape[1] * w.shape[1] / best["matmul"] / 1e9
    del a, w
    print(f"roofline: plain matmul ({n_ent} x {args.d_img + hidden}) @ ({args.d_img + hidden} x {hidden}): "
          f"{peak:.1f} GFLOP/s")
    t_start, t_finish = best["start"], best["finish"]
    f_start, f_finish = flops[("start", 0)], flops[("finish", 0)]
    phases = {b: best[("step", b)] for b in args.batches}
    rows = []
    for b in args.batches:
        t_naive = best[("naive", b)]
        rows.append((b, "naive (table + B x N matrices every step)", 1 / t_naive,
                     flops[("naive", b)] / t_naive / 1e9, naive_steps * rounds))
        if exact:
            t_exact = best[("exact", b)]
            rows.append((b, "ours, entity_refresh_every=1 (exact step)", 1 / t_exact,
                         flops[("exact", b)] / t_exact / 1e9, naive_steps * rounds))
        t_step, f_step = phases[b], flops[("step", b)]
        for kk in sorted({k, 4 * k}):
            t_cycle = t_start + kk * t_step + t_finish
            rows.append((b, f"ours, entity_refresh_every={kk}", kk / t_cycle,
                         (f_start + kk * f_step + f_finish) / t_cycle / 1e9, our_steps * rounds))
    if args.quick:  # whole cycles timed end to end, to check the phase model
        b, kk = max(args.batches), 4
        t_real = timed(lambda: (bench.cycle.start(), [bench.our_step(b) for _ in range(kk)], bench.finish()), rounds)
        print(f"check: a real {kk}-step cycle at batch {b} took {t_real:.2f} s (best of {rounds}), "
              f"the phase model says {t_start + kk * phases[b] + t_finish:.2f} s")

    print(f"\nphases of ours: start (table, no autograd) {t_start:.2f} s, finish (table with autograd + backward "
          f"+ step) {t_finish:.2f} s; step: " + ", ".join(f"batch {b} {phases[b]:.2f} s" for b in args.batches))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB\n")
    print("| batch | step | steps/s | samples/s | GFLOP/s | of roofline | vs naive | timed steps |")
    print("|---|---|---|---|---|---|---|---|")
    base = {}
    for b, name, sps, gflops, timed_n in rows:
        base.setdefault(b, sps)
        print(f"| {b} | {name} | {sps:.4f} | {sps * b:.1f} | {gflops:.1f} | {100 * gflops / peak:.0f} % | "
              f"{sps / base[b]:.2f}x | {timed_n} |")
    big = max(args.batches)
    ours = next(sps for b, name, sps, *_ in rows if b == big and name.endswith(f"={k}"))
    print(f"train_step_vs_naive: {ours / base[big]:.2f}")


if __name__ == "__main__":
    main()
