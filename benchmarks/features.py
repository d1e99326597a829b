"""Feature stage throughput: batched DataLoader extraction from a zip shard vs a plain loop, in one process.

Real JPEGs: the OSV-5M sample photos (``$HIERLOC_OSV5M_SAMPLE/images``, else
``../shared/osv5m-sample/images`` beside the checkout, as tests/conftest.py finds them; 512 px tall street
views), repeated under new ids into one release-style zip shard (``images/train/00.zip``),
read through geodata.ingest.image_store.ImageStore (EXIF, RGB). The model is a random-init open_clip image
tower (default ViT-S-32, 22.6M parameters, 224 px; random weights cost the same as trained ones).

Rows (images/s; ratio against the loop in the same run):

- loop: decode + transform + forward, one image at a time (batch 1), no workers, no cache
  (on the first 128 images, quick 32: it is the slow row);
- features, 0 workers: hierloc.features.extract.extract_features, batched, decoding in the main process;
- features, N workers: the stage as the pipeline runs it (DataLoader workers decode, batches);
- re-run, all cached: the same request again (reads shard ids only, encodes nothing);
- +10% new images: a grown request, only the new ids are encoded.

    python benchmarks/features.py --quick      # 96 images, under a minute on 2 idle CPU cores
    python benchmarks/features.py              # 512 images

Last line: ``features_vs_loop: <ratio>`` (features with workers / loop).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from geodata.ingest.image_store import ImageStore
from hierloc.features.backbones import load_backbone
from hierloc.features.extract import extract_features

ROOT = Path(__file__).resolve().parents[1]


def sample_dir() -> Path:
    """The OSV-5M sample, found as tests/conftest.py finds it: $HIERLOC_OSV5M_SAMPLE, else
    shared/osv5m-sample beside the checkout (or inside it)."""
    if "HIERLOC_OSV5M_SAMPLE" in os.environ:
        return Path(os.environ["HIERLOC_OSV5M_SAMPLE"])
    candidates = [ROOT.parent / "shared" / "osv5m-sample", ROOT / "shared" / "osv5m-sample"]
    return next((c for c in candidates if (c / "select.csv").exists()), candidates[0])


SAMPLE = sample_dir() / "images"


def build_shard(root: Path, n: int) -> tuple[np.ndarray, list[str], list[str]]:
    """n sample photos (repeated, stored uncompressed as in the release) in root/images/train/00.zip."""
    photos = sorted(SAMPLE.glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no sample photos in {SAMPLE}")
    data = [p.read_bytes() for p in photos]
    ids = np.arange(1, n + 1, dtype=np.int64) * 1_000_003  # distinct ids; the photos repeat
    path = root / "images" / "train" / "00.zip"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for k, i in enumerate(ids):
            zf.writestr(f"{i}.jpg", data[k % len(data)])
    return ids, ["images/train/00.zip"] * n, [f"{i}.jpg" for i in ids]


def plain_loop(backbone, store: ImageStore, containers, members) -> float:
    """Images/s of decode + transform + forward, batch 1."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for c, m in zip(containers, members):
            backbone.encode(backbone.transform(store.open(c, m))[None])
    return len(members) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="96 images (under a minute)")
    ap.add_argument("--n", type=int, default=None, help="images in the shard (default 512, quick 160)")
    ap.add_argument("--loop-n", type=int, default=None, help="images the plain loop encodes (default 128, quick 32)")
    ap.add_argument("--arch", default="ViT-S-32", help="open_clip architecture (random init)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the feature stage")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the main process")
    args = ap.parse_args()
    n = args.n or (96 if args.quick else 512)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(f"open_clip:{args.arch}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="hierloc-bench-features-") as tmp:
        root = Path(tmp)
        ids, containers, members = build_shard(root, n)
        n_old = n - n // 11  # the last ~9% arrive later: the incremental row
        store = ImageStore(root)
        plain_loop(backbone, store, containers[:4], members[:4])  # warm-up: first-call allocations
        n_loop = min(args.loop_n or (32 if args.quick else 128), n_old)  # a rate: fewer images suffice
        loop_rate = plain_loop(backbone, store, containers[:n_loop], members[:n_loop])
        rows.append(("loop (decode + forward, batch 1)", n_loop, n_loop / loop_rate, loop_rate))

        def run(cache: str, k: int, workers: int) -> dict:
            return extract_features(ids[:k], containers[:k], members[:k], store.open, backbone, root / cache,
                                    batch_size=args.batch_size, shard_size=128, num_workers=workers).summary()

        s = run("cache0", n_old, 0)
        rows.append((f"features, 0 workers, batch {args.batch_size}", s["encoded"], s["seconds"], s["images_per_s"]))
        s = run("cache", n_old, args.workers)
        feat_rate = s["images_per_s"]
        rows.append((f"features, {args.workers} workers, batch {args.batch_size}", s["encoded"], s["seconds"],
                     feat_rate))
        s = run("cache", n_old, args.workers)
        rows.append(("re-run, all cached", s["encoded"], s["seconds"], float("nan")))
        s = run("cache", n, args.workers)
        rows.append((f"+{n - n_old} new images ({n} requested)", s["encoded"], s["seconds"], s["images_per_s"]))

    print(f"open_clip:{args.arch} (random init, dim {backbone.dim}), {n} sample JPEGs in one zip shard, "
          f"{args.threads} torch threads, {torch.get_num_threads()} in use")
    print(f"{'method':<40} {'encoded':>8} {'seconds':>9} {'images/s':>9} {'vs loop':>8}")
    for name, k, secs, rate in rows:
        ratio = "" if np.isnan(rate) else f"{rate / loop_rate:.2f}"
        rate_s = "-" if np.isnan(rate) else f"{rate:.1f}"
        print(f"{name:<40} {k:>8} {secs:>9.2f} {rate_s:>9} {ratio:>8}")
    print(f"features_vs_loop: {feat_rate / loop_rate:.2f}")


if __name__ == "__main__":
    main()
