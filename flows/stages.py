"""The pipeline's stages as plain functions: they wire geodata (tables) to hierloc (torch).

No Prefect and no MLflow here: flows/pipeline.py wraps each stage in a task and a
tracked run; the CLI can call them directly. Stages pass paths, not frames. Every
file a stage writes lives under its own folder of the work directory:

    ingest/      manifest/{split}.parquet/part-*.parquet (one part per incremental run), image_index/{split}.parquet,
                 quarantine.parquet, ingest_report.json, ingest_state.json,
                 features/<name>/shard-<split>-*.npz (precomputed WebDataset features)
    hierarchy/   entities.parquet, assignments_{split}.parquet, hierarchy_report.json,
                 quarantine.parquet (label_mismatch: coordinates contradict the country label)
    features/cache/<backbone>-<weights key>/shard-*.npz   one incremental cache per backbone, by image id
    features/<backbone>-<digest>/{split}/view.json        what train/evaluate read
    train/<digest>/  checkpoint.pt, model.pt
    export/<digest>/ the model bundle (hierloc.infer.predictor); export/latest.json points at the newest
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

from flows.faults import EmptySplitError, check_feature_failures, check_splits_have_rows
from flows.scoring import score_points
from geodata.labels.geonames import default_labeler
from geodata.labels.hierarchy import assign_images, build_entities, parent_rows
from geodata.ingest.image_store import ImageStore
from geodata.labels.label import country_disagreements, label_points, polygon_report, representative_coords
from geodata.atomic import write_parquet_atomic, write_text_atomic
from geodata.ingest.incremental import file_sha256
from geodata.labels.check import check_ingested_labels, unassign, write_label_quarantine
from geodata.ingest.run import ingest_osv5m
from geodata.osv5m import LABEL_COLUMNS, LEVELS, UNIQUE_COLUMNS
from hierloc.device import resolve_device
from hierloc.digest import digest_of
from hierloc.features.backbones import load_backbone, parse_spec
from hierloc.features.cache import scan_cache
from hierloc.features.extract import effective_precision, extract_features
from hierloc.features.views import features_digest, load_features, resolve_feature_dir, write_view
from hierloc.infer.beam import beam_search
from hierloc.infer.metrics import expected_calibration_error
from hierloc.model.model import ModelConfig
from hierloc.infer.predictor import write_bundle
from hierloc.infer.retrieval import RetrievalIndex
from hierloc.model.io import load_model
from hierloc.train.data import EntityData, TrainData, entity_mean_features
from hierloc.train.loop import TrainConfig, train
from hierloc.train.warm_start import entity_row_map

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


def _write_json(obj: dict, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2, default=str), path)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), path)


# --- 1. ingest --------------------------------------------------------------
def run_ingest(data_dir: Path, out_dir: Path, verify_images: str = "decode", max_bad_fraction: float = 0.05,
               layout: str = "auto", incremental: bool = True) -> dict:
    """Read an OSV-5M folder (CSV + zips, or the WebDataset copy) into Parquet manifests and a
    quarantine (geodata.ingest.run); incremental: only new CSV bytes and new shards on a re-run."""
    report = ingest_osv5m(Path(data_dir), Path(out_dir), SPLITS, verify_images, max_bad_fraction,
                          layout=layout, incremental=incremental).to_dict()
    check_splits_have_rows(report)  # EmptySplitError: a header-only CSV, or every row quarantined
    return report


# --- 2. hierarchy ------------------------------------------------------------
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
    """
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if coords == "representative" and labeler != "polygons":
        raise ValueError("coords='representative' needs polygons: set labeler='polygons'")
    admin = polygon_labeler = None
    if labeler == "polygons":
        from geodata.admin import load_admin
        from geodata.labels.label import disambiguate_names
        from geodata.labels.polygons import PolygonLabeler

        admin = disambiguate_names(load_admin(admin_source, admin_path))
        polygon_labeler = PolygonLabeler(admin, grid_deg=grid_deg, max_snap_km=max_snap_km,
                                         check_all_levels=check_all_levels)
    report: dict = {"labeler": labeler, "coords": coords}
    manifests = {split: pd.read_parquet(ingest_dir / "manifest" / f"{split}.parquet") for split in SPLITS}
    for split in (s for s, m in manifests.items() if m.empty):
        raise EmptySplitError(f"split {split!r} has no rows to work on: {ingest_dir / 'manifest' / f'{split}.parquet'} "
                              f"is empty (see {ingest_dir / 'ingest_report.json'})")
    checks = check_ingested_labels(ingest_dir, manifests)  # label_mismatch rows: no entity, quarantined
    # Both splits in one labelling run: one cluster start and one labeler shipment, not one per split.
    res = label_points(pd.concat(manifests.values(), ignore_index=True), labeler, scheduler=scheduler,
                       labeler=polygon_labeler, work_dir=out_dir / "partitions", runner=runner)
    label_sets, start = {}, 0
    for split, m in manifests.items():
        labels = res.labels.iloc[start : start + len(m)].reset_index(drop=True)
        start += len(m)
        rep = dict(res.report)
        if labeler == "polygons":
            rep = polygon_report(labels, polygon_labeler.level_names)
            # OSV-5M's own labels are GeoNames': how often do the polygons put a point in another country?
            rep["country_differs_from_geonames"] = country_disagreements(labels, m["country"])
        rep["label_mismatch"] = checks[split].n
        for col in LABEL_COLUMNS:  # the labels the entity table is built from
            m[col] = labels[col].to_numpy()
        label_sets[split] = labels
        report[f"labels_{split}"] = rep
    train_m = manifests["train"]
    has_country = (train_m["country"] != "").to_numpy()
    use = has_country & ~checks["train"].mask
    prev = pd.read_parquet(previous) if previous else None
    places = default_labeler().places if coords in ("geonames", "representative") else None
    entities = build_entities(train_m[use], places=places, coords="geonames" if coords == "representative" else coords,
                              previous=prev)
    if coords == "representative":
        entities = representative_coords(entities, label_sets["train"][use].assign(
            **{c: train_m.loc[use, c].to_numpy() for c in LABEL_COLUMNS}), admin)
    _write_parquet(entities, out_dir / "entities.parquet")
    ids = set(entities["entity_id"].tolist())
    report.update({"entities": {lvl: int((entities["level"] == i).sum()) for i, lvl in enumerate(LEVELS)},
                   "new_entities": int(len(entities) - (0 if prev is None else entities["key"].isin(prev["key"]).sum())),
                   "placeholder_subregions": int(entities["placeholder"].sum()),
                   # check_tree (in build_entities) refuses a table with orphans: recorded for the report
                   "orphans": int((entities["level"] > 0).sum() - entities["parent_id"].isin(ids).sum()),
                   "train_points_without_country": int((~has_country).sum())})
    for split in SPLITS:
        assigned = unassign(assign_images(manifests[split], entities), checks[split].mask)
        _write_parquet(assigned, out_dir / f"assignments_{split}.parquet")
        report[f"unassigned_{split}"] = {lvl: int((assigned[f"{lvl}_id"] < 0).sum()) for lvl in LEVELS}
    report["label_mismatch"] = {split: c.n for split, c in checks.items()}
    report["quarantine_path"] = str(write_label_quarantine(checks, out_dir / "quarantine.parquet"))
    _write_json(report, out_dir / "hierarchy_report.json")
    from flows import plots

    plots.entity_map(entities["lat"], entities["lon"], entities["level"].to_numpy(np.int64), out_dir / "entity_map.png",
                     n_images=entities["n_images"], title=f"{len(entities):,} entities ({labeler} labels, {coords} coordinates)")
    return report


# --- 3. features -------------------------------------------------------------
def _slug(spec: str) -> str:
    """A spec as a folder name: 'open_clip:ViT-L-14' -> 'open_clip-ViT-L-14' (a config path keeps its file name)."""
    kind, _, name = spec.partition(":")
    if name.endswith(".json"):
        name = Path(name).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{kind}:{name}")


def feature_cache_dir(root: Path, backbone: str, weights: str, precision: str = "fp32") -> Path:
    """The incremental cache of one backbone: ``root/cache/<backbone>-<weights key>[-<precision>]``.

    Keyed by content (hierloc.features.backbones.weights_key), not by image list: every run with the
    same weights adds to, and reads from, the same cache.
    """
    suffix = "" if precision == "fp32" else f"-{precision}"
    return Path(root) / "cache" / f"{_slug(backbone)}-{weights[:16]}{suffix}"


def _precomputed_key(cache: Path) -> str:
    """Fingerprint of a precomputed feature folder: its shards' names, sizes and mtimes."""
    h = hashlib.sha256()
    for p in sorted(cache.glob("shard-*.npz")):
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()


def run_features(
    data_dir: Path, ingest_dir: Path, out_root: Path, backbone: str = "fixed:pixelstats",
    pretrained: str | None = None, batch_size: int = 256, num_workers: int = 2, device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None, *, precision: str = "fp32",
    shard_size: int = 8192, retry_failed: bool = False, max_bad_fraction: float = 0.05,
) -> dict:
    """Frozen backbone features of every manifest image, in one incremental cache per backbone.

    Only images the cache lacks are encoded (both splits in one pass). ``precomputed:<name>``
    reads ``ingest_dir/features/<name>`` (written by the WebDataset ingest) and only checks that
    every manifest id is there. Returns backbone, dim, weights (content key), cache, ``dirs``
    {split: view folder} for the later stages, ``digests`` {split: sha256 of backbone, weights,
    precision and the split's ids}, and per split n, encoded, cached, failures, seconds, images_per_s.
    Unreadable images get NaN features (left out later); FeatureFailureError when a split's
    share of them is above ``max_bad_fraction`` (a wrong image root, a broken backbone).
    """
    import pyarrow.dataset as pads

    kind, name = parse_spec(backbone)
    manifests = {}
    for split in SPLITS:
        path = Path(ingest_dir) / "manifest" / f"{split}.parquet"
        has = set(pads.dataset(path).schema.names)  # tar rows carry where their bytes lie
        cols = ["id", "image_container", "image_member"] + [c for c in ("image_offset", "image_size") if c in has]
        manifests[split] = pd.read_parquet(path, columns=cols)
    if kind == "precomputed":
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):  # a folder name, never a path out of ingest_dir
            raise ValueError(f"backbone {backbone}: the name must be a plain folder name under {ingest_dir}/features")
        cache = Path(ingest_dir) / "features" / name
        if not any(cache.glob("shard-*.npz")):
            raise FileNotFoundError(f"backbone {backbone}: no feature shards in {cache}; ingest the WebDataset copy "
                                    f"that holds {name}.npy per sample, or pick another backbone")
        weights, precision, summary = _precomputed_key(cache), "fp32", {"seconds": 0.0, "images_per_s": float("nan")}
        index, encoded_ids = scan_cache(cache), np.zeros(0, np.int64)
    else:
        bb = load_backbone(backbone, pretrained)
        device = resolve_device(device)
        precision = effective_precision(device, precision)
        weights = bb.weights_key
        cache = feature_cache_dir(Path(out_root), backbone, weights, precision)
        union = pd.concat(manifests.values(), ignore_index=True).drop_duplicates("id")
        where = {f"{k}s": union[f"image_{k}"].fillna(-1).to_numpy(np.int64) for k in ("offset", "size")
                 if f"image_{k}" in union}
        ext = extract_features(union["id"].to_numpy(np.int64), union["image_container"].to_numpy(),
                               union["image_member"].to_numpy(), ImageStore(Path(data_dir)).open, bb, cache,
                               batch_size=batch_size, shard_size=shard_size, num_workers=num_workers, device=device,
                               precision=precision, retry_failed=retry_failed, progress=progress,
                               **(where if len(where) == 2 else {}))
        index, encoded_ids, summary = ext.index, ext.encoded_ids, ext.summary()
    out: dict = {"backbone": backbone, "dim": index.dim, "weights": weights, "precision": precision,
                 "cache": str(cache), "dirs": {}, "digests": {}}
    for split, m in manifests.items():
        ids = m["id"].to_numpy(np.int64)
        missing = index.missing(ids)
        if len(missing):  # precomputed features that the ingest did not write
            raise ValueError(f"backbone {backbone}: {len(missing)} of {len(ids)} {split} manifest ids have no "
                             f"features in {cache} (e.g. id {int(missing[0])}); re-run the ingest that writes them")
        digest = features_digest(backbone, weights, precision, ids)
        view = Path(out_root) / f"{_slug(backbone)}-{digest[:16]}" / split
        doc = write_view(view, cache, ids, index.failures, {"split": split, "backbone": backbone, "weights": weights,
                                                            "precision": precision, "digest": digest, "dim": index.dim})
        bad = ids[index.failed(ids)]
        check_feature_failures(split, len(ids), [(int(i), index.failures[int(i)]) for i in bad[:5]], len(bad),
                               max_bad_fraction, str(data_dir), log)
        n_new = int(np.isin(ids, encoded_ids).sum())
        out["dirs"][split], out["digests"][split] = str(view), digest
        out[split] = {"n": int(len(ids)), "encoded": n_new, "cached": int(len(ids)) - n_new, "failures": doc["failures"],
                      "seconds": summary["seconds"], "images_per_s": summary["images_per_s"]}
    return out


# --- 4. train ----------------------------------------------------------------
def _split_arrays(ingest_dir: Path, hierarchy_dir: Path, feature_dir: Path, split: str, require_targets: bool = False):
    """Features, per-level targets and coordinates of one split, aligned by image id.

    Images whose features could not be computed (NaN) are dropped and counted; with
    ``require_targets`` also images without an entity at some level (unassigned by a labeler).
    """
    m = pd.read_parquet(Path(ingest_dir) / "manifest" / f"{split}.parquet")
    a = pd.read_parquet(Path(hierarchy_dir) / f"assignments_{split}.parquet")
    feats = load_features(resolve_feature_dir(Path(feature_dir)), m["id"].to_numpy(np.int64))  # KeyError if missing
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
    model_cfg: ModelConfig, train_cfg: TrainConfig, log_fn=None, *,
    init_from: Path | None = None, init_entities: Path | None = None, data_key: dict | None = None,
    text: dict | None = None,
) -> dict:
    """Train on the train split; the run folder is keyed by config + data so reruns resume.

    ``init_from``/``init_entities``: warm start from an earlier model.pt and its entity table
    (a fine-tune from the champion): parameters are copied, entity rows matched by stable key,
    new entities start fresh. ``data_key``: content digests of the inputs (the pipeline's), so a
    folder whose content changed trains in a new run folder instead of resuming a stale one.
    ``text``: {"spec", "pretrained", "batch_size"} to give the entities Text_i (hierloc.model.text), or None.
    """
    _, feats, targets, latlon, dropped = _split_arrays(ingest_dir, hierarchy_dir, Path(feature_dirs["train"]), "train",
                                                       require_targets=True)
    ents = load_entities(hierarchy_dir)
    level_sizes = [int((ents["level"] == i).sum()) for i in range(len(LEVELS))]
    ent_data = EntityData(
        img_feat=entity_mean_features(feats, targets, level_sizes),
        latlon_deg=ents[["lat", "lon"]].to_numpy(np.float32),
        level_sizes=level_sizes,
        parent_index=parent_rows(ents),
        text_feat=entity_text_features(ents, **text) if text else None,
    )
    data = TrainData(feats, targets, latlon)
    init_rows = None
    if init_from is not None:
        old_keys = pd.read_parquet(init_entities, columns=["key"])["key"].to_numpy() if init_entities else None
        if old_keys is None:
            raise ValueError(f"a warm start from {init_from} needs the entity table it was trained with (init_entities)")
        init_rows = entity_row_map(old_keys, ents["key"].to_numpy())
    key = data_key or {"features": feature_dirs["train"], "hierarchy": str(hierarchy_dir)}
    run_dir = Path(out_root) / digest_of([model_cfg.to_dict(), train_cfg.to_dict(), key,
                                          {"init_from": str(init_from) if init_from else None, "text": text}])
    res = train(data, ent_data, model_cfg, train_cfg, run_dir, log_fn=log_fn, init_from=init_from, init_rows=init_rows)
    return {"model_path": str(res.model_path), "checkpoint": str(res.checkpoint), "run_dir": str(run_dir),
            "steps": res.steps, "epochs_run": res.epochs_run, "seconds": res.seconds,
            "n_train": int(len(feats)), "dropped_no_features_or_entity": dropped,
            "n_warm_started_entities": int((init_rows >= 0).sum()) if init_rows is not None else 0, **res.final}


def entity_text_features(ents: pd.DataFrame, spec: str, pretrained: str | None = None, batch_size: int = 256,
                         device: str = "cpu") -> np.ndarray:
    """Text_i of every entity: the text tower on "name, parent, ..., country" (hierloc.model.text)."""
    from hierloc.model.text import encode_texts, entity_texts

    texts = entity_texts(ents["name"].fillna("").astype(str).tolist(), parent_rows(ents))
    return encode_texts(texts, spec=spec, pretrained=pretrained, batch_size=batch_size, device=device)


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


def score_bundle(bundle: Path, ingest_dir: Path, feature_dir: Path, beam_k: int = 10, variant: str = "official") -> dict:
    """A bundle's metrics on the test split, from cached features: what the registry gate compares.

    The bundle's own entity table gives the predicted coordinates, so a champion trained on an
    older hierarchy is scored exactly as the candidate is (same split, same function)."""
    from hierloc.infer.predictor import Predictor

    m = pd.read_parquet(Path(ingest_dir) / "manifest" / "test.parquet")
    feats = load_features(resolve_feature_dir(Path(feature_dir)), m["id"].to_numpy(np.int64))
    ok = np.isfinite(feats).all(axis=1)
    m, feats = m[ok].reset_index(drop=True), feats[ok]
    pred = Predictor.load(Path(bundle), with_backbone=False)
    res = beam_search(pred.model, pred.check_features(feats), k=beam_k, backend=pred.backend, tau=pred.tau,
                      index=pred.index)
    city = res.picks[:, -1]
    metrics, _, _ = score_points(pred.entities["lat"].to_numpy(float)[city], pred.entities["lon"].to_numpy(float)[city],
                                 m["latitude"].to_numpy(float), m["longitude"].to_numpy(float),
                                 m[list(UNIQUE_COLUMNS)], variant=variant)
    metrics["n_dropped_no_features"] = int((~ok).sum())
    return metrics


def same_backbone(bundle: Path, backbone: str, pretrained: str | None) -> bool:
    """Whether a bundle's model reads the features of ``backbone`` (same spec, same weights)."""
    meta = json.loads((Path(bundle) / "bundle.json").read_text())
    if meta.get("backbone") != backbone:
        return False
    weights, tag = meta.get("backbone_weights"), meta.get("backbone_tag")
    if pretrained is None:
        return not weights and not tag
    if Path(pretrained).is_file():  # a local weights file: the bundle holds a copy; compare contents
        return bool(weights) and file_sha256(Path(bundle) / weights) == file_sha256(Path(pretrained))
    return tag == pretrained


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
    _, radii = plots.poincare_disk(points, ents["level"].to_numpy(np.int64), float(model.curvature.detach()),
                                   fig_dir / "poincare_disk.png", geometry=model.cfg.geometry)
    return radii
