"""The hierloc pipeline as one Prefect flow: ingest -> hierarchy -> features -> train -> evaluate.

Each task calls one stage function (flows/stages.py) inside its own MLflow run,
nested under the pipeline's parent run. Parameters are pydantic models, validated
by Prefect and rendered as forms in its UI, and logged to MLflow whole.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows import stages
from flows.serving import log_pyfunc
from flows.settings import DEMO_DATA_DIR, WORK_DIR
from flows.tracking import Run, tracked_run
from hierloc.model import ModelConfig
from hierloc.train import TrainConfig


class DemoDataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    build_if_missing: bool = Field(True, description="build the embedded 'Earth tiles' data when data_dir has no train.csv")
    n_train: int = Field(20_000, ge=10, le=2_000_000)
    n_test: int = Field(2_000, ge=10, le=500_000)
    seed: int = Field(0, ge=0)


class IngestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verify_images: Literal["none", "exists", "decode"] = Field("decode", description="how far to check each image")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="fail the run above this quarantined share")


class HierarchyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labeler: Literal["osv5m", "geonames", "polygons"] = Field(
        "osv5m", description="osv5m: the dataset's labels; geonames: nearest GeoNames place (= reverse_geocoder); "
                             "polygons: admin polygons (point in polygon, Dask-parallel)")
    coords: Literal["geonames", "mean", "medoid", "representative"] = Field(
        "geonames", description="entity coordinates: GeoNames place for cities (upper levels: image mean), image mean, "
                                "image medoid, or polygon representative point (polygons only)")
    admin_source: Literal["gazetteer", "gadm", "geoboundaries", "natural_earth", "parquet"] = Field(
        "gazetteer", description="polygons: embedded geoBoundaries units (gazetteer), or your GADM / geoBoundaries / "
                                 "Natural Earth files, or a prepared GeoParquet table, at admin_path")
    admin_path: str | None = Field(None, description="polygon file or folder for gadm / geoboundaries / natural_earth")
    grid_deg: float = Field(5.0, ge=0.0, le=360.0, description="cut polygons on this grid (0 = no cut): faster joins")
    max_snap_km: float = Field(25.0, ge=0.0, le=500.0, description="points in no polygon go to the nearest within this")
    check_all_levels: bool = Field(False, description="look every point up at every level, to count every "
                                                      "disagreement between levels (slower; same labels)")
    @field_validator("grid_deg")
    @classmethod
    def _grid(cls, v: float) -> float:
        if 0 < v < 0.1:
            raise ValueError("grid_deg: 0 (no cut) or at least 0.1 degree")
        return v

    dask_scheduler: str | None = Field(None, description="Dask scheduler address (tcp://...) for a real cluster; "
                                                         "None: a LocalCluster for big inputs, in-process for small ones; 'sync'")


class FeatureParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backbone: str = Field("fixed:pixelstats", pattern=r"^(fixed:pixelstats|open_clip:[\w\-/.@]+)$")
    pretrained: str | None = Field(None, description="local weights file (or open_clip tag with network); None = random init")
    batch_size: int = Field(256, ge=1, le=65_536)
    num_workers: int = Field(2, ge=0, le=64)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")


class EvalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["hierloc", "retrieval"] = Field(
        "hierloc", description="hierloc: train the model and beam-search it; retrieval: the paper's baseline, the "
                               "location of the nearest training image by backbone feature (no training)")
    beam_k: int = Field(10, ge=1, le=10_000, description="beam width (paper: 10)")
    variant: Literal["official", "corrected"] = Field("official", description="OSV-5M metric variant (see README)")


class PipelineConfig(BaseModel):
    """Everything one pipeline run needs; the defaults run the embedded demo."""

    model_config = ConfigDict(extra="forbid")
    data_dir: str = Field(str(DEMO_DATA_DIR), description="an OSV-5M release folder (train.csv, test.csv, images/)")
    work_dir: str = Field(str(WORK_DIR), description="where the stages write their outputs")
    experiment: str = Field("hierloc", min_length=1, description="MLflow experiment name")
    demo_data: DemoDataParams = DemoDataParams()
    ingest: IngestParams = IngestParams()
    hierarchy: HierarchyParams = HierarchyParams()
    features: FeatureParams = FeatureParams()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalParams = EvalParams()


def _work(cfg: PipelineConfig, stage: str) -> Path:
    return Path(cfg.work_dir) / stage


@task(name="demo-data", retries=1, cache_policy=NO_CACHE)
def demo_data_task(cfg: PipelineConfig) -> str:
    from geodata.demo_data import build_demo_dataset

    data_dir = Path(cfg.data_dir)
    if (data_dir / "train.csv").exists() or not cfg.demo_data.build_if_missing:
        return str(data_dir)
    get_run_logger().info("building the embedded demo dataset in %s", data_dir)
    build_demo_dataset(data_dir, n_train=cfg.demo_data.n_train, n_test=cfg.demo_data.n_test, seed=cfg.demo_data.seed)
    return str(data_dir)


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def ingest_task(cfg: PipelineConfig, parent: str) -> dict:
    with tracked_run(cfg.experiment, "ingest", parent, tags={"stage": "ingest"}) as run:
        run.params({"data_dir": cfg.data_dir, **cfg.ingest.model_dump()})
        out = _work(cfg, "ingest")
        report = stages.run_ingest(Path(cfg.data_dir), out, cfg.ingest.verify_images, cfg.ingest.max_bad_fraction)
        _log_ingest(run, report)
        for name in ("ingest_report.json", "quarantine.parquet"):
            if (out / name).exists():
                run.artifact(out / name)
    return report


def _log_ingest(run: Run, report: dict) -> None:
    for split, rep in (report.get("splits") or {}).items():
        counts = {k: v for k, v in rep.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.metrics({f"{split}_{k}": v for k, v in counts.items()})
        for reason, n in (rep.get("reasons") or {}).items():
            run.metrics({f"{split}_quarantined_{reason}": n})


@task(name="hierarchy", retries=1, cache_policy=NO_CACHE)
def hierarchy_task(cfg: PipelineConfig, parent: str) -> dict:
    with tracked_run(cfg.experiment, "hierarchy", parent, tags={"stage": "hierarchy"}) as run:
        run.params(cfg.hierarchy.model_dump())
        out = _work(cfg, "hierarchy")
        h = cfg.hierarchy
        report = stages.run_hierarchy(_work(cfg, "ingest"), out, h.coords, labeler=h.labeler, admin_source=h.admin_source,
                                      admin_path=h.admin_path, grid_deg=h.grid_deg, max_snap_km=h.max_snap_km,
                                      check_all_levels=h.check_all_levels, scheduler=h.dask_scheduler)
        run.metrics({f"n_{lvl}": n for lvl, n in report["entities"].items()})
        run.metrics({"n_placeholder_subregions": report["placeholder_subregions"], "n_orphans": report["orphans"],
                     "train_points_without_country": report["train_points_without_country"]})
        for split in stages.SPLITS:
            run.metrics({f"unassigned_{split}_{lvl}": n for lvl, n in report[f"unassigned_{split}"].items()})
            run.metrics({f"labels_{split}_{k}": v for k, v in report[f"labels_{split}"].items()})
        run.artifact(out / "entities.parquet")
        run.artifact(out / "hierarchy_report.json")
        run.artifact(out / "entity_map.png")
    return report


@task(name="features", retries=1, cache_policy=NO_CACHE)
def features_task(cfg: PipelineConfig, parent: str) -> dict:
    logger = get_run_logger()
    with tracked_run(cfg.experiment, "features", parent, tags={"stage": "features"}) as run:
        run.params(cfg.features.model_dump())
        f = cfg.features

        def progress(done: int, total: int, secs: float) -> None:
            if done == total or done % (f.batch_size * 20) == 0:
                rate = done / max(secs, 1e-9)
                logger.info("features %d/%d (%.0f images/s, ETA %.0f s)", done, total, rate, (total - done) / max(rate, 1e-9))

        out = stages.run_features(Path(cfg.data_dir), _work(cfg, "ingest"), _work(cfg, "features"), f.backbone,
                                  f.pretrained, f.batch_size, f.num_workers, f.device, progress)
        for split in stages.SPLITS:
            run.metrics({f"{split}_images_per_s": out[split]["images_per_s"], f"{split}_failures": out[split]["failures"]})
        run.metrics({"dim": out["dim"]})
        run.json(out, "features.json")
    return out


@task(name="train", cache_policy=NO_CACHE)  # no cache, no retries: it resumes from its checkpoint
def train_task(cfg: PipelineConfig, feats: dict, parent: str) -> dict:
    with tracked_run(cfg.experiment, "train", parent, tags={"stage": "train"}) as run:
        run.params({"model": cfg.model.to_dict(), "train": cfg.train.to_dict()})
        out = stages.run_train(_work(cfg, "ingest"), _work(cfg, "hierarchy"), feats["dirs"], _work(cfg, "train"),
                               cfg.model, cfg.train, log_fn=lambda m, step: run.metrics(m, step=step))
        run.metrics({k: v for k, v in out.items() if k not in ("model_path", "checkpoint", "run_dir")})
        bundle = stages.run_export(out["model_path"], _work(cfg, "hierarchy"), cfg.features.backbone,
                                   cfg.features.pretrained, _work(cfg, "export") / Path(out["run_dir"]).name,
                                   source={"train_run_id": run.run_id, "parent_run_id": parent})
        out["bundle"] = str(bundle)
        out["model_uri"] = log_pyfunc(run.client, run.run_id, bundle)
        run.tags({"model_path": out["model_path"], "bundle_path": str(bundle), "model_uri": out["model_uri"]})
    return out


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, feats: dict, trained: dict, parent: str) -> dict:
    """The trained model's beam search, or (evaluate.method=retrieval) the retrieval baseline."""
    e = cfg.evaluate
    with tracked_run(cfg.experiment, "evaluate", parent, tags={"stage": "evaluate", "method": e.method}) as run:
        run.params(e.model_dump())
        out = _work(cfg, "evaluate")
        if e.method == "retrieval":
            metrics = stages.run_retrieval(_work(cfg, "ingest"), _work(cfg, "hierarchy"), feats["dirs"], out, e.variant)
        else:
            metrics = stages.run_evaluate(Path(trained["model_path"]), _work(cfg, "ingest"), _work(cfg, "hierarchy"),
                                          feats["dirs"], out, e.beam_k, e.variant)
        run.metrics(metrics)
        run.artifact(out / "metrics.json")
        run.artifact(out / "predictions.parquet")
        run.artifact_dir(out / "figures", "figures")
    return metrics


@flow(name="hierloc-pipeline", log_prints=True)
def pipeline(cfg: PipelineConfig = PipelineConfig()) -> dict:
    """The whole pipeline on one OSV-5M folder; returns the evaluation metrics and run ids."""
    logging.getLogger("hierloc").setLevel(logging.INFO)
    with tracked_run(cfg.experiment, "pipeline", tags={"stage": "pipeline"}) as parent:
        parent.params(cfg.model_dump(mode="json"))
        parent.json(cfg.model_dump(mode="json"), "pipeline_config.json")
        demo_data_task(cfg)
        ingest_task(cfg, parent.run_id)
        hierarchy_task(cfg, parent.run_id)
        feats = features_task(cfg, parent.run_id)
        # The retrieval baseline needs no training.
        trained = {} if cfg.evaluate.method == "retrieval" else train_task(cfg, feats, parent.run_id)
        metrics = evaluate_task(cfg, feats, trained, parent.run_id)
        parent.metrics(metrics)
        parent.tags({"method": cfg.evaluate.method})
    return {"metrics": metrics, "parent_run_id": parent.run_id, "model_path": trained.get("model_path"),
            "bundle": trained.get("bundle"), "model_uri": trained.get("model_uri")}
