"""The variants on the held-out demo split, through the pipeline: which one generalises to unseen places?

On the default demo every variant scores ~4980 (its test photos are near copies of training
photos of the same places). Here the data is the demo's place-level held-out split (every
test row at least --heldout-km from every training row, geodata.demo.heldout), and each
variant is a real `hierloc-pipeline` flow run (flows.pipeline.pipeline) with its config overlay:

    HierLoc                 the defaults (Lorentz, GWH-InfoNCE, random Fourier location features)
    Euclidean               {"model": {"geometry": "euclidean"}}
    lambda = 0              {"train": {"lam": 0}}            (plain InfoNCE)
    retrieval               {"evaluate": {"method": "retrieval"}} (no training: one run, std 0)
    + attention             {"model": {"attention": true}}
    + spherical harmonics   {"model": {"coord_encoder": "sh"}}

each with --seeds training seeds (train.seed = 0, 1, ...); the data (demo_data.seed) is fixed.
All runs share one data folder and one work folder, so the ingest, hierarchy and features
stages are computed once and then taken from the Prefect cache; every run lands in one MLflow
experiment (--experiment), its parent run tagged with the variant and seed. Registration is off.

    python benchmarks/variants.py --quick      # 3,000 / 300 rows, 1 seed, 3 epochs: a check that it runs
    python benchmarks/variants.py              # 20,000 / 2,000 rows, 3 seeds, the default epochs

Prints a table of mean +- std (over seeds) of geoscore, median km, acc_25km / acc_200km /
acc_750km and the country and region accuracy (reverse-geocoded, official variant), writes
it with every run's metrics to <out>/variants.json, and ends with one line:
``variants_heldout: best <variant> geoscore <mean> (HierLoc <mean>, retrieval <mean>)``.
Accuracy within the hold-out radius is ~0 by construction: a prediction is a training
entity's (or image's) location, and none lies within R km of a test row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, dict] = {
    "HierLoc": {},
    "Euclidean": {"model": {"geometry": "euclidean"}},
    "lambda = 0": {"train": {"lam": 0.0}},
    "retrieval": {"evaluate": {"method": "retrieval"}},
    "+ attention": {"model": {"attention": True}},
    "+ spherical harmonics": {"model": {"coord_encoder": "sh"}},
}
#: Deterministic without a training seed: run once.
SEEDLESS = {"retrieval"}
COLUMNS = ("geoscore", "median_km", "acc_25km", "acc_200km", "acc_750km", "acc_country", "acc_region")
PERCENT = {c for c in COLUMNS if c.startswith("acc_")}


def merge(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay``'s leaves written over it (nested dicts merged, not replaced)."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def configs(args: argparse.Namespace) -> list[tuple[str, int, dict]]:
    """(variant, seed, PipelineConfig dict) for every run, in order."""
    base = {
        "data_dir": str(args.out / "data"), "work_dir": str(args.out / "work"), "experiment": args.experiment,
        "demo_data": {"n_train": args.n_train, "n_test": args.n_test, "seed": args.data_seed,
                      "heldout_km": args.heldout_km},
        "registry": {"enabled": False},
        "train": {"epochs": args.epochs} if args.epochs else {},
    }
    runs = []
    for name in args.variants:
        for seed in ([0] if name in SEEDLESS else range(args.seeds)):
            runs.append((name, seed, merge(base, merge(VARIANTS[name], {"train": {"seed": seed}}))))
    return runs


def summarise(rows: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant -> column -> (mean, sample std (0 for one run), runs)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        got = [r["metrics"] for r in rows if r["variant"] == name]
        out[name] = {c: (statistics.fmean(m[c] for m in got),
                         statistics.stdev(m[c] for m in got) if len(got) > 1 else 0.0, len(got)) for c in COLUMNS}
    return out


def format_table(summary: dict) -> str:
    def cell(c, mean, std):
        return f"{100 * mean:.1f} +- {100 * std:.1f}" if c in PERCENT else f"{mean:.1f} +- {std:.1f}"

    head = "| variant | runs | " + " | ".join(c + (" %" if c in PERCENT else "") for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, cols in summary.items():
        n = next(iter(cols.values()))[2]
        lines.append(f"| {name} | {n} | " + " | ".join(cell(c, m, s) for c, (m, s, _) in cols.items()) + " |")
    return "\n".join(lines)


def summary_line(summary: dict) -> str:
    best = max(summary, key=lambda n: summary[n]["geoscore"][0])
    ref = ", ".join(f"{n} {summary[n]['geoscore'][0]:.1f}" for n in ("HierLoc", "retrieval") if n in summary)
    return f"variants_heldout: best {best} geoscore {summary[best]['geoscore'][0]:.1f} ({ref})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3,000 / 300 rows, 1 seed, 3 epochs")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds per variant (default 3; --quick 1)")
    ap.add_argument("--n-train", type=int, default=None, help="training rows (default 20,000; --quick 3,000)")
    ap.add_argument("--n-test", type=int, default=None, help="test rows (default 2,000; --quick 300)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: TrainConfig's; --quick 3)")
    ap.add_argument("--heldout-km", type=float, default=25.0, help="the hold-out radius R (km)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=None, help="data, work folder and variants.json "
                                                          "(default data/variants-heldout[-quick])")
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default variants-heldout[-quick])")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else the project's)")
    args = ap.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or (1 if quick else 3)
    args.n_train = args.n_train or (3_000 if quick else 20_000)
    args.n_test = args.n_test or (300 if quick else 2_000)
    args.epochs = args.epochs or (3 if quick else None)
    suffix = "-quick" if quick else ""
    args.out = (args.out or ROOT / "data" / f"variants-heldout{suffix}").resolve()
    args.experiment = args.experiment or f"variants-heldout{suffix}"
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or args.seeds < 1:
        ap.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})" if unknown else "--seeds must be >= 1")
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri

    import flows  # noqa: F401  (offline defaults)
    from flows.cli.terminal import quiet_prefect
    from flows.params import PipelineConfig
    from flows.pipeline import pipeline
    from geodata.atomic import write_text_atomic
    from mlflow.tracking import MlflowClient

    quiet_prefect()
    rows = []
    for name, seed, cfg_dict in configs(args):
        cfg = PipelineConfig.model_validate(cfg_dict)
        t0 = time.perf_counter()
        result = pipeline(cfg)
        seconds = time.perf_counter() - t0
        MlflowClient().set_tag(result["parent_run_id"], "variant", name)
        MlflowClient().set_tag(result["parent_run_id"], "variant_seed", str(seed))
        m = result["metrics"]
        rows.append({"variant": name, "seed": seed, "seconds": round(seconds, 1),
                     "parent_run_id": result["parent_run_id"],
                     "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))}})
        print(f"{name} seed {seed}: geoscore {m['geoscore']:.1f}, median {m['median_km']:.1f} km, "
              f"acc_country {100 * m['acc_country']:.1f} % ({seconds:.0f} s)", flush=True)
    summary = summarise(rows)
    baseline = rows[0]["metrics"]["baseline_majority_acc_country"]
    table = format_table(summary)
    write_text_atomic(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                  "runs": rows, "baseline_majority_acc_country": baseline,
                                  "summary": summary, "table": table}, indent=2) + "\n",
                      args.out / "variants.json")
    print(f"\nheld-out split: {args.n_train} train / {args.n_test} test rows, every test row >= "
          f"{args.heldout_km} km from every training row; always the most frequent training country: "
          f"{100 * baseline:.1f} %")
    print(table)
    print(summary_line(summary))


if __name__ == "__main__":
    main()
