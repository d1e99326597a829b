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

Then the decoding table (images/s; ratio against today's path in the same run; hierloc.features.decode):

- loader alone (no model), the DataLoader as the stage runs it, batches moved to the device and made
  model-ready there: today's path (full decode, the whole transform in the workers, float32); reduced-scale
  JPEG decoding (PIL draft) with float32 workers; full decode with uint8 workers and normalisation on the
  device; both (the default now);
- end to end (``extract_features`` on half the images), today's path vs the default, with the same model.

Loader rows: the median of 3 interleaved runs, the main process on 1 torch thread; end to end: the median
of 2 interleaved runs (other work on shared cores moves single runs); with the CPU time per image of all
processes (main and workers), which moves less with other work.

``feature_rates(spec, photos, n_images, ...)`` gives benchmarks/gpu.py the feature-stage figures of one
backbone on one device: end to end, the encoder alone, the loader alone.

    python benchmarks/features.py --quick      # 96 images, under a minute on 2 idle CPU cores
    python benchmarks/features.py              # 512 images

Last lines: ``features_vs_loop: <ratio>`` (features with workers / loop), ``loader_vs_today: <ratio>``
(the default loader / today's), ``end_to_end_vs_today: <ratio>``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from geodata.ingest.image_store import ImageStore
from hierloc.device import resolve_device
from hierloc.features.backbones import Backbone, load_backbone
from hierloc.features.dataset import compact_items, device_batches
from hierloc.features.decode import DecodePlan, plan_decoding
from hierloc.features.device_decode import DeviceDecodePlan, device_decoded_batches
from hierloc.features.extract import PRECISIONS, effective_precision, extract_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import sync  # noqa: E402  (benchmarks/gpu_common.py: clocks read after the device's queue)

ROOT = Path(__file__).resolve().parents[1]


def sample_dir() -> Path:
    """The OSV-5M sample, found as tests/conftest.py finds it: $HIERLOC_OSV5M_SAMPLE, else
    shared/osv5m-sample beside the checkout (or inside it)."""
    if "HIERLOC_OSV5M_SAMPLE" in os.environ:
        return Path(os.environ["HIERLOC_OSV5M_SAMPLE"])
    candidates = [ROOT.parent / "shared" / "osv5m-sample", ROOT / "shared" / "osv5m-sample"]
    return next((c for c in candidates if (c / "select.csv").exists()), candidates[0])


SAMPLE = sample_dir() / "images"


def build_shard(root: Path, n: int, photos: list[Path] | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """n photos (default: the sample's; repeated, stored uncompressed as in the release) in
    root/images/train/00.zip; (ids, containers, members)."""
    photos = sorted(SAMPLE.glob("*.jpg")) if photos is None else list(photos)
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


class TodaysTransform:
    """The backbone's transform behind a wrapper the decoding plan does not recognise, so it runs whole
    in the workers on a full decode, float32: the feature stage's path before hierloc.features.decode
    (same repr, so the same cache key as ``fast_decode=False``)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image)

    def __repr__(self) -> str:
        return repr(self.transform)


def todays_backbone(bb: Backbone) -> Backbone:
    """``bb`` decoding as the stage did before: full decode, float32 from the workers."""
    return Backbone(bb.spec, bb.module, TodaysTransform(bb.transform), bb.dim, fast_decode=False)


def loader_rate(store: ImageStore, ids, containers, members, plan: DecodePlan | DeviceDecodePlan, *, batch_size: int,
                workers: int, device: torch.device) -> float:
    """Images/s of the stage's loader alone: workers decode, batches reach the device model-ready, no model.
    A DeviceDecodePlan: workers read bytes, the JPEGs are decoded on ``device`` (decoder 'device')."""
    items = compact_items(np.asarray(ids, np.int64), np.asarray(containers, object), np.asarray(members, object),
                          None, None)
    sync(device)
    t0, n = time.perf_counter(), 0
    with torch.inference_mode():
        batches = device_decoded_batches if isinstance(plan, DeviceDecodePlan) else device_batches
        for _, _, errors in batches(items, store.open, plan, batch_size=batch_size, num_workers=workers,
                                    device=device):
            n += len(errors)
    sync(device)
    return n / (time.perf_counter() - t0)


def encoder_rate(bb: Backbone, *, device: torch.device, precision: str, batch_size: int, n_images: int) -> float:
    """Images/s of the encoder alone on random model-ready batches on the device (after 2 warm-up batches)."""
    dtype = PRECISIONS[precision]
    bb.module.to(device)
    x = torch.randn(batch_size, *bb.decoding.shape, device=device)
    n_batches = max(3, math.ceil(n_images / batch_size))
    with torch.inference_mode():
        amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with amp:
            for _ in range(2):
                bb.encode(x)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                bb.encode(x)
            sync(device)
    return n_batches * batch_size / (time.perf_counter() - t0)


def feature_rates(spec: str, photos: list[Path], n_images: int, *, device: str | torch.device = "cpu",
                  precision: str = "fp32", batch_size: int = 256, workers: int = 2, fast_decode: bool = True,
                  backbone: Backbone | None = None, decoder: str = "pil") -> dict:
    """The feature stage's rates for backbone ``spec`` (random init) on ``device``, images/s:
    ``end_to_end_img_s`` (extract_features on a zip shard of ``photos`` repeated to ``n_images``, worker
    start-up included), ``encoder_only_img_s`` (random inputs of the model's shape on the device, after
    2 warm-up batches), ``loader_only_img_s`` (the same loader, no model, start-up included); also
    ``startup_s`` (until the first batch is encoded) and ``end_to_end_steady_img_s`` (after it; the
    workers decode ahead during start-up, so it reads high unless ``n_images`` is well above
    workers x 4 chunks x 32 images: 1,792 with 14 workers). ``fast_decode``: the default path (JPEGs
    decoded at reduced scale, uint8 from the workers, normalised on the device); False: today's path
    (full decode, the whole transform in the workers, float32). ``precision``: fp32, or bf16 / fp16
    autocast on CUDA (the CPU computes fp32). ``backbone``: ``load_backbone(spec)`` already built (a
    random-init ViT-L-14 takes seconds to build), reused for both paths. ``decoder``: 'pil' (JPEGs decoded in
    the workers) or 'device' (workers read bytes, decode_jpeg on ``device``: nvjpeg on CUDA)."""
    device = resolve_device(device)
    precision = effective_precision(device, precision)
    bb = load_backbone(spec) if backbone is None else backbone
    bb = bb if fast_decode else todays_backbone(bb)
    if decoder != bb.decoder:
        bb = Backbone(bb.spec, bb.module, bb.transform, bb.dim, bb.fast_decode, decoder)
    out = {"spec": spec, "device": str(device), "precision": precision, "batch_size": batch_size, "workers": workers,
           "fast_decode": fast_decode, "decoder": decoder, "n_images": n_images}
    out["encoder_only_img_s"] = encoder_rate(bb, device=device, precision=precision, batch_size=batch_size,
                                             n_images=n_images)
    with tempfile.TemporaryDirectory(prefix="hierloc-bench-features-") as tmp:
        root = Path(tmp)
        ids, containers, members = build_shard(root, n_images, photos)
        store = ImageStore(root)
        plan = bb.device_decoding if decoder == "device" else bb.decoding
        out["loader_only_img_s"] = loader_rate(store, ids, containers, members, plan, batch_size=batch_size,
                                               workers=workers, device=device)
        marks: list[tuple[int, float]] = []
        sync(device)
        t0 = time.perf_counter()
        extract_features(ids, containers, members, store.open, bb, root / "cache", batch_size=batch_size,
                         shard_size=max(n_images, 1), num_workers=workers, device=device, precision=precision,
                         progress=lambda done, total, secs: marks.append((done, time.perf_counter())))
        sync(device)
        t1 = time.perf_counter()
    out["end_to_end_img_s"] = n_images / (t1 - t0)
    first_n, first_t = marks[0] if marks else (0, t0)
    out["startup_s"] = first_t - t0
    steady = n_images - first_n
    out["end_to_end_steady_img_s"] = steady / (marks[-1][1] - first_t) if steady and len(marks) > 1 else float("nan")
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, joined after each run)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def decoding_table(backbone: Backbone, root: Path, ids, containers, members, *, batch_size: int, workers: int,
                   n_e2e: int, rounds: int = 3) -> list[tuple[str, float, float]]:
    """(row, images/s, CPU ms per image over all processes) of the loader variants (no model) and end to
    end (today vs the default) on the CPU. Other work on shared cores moves single runs: the loader rows
    are the median of ``rounds`` interleaved runs, end to end the median of 2 each, interleaved; the CPU
    time per image moves less with it.

    The loader rows run the main process on one torch thread: with the model absent it only assembles
    and converts batches, which on a GPU costs the host nothing, while on 2 CPU cores the OpenMP threads
    of a 2-thread main process spin against the workers (measured: uint8 320 -> 190 images/s)."""
    store, cpu = ImageStore(root), torch.device("cpu")
    variants = [("loader: today (full decode, float32 workers)", False, False),
                ("loader: draft decode, float32 workers", True, False),
                ("loader: full decode, uint8 + normalise after", False, True),
                ("loader: draft + uint8 (default)", True, True)]
    plans = {name: plan_decoding(backbone.transform, fast_decode=fast, split=split) for name, fast, split in variants}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in plans}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            for name, plan in plans.items():
                c0 = _cpu_seconds()
                rate = loader_rate(store, ids, containers, members, plan, batch_size=batch_size, workers=workers,
                                   device=cpu)
                runs[name].append((rate, (_cpu_seconds() - c0) * 1e3 / len(ids)))
    finally:
        torch.set_num_threads(threads)
    e2e = {"end to end: today": todays_backbone(backbone), "end to end: default": backbone}
    for r in range(2):  # a fresh cache each time
        for name, bb in e2e.items():
            c0 = _cpu_seconds()
            s = extract_features(ids[:n_e2e], containers[:n_e2e], members[:n_e2e], store.open, bb,
                                 root / f"cache-{name[-5:]}-{r}", batch_size=batch_size, shard_size=n_e2e,
                                 num_workers=workers).summary()
            runs.setdefault(name, []).append((s["images_per_s"], (_cpu_seconds() - c0) * 1e3 / n_e2e))
    return [(name, float(np.median([r for r, _ in got])), float(np.median([c for _, c in got])))
            for name, got in runs.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="96 images (under a minute)")
    ap.add_argument("--n", type=int, default=None, help="images in the shard (default 512, quick 160)")
    ap.add_argument("--loop-n", type=int, default=None, help="images the plain loop encodes (default 128, quick 32)")
    ap.add_argument("--arch", default="ViT-S-32", help="open_clip architecture (random init)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the feature stage")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the main process")
    ap.add_argument("--decode-only", action="store_true", help="only the decoding table")
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
        decode_rows = decoding_table(backbone, root, ids, containers, members, batch_size=args.batch_size,
                                     workers=args.workers, n_e2e=n // 2)
        if args.decode_only:
            return _print_decoding(args, backbone, n, decode_rows)
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
    _print_decoding(args, backbone, n, decode_rows)


def _print_decoding(args, backbone: Backbone, n: int, rows: list[tuple[str, float, float]]) -> None:
    print(f"\ndecoding: open_clip:{args.arch}, {n} sample JPEGs ({n // 2} end to end), {args.workers} workers, "
          f"batch {args.batch_size}, on the CPU (ratios: against today's path in this run)")
    print(f"{'path':<46} {'images/s':>9} {'vs today':>9} {'CPU ms/img':>11} {'vs today':>9}")
    base = {"loader": rows[0], "end to end": rows[4]}
    for name, rate, cpu_ms in rows:
        b = base[name.split(":")[0]]
        print(f"{name:<46} {rate:>9.1f} {rate / b[1]:>9.2f} {cpu_ms:>11.2f} {b[2] / cpu_ms:>9.2f}")
    print(f"loader_vs_today: {rows[3][1] / rows[0][1]:.2f}")
    print(f"end_to_end_vs_today: {rows[5][1] / rows[4][1]:.2f}")


if __name__ == "__main__":
    main()
