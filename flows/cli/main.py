"""The `hierloc` command line. Heavy imports happen inside each command, so `--help` is instant."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from flows.cli.common import fail
from flows.cli.evaluate import evaluate
from flows.cli.predict import PREDICT_EXIT_HELP, predict

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hierarchical visual geolocation (HierLoc) pipeline and tools.")


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(..., "--out", help="folder to write the dataset into"),
    n_train: int = typer.Option(20_000, help="training rows"),
    n_test: int = typer.Option(2_000, help="test rows"),
    seed: int = typer.Option(0),
    relief: bool = typer.Option(False, help="stack the shaded relief under each Blue Marble crop"),
    heldout_km: Optional[float] = typer.Option(
        None, "--heldout-km", help="place-level held-out split: every test row at least this many km from every "
                                  "training row (its own folder, never the default demo's)"),
    heldout: bool = typer.Option(False, "--heldout", help="the held-out split at 25 km (= --heldout-km 25)"),
) -> None:
    """Write the embedded 'Earth tiles' dataset in the OSV-5M release layout."""
    from geodata.demo.build import build_demo_dataset
    from geodata.demo.heldout import HELDOUT_KM_DEFAULT
    from flows.stages.data_dir import check_heldout_target

    if heldout and heldout_km is None:
        heldout_km = HELDOUT_KM_DEFAULT
    try:
        check_heldout_target(out, heldout_km)
        stats = build_demo_dataset(out, n_train=n_train, n_test=n_test, seed=seed, relief=relief,
                                   heldout_km=heldout_km)
    except ValueError as exc:  # ForeignFolderError: a folder of someone else's files is never written to
        fail(str(exc))
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
            fail(f"unknown --method {method!r}: use geonames or polygons")
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


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
    from flows.report.scoring import format_metrics_table, score_prediction_csv

    try:
        result = score_prediction_csv(pred_csv, truth, variant=variant, inclusive=inclusive, per_row_out=per_row)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=2) if as_json else format_metrics_table(result))


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="PipelineConfig as JSON"),
    data_dir: Optional[str] = typer.Option(None, help="OSV-5M folder (overrides the config)"),
    work_dir: Optional[str] = typer.Option(None, help="work folder (overrides the config)"),
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment"),
    check: bool = typer.Option(False, "--check", help="validate only: print the resolved config as JSON, run nothing"),
) -> None:
    """Run the whole pipeline as a Prefect flow, tracked in MLflow."""
    from flows.cli.config import load_config_or_exit

    cfg = load_config_or_exit(config, {"data_dir": data_dir, "work_dir": work_dir, "experiment": experiment})
    if check:  # the JSON is what `prefect deployment run ... --params '{"cfg": ...}'` takes (docs/runbook.md)
        typer.echo(cfg.model_dump_json(indent=2))
        return
    _run_and_report(cfg)


@app.command()
def demo(
    epochs: Optional[int] = typer.Option(None, help="override the training epochs"),
) -> None:
    """Build the embedded demo data if missing, run the whole pipeline on it, print the metrics."""
    from flows.params import PipelineConfig

    cfg = PipelineConfig()
    if epochs:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    _run_and_report(cfg, readme_table=True)


def _run_and_report(cfg, readme_table: bool = False) -> None:
    import mlflow

    from flows.cli.terminal import mlflow_ui_hint, quiet_prefect
    from flows.errors import plain_reason
    from flows.cli.signals import stop_on_sigterm
    from flows.pipeline import pipeline
    from flows.report.scoring import format_metrics_table

    quiet_prefect()
    t0 = time.monotonic()
    try:
        with stop_on_sigterm():  # SIGTERM: exit 143, checkpoint kept, the servers this process started stopped
            result = pipeline(cfg)
    except Exception as exc:  # the flow run's log (above, and in Prefect) holds the traceback
        typer.secho(f"error: the pipeline failed: {plain_reason(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    m = result["metrics"]
    if readme_table:  # the README's table, and the record `make readme-tables` writes it from
        from flows.report.demo_table import save_demo_results

        text, path = save_demo_results(cfg, result, time.monotonic() - t0)
        typer.echo(f"\n{text}\n(saved to {path}; `make readme-tables` puts it in the README)")
    extra = ("pick_", "baseline_", "n_dropped", "ece_", "mean_prob_", "mean_ball_", "search_", "index_gb")
    retrieval = cfg.evaluate.method == "retrieval"
    if not readme_table:
        typer.echo("\n" + format_metrics_table({k: v for k, v in m.items() if not k.startswith(extra)}))
        typer.echo("\nentity at each level of the nearest training image (retrieval baseline):" if retrieval
                   else "\nentity picked per level (beam search):")
        for lvl in ("country", "region", "subregion", "city"):
            typer.echo(f"  pick_acc_{lvl:<10} {100 * m[f'pick_acc_{lvl}']:.1f} %")
        typer.echo(f"  baseline: always the most frequent training country: {100 * m['baseline_majority_acc_country']:.1f} %")
    if not retrieval and not readme_table:
        typer.echo("beam probabilities (mean probability of the pick / expected calibration error):")
        for lvl in ("country", "region", "subregion", "city"):
            typer.echo(f"  {lvl:<10} {100 * m[f'mean_prob_{lvl}']:5.1f} %  / {100 * m[f'ece_{lvl}']:.1f} %")
    what = "exact retrieval over the training features" if retrieval else f"beam k={m.get('search_beam_k', cfg.evaluate.beam_k)}"
    typer.echo(f"search: {m['search_queries_per_s']:,.0f} queries/s ({what}, backbone excluded)")
    gate = result.get("registry")
    if gate:
        typer.echo(f"registry: {gate['name']} v{gate['version']} {'promoted to' if gate['promoted'] else 'not'} "
                   f"'champion' ({gate['reason']})")
    uri = mlflow.get_tracking_uri()
    typer.echo(f"\nMLflow parent run {result['parent_run_id']} in {uri}")
    typer.echo(mlflow_ui_hint(uri))


app.command(epilog=PREDICT_EXIT_HELP)(predict)
app.command()(evaluate)


def main() -> None:
    import warnings

    import flows  # noqa: F401  (offline defaults before anything else)

    # geoopt scripts a helper with torch.jit at import time; the deprecation is not the user's to act on
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    app()
