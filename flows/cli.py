"""The `hierloc` command line. Heavy imports happen inside each command, so `--help` is instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hierarchical visual geolocation (HierLoc) pipeline and tools.")


def _fail(msg: str) -> None:
    typer.secho("\n".join(f"error: {line}" for line in str(msg).splitlines() or [""]), fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(..., "--out", help="folder to write the dataset into"),
    n_train: int = typer.Option(20_000, help="training rows"),
    n_test: int = typer.Option(2_000, help="test rows"),
    seed: int = typer.Option(0),
    relief: bool = typer.Option(False, help="stack the shaded relief under each Blue Marble crop"),
) -> None:
    """Write the embedded 'Earth tiles' dataset in the OSV-5M release layout."""
    from geodata.demo.build import build_demo_dataset

    try:
        stats = build_demo_dataset(out, n_train=n_train, n_test=n_test, seed=seed, relief=relief)
    except ValueError as exc:  # ForeignFolderError: a folder of someone else's files is never written to
        _fail(str(exc))
    typer.echo(json.dumps(stats, indent=2, default=str))


@app.command()
def label(
    in_csv: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV with latitude, longitude columns"),
    out_csv: Path = typer.Argument(..., help="output CSV (input columns + OSV-5M labels)"),
    lat_col: str = typer.Option("latitude"),
    lon_col: str = typer.Option("longitude"),
    method: str = typer.Option("geonames", help="geonames (= reverse_geocoder, OSV-5M's method) or polygons"),
    admin_source: str = typer.Option("gazetteer", help="polygons: gazetteer (embedded), gadm, geoboundaries, natural_earth"),
    admin_path: Optional[Path] = typer.Option(None, help="polygons: your GADM .gpkg / geoBoundaries folder / NE file"),
    max_snap_km: float = typer.Option(25.0, help="polygons: points in no polygon go to the nearest within this"),
    dask_scheduler: Optional[str] = typer.Option(None, help="polygons: Dask scheduler address (default: local)"),
) -> None:
    """Add country, region, sub-region, city (and unique_* for geonames) to each row of a CSV.

    geonames gives answers identical to reverse_geocoder; polygons adds, per level, the polygon
    code and why the point got it (inside, snapped, ...).
    """
    try:
        if method == "geonames":
            from geodata.labels.geonames_csv import label_csv

            n = label_csv(in_csv, out_csv, lat_col=lat_col, lon_col=lon_col)
            typer.echo(f"labelled {n} rows -> {out_csv}")
        elif method == "polygons":
            from geodata.labels.label import label_csv_polygons

            rep = label_csv_polygons(in_csv, out_csv, lat_col=lat_col, lon_col=lon_col, admin_source=admin_source,
                                     admin_path=admin_path, max_snap_km=max_snap_km, scheduler=dask_scheduler)
            typer.echo(f"labelled {rep['n']} rows -> {out_csv}; without a country: {rep['unassigned_country']}")
            for lvl in ("country", "region", "sub-region"):
                if lvl in rep:
                    typer.echo(f"  {lvl:<10} " + ", ".join(f"{k} {v}" for k, v in rep[lvl].items()))
        else:
            _fail(f"unknown --method {method!r}: use geonames or polygons")
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command()
def metrics(
    pred_csv: Path = typer.Argument(..., exists=True, dir_okay=False, help="id, latitude, longitude"),
    truth: Path = typer.Option(..., "--truth", exists=True, dir_okay=False, help="OSV-5M-format truth CSV"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    variant: str = typer.Option("official", help="official (published numbers) or corrected"),
    inclusive: bool = typer.Option(False, help="count d <= r for the km thresholds (Im2GPS style)"),
    per_row: Optional[Path] = typer.Option(None, help="write per-row distances, scores and hits here"),
) -> None:
    """OSV-5M benchmark metrics of a prediction CSV."""
    from flows.scoring import format_metrics_table, score_prediction_csv

    try:
        result = score_prediction_csv(pred_csv, truth, variant=variant, inclusive=inclusive, per_row_out=per_row)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result, indent=2) if as_json else format_metrics_table(result))


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="PipelineConfig as JSON"),
    data_dir: Optional[str] = typer.Option(None, help="OSV-5M folder (overrides the config)"),
    work_dir: Optional[str] = typer.Option(None, help="work folder (overrides the config)"),
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment"),
) -> None:
    """Run the whole pipeline as a Prefect flow, tracked in MLflow."""
    from flows.cli_support import load_config_or_exit

    cfg = load_config_or_exit(config, {"data_dir": data_dir, "work_dir": work_dir, "experiment": experiment})
    _run_and_report(cfg)


@app.command()
def demo(
    epochs: Optional[int] = typer.Option(None, help="override the training epochs"),
) -> None:
    """Build the embedded demo data if missing, run the whole pipeline on it, print the metrics."""
    from flows.pipeline import PipelineConfig

    cfg = PipelineConfig()
    if epochs:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    _run_and_report(cfg)


def _run_and_report(cfg) -> None:
    import mlflow

    from flows.cli_support import stop_on_sigterm
    from flows.pipeline import pipeline
    from flows.scoring import format_metrics_table

    with stop_on_sigterm():  # SIGTERM: exit 143, checkpoint kept, the servers this process started stopped
        result = pipeline(cfg)
    m = result["metrics"]
    extra = ("pick_", "baseline_", "n_dropped", "ece_", "mean_prob_", "mean_ball_", "search_", "index_gb")
    typer.echo("\n" + format_metrics_table({k: v for k, v in m.items() if not k.startswith(extra)}))
    retrieval = cfg.evaluate.method == "retrieval"
    typer.echo("\nentity at each level of the nearest training image (retrieval baseline):" if retrieval
               else "\nentity picked per level (beam search):")
    for lvl in ("country", "region", "subregion", "city"):
        typer.echo(f"  pick_acc_{lvl:<10} {100 * m[f'pick_acc_{lvl}']:.1f} %")
    typer.echo(f"  baseline: always the most frequent training country: {100 * m['baseline_majority_acc_country']:.1f} %")
    if not retrieval:
        typer.echo("beam probabilities (mean probability of the pick / expected calibration error):")
        for lvl in ("country", "region", "subregion", "city"):
            typer.echo(f"  {lvl:<10} {100 * m[f'mean_prob_{lvl}']:5.1f} %  / {100 * m[f'ece_{lvl}']:.1f} %")
    what = "exact retrieval over the training features" if retrieval else "beam k=10"
    typer.echo(f"search: {m['search_queries_per_s']:,.0f} queries/s ({what}, backbone excluded)")
    gate = result.get("registry")
    if gate:
        typer.echo(f"registry: {gate['name']} v{gate['version']} {'promoted to' if gate['promoted'] else 'not'} "
                   f"'champion' ({gate['reason']})")
    uri = mlflow.get_tracking_uri()
    typer.echo(f"\nMLflow parent run {result['parent_run_id']} in {uri}")
    typer.echo(f"open the UI with:  mlflow ui --backend-store-uri {uri}")


PREDICT_EXIT_HELP = "exit code 0: every photo answered; 1: some failed, others answered; 2: none answered or bad arguments"
_LEVEL_LABELS = ("country", "region", "subregion", "city")


def _load_predictor(model: Optional[str], device: str):
    """Bundle folder or MLflow URI (or the last `make demo` export) -> Predictor; errors exit 2."""
    from flows import settings
    from flows.serving import resolve_bundle
    from hierloc.infer.predictor import Predictor

    try:
        bundle = resolve_bundle(model, settings.WORK_DIR)
        return bundle, Predictor.load(bundle, device=device)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _pct(p: float) -> str:
    return f"{100 * p:5.1f}%"


def _format_prediction(file: str, pred, top_k: int) -> str:
    """Human text for one answered photo: file, path with level probabilities, point, candidates."""
    lines = [file]
    width = max(len(lvl) for lvl in _LEVEL_LABELS)
    for lvl in _LEVEL_LABELS:
        if lvl in pred.levels:
            v = pred.levels[lvl]
            lines.append(f"  {lvl:<{width}}  {_pct(v['prob'])}  {v['name'] or '-'}")
    lines.append(f"  {'point':<{width}}  {pred.latitude:9.4f}, {pred.longitude:9.4f}   {pred.path()}")
    if pred.candidates:
        lines.append(f"  top {min(top_k, len(pred.candidates))} candidates:")
        lines.append(f"    {'rank':>4}  {'prob':>6}  {'latitude':>9}  {'longitude':>10}  path")
        for c in pred.candidates:
            lines.append(f"    {c['rank']:>4}  {_pct(c['prob'])}  {c['latitude']:9.4f}  {c['longitude']:10.4f}  {c['path']}")
    return "\n".join(lines)


def _map_paths(map_out: Path, files: list[Path]) -> list[Path]:
    """One PNG: ``map_out`` itself; several: ``<stem>-<photo stem>.png`` beside it (made unique)."""
    if len(files) == 1:
        return [map_out]
    out, seen = [], set()
    for f in files:
        name, k = f"{map_out.stem}-{f.stem}", 2
        while name in seen:
            name, k = f"{map_out.stem}-{f.stem}-{k}", k + 1
        seen.add(name)
        out.append(map_out.with_name(name + (map_out.suffix or ".png")))
    return out


@app.command(epilog=PREDICT_EXIT_HELP)
def predict(
    photos: list[Path] = typer.Argument(..., help="photo files or folders (searched recursively)", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="bundle folder or MLflow model URI "
                                        "(runs:/<id>/model, models:/<name>/<version>); default: the last `make demo` export"),
    top_k: int = typer.Option(5, "--top-k", min=1, help="candidates listed per photo"),
    beam_k: int = typer.Option(10, "--beam-k", min=1, help="beam width per level"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document on stdout, nothing else"),
    map_out: Optional[Path] = typer.Option(None, "--map", help="PNG map of the candidates (several photos: "
                                           "<stem>-<photo stem>.png beside it)"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1, help="refuse larger images "
                                             "(decompression bombs); default 40,000,000"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="photos decoded and encoded together"),
    device: str = typer.Option("cpu", help="torch device (cpu, cuda, cuda:1)"),
) -> None:
    """Where was each photo taken? The hierarchical path, its coordinates and the top-k candidates."""
    import time

    from geodata.eval_sets.photos import decoded_batches
    from geodata.ingest.image_decode import DEFAULT_MAX_IMAGE_PIXELS, expand_photo_paths

    limit = max_pixels or DEFAULT_MAX_IMAGE_PIXELS
    _, predictor = _load_predictor(model, device)
    # one entry per photo or per bad argument, in argument order
    entries: list[dict] = []
    files: list[Path] = []
    for arg in photos:
        found, errs = expand_photo_paths([arg])
        for p in found:
            entries.append({"file": str(p), "_path": p})
            files.append(p)
        entries += [{"file": str(p), "error": reason} for p, reason in errs]
    entry_of = [e for e in entries if "_path" in e]

    t_search, n_answered = 0.0, 0
    for batch in decoded_batches(files, batch_size, limit):
        good = []
        for i, image, err in batch:
            if image is None:
                entry_of[i]["error"] = err
            else:
                good.append((i, image))
        if not good:
            continue
        feats = predictor.image_features([im for _, im in good], batch_size=batch_size)
        t0 = time.perf_counter()
        preds = predictor.predict_features(feats, top_k=top_k, beam_k=beam_k)
        t_search += time.perf_counter() - t0
        for (i, _), pred in zip(good, preds):
            entry_of[i]["_pred"] = pred
        n_answered += len(good)
        del good, feats  # the images of this batch are no longer needed

    if map_out is not None:
        from flows.plots import candidates_map

        for entry, png in zip(entry_of, _map_paths(map_out, files)):
            pred = entry.get("_pred")
            if pred is None or not pred.candidates:
                continue
            cands = [{"lat": c["latitude"], "lon": c["longitude"], "prob": c["prob"],
                      "label": f"{c['path'].rsplit(' > ', 1)[-1]}, {c['key'].split('|', 1)[0]}"} for c in pred.candidates]
            try:
                entry["map"] = str(candidates_map(cands, png, title=f"{entry['_path'].name}: {pred.path()}"))
            except (OSError, ValueError) as exc:
                entry["map_error"] = f"cannot write the map {png}: {exc}"

    for e in entries:
        if e.get("error"):
            typer.echo(f"error: {e['file']}: {e['error']}", err=True)
        if e.get("map_error"):
            typer.echo(f"error: {e['map_error']}", err=True)
    if as_json:
        doc = []
        for e in entries:
            pred = e.get("_pred")
            body = pred.to_dict() if pred is not None else {"latitude": None, "longitude": None, "path": None,
                                                            "levels": {}, "candidates": []}
            item = {"file": e["file"], **body, "error": e.get("error")}
            if "map" in e:
                item["map"] = e["map"]
            doc.append(item)
        typer.echo(json.dumps(doc, indent=2))
    else:
        blocks = []
        for e in entries:
            if e.get("_pred") is not None:
                block = _format_prediction(e["file"], e["_pred"], top_k)
                if "map" in e:
                    block += f"\n  map: {e['map']}"
                blocks.append(block)
        if blocks:
            typer.echo("\n\n".join(blocks))
        if n_answered:
            typer.echo(f"search (backbone excluded): {1000 * t_search / n_answered:.2f} ms/photo over {n_answered} "
                       f"photo(s), beam_k={beam_k}", err=True)
    n_failed = len(entries) - n_answered
    if n_failed:
        typer.echo(f"answered {n_answered} of {len(entries)}; {n_failed} failed (see the error lines above)", err=True)
    raise typer.Exit(0 if n_failed == 0 else 1 if n_answered else 2)


@app.command()
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
    variant: str = typer.Option("official", help="official (published numbers) | corrected (see README)"),
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

    from flows.benchmark_eval import evaluate_benchmark
    from flows.scoring import format_metrics_table
    from geodata.eval_sets.benchmark_csv import LATLON_ORDERS
    from geodata.eval_sets.truth import EVAL_FORMATS
    from geodata.ingest.image_decode import DEFAULT_MAX_IMAGE_PIXELS
    from hierloc.infer.metrics import VARIANTS

    for name, value, allowed in (("--format", fmt, EVAL_FORMATS), ("--latlon-order", latlon_order, LATLON_ORDERS),
                                 ("--variant", variant, VARIANTS)):
        if value not in allowed:
            _fail(f"{name} {value!r}: expected one of {', '.join(allowed)}")
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    bundle, predictor = _load_predictor(model, device)
    progress = None
    if sys.stderr.isatty():
        def progress(done: int, total: int, seconds: float) -> None:
            typer.echo(f"\r  {done}/{total} photos, {done / max(seconds, 1e-9):.1f}/s", err=True, nl=done >= total)
    try:
        res = evaluate_benchmark(predictor, meta, images, fmt=fmt, latlon_order=latlon_order, variant=variant,
                                 inclusive=inclusive, beam_k=beam_k, out_dir=out, batch_size=batch_size,
                                 max_bad_fraction=max_bad_fraction,
                                 max_image_pixels=max_pixels or DEFAULT_MAX_IMAGE_PIXELS, progress=progress)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    res["model"] = str(bundle)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
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
    for lvl in _LEVEL_LABELS:
        typer.echo(f"  pick_acc_{lvl:<10} {100 * m[f'pick_acc_{lvl}']:.1f} %")
    typer.echo(f"\nsearch (backbone excluded): {res['search_ms_per_image']:.2f} ms/photo; total {res['seconds']:.1f} s")
    if "files" in res:
        typer.echo("wrote: " + ", ".join(res["files"].values()))


def main() -> None:
    import warnings

    import flows  # noqa: F401  (offline defaults before anything else)

    # geoopt scripts a helper with torch.jit at import time; the deprecation is not the user's to act on
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    app()


if __name__ == "__main__":
    sys.exit(main())
