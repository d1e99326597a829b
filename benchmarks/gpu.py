"""The GPU path in one command: beam search, training steps and the feature stage, one table, one JSON.

Sections (``--sections``, all by default; each catches its own failures, records them in the JSON
and the table, and the run goes on; the JSON is rewritten atomically after every section, so a
run cut short keeps what it measured):

- ``beam``: HierLoc beam search k=10 over an OSV-5M-size synthetic entity table (244k entities on 4
  levels, 210k queries): the torch kernel on the GPU, FAISS on every CPU core, their top-1
  agreement; the paper's baseline, exact top-1 retrieval over 4.9M x 128 embeddings on the same
  GPU, fp32 and bf16 (benchmarks/gpu_search.py);
- ``train``: steady-state steps/s and images/s of the real training loop (``train`` with a step
  budget) for batch 256 and 16, entity_refresh_every k=1 and k=16, the OSV-5M-size table (244k
  entities), d_img 1024, bf16 autocast; FLOPs per step counted with torch.utils.flop_counter,
  TFLOP/s and the share of the chip's dense bf16 peak (benchmarks/gpu_train.py);
- ``features``: the feature stage end to end against the encoder alone (and the loader alone),
  open_clip ViT-B-32 and ViT-L-14 (random init), bf16, 14 DataLoader workers, real JPEGs (the
  OSV-5M sample: $HIERLOC_OSV5M_SAMPLE), through benchmarks/features.py's ``feature_rates``
  (skipped, saying so, where that function does not exist).

Without CUDA, or with ``--quick``, every size is reduced (tables of 1/16 and 1/128 of OSV-5M's,
200k retrieval vectors, d_img 128, k=1 and 4, a dozen steps, 64 images through ViT-B-32) so that the run takes a minute or
two on a CPU; the JSON says ``"reduced": true``. On the GPU machine (../shared/gpu/carry.sh):

    python benchmarks/gpu.py --out OUT                  # all sections, sized for < 8 min on an H200 (~5 estimated)
    python benchmarks/gpu.py --quick --out OUT          # reduced sizes (CPU: ~1-2 min)
    python benchmarks/gpu.py --sections beam train --out OUT

Last line: ``json: OUT/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import describe, guard, release_memory  # noqa: E402
from synthetic import OSV5M_LEVEL_SIZES  # noqa: E402

from hierloc.atomic import atomic_write_path  # noqa: E402

SECTIONS = ("beam", "train", "features")


@dataclass(frozen=True)
class Sizes:
    """What each section runs on: the full sizes (a GPU) or reduced ones (``--quick``, no CUDA)."""

    beam_levels: tuple[int, ...]
    beam_queries: int
    beam_batch: int  # queries per call of the torch kernel
    retrieval_n: int
    retrieval_queries: int
    train_levels: tuple[int, ...]
    d_img: int
    batches: tuple[int, ...]
    refresh: tuple[int, ...]
    log_every: int  # steps per timed interval (rounded up to a multiple of k)
    intervals: int  # timed intervals after the warm-up interval
    feature_specs: tuple[str, ...]
    feature_images: int
    feature_batch: int
    workers: int


FULL = Sizes(beam_levels=OSV5M_LEVEL_SIZES, beam_queries=210_122, beam_batch=8192, retrieval_n=4_900_000,
             retrieval_queries=20_000, train_levels=OSV5M_LEVEL_SIZES, d_img=1024, batches=(256, 16), refresh=(1, 16),
             log_every=32, intervals=4, feature_specs=("open_clip:ViT-B-32", "open_clip:ViT-L-14"),
             feature_images=8192, feature_batch=256, workers=14)
QUICK = Sizes(beam_levels=tuple(max(1, s // 16) for s in OSV5M_LEVEL_SIZES), beam_queries=8192, beam_batch=2048,
              retrieval_n=200_000, retrieval_queries=256, train_levels=tuple(max(4, s // 128) for s in OSV5M_LEVEL_SIZES),
              d_img=128, batches=(256, 16), refresh=(1, 4), log_every=4, intervals=2,
              feature_specs=("open_clip:ViT-B-32",), feature_images=64, feature_batch=32, workers=2)


class Skipped(Exception):
    """A section that cannot run here (a missing function or data): recorded as skipped, with why."""


# --- sections ------------------------------------------------------------------------------
def run_beam(sz: Sizes, device: torch.device, args, work: Path) -> dict:
    from gpu_search import beam_rates

    return beam_rates(sz.beam_levels, sz.beam_queries, device, threads=args.threads, batch_size=sz.beam_batch,
                      retrieval_n=sz.retrieval_n, retrieval_queries=sz.retrieval_queries)


def run_train(sz: Sizes, device: torch.device, args, work: Path) -> dict:
    from gpu_train import train_rates

    return train_rates(sz.train_levels, sz.d_img, sz.batches, sz.refresh, device, log_every=sz.log_every,
                       intervals=sz.intervals, work_dir=work)


def run_features(sz: Sizes, device: torch.device, args, work: Path) -> dict:
    import features as feature_bench  # benchmarks/features.py

    rates = getattr(feature_bench, "feature_rates", None)
    if rates is None:
        raise Skipped("benchmarks/features.py has no feature_rates(...) yet (the decoding work adds it)")
    images = feature_bench.sample_dir() / "images"
    photos = sorted(images.glob("*.jpg"))
    if not photos:
        raise Skipped(f"no sample photos in {images}: set HIERLOC_OSV5M_SAMPLE (../shared/gpu/carry.sh)")
    precision = "bf16" if device.type == "cuda" else "fp32"
    workers = min(sz.workers, os.cpu_count() or 1)
    out: dict = {"photos": len(photos), "images": sz.feature_images, "precision": precision, "workers": workers,
                 "batch_size": sz.feature_batch, "device": str(device), "models": [], "errors": {}}
    # the new decoding (reduced-scale JPEGs, uint8 workers) for every model; the last model also with
    # today's full decode, in the same process: the ratio against the old path
    # and the last model with JPEGs decoded on the device (decode_jpeg: nvjpeg on CUDA)
    runs = ([(spec, True, "pil") for spec in sz.feature_specs] + [(sz.feature_specs[-1], False, "pil")]
            + [(sz.feature_specs[-1], True, "device")])
    for spec, fast, decoder in runs:
        how = f"{'' if fast else ', full decode'}{', device decode' if decoder == 'device' else ''}"
        with guard(out["errors"], f"{spec}{how}"):
            r = rates(spec, photos, sz.feature_images, device=str(device), precision=precision,
                      batch_size=sz.feature_batch, workers=workers, fast_decode=fast, decoder=decoder)
            row = {"spec": spec, "fast_decode": fast, "decoder": decoder, **{key: float(r[key]) for key in
                                                         ("end_to_end_img_s", "encoder_only_img_s", "loader_only_img_s")}}
            row["end_to_end_vs_encoder"] = row["end_to_end_img_s"] / row["encoder_only_img_s"]
            row.update({key: float(r[key]) for key in ("startup_s", "end_to_end_steady_img_s") if key in r})
            out["models"].append(row)
    return out


RUNNERS = {"beam": run_beam, "train": run_train, "features": run_features}


# --- the table -----------------------------------------------------------------------------
def _n(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table_rows(report: dict) -> list[tuple[str, str, str]]:
    """(section, measurement, figure) rows of the report, failures included."""
    rows = []
    for name, sec in report["sections"].items():
        if sec["status"] in ("failed", "skipped"):
            rows.append((name, sec["status"].upper(), sec.get("error") or sec.get("reason", "")))
            continue
        if name == "beam":
            where = f"{sec['entities']:,} entities, {sec['queries']:,} queries, k={sec['k']}"
            if "torch" in sec:
                rows.append((name, f"beam, torch kernel on {sec['torch']['device']} ({where})",
                             f"{_n(sec['torch']['qps'])} q/s"))
            if "faiss" in sec:
                rows.append((name, f"beam, FAISS on the CPU, {sec['faiss']['threads']} threads",
                             f"{_n(sec['faiss']['qps'])} q/s"))
            if "top1_agreement" in sec:
                rows.append((name, "top-1 identical, torch kernel vs FAISS", f"{100 * sec['top1_agreement']:.2f} %"))
            r = sec.get("retrieval")
            if r:
                what = f"exact retrieval top-{r['k']}, {r['n'] / 1e6:.1f}M x {r['dim']} on {r['device']}"
                rows.append((name, f"{what}, fp32{' (TF32)' if r['tf32'] else ''}", f"{_n(r['fp32_qps'])} q/s"))
                rows.append((name, f"{what}, bf16", f"{_n(r['bf16_qps'])} q/s (top-1 = fp32's for "
                                                    f"{100 * r['bf16_top1_agreement']:.1f} %)"))
        elif name == "train":
            peak = sec["peak_bf16_tflops"]
            for c in sec["configs"]:
                flops = c.get("flops_per_step")
                share = f" = {100 * c['of_peak']:.1f} % of {peak:,.0f}" if c.get("of_peak") is not None else ""
                eager = ", eager (compile off)" if c.get("compile") == "off" else ""
                rows.append((name, f"train, batch {c['batch']}, k={c['refresh_every']}{eager}, {sec['entities']:,} entities, "
                                   f"d_img {sec['d_img']}, {sec['device']}",
                             f"{c['steps_per_s']:,.2f} steps/s, {_n(c['images_per_s'])} images/s; "
                             f"{_n(flops and flops / 1e9, 1)} GFLOP/step, {_n(c.get('tflop_s'), 2)} TFLOP/s{share}"))
            for k, h in (sec.get("host_syncs") or {}).items():
                cuda = f", CUDA sync warnings {h['cuda_sync_warnings']}" if "cuda_sync_warnings" in h else ""
                rows.append((name, f"host syncs between logging points, first batch size, {k}",
                             f"{h['host_syncs']} in {h['steps']} steps{cuda}"))
        elif name == "features":
            for m in sec["models"]:
                how = ", device decode" if m.get("decoder") == "device" else ""
                how += "" if m.get("fast_decode", True) else ", full decode (the old path)"
                rows.append((name, f"{m['spec']}{how}, "
                                   f"{sec['precision']}, {sec['workers']} workers, end to end "
                                   f"(encoder alone; loader alone)",
                             f"{_n(m['end_to_end_img_s'])} images/s ({_n(m['encoder_only_img_s'])}; "
                             f"{_n(m['loader_only_img_s'])}): {100 * m['end_to_end_vs_encoder']:.0f} % of the encoder"))
        for part, err in sec.get("errors", {}).items():
            rows.append((name, f"FAILED: {part}", err))
    return rows


def print_table(report: dict) -> None:
    meta = report["meta"]
    print(f"\n{meta['device_name'] or 'CPU'}, torch {meta['torch']}, {meta['cpu_count']} CPU cores"
          f"{', REDUCED sizes' if meta['reduced'] else ''}\n")
    print("| section | measurement | figure |\n|---|---|---|")
    for row in table_rows(report):
        print("| " + " | ".join(s.replace("|", "/") for s in row) + " |")


# --- the run -------------------------------------------------------------------------------
def write_json(path: Path, report: dict) -> None:
    with atomic_write_path(path) as tmp:
        # numpy scalars and arrays as numbers and lists; anything else as its text (never a crash here)
        tmp.write_text(json.dumps(report, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
                       + "\n")


def run_section(name: str, sz: Sizes, device: torch.device, args, work: Path) -> dict:
    """One section's entry: its figures and ``status`` ok / partial (a part failed) / failed / skipped."""
    t0 = time.perf_counter()
    try:
        entry = RUNNERS[name](sz, device, args, work)
        entry = {"status": "partial" if entry.get("errors") else "ok", **entry}
    except Skipped as why:
        entry = {"status": "skipped", "reason": str(why)}
    except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' figures
        traceback.print_exc()
        entry = {"status": "failed", "error": describe(exc), "traceback": traceback.format_exc()[-3000:]}
    finally:
        release_memory()
    entry["seconds"] = time.perf_counter() - t0
    return entry


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu.json")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (automatic without CUDA)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="FAISS threads (default: every core)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sz = QUICK if args.quick or not cuda else FULL
    name = torch.cuda.get_device_name(device) if cuda else None
    json_path = args.out / "gpu.json"
    report = {"meta": {"argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick,
                       "reduced": sz is QUICK, "device": str(device), "device_name": name,
                       "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                       "cpu_count": os.cpu_count(), "sizes": asdict(sz), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
              "sections": {}}
    if not cuda:
        print("no CUDA device: every section runs on the CPU at reduced sizes")
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hierloc-gpu-bench-") as work:  # run folders: GBs at full size
        for sec in dict.fromkeys(args.sections):  # once each, in the order given
            print(f"--- {sec} ...", flush=True)
            report["sections"][sec] = run_section(sec, sz, device, args, Path(work))
            report["meta"]["wall_s"] = time.perf_counter() - t0
            write_json(json_path, report)
            print(f"--- {sec}: {report['sections'][sec]['status']} in {report['sections'][sec]['seconds']:.0f} s",
                  flush=True)
    print_table(report)
    print(f"\nwall {report['meta']['wall_s']:.0f} s\njson: {json_path}")
    return report


if __name__ == "__main__":
    main()
