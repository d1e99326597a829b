"""The whole entity hierarchy from an ingest's manifests: label, check, build, assign, count.

Two calls, in the order the pipeline's hierarchy stage makes them:

- ``hierarchy_labeler``: the labeler ("osv5m": the dataset's own label columns, "geonames":
  relabel with the GeoNames labeler, "polygons": admin polygons from ``admin_source``/
  ``admin_path``, geodata.admin.schema), its options checked and its polygons loaded once;
- ``build_hierarchy``: both splits labelled in one run (geodata.labels.label.label_points,
  over Parquet partitions on Dask), rows whose coordinates contradict their country label
  left out (geodata.labels.check), the entity table built from the training labels
  (geodata.labels.hierarchy.build_entities), every image of every split assigned its entity
  at each level, and the QC report's counts.

Nothing is written here: the caller writes the entity table, the assignments, the
label_mismatch quarantine and the report (flows/stages/hierarchy.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from geodata.labels.check import LabelCheck, check_labels, unassign
from geodata.labels.geonames import default_labeler
from geodata.labels.hierarchy import assign_images, build_entities
from geodata.labels.label import country_disagreements, label_points, polygon_report, representative_coords
from geodata.osv5m import LABEL_COLUMNS, LEVELS


@dataclass
class HierarchyLabeler:
    """How the images are labelled: ``method`` ("osv5m", "geonames", "polygons") and, for
    polygons, the prepared PolygonLabeler and its (name-disambiguated) admin table."""

    method: str
    coords: str
    polygons: object | None = None  # geodata.labels.polygons.PolygonLabeler
    admin: gpd.GeoDataFrame | None = None


@dataclass
class Hierarchy:
    """What ``build_hierarchy`` returns: entities (ENTITY_COLUMNS), assignments {split: id +
    <level>_id / <level>_index}, labels {split: the labeler's output per row}, checks {split:
    LabelCheck} and report (the counts of hierarchy_report.json)."""

    entities: pd.DataFrame
    assignments: dict[str, pd.DataFrame]
    labels: dict[str, pd.DataFrame]
    checks: dict[str, LabelCheck]
    report: dict


def hierarchy_labeler(
    method: str = "osv5m", coords: str = "geonames", *, admin_source: str = "gazetteer",
    admin_path: str | None = None, grid_deg: float = 5.0, max_snap_km: float = 25.0, check_all_levels: bool = False,
) -> HierarchyLabeler:
    """The labeler ``build_hierarchy`` runs. coords: "geonames", "mean", "medoid"
    (geodata.labels.hierarchy.build_entities) or "representative" (polygon representative
    points; polygons only: ValueError otherwise). Polygons are loaded here, once."""
    if coords == "representative" and method != "polygons":
        raise ValueError("coords='representative' needs polygons: set labeler='polygons'")
    if method != "polygons":
        return HierarchyLabeler(method, coords)
    from geodata.admin import load_admin
    from geodata.labels.label import disambiguate_names
    from geodata.labels.polygons import PolygonLabeler

    admin = disambiguate_names(load_admin(admin_source, admin_path))
    polygons = PolygonLabeler(admin, grid_deg=grid_deg, max_snap_km=max_snap_km, check_all_levels=check_all_levels)
    return HierarchyLabeler(method, coords, polygons, admin)


def _label_splits(manifests: dict[str, pd.DataFrame], labeler: HierarchyLabeler, checks: dict[str, LabelCheck],
                  scheduler: str | None, work_dir: Path | None, runner) -> tuple[dict, dict]:
    """Both splits in one labelling run (one cluster start and one labeler shipment, not one
    per split); each manifest's label columns are replaced by the labels (in place).
    Returns ({split: labels}, {split: the labels' report})."""
    res = label_points(pd.concat(manifests.values(), ignore_index=True), labeler.method, scheduler=scheduler,
                       labeler=labeler.polygons, work_dir=work_dir, runner=runner)
    label_sets, reports, start = {}, {}, 0
    for split, m in manifests.items():
        labels = res.labels.iloc[start : start + len(m)].reset_index(drop=True)
        start += len(m)
        rep = dict(res.report)
        if labeler.method == "polygons":
            rep = polygon_report(labels, labeler.polygons.level_names)
            # OSV-5M's own labels are GeoNames': how often do the polygons put a point in another country?
            rep["country_differs_from_geonames"] = country_disagreements(labels, m["country"])
        rep["label_mismatch"] = checks[split].n
        for col in LABEL_COLUMNS:  # the labels the entity table is built from
            m[col] = labels[col].to_numpy()
        label_sets[split] = labels
        reports[split] = rep
    return label_sets, reports


def _entities(train: pd.DataFrame, use: np.ndarray, train_labels: pd.DataFrame, labeler: HierarchyLabeler,
              previous: pd.DataFrame | None) -> pd.DataFrame:
    """The entity table of the ``use`` rows of the (relabelled) training manifest."""
    coords = labeler.coords
    places = default_labeler().places if coords in ("geonames", "representative") else None
    entities = build_entities(train[use], places=places, coords="geonames" if coords == "representative" else coords,
                              previous=previous)
    if coords == "representative":
        entities = representative_coords(entities, train_labels[use].assign(
            **{c: train.loc[use, c].to_numpy() for c in LABEL_COLUMNS}), labeler.admin)
    return entities


def _entity_counts(entities: pd.DataFrame, previous: pd.DataFrame | None, n_without_country: int) -> dict:
    ids = set(entities["entity_id"].tolist())
    return {"entities": {lvl: int((entities["level"] == i).sum()) for i, lvl in enumerate(LEVELS)},
            "new_entities": int(len(entities) - (0 if previous is None else entities["key"].isin(previous["key"]).sum())),
            "placeholder_subregions": int(entities["placeholder"].sum()),
            # check_tree (in build_entities) refuses a table with orphans: recorded for the report
            "orphans": int((entities["level"] > 0).sum() - entities["parent_id"].isin(ids).sum()),
            "train_points_without_country": n_without_country}


def build_hierarchy(
    manifests: dict[str, pd.DataFrame], labeler: HierarchyLabeler, *, previous: pd.DataFrame | None = None,
    checks: dict[str, LabelCheck] | None = None, scheduler: str | None = None, work_dir: Path | None = None,
    runner=None,
) -> Hierarchy:
    """Entity table from the training labels, per-image entity ids for every split, and a QC report.

    manifests: {split: manifest} with a "train" split (latitude, longitude, id, line and the
    OSV-5M label columns); the frames are relabelled in place. ``previous``: the entity table
    of the model being fine-tuned: its entities keep their ids, new ones are appended
    (geodata.labels.hierarchy.build_entities). ``checks``: the label_mismatch check of each
    split (geodata.labels.check.check_ingested_labels names the ingest's files); None: checked
    here, rows named by ``<split>.csv``. Rows whose coordinates contradict their country label
    get no entity. ``scheduler``, ``work_dir`` (the Parquet partitions), ``runner``: the
    labelling's Dask settings (geodata.labels.parallel).
    """
    if checks is None:
        checks = {split: check_labels(m, split, f"{split}.csv") for split, m in manifests.items()}
    report: dict = {"labeler": labeler.method, "coords": labeler.coords}
    label_sets, label_reports = _label_splits(manifests, labeler, checks, scheduler, work_dir, runner)
    report.update({f"labels_{split}": rep for split, rep in label_reports.items()})
    train = manifests["train"]
    has_country = (train["country"] != "").to_numpy()
    entities = _entities(train, has_country & ~checks["train"].mask, label_sets["train"], labeler, previous)
    report.update(_entity_counts(entities, previous, int((~has_country).sum())))
    assignments = {}
    for split, m in manifests.items():
        assignments[split] = unassign(assign_images(m, entities), checks[split].mask)
        report[f"unassigned_{split}"] = {lvl: int((assignments[split][f"{lvl}_id"] < 0).sum()) for lvl in LEVELS}
    report["label_mismatch"] = {split: c.n for split, c in checks.items()}
    return Hierarchy(entities, assignments, label_sets, checks, report)
