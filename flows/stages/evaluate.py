"""Stage 5, evaluate: the trained model's beam search on the test split (or the retrieval
baseline), OSV-5M metrics, predictions and figures; and the registry gate's scoring of a bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flows.report.figures import write_figures
from flows.report.scoring import pick_metrics, score_points
from flows.stages.files import (SPLIT_COLUMNS, load_entities, manifest_path, read_manifest, split_arrays, write_json,
                                write_parquet)
from geodata.ingest.incremental import file_sha256
from geodata.labels.targets import majority_accuracy
from geodata.osv5m import LEVELS, UNIQUE_COLUMNS
from hierloc.features.views import open_features, resolve_feature_dir
from hierloc.infer.beam import beam_search_chunks
from hierloc.infer.retrieval import RetrievalIndex
from hierloc.model.io import load_model


def _majority_country_acc(ingest_dir: Path, test: pd.DataFrame) -> float:
    """The bar to clear: always answering the most frequent training country."""
    train_cc = pd.read_parquet(manifest_path(ingest_dir, "train"), columns=["country"])["country"]
    return majority_accuracy(train_cc, test["country"])


def _write_outputs(out_dir: Path, preds: pd.DataFrame, metrics: dict) -> None:
    write_parquet(preds, out_dir / "predictions.parquet")
    write_json(metrics, out_dir / "metrics.json")


def run_evaluate(
    model_path: Path, ingest_dir: Path, hierarchy_dir: Path, feature_dirs: dict[str, str], out_dir: Path,
    beam_k: int = 10, variant: str = "official", device: str = "cpu",
) -> dict:
    """Beam search on the test split; OSV-5M metrics of the predicted city coordinates
    (reverse-geocoded, as the official code) and the accuracy of the entity picked at each level.
    The test features stay on disk: the search runs block by block (beam_search_chunks)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m, feats, targets, latlon, dropped = split_arrays(ingest_dir, hierarchy_dir, Path(feature_dirs["test"]), "test")
    ents = load_entities(hierarchy_dir)
    model = load_model(model_path)
    res = beam_search_chunks(model, feats, k=beam_k, device=device, tau=model.tau)
    city_rows = res.picks[:, -1]
    pred_lat = ents["lat"].to_numpy()[city_rows]
    pred_lon = ents["lon"].to_numpy()[city_rows]
    unique = m[list(UNIQUE_COLUMNS)]
    metrics, dist_km, hits = score_points(pred_lat, pred_lon, latlon[:, 0].astype(float), latlon[:, 1].astype(float),
                                          unique, variant=variant)
    metrics.update(pick_metrics(ents["level_index"].to_numpy(), res.picks, res.pick_prob, targets))
    metrics["baseline_majority_acc_country"] = _majority_country_acc(ingest_dir, m)
    metrics["n_dropped_no_features"] = dropped
    preds = pd.DataFrame({"id": m["id"], "latitude": pred_lat, "longitude": pred_lon, "dist_km": dist_km,
                          **{f"pick_{n}": ents["key"].to_numpy()[res.picks[:, lvl]] for lvl, n in enumerate(LEVELS)},
                          **{f"prob_{n}": res.pick_prob[:, lvl] for lvl, n in enumerate(LEVELS)},
                          **{f"hit_{k}": v for k, v in hits.items()}, "score": res.pick_score})
    metrics["search_queries_per_s"] = res.queries_per_s
    # what the search did, read from its answer (not from the config): the beam width (columns of
    # its top-k) and the entities it scored per query (countries + the children of the kept beams)
    metrics["search_beam_k"] = int(res.top_rows.shape[1])
    metrics["search_entities_scored_per_query"] = float(res.n_scored.mean()) if len(res.n_scored) else 0.0
    metrics.update(write_figures(out_dir / "figures", model, ents, m, preds, metrics))
    _write_outputs(out_dir, preds, metrics)
    return metrics


def run_retrieval(
    ingest_dir: Path, hierarchy_dir: Path, feature_dirs: dict[str, str], out_dir: Path, variant: str = "official",
) -> dict:
    """The retrieval baseline (the paper's "SC Retrieval"): each test image takes the location of
    its nearest training image by backbone feature (cosine, exact, FAISS), scored with the same
    metrics as the model; pick_acc_<level> is the nearest training image's entity at each level.

    Unlike the model's stages this one holds the train split's features in memory, float32
    (N, D): the exact index is built from them (at OSV-5M size, 4.9M x 768, 15 GB)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, tr_feats, tr_targets, tr_latlon, _ = split_arrays(ingest_dir, hierarchy_dir, Path(feature_dirs["train"]), "train")
    m, feats, targets, latlon, dropped = split_arrays(ingest_dir, hierarchy_dir, Path(feature_dirs["test"]), "test")
    index = RetrievalIndex(np.asarray(tr_feats))  # the index needs the whole matrix (see above)
    feats = np.asarray(feats)
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
    _write_outputs(out_dir, preds, metrics)
    return metrics


def score_bundle(bundle: Path, ingest_dir: Path, feature_dir: Path, beam_k: int = 10, variant: str = "official") -> dict:
    """A bundle's metrics on the test split, from cached features (memory-mapped, searched block by
    block): what the registry gate compares.

    The bundle's own entity table gives the predicted coordinates, so a champion trained on an
    older hierarchy is scored exactly as the candidate is (same split, same function)."""
    from hierloc.infer.predictor import Predictor

    m = read_manifest(manifest_path(ingest_dir, "test"), SPLIT_COLUMNS)
    feats = open_features(resolve_feature_dir(Path(feature_dir)), m["id"].to_numpy(np.int64))
    ok = feats.finite_mask()  # streamed; the rows stay on disk, searched block by block
    m, feats = m[ok].reset_index(drop=True), feats.subset(ok)
    pred = Predictor.load(Path(bundle), with_backbone=False)
    res = beam_search_chunks(pred.model, feats, prepare=pred.check_features, k=beam_k, backend=pred.backend,
                             tau=pred.tau, index=pred.index)
    city = res.picks[:, -1]
    metrics, _, _ = score_points(pred.entities["lat"].to_numpy(float)[city], pred.entities["lon"].to_numpy(float)[city],
                                 m["latitude"].to_numpy(float), m["longitude"].to_numpy(float),
                                 m[list(UNIQUE_COLUMNS)], variant=variant)
    metrics["n_dropped_no_features"] = int((~ok).sum())
    return metrics


def same_backbone(bundle: Path, backbone: str, pretrained: str | None) -> bool:
    """Whether a bundle's model reads the features of ``backbone`` (same spec, same weights)."""
    from hierloc.infer.predictor import bundle_weights, read_bundle_meta

    meta = read_bundle_meta(Path(bundle))
    if meta.get("backbone") != backbone:
        return False
    weights, tag = bundle_weights(Path(bundle), meta), meta.get("backbone_tag")
    if pretrained is None:
        return not weights and not tag
    if Path(pretrained).is_file():  # a local weights file: the bundle holds a copy; compare contents
        return bool(weights) and file_sha256(weights) == file_sha256(Path(pretrained))
    return tag == pretrained
