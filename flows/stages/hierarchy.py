"""Stage 2, hierarchy: the entity table and every image's entities (geodata.labels.build)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flows.report.maps import entity_map
from flows.stages.files import read_manifests, write_json, write_parquet
from geodata.labels.build import build_hierarchy, hierarchy_labeler
from geodata.labels.check import check_ingested_labels, write_label_quarantine
from geodata.osv5m import LABEL_COLUMNS


#: What the labelers, the label check and the entity table read of a manifest.
HIERARCHY_COLUMNS = ("id", "line", "latitude", "longitude", *LABEL_COLUMNS, "image_container")


def run_hierarchy(
    ingest_dir: Path, out_dir: Path, coords: str = "geonames", previous: Path | None = None, *,
    labeler: str = "osv5m", admin_source: str = "gazetteer", admin_path: str | None = None,
    grid_deg: float = 5.0, max_snap_km: float = 25.0, check_all_levels: bool = False, scheduler: str | None = None,
    runner=None,
) -> dict:
    """Entity table from the training labels, per-image entity ids for every split, and a QC report.

    labeler: "osv5m" (the dataset's own label columns), "geonames" (relabel with the GeoNames
    labeler) or "polygons" (admin polygons from ``admin_source``/``admin_path``, geodata.admin.schema);
    the labelers run over Parquet partitions on Dask (``scheduler``, ``runner``: geodata.labels.parallel).
    ``previous``: the entity table of the model being fine-tuned: its entities keep their ids,
    new ones are appended (geodata.labels.hierarchy.build_entities).
    coords: "geonames", "mean", "medoid" (geodata.labels.hierarchy.build_entities) or "representative"
    (polygon representative points; polygons only). Rows whose coordinates contradict their
    country label (geodata.labels.check) get no entity and are listed in quarantine.parquet.
    Writes entities.parquet, assignments_<split>.parquet, quarantine.parquet,
    hierarchy_report.json and entity_map.png (geodata.labels.build computes them).
    """
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    how = hierarchy_labeler(labeler, coords, admin_source=admin_source, admin_path=admin_path, grid_deg=grid_deg,
                            max_snap_km=max_snap_km, check_all_levels=check_all_levels)
    manifests = read_manifests(ingest_dir, HIERARCHY_COLUMNS)  # EmptySplitError: a split without rows
    checks = check_ingested_labels(ingest_dir, manifests)  # label_mismatch rows: no entity, quarantined
    built = build_hierarchy(manifests, how, previous=pd.read_parquet(previous) if previous else None, checks=checks,
                            scheduler=scheduler, work_dir=out_dir / "partitions", runner=runner)
    entities, report = built.entities, built.report
    write_parquet(entities, out_dir / "entities.parquet")
    for split, assigned in built.assignments.items():
        write_parquet(assigned, out_dir / f"assignments_{split}.parquet")
    report["quarantine_path"] = str(write_label_quarantine(checks, out_dir / "quarantine.parquet"))
    write_json(report, out_dir / "hierarchy_report.json")
    entity_map(entities["lat"], entities["lon"], entities["level"].to_numpy(np.int64), out_dir / "entity_map.png",
               n_images=entities["n_images"], title=f"{len(entities):,} entities ({labeler} labels, {coords} coordinates)")
    return report
