"""Peak memory of the train stage's data path: features on disk vs in memory.

Writes a synthetic train split (manifest, entity hierarchy, assignments) and a feature cache of
``--rows`` x ``--dim`` float16 rows in shards of 8,192 (the layout the features stage and the
WebDataset ingest write; the manifest's order is shuffled against the shards'), then runs, each in
a fresh process with ``--checkout`` on its path (this tree by default; an older checkout to compare):

- ``load``: flows.stages.files.split_arrays + hierloc.train.data.entity_mean_features;
- ``train``: flows.stages.train.run_train, one epoch of ``--batch`` rows (small model).

Per phase: wall seconds, peak RSS (the kernel's VmHWM) and the peaks of its anonymous and
file-backed parts (sampled every 20 ms: mapped feature pages are file-backed; they stay in the page
cache when unmapped). ``python benchmarks/train_memory.py --rows 200000`` takes about a minute.
Last line: ``train_memory: rows=<N> load_peak_gb=<x> train_peak_gb=<y>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

LEVELS = ("country", "region", "subregion", "city")
SHARD_ROWS = 8192

CHILD = r"""
import json, sys, threading, time
from pathlib import Path

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out

peak = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s[k])
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()

phase, work = sys.argv[1], Path(sys.argv[2])
import numpy as np
from flows.stages.files import split_arrays, load_entities
from flows.stages.train import run_train
from hierloc.model.model import ModelConfig
from hierloc.train.data import entity_mean_features
from hierloc.train.loop import TrainConfig
base = status()["VmHWM"]
t0 = time.perf_counter()
if phase == "load":
    _, feats, targets, _, _ = split_arrays(work / "ingest", work / "hierarchy", work / "cache", "train",
                                           require_targets=True)
    ents = load_entities(work / "hierarchy")
    sizes = [int((ents["level"] == i).sum()) for i in range(4)]
    img = entity_mean_features(feats, targets, sizes)
    extra = {"n": len(feats), "img_feat": list(img.shape)}
else:
    res = run_train(work / "ingest", work / "hierarchy", {"train": str(work / "cache")}, work / "runs",
                    ModelConfig(dim=16, hidden=64), TrainConfig(epochs=1, batch_size=int(sys.argv[3]), device="cpu",
                                                                warmup_steps=2, log_every=10))
    extra = {"steps": res["steps"], "n": res["n_train"]}
time.sleep(0.05)
print(json.dumps({"phase": phase, "seconds": time.perf_counter() - t0, "base_gb": base / 1e9,
                  "peak_gb": status()["VmHWM"] / 1e9, "peak_anon_gb": peak["RssAnon"] / 1e9,
                  "peak_file_gb": peak["RssFile"] / 1e9, **extra}))
"""


def write_inputs(work: Path, rows: int, dim: int, sizes: tuple[int, ...], seed: int = 0) -> None:
    """Manifest, hierarchy (entities + assignments) and float16 feature shards for ``rows`` images."""
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0, *sizes])
    parent = np.full(offsets[-1], -1, np.int64)
    for lvl in range(1, len(sizes)):
        parent[offsets[lvl] : offsets[lvl + 1]] = offsets[lvl - 1] + rng.integers(0, sizes[lvl - 1], sizes[lvl])
    ents = pd.DataFrame({"entity_id": np.arange(offsets[-1]), "parent_id": parent,
                         "level": np.repeat(np.arange(len(sizes)), sizes),
                         "level_index": np.concatenate([np.arange(s) for s in sizes]),
                         "lat": rng.uniform(-60, 60, offsets[-1]), "lon": rng.uniform(-180, 180, offsets[-1])})
    ents["key"] = ents["entity_id"].astype(str)
    ents["name"] = "e" + ents["key"]
    (work / "hierarchy").mkdir(parents=True)
    ents.to_parquet(work / "hierarchy" / "entities.parquet")
    city = rng.zipf(1.3, rows) % sizes[-1]  # skewed, as places are
    idx = np.empty((rows, len(sizes)), np.int64)
    idx[:, -1] = city
    for lvl in range(len(sizes) - 2, -1, -1):
        idx[:, lvl] = parent[offsets[lvl + 1] + idx[:, lvl + 1]] - offsets[lvl]
    ids = 10**12 + np.arange(rows)
    order = rng.permutation(rows)  # the manifest's order is not the shards'
    pd.DataFrame({f"{n}_index": idx[order, i] for i, n in enumerate(LEVELS)}).to_parquet(
        work / "hierarchy" / "assignments_train.parquet")
    (work / "ingest" / "manifest").mkdir(parents=True)
    pd.DataFrame({"id": ids[order], "latitude": ents["lat"].to_numpy()[offsets[-2] + city[order]],
                  "longitude": ents["lon"].to_numpy()[offsets[-2] + city[order]]}).to_parquet(
        work / "ingest" / "manifest" / "train.parquet")
    (work / "cache").mkdir()
    for k, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        feats = rng.standard_normal((n, dim), np.float32).astype(np.float16)
        with open(work / "cache" / f"shard-{k:05d}.npz", "wb") as fh:
            np.savez(fh, ids=ids[start : start + n], feats=feats, fail_ids=np.zeros(0, np.int64),
                     fail_reasons=np.zeros(0, str))


def run_phase(checkout: Path, phase: str, work: Path, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", CHILD, phase, str(work), str(batch)], env=env, cwd=checkout,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{phase} in {checkout} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--sizes", default="50,500,2000,5000", help="entities per level")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="train_memory-") as tmp:
        work = Path(tmp)
        write_inputs(work, args.rows, args.dim, tuple(int(s) for s in args.sizes.split(",")))
        disk = sum(p.stat().st_size for p in (work / "cache").iterdir()) / 1e9
        print(f"{args.rows} x {args.dim} float16 features: {disk:.2f} GB on disk; checkout {args.checkout}")
        res = {p: run_phase(args.checkout, p, work, args.batch) for p in ("load", "train")}
    print(f"{'phase':6} {'seconds':>8} {'base GB':>8} {'peak GB':>8} {'anon GB':>8} {'file GB':>8}")
    for p, r in res.items():
        print(f"{p:6} {r['seconds']:8.1f} {r['base_gb']:8.2f} {r['peak_gb']:8.2f} {r['peak_anon_gb']:8.2f} "
              f"{r['peak_file_gb']:8.2f}")
    print(f"train_memory: rows={args.rows} load_peak_gb={res['load']['peak_gb']:.2f} "
          f"train_peak_gb={res['train']['peak_gb']:.2f}")


if __name__ == "__main__":
    main()
