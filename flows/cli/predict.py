"""``hierloc predict``: where was each photo taken? One step per function: the model, the
photos named on the command line, batched prediction, the maps, the output, the exit code."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from flows.cli.common import LEVEL_LABELS, load_predictor

PREDICT_EXIT_HELP = "exit code 0: every photo answered; 1: some failed, others answered; 2: none answered or bad arguments"


def _pct(p: float) -> str:
    return f"{100 * p:5.1f}%"


def _format_prediction(file: str, pred, top_k: int) -> str:
    """Human text for one answered photo: file, path with level probabilities, point, candidates."""
    lines = [file]
    width = max(len(lvl) for lvl in LEVEL_LABELS)
    for lvl in LEVEL_LABELS:
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


def _expand(photos: list[Path]) -> tuple[list[dict], list[Path]]:
    """One entry per photo or per bad argument, in argument order (a photo's entry holds its
    ``_path``), and the photo files."""
    from geodata.ingest.image_decode import expand_photo_paths

    entries: list[dict] = []
    files: list[Path] = []
    for arg in photos:
        found, errs = expand_photo_paths([arg])
        for p in found:
            entries.append({"file": str(p), "_path": p})
            files.append(p)
        entries += [{"file": str(p), "error": reason} for p, reason in errs]
    return entries, files


def _predict_batches(predictor, files: list[Path], entry_of: list[dict], *, batch_size: int, max_pixels: int,
                     top_k: int, beam_k: int) -> tuple[int, float]:
    """Decode (as the model's features were: ``Predictor.decode_min_side``), encode and search ``files``
    in batches; each photo's entry gets ``_pred`` or an ``error``. Returns (photos answered, seconds
    spent in the search)."""
    from geodata.eval_sets.photos import decoded_batches

    t_search, n_answered = 0.0, 0
    for batch in decoded_batches(files, batch_size, max_pixels, min_side=predictor.decode_min_side):
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
    return n_answered, t_search


def _write_maps(map_out: Path, entry_of: list[dict], files: list[Path]) -> None:
    """A candidates map per answered photo: the entry gets ``map`` (its path) or ``map_error``."""
    from flows.report.maps import candidates_map

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


def _print_errors(entries: list[dict]) -> None:
    for e in entries:
        if e.get("error"):
            typer.echo(f"error: {e['file']}: {e['error']}", err=True)
        if e.get("map_error"):
            typer.echo(f"error: {e['map_error']}", err=True)


def _print_json(entries: list[dict]) -> None:
    """One JSON document: a record per entry (a failed one with empty fields and its error)."""
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


def _print_text(entries: list[dict], top_k: int) -> None:
    blocks = []
    for e in entries:
        if e.get("_pred") is not None:
            block = _format_prediction(e["file"], e["_pred"], top_k)
            if "map" in e:
                block += f"\n  map: {e['map']}"
            blocks.append(block)
    if blocks:
        typer.echo("\n\n".join(blocks))


def _exit_code(n_entries: int, n_answered: int) -> int:
    """0: every photo answered; 1: some failed, others answered; 2: none answered."""
    n_failed = n_entries - n_answered
    if n_failed:
        typer.echo(f"answered {n_answered} of {n_entries}; {n_failed} failed (see the error lines above)", err=True)
    return 0 if n_failed == 0 else 1 if n_answered else 2


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
    from geodata.ingest.image_decode import DEFAULT_MAX_IMAGE_PIXELS

    _, predictor = load_predictor(model, device)
    entries, files = _expand(photos)
    entry_of = [e for e in entries if "_path" in e]
    n_answered, t_search = _predict_batches(predictor, files, entry_of, batch_size=batch_size,
                                            max_pixels=max_pixels or DEFAULT_MAX_IMAGE_PIXELS, top_k=top_k, beam_k=beam_k)
    if map_out is not None:
        _write_maps(map_out, entry_of, files)
    _print_errors(entries)
    if as_json:
        _print_json(entries)
    else:
        _print_text(entries, top_k)
        if n_answered:
            typer.echo(f"search (backbone excluded): {1000 * t_search / n_answered:.2f} ms/photo over {n_answered} "
                       f"photo(s), beam_k={beam_k}", err=True)
    raise typer.Exit(_exit_code(len(entries), n_answered))
