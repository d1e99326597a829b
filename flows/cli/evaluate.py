"""``hierloc evaluate``: benchmark metrics of a model on Im2GPS3k, YFCC4k, a generic CSV or OSV-5M photos."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.common import LEVEL_LABELS, fail, load_predictor


def evaluate(
    meta: Path = typer.Option(..., "--meta", exists=True, dir_okay=False, help="benchmark ground truth CSV "
                              "(im2gps3k_places365.csv, yfcc4k_places365.csv, an OSV-5M test.csv, or id/lat/lon)"),
    images: Path = typer.Option(..., "--images", exists=True, file_okay=False, help="folder holding the benchmark's photos "
                                "(any depth)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="bundle folder or MLflow model URI; "
                                        "default: the last `make demo` export"),
    fmt: str = typer.Option("auto", "--format", help="auto | im2gps3k | yfcc4k | generic | osv5m"),
    latlon_order: str = typer.Option("auto", "--latlon-order", help="auto (decide from ranges and GeoNames "
                                     "plausibility) | as-labelled | swapped"),
    variant: str = typer.Option("official", help="official (published numbers) | corrected (see docs/metrics.md)"),
    inclusive: Optional[bool] = typer.Option(None, "--inclusive/--strict", help="count d <= r / d < r for the km "
                                             "thresholds (default: inclusive for im2gps3k, yfcc4k, generic, as their "
                                             "code; strict for osv5m, as its code)",
                                             show_default=False),
    beam_k: int = typer.Option(10, "--beam-k", min=1, help="beam width per level"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="photos decoded and encoded together"),
    max_bad_fraction: float = typer.Option(0.05, "--max-bad-fraction", min=0.0, max=1.0,
                                           help="refuse the CSV when more of its rows are bad"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1, help="refuse larger images; default 40,000,000"),
    device: str = typer.Option("cpu", help="torch device (cpu, cuda, cuda:1)"),
    as_json: bool = typer.Option(False, "--json", help="print the whole result as JSON"),
    out: Optional[Path] = typer.Option(None, "--out", file_okay=False, help="write predictions.parquet, metrics.json, "
                                       "skipped.csv, error_map.png, error_cdf.png here"),
) -> None:
    """Benchmark metrics of a model on Im2GPS3k, YFCC4k, a generic CSV or OSV-5M photos."""
    import logging

    from flows.report.benchmark import evaluate_benchmark
    from geodata.ingest.image_decode import DEFAULT_MAX_IMAGE_PIXELS

    _check_choices(fmt, latlon_order, variant)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    bundle, predictor = load_predictor(model, device)
    try:
        res = evaluate_benchmark(predictor, meta, images, fmt=fmt, latlon_order=latlon_order, variant=variant,
                                 inclusive=inclusive, beam_k=beam_k, out_dir=out, batch_size=batch_size,
                                 max_bad_fraction=max_bad_fraction,
                                 max_image_pixels=max_pixels or DEFAULT_MAX_IMAGE_PIXELS, progress=_progress())
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    res["model"] = str(bundle)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    _print_result(res, bundle)


def _check_choices(fmt: str, latlon_order: str, variant: str) -> None:
    """--format, --latlon-order and --variant among their choices; else exit 2 naming them."""
    from geodata.eval_sets.truth import EVAL_FORMATS
    from geodata.eval_sets.benchmark_csv import LATLON_ORDERS
    from hierloc.infer.metrics import VARIANTS

    for name, value, allowed in (("--format", fmt, EVAL_FORMATS), ("--latlon-order", latlon_order, LATLON_ORDERS),
                                 ("--variant", variant, VARIANTS)):
        if value not in allowed:
            fail(f"{name} {value!r}: expected one of {', '.join(allowed)}")


def _progress():
    """Photos done of all, photos/s and ETA (hierloc.progress: a bar when stderr is a terminal; the
    log lines otherwise stay below this command's warning level)."""
    import logging

    from hierloc.progress import Progress

    bar: list[Progress] = []

    def progress(done: int, total: int, seconds: float) -> None:
        if not bar:
            bar.append(Progress(total, "photos", unit="photo", logger=logging.getLogger(__name__)))
        bar[0].update(done - bar[0].done)
        if done >= total:
            bar[0].close()

    return progress


def _print_result(res: dict, bundle: Path) -> None:
    """The evaluation as text: what was read and skipped, the metrics, the timings, the files."""
    from flows.report.scoring import format_metrics_table

    m = res["metrics"]
    typer.echo(f"{res['format']} benchmark {res['meta_csv']}, model {bundle}")
    typer.echo(f"coordinate order: {res['swap_evidence']}")
    typer.echo(f"thresholds: {'d <= r (inclusive)' if res['inclusive'] else 'd < r (strict)'}; "
               f"level keys: {res['variant']} variant")
    typer.echo(f"rows {res['n_rows']}: evaluated {res['n_evaluated']}, missing images {res['n_missing_images']}, "
               f"unreadable images {res['n_unreadable_images']}, quarantined {res['n_quarantined']}")
    for s in res["skipped_examples"][:5]:
        where = f"line {s['line']} {s['field']}={s['value']!r}" if s["line"] is not None else s["image"]
        typer.echo(f"  skipped ({s['kind']}) {where}: {s['reason']}")
    n_skipped = res["n_missing_images"] + res["n_unreadable_images"] + res["n_quarantined"]
    if n_skipped > 5:
        typer.echo(f"  ... {n_skipped - 5} more skipped row(s): " + ("see " + res["files"]["skipped"] if "files" in res
                                                                    else "pass --out DIR to list them all in skipped.csv"))
    typer.echo("\n" + format_metrics_table({k: v for k, v in m.items() if not k.startswith("pick_")}))
    typer.echo("\nentity picked per level (beam search):")
    for lvl in LEVEL_LABELS:
        typer.echo(f"  pick_acc_{lvl:<10} {100 * m[f'pick_acc_{lvl}']:.1f} %")
    typer.echo(f"\nsearch (backbone excluded): {res['search_ms_per_image']:.2f} ms/photo; total {res['seconds']:.1f} s")
    if "files" in res:
        typer.echo("wrote: " + ", ".join(res["files"].values()))
