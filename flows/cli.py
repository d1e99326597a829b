"""The `hierloc` command line. Heavy imports happen inside each command, so `--help` is instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hierarchical visual geolocation (HierLoc) pipeline and tools.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
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
    from geodata.demo_data import build_demo_dataset

    stats = build_demo_dataset(out, n_train=n_train, n_test=n_test, seed=seed, relief=relief)
    typer.echo(json.dumps(stats, indent=2, default=str))


@app.command()
def label(
    in_csv: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV with latitude, longitude columns"),
    out_csv: Path = typer.Argument(..., help="output CSV (input columns + OSV-5M labels)"),
    lat_col: str = typer.Option("latitude"),
    lon_col: str = typer.Option("longitude"),
) -> None:
    """Add country, region, sub-region, city and unique_* columns (identical to reverse_geocoder)."""
    from geodata.geonames import label_csv

    try:
        n = label_csv(in_csv, out_csv, lat_col=lat_col, lon_col=lon_col)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"labelled {n} rows -> {out_csv}")


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


def _load_config(config: Optional[Path], overrides: dict) -> "PipelineConfig":  # noqa: F821
    from flows.pipeline import PipelineConfig

    data = json.loads(config.read_text()) if config else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig.model_validate(data)


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="PipelineConfig as JSON"),
    data_dir: Optional[str] = typer.Option(None, help="OSV-5M folder (overrides the config)"),
    work_dir: Optional[str] = typer.Option(None, help="work folder (overrides the config)"),
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment"),
) -> None:
    """Run the whole pipeline as a Prefect flow, tracked in MLflow."""
    cfg = _load_config(config, {"data_dir": data_dir, "work_dir": work_dir, "experiment": experiment})
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

    from flows.pipeline import pipeline
    from flows.scoring import format_metrics_table

    result = pipeline(cfg)
    m = result["metrics"]
    typer.echo("\n" + format_metrics_table({k: v for k, v in m.items() if not k.startswith(("pick_", "baseline_", "n_dropped"))}))
    typer.echo("\nentity picked per level (beam search):")
    for lvl in ("country", "region", "subregion", "city"):
        typer.echo(f"  pick_acc_{lvl:<10} {100 * m[f'pick_acc_{lvl}']:.1f} %")
    typer.echo(f"  baseline: always the most frequent training country: {100 * m['baseline_majority_acc_country']:.1f} %")
    uri = mlflow.get_tracking_uri()
    typer.echo(f"\nMLflow parent run {result['parent_run_id']} in {uri}")
    typer.echo(f"open the UI with:  mlflow ui --backend-store-uri {uri}")


def main() -> None:
    import flows  # noqa: F401  (offline defaults before anything else)

    app()


if __name__ == "__main__":
    sys.exit(main())
