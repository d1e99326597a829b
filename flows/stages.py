"""The pipeline's stages as plain functions: they wire geodata (tables) to hierloc (torch).

No Prefect and no MLflow here: flows/pipeline.py wraps each stage in a task and a
tracked run; the CLI can call them directly. Stages pass paths, not frames. Every
file a stage writes lives under its own folder of the work directory:

    ingest/      manifest/{split}.parquet, quarantine.parquet, ingest_report.json
    hierarchy/   entities.parquet, assignments_{split}.parquet, hierarchy_report.json
    features/<backbone>-<digest>/{split}/shard-*.npz
    train/<digest>/  checkpoint.pt, model.pt
    export/<digest>/ the model bundle (hierloc.predictor); export/latest.json points at the newest
    evaluate/    predictions.parquet, metrics.json, figures/*.png (the retrieval baseline writes here too)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from flows.scoring import score_points
from geodata.geonames import default_labeler
from geodata.hierarchy import assign_images, build_entities, parent_rows
from geodata.images import ImageStore
from geodata.labeling import country_disagreements, label_points, polygon_report, representative_coords
from geodata.atomic import write_parquet_atomic, write_text_atomic
from geodata.ingest import ingest_osv5m
from geodata.osv5m import LABEL_COLUMNS, LEVELS, UNIQUE_COLUMNS
from hierloc.features import extract_features, load_backbone, load_features
from hierloc.inference import beam_search
from hierloc.metrics import expected_calibration_error
from hierloc.model import ModelConfig
from hierloc.predictor import write_bundle
from hierloc.retrieval import RetrievalIndex
from hierloc.train import EntityData, TrainConfig, TrainData, config_digest, entity_mean_features, load_model, train

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


def _write_json(obj: dict, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2, default=str), path)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), path)


# --- 1. ingest --------------------------------------------------------------
def run_ingest(data_dir: Path, out_dir: Path, verify_images: str = "decode", max_bad_fraction: float = 0.05) -> dict:
    """Read an OSV-5M folder into Parquet manifests and a quarantine (geodata.ingest)."""
    report = ingest_osv5m(Path(data_dir), Path(out_dir), SPLITS, verify_images, max_bad_fraction)
    return report.to_dict()


# --- 2. hierarchy ------------------------------------------------------------
def run_hierarchy(
    ingest_dir: Path, out_dir: Path, coords: str = "geonames", previous: Path | None = None, *,
    labeler: str = "osv5m", admin_source: str = "gazetteer", admin_path: str | None = None,
    grid_deg: float = 5.0, max_snap_km: float = 25.0, check_all_levels: bool = False, scheduler: str | None = None,
) -> dict:
    """Entity table from the training labels, per-image entity ids for every split, and a QC report.

    labeler: "osv5m" (the dataset's own label columns), "geonames" (relabel with the GeoNames
    labeler) or "polygons" (admin polygons from ``admin_source``/``admin_path``, geodata.admin);
    the labelers run over Parquet partitions on Dask (``scheduler``: geodata.parallel).
    coords: "geonames", "mean", "medoid" (geodata.hierarchy.build_entities) or "representative"
    (polygon representative points; polygons only).
    """
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if coords == "representative" and labeler != "polygons":
        raise ValueError("coords='representative' needs polygons: set labeler='polygons'")
    admin = polygon_labeler = None
    if labeler == "polygons":
        from geodata.admin import load_admin
        from geodata.labeling import disambiguate_names
        from geodata.polygon_labeler import PolygonLabeler

        admin = disambiguate_names(load_admin(admin_source, admin_path))
        polygon_labeler = PolygonLabeler(admin, grid_deg=grid_deg, max_snap_km=max_snap_km,
                                         check_all_levels=check_all_levels)
    report: dict = {"labeler": labeler, "coords": coords}
    manifests = {split: pd.read_parquet(ingest_dir / "manifest" / f"{split}.parquet") for split in SPLITS}
    # Both splits in one labelling run: one cluster start and one labeler shipment, not one per split.
    res = label_points(pd.concat(manifests.values(), ignore_index=True), labeler, scheduler=scheduler,
                       labeler=polygon_labeler, work_dir=out_dir / "partitions")
    label_sets, start = {}, 0
    for split, m in manifests.items():
        labels = res.labels.iloc[start : start + len(m)].reset_index(drop=True)
        start += len(m)
        rep = dict(res.report)
        if labeler == "polygons":
            rep = polygon_report(labels, polygon_labeler.level_names)
            # OSV-5M's own labels are GeoNames': how often do the polygons put a point in another country?
            rep["country_differs_from_geonames"] = country_disagreements(labels, m["country"])
        for col in LABEL_COLUMNS:  # the labels the entity table is built from
            m[col] = labels[col].to_numpy()
        label_sets[split] = labels
        report[f"labels_{split}"] = rep
    train_m = manifests["train"]
    has_country = (train_m["country"] != "").to_numpy()
    prev = pd.read_parquet(previous) if previous else None
    places = default_labeler().places if coords in ("geonames", "representative") else None
    entities = build_entities(train_m[has_country], places=places, coords="geonames" if coords == "representative" else coords,
                              previous=prev)
    if coords == "representative":
        entities = representative_coords(entities, label_sets["train"][has_country].assign(
            **{c: train_m.loc[has_country, c].to_numpy() for c in LABEL_COLUMNS}), admin)
    _write_parquet(entities, out_dir / "entities.parquet")
    ids = set(entities["entity_id"].tolist())
    report.update({"entities": {lvl: int((entities["level"] == i).sum()) for i, lvl in enumerate(LEVELS)},
                   "placeholder_subregions": int(entities["placeholder"].sum()),
                   # check_tree (in build_entities) refuses a table with orphans: recorded for the report
                   "orphans": int((entities["level"] > 0).sum() - entities["parent_id"].isin(ids).sum()),
                   "train_points_without_country": int((~has_country).sum())})
    for split in SPLITS:
        assigned = assign_images(manifests[split], entities)
        _write_parquet(assigned, out_dir / f"assignments_{split}.parquet")
        report[f"unassigned_{split}"] = {lvl: int((assigned[f"{lvl}_id"] < 0).sum()) for lvl in LEVELS}
    _write_json(report, out_dir / "hierarchy_report.json")
    from flows import plots

    plots.entity_map(entities["lat"], entities["lon"], entities["level"].to_numpy(np.int64), out_dir / "entity_map.png",
                     n_images=entities["n_images"], title=f"{len(entities):,} entities ({labeler} labels, {coords} coordinates)")
    return report


# --- 3. features -------------------------------------------------------------
def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec)


def feature_cache_dir(root: Path, backbone: str, pretrained: str | None, ids: np.ndarray) -> Path:
    """Cache folder keyed by the backbone and the exact image list (content hash)."""
    h = hashlib.sha256(f"{backbone}|{pretrained}".encode() + np.asarray(ids, np.int64).tobytes()).hexdigest()[:12]
    return Path(root) / f"{_slug(backbone)}-{h}"


def run_features(
    data_dir: Path, ingest_dir: Path, out_root: Path, backbone: str = "fixed:pixelstats",
    pretrained: str | None = None, batch_size: int = 256, num_workers: int = 2, device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Frozen backbone features of every manifest image, cached per split."""
    bb = load_backbone(backbone, pretrained)
    store = ImageStore(Path(data_dir))
    out: dict = {"backbone": backbone, "dim": bb.dim, "dirs": {}}
    for split in SPLITS:
        m = pd.read_parquet(Path(ingest_dir) / "manifest" / f"{split}.parquet", columns=["id", "image_container", "image_member"])
        cache = feature_cache_dir(Path(out_root), backbone, pretrained, m["id"].to_numpy()) / split
        items = list(zip(m["id"].tolist(), m["image_container"].tolist(), m["image_member"].tolist()))
        stats = extract_features(items, store.open, bb, cache, batch_size=batch_size, num_workers=num_workers,
                                 device=device, progress=progress)
        out["dirs"][split] = str(cache)
        out[split] = stats
    return out


# --- 4. train ----------------------------------------------------------------
def _split_arrays(ingest_dir: Path, hierarchy_dir: Path, feature_dir: Path, split: str, require_targets: bool = False):
    """Features, per-level targets and coordinates of one split, aligned by image id.

    Images whose features could not be computed (NaN) are dropped and counted; with
    ``require_targets`` also images without an entity at some level (unassigned by a labeler).
    """
    m = pd.read_parquet(Path(ingest_dir) / "manifest" / f"{split}.parquet")
    a = pd.read_parquet(Path(hierarchy_dir) / f"assignments_{split}.parquet")
    ids, feats = load_features(feature_dir)
    row = pd.Index(ids).get_indexer(m["id"])
    if (row < 0).any():
        raise ValueError(f"{(row < 0).sum()} {split} images have no cached features in {feature_dir}: rerun features")
    feats = feats[row]
    ok = np.isfinite(feats).all(axis=1)
    if require_targets:  # training needs an entity at every level; evaluation keeps every row
        ok &= (a[[f"{lvl}_index" for lvl in LEVELS]].to_numpy() >= 0).all(axis=1)
    m, a, feats = m[ok].reset_index(drop=True), a[ok].reset_index(drop=True), feats[ok]
    targets = a[[f"{lvl}_index" for lvl in LEVELS]].to_numpy(np.int64)
    latlon = m[["latitude", "longitude"]].to_numpy(np.float32)
    return m, feats, targets, latlon, int((~ok).sum())


def load_entities(hierarchy_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(hierarchy_dir) / "entities.parquet")


def run_train(
    ingest_dir: Path, hierarchy_dir: Path, feature_dirs: dict[str, str], out_root: Path,
    model_cfg: ModelConfig, train_cfg: TrainConfig, log_fn=None,
) -> dict:
    """Train on the train split; the run folder is keyed by config + data so reruns resume."""
    _, feats, targets, latlon, dropped = _split_arrays(ingest_dir, hierarchy_dir, Path(feature_dirs["train"]), "train",
                                                       require_targets=True)
    ents = load_entities(hierarchy_dir)
    level_sizes = [int((ents["level"] == i).sum()) for i in range(len(LEVELS))]
    ent_data = EntityData(
        img_feat=entity_mean_features(feats, targets, level_sizes),
        latlon_deg=ents[["lat", "lon"]].to_numpy(np.float32),
        level_sizes=level_sizes,
        parent_index=parent_rows(ents),
    )
    data = TrainData(feats, targets, latlon)
    run_dir = Path(out_root) / config_digest(model_cfg.to_dict(), train_cfg.to_dict(), {"features": feature_dirs["train"], "hierarchy": str(hierarchy_dir)})
    res = train(data, ent_data, model_cfg, train_cfg, run_dir, log_fn=log_fn)
    return {"model_path": str(res.model_path), "checkpoint": str(res.checkpoint), "run_dir": str(run_dir),
            "steps": res.steps, "epochs_run": res.epochs_run, "seconds": res.seconds,
            "n_train": int(len(feats)), "dropped_no_features_or_entity": dropped, **res.final}


# --- 4b. export ----------------------------------------------------------------
def run_export(model_path: Path, hierarchy_dir: Path, backbone: str, pretrained: str | None, out_dir: Path,
               source: dict | None = None) -> Path:
    """Pack the trained head, its entity table and the backbone into a bundle; point
    ``export/latest.json`` at it (what ``hierloc predict`` uses by default)."""
    out_dir = Path(out_dir)
    bundle = write_bundle(out_dir, Path(model_path), load_entities(hierarchy_dir), backbone, pretrained, source)
    _write_json({"bundle": str(bundle.resolve())}, out_dir.parent / "latest.json")
    return bundle


def latest_bundle(work_dir: Path) -> Path | None:
    """The bundle the last pipeline run exported under ``work_dir``, if any."""
    pointer = Path(work_dir) / "export" / "latest.json"
    if not pointer.is_file():
        return None
    bundle = Path(json.loads(pointer.read_text())["bundle"])
    return bundle if (bundle / "bundle.json").is_file() else None


# --- 5. evaluate -------------------------------------------------------------
def run_evaluate(
    model_path: Path, ingest_dir: Path, hierarchy_dir: Path, feature_dirs: dict[str, str], out_dir: Path,
    beam_k: int = 10, variant: str = "official", device: str = "cpu",
) -> dict:
    """Beam search on the test split; OSV-5M metrics of the predicted city coordinates
    (reverse-geocoded, as the official code) and the accuracy of the entity picked at each level."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m, feats, targets, latlon, dropped = _split_arrays(ingest_dir, hierarchy_dir, Path(feature_dirs["test"]), "test")
    ents = load_entities(hierarchy_dir)
    model = load_model(model_path)
    res = beam_search(model, feats, k=beam_k, device=device, tau=model.tau)
    city_rows = res.picks[:, -1]
    pred_lat = ents["lat"].to_numpy()[city_rows]
    pred_lon = ents["lon"].to_numpy()[city_rows]
    unique = m[list(UNIQUE_COLUMNS)]
    metrics, dist_km, hits = score_points(pred_lat, pred_lon, latlon[:, 0].astype(float), latlon[:, 1].astype(float),
                                          unique, variant=variant)
    level_index = ents["level_index"].to_numpy()
    for lvl, name in enumerate(LEVELS):
        picked_ok = level_index[res.picks[:, lvl]] == targets[:, lvl]
        metrics[f"pick_acc_{name}"] = float(picked_ok.mean()) if len(m) else float("nan")
        # Are the beam probabilities calibrated? 0 = a picked entity with probability p is right a share p of the time.
        metrics[f"ece_{name}"] = expected_calibration_error(res.pick_prob[:, lvl], picked_ok)
        metrics[f"mean_prob_{name}"] = float(res.pick_prob[:, lvl].mean()) if len(m) else float("nan")
    metrics["baseline_majority_acc_country"] = _majority_country_acc(ingest_dir, m)
    metrics["n_dropped_no_features"] = dropped
    preds = pd.DataFrame({"id": m["id"], "latitude": pred_lat, "longitude": pred_lon, "dist_km": dist_km,
                          **{f"pick_{n}": ents["key"].to_numpy()[res.picks[:, lvl]] for lvl, n in enumerate(LEVELS)},
                          **{f"prob_{n}": res.pick_prob[:, lvl] for lvl, n in enumerate(LEVELS)},
                          **{f"hit_{k}": v for k, v in hits.items()}, "score": res.pick_score})
    metrics["search_queries_per_s"] = res.queries_per_s
    metrics.update(write_figures(out_dir / "figures", model, ents, m, preds, metrics))
    _write_parquet(preds, out_dir / "predictions.parquet")
    _write_json(metrics, out_dir / "metrics.json")
    return metrics


def _majority_country_acc(ingest_dir: Path, test: pd.DataFrame) -> float:
    """The bar to clear: always answering the most frequent training country."""
    train_cc = pd.read_parquet(Path(ingest_dir) / "manifest" / "train.parquet", columns=["country"])["country"]
    majority = train_cc.value_counts().index[0] if len(train_cc) else ""
    return float((test["country"] == majority).mean()) if len(test) else float("nan")


def run_retrieval(
    ingest_dir: Path, hierarchy_dir: Path, feature_dirs: dict[str, str], out_dir: Path, variant: str = "official",
) -> dict:
    """The retrieval baseline (the paper's "SC Retrieval"): each test image takes the location of
    its nearest training image by backbone feature (cosine, exact, FAISS), scored with the same
    metrics as the model; pick_acc_<level> is the nearest training image's entity at each level."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, tr_feats, tr_targets, tr_latlon, _ = _split_arrays(ingest_dir, hierarchy_dir, Path(feature_dirs["train"]), "train")
    m, feats, targets, latlon, dropped = _split_arrays(ingest_dir, hierarchy_dir, Path(feature_dirs["test"]), "test")
    index = RetrievalIndex(tr_feats)
    res = index.search(feats, k=1)
    nn = res.rows[:, 0]
    pred_lat, pred_lon = tr_latlon[nn, 0].astype(float), tr_latlon[nn, 1].astype(float)
    metrics, dist_km, hits = score_points(pred_lat, pred_lon, latlon[:, 0].astype(float), latlon[:, 1].astype(float),
                                          m[list(UNIQUE_COLUMNS)], variant=variant)
    for lvl, name in enumerate(LEVELS):
        metrics[f"pick_acc_{name}"] = float((tr_targets[nn, lvl] == targets[:, lvl]).mean()) if len(m) else float("nan")
    metrics["baseline_majority_acc_country"] = _majority_country_acc(ingest_dir, m)
    metrics["n_dropped_no_features"] = dropped
    metrics["search_queries_per_s"] = len(feats) / res.seconds if res.seconds > 0 else float("nan")
    metrics["index_gb"] = index.nbytes / 1e9
    preds = pd.DataFrame({"id": m["id"], "latitude": pred_lat, "longitude": pred_lon, "dist_km": dist_km,
                          "neighbour_row": nn, "similarity": res.similarity[:, 0],
                          **{f"hit_{k}": v for k, v in hits.items()}})
    ents = load_entities(hierarchy_dir)
    keys = {lvl: ents.loc[ents["level"] == lvl, "key"].to_numpy() for lvl in range(len(LEVELS))}
    preds["pick_country"] = np.where(tr_targets[nn, 0] >= 0, keys[0][np.maximum(tr_targets[nn, 0], 0)], "")
    write_figures(out_dir / "figures", None, ents, m, preds, metrics)
    _write_parquet(preds, out_dir / "predictions.parquet")
    _write_json(metrics, out_dir / "metrics.json")
    return metrics


def write_figures(fig_dir: Path, model, ents: pd.DataFrame, truth: pd.DataFrame, preds: pd.DataFrame,
                  metrics: dict) -> dict:
    """The evaluation at a glance: error map and CDF, per-level accuracy, country confusion,
    and the entity embeddings in the Poincare disk. Returns the disk's mean radius per level."""
    from flows import plots

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    plots.error_map(truth["latitude"], truth["longitude"], preds["latitude"], preds["longitude"], fig_dir / "error_map.png")
    plots.error_cdf(preds["dist_km"], fig_dir / "error_cdf.png")
    plots.level_accuracy_bars(metrics, fig_dir / "level_accuracy.png")
    pred_cc = preds["pick_country"].astype(str).str.split("|").str[0]
    plots.country_confusion(truth["country"].astype(str), pred_cc, fig_dir / "country_confusion.png")
    if model is None:  # a baseline without entity embeddings
        return {}
    with torch.no_grad():
        points = model.eval().encode_entities().cpu().numpy()
    _, radii = plots.poincare_disk(points, ents["level"].to_numpy(np.int64), float(model.curvature),
                                   fig_dir / "poincare_disk.png", geometry=model.cfg.geometry)
    return radii
