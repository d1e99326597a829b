"""Stage 4b, export: the trained head, its entity table and the backbone as one bundle
(hierloc.infer.predictor); ``export/latest.json`` names the newest."""

from __future__ import annotations

import json
from pathlib import Path

from flows.stages.files import load_entities, write_json
from hierloc.infer.predictor import write_bundle


def run_export(model_path: Path, hierarchy_dir: Path, backbone: str, pretrained: str | None, out_dir: Path,
               source: dict | None = None, *, fast_decode: bool) -> Path:
    """Pack the trained head, its entity table and the backbone into a bundle; point
    ``export/latest.json`` at it (what ``hierloc predict`` uses by default). ``fast_decode``: how
    the features stage decoded the training images (its output's ``fast_decode``); the bundle
    records it and serving decodes the same way."""
    out_dir = Path(out_dir)
    bundle = write_bundle(out_dir, Path(model_path), load_entities(hierarchy_dir), backbone, pretrained, source,
                          fast_decode=fast_decode)
    write_json({"bundle": str(bundle.resolve())}, out_dir.parent / "latest.json")
    return bundle


def latest_bundle(work_dir: Path) -> Path | None:
    """The bundle the last pipeline run exported under ``work_dir``, if any."""
    pointer = Path(work_dir) / "export" / "latest.json"
    if not pointer.is_file():
        return None
    bundle = Path(json.loads(pointer.read_text())["bundle"])
    return bundle if (bundle / "bundle.json").is_file() else None
