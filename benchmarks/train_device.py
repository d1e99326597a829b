"""Training steps/s and beam-search queries/s of the HierLoc model, per device, in one process
(the entity index built once per model; FAISS on the CPU, the torch kernel on CUDA).

A synthetic hierarchy with a realistic fan-out (``--levels``), clustered d_img
features, full-table negatives every step (the paper's loss). Prints a table with
the ratio of each device to the CPU run of the same process, and checks that CUDA
and CPU beam searches of the same trained model agree.

    python benchmarks/train_device.py --quick           # CPU only, under a minute
    python benchmarks/train_device.py --devices cpu cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hierloc.infer.beam import beam_search
from hierloc.infer.search import EntityIndex
from hierloc.model.model import ModelConfig
from hierloc.model.io import load_model
from hierloc.train.data import EntityData, TrainData, entity_mean_features
from hierloc.train.loop import TrainConfig, train


def synthetic(levels: list[int], n: int, d_img: int, seed: int = 0) -> tuple[TrainData, EntityData]:
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0, *levels])
    parent = np.full(offsets[-1], -1, dtype=np.int64)
    for lvl in range(1, len(levels)):
        # every parent gets at least one child, the rest spread with a skew
        kids = np.concatenate([np.arange(levels[lvl - 1]), rng.zipf(1.5, levels[lvl] - levels[lvl - 1]) % levels[lvl - 1]])
        parent[offsets[lvl] : offsets[lvl + 1]] = offsets[lvl - 1] + np.sort(kids)
    leaf = rng.integers(0, levels[-1], n)
    targets = np.zeros((n, len(levels)), dtype=np.int64)
    targets[:, -1] = leaf
    for lvl in range(len(levels) - 2, -1, -1):
        targets[:, lvl] = parent[offsets[lvl + 1] + targets[:, lvl + 1]] - offsets[lvl]
    latlon = np.c_[rng.uniform(-60, 70, offsets[-1]), rng.uniform(-180, 180, offsets[-1])].astype(np.float32)
    centers = rng.normal(size=(levels[-1], d_img)).astype(np.float32)
    feats = centers[leaf] + 0.5 * rng.normal(size=(n, d_img)).astype(np.float32)
    data = TrainData(feats, targets, latlon[offsets[-2] + leaf])  # each image at its city
    ents = EntityData(entity_mean_features(feats, targets, levels), latlon, levels, parent)
    return data, ents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", default=["cpu"])
    ap.add_argument("--levels", type=int, nargs="+", default=[233, 4_900, 29_000, 210_000])
    ap.add_argument("--n", type=int, default=20_000, help="training images")
    ap.add_argument("--d-img", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="small hierarchy and data, CPU, under a minute")
    args = ap.parse_args()
    if args.quick:
        args.levels, args.n, args.d_img, args.queries = [50, 500, 2_000, 8_000], 4_096, 256, 4_096
    data, ents = synthetic(args.levels, args.n, args.d_img)
    print(f"hierarchy {args.levels}, {args.n} images, d_img {args.d_img}, batch {args.batch}, torch {torch.__version__}")
    rows, picks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for dev in args.devices:
            cfg = TrainConfig(epochs=1, batch_size=args.batch, device=dev, warmup_steps=10, log_every=10_000)
            t0 = time.perf_counter()
            res = train(data, ents, ModelConfig(), cfg, Path(tmp) / dev)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            train_s = time.perf_counter() - t0
            model = load_model(res.model_path)
            q = data.features[: args.queries]
            backend = "faiss" if dev == "cpu" else "torch"  # what backend="auto" picks on each device
            index = EntityIndex.from_model(model.to(dev), device=dev if backend == "torch" else "cpu")  # built once
            beam_search(model, q[:256], k=10, device=dev, backend=backend, index=index)  # warm-up
            t0 = time.perf_counter()
            out = beam_search(model, q, k=10, device=dev, backend=backend, index=index)  # image MLP + search
            beam_s = time.perf_counter() - t0
            picks[dev] = (res.model_path, out.picks)
            rows.append((dev, res.steps / train_s, res.steps * args.batch / train_s, len(q) / beam_s, res.final["epoch_loss"]))
        base = rows[0]
        print(f"{'device':<8} {'steps/s':>9} {'samples/s':>10} {'beam q/s':>10} {'x steps':>8} {'x beam':>7} {'loss':>8}")
        for dev, sps, smp, qps, loss in rows:
            print(f"{dev:<8} {sps:>9.2f} {smp:>10.0f} {qps:>10.0f} {sps / base[1]:>8.2f} {qps / base[3]:>7.2f} {loss:>8.4f}")
        for dev in args.devices[1:]:
            # Same trained weights (from the device run) searched on CPU and on the device.
            model = load_model(picks[dev][0])
            cpu = beam_search(model, data.features[: args.queries], k=10, device="cpu").picks
            agree = (cpu[:, -1] == picks[dev][1][:, -1]).mean()
            print(f"{dev} vs cpu beam search, same weights: {100 * agree:.2f} % identical city picks")


if __name__ == "__main__":
    main()
