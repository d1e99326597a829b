"""What the commands share: the one-line error exit and the model they predict with."""

from __future__ import annotations

from typing import Optional

import typer

LEVEL_LABELS = ("country", "region", "subregion", "city")


def fail(msg: str) -> None:
    typer.secho("\n".join(f"error: {line}" for line in str(msg).splitlines() or [""]), fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def load_predictor(model: Optional[str], device: str):
    """Bundle folder or MLflow URI (or the last `make demo` export) -> Predictor; errors exit 2."""
    from flows import settings
    from flows.serving.resolve import resolve_bundle
    from hierloc.infer.predictor import Predictor

    try:
        bundle = resolve_bundle(model, settings.WORK_DIR)
        return bundle, Predictor.load(bundle, device=device)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
