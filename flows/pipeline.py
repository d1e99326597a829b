"""The hierloc flows: the whole pipeline, each stage alone, and scheduled retraining.

    hierloc-pipeline   demo data -> ingest -> hierarchy -> features -> train -> evaluate -> register + gate
    hierloc-<stage>    one stage, its inputs named by the run ids of earlier stages (UpstreamRuns)
    hierloc-retrain    incremental ingest -> hierarchy with stable ids -> new features -> fine-tune
                       from the champion -> evaluate -> gate (the 'champion' alias moves by rule)

prefect.yaml deploys these functions. They wire the tasks (flows/tasks.py: one stage
function of flows/stages/ each, inside its own MLflow run, nested under the flow's parent
run; ingest, hierarchy and features cached on their inputs' digests, training resumed from
its checkpoint). Parameters are pydantic models (flows/params.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from flows.params import HierarchyParams, PipelineConfig, RetrainParams, UpstreamRuns
from flows.run_logs import route_library_logs
from flows.stages.data_dir import SPLITS
from flows.stages.files import manifest_path
from flows.tasks import (demo_data_task, evaluate_task, features_exist, features_task, hierarchy_task, ingest_task,
                         local_champion, outputs_exist, register_task, run_cached, train_task)
from flows.tracking import registry
from flows.tracking.lineage import check_tracking, files_digest, latest_stage_run, load_outputs, source_digest
from flows.tracking.runs import Run, tracked_run

@flow(name="hierloc-hierarchy-dask")
def hierarchy_on_dask(**kwargs) -> tuple[dict, bool]:
    """The hierarchy task with its labelling partitions on this subflow's DaskTaskRunner."""
    return run_cached(hierarchy_task, outputs_exist("entities.parquet"), **kwargs)


def _dask_task_runner(params: HierarchyParams, n_rows: int):
    """A DaskTaskRunner when the labelling is worth a cluster and Dask workers can report
    task runs to a Prefect server; None: label in-process (or on geodata's own Dask path)."""
    from geodata.labels.parallel import MIN_ROWS_FOR_CLUSTER, default_scheduler

    address = params.dask_scheduler or default_scheduler()
    # Dask worker processes inherit the environment, not this process's Prefect settings: without
    # PREFECT_API_URL in it each would start its own temporary server. Then geodata's own Dask path runs.
    if params.labeler == "osv5m" or address == "sync" or not os.environ.get("PREFECT_API_URL"):
        return None
    if address in (None, "local"):
        if n_rows < MIN_ROWS_FOR_CLUSTER and address is None:
            return None
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None, "host": "127.0.0.1"})
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)



def run_hierarchy_stage(cfg: PipelineConfig, ingest: dict, parent: str | None,
                        previous: Path | None = None) -> tuple[dict, bool]:
    import pyarrow.dataset as pads

    # from the Parquet footers: no column is read
    n_rows = sum(pads.dataset(manifest_path(ingest["dir"], s)).count_rows() for s in SPLITS)
    runner = _dask_task_runner(cfg.hierarchy, n_rows)
    kwargs = dict(ingest=ingest, work_dir=cfg.work_dir, params=cfg.hierarchy,
                  previous=str(previous) if previous else None,
                  previous_digest=files_digest([previous]) if previous else None,
                  on_dask=runner is not None, experiment=cfg.experiment, parent=parent)
    if runner is None:
        return run_cached(hierarchy_task, outputs_exist("entities.parquet"), **kwargs)
    return hierarchy_on_dask.with_options(task_runner=runner)(**kwargs)



# --- flows ----------------------------------------------------------------------------
def _stages(cfg: PipelineConfig, parent: Run, previous: Path | None = None, init: dict | None = None) -> dict:
    """ingest -> hierarchy -> features -> train -> evaluate -> register, under ``parent``."""
    demo_data_task(cfg)
    ingest, c_ingest = run_cached(ingest_task, outputs_exist("manifest"), data_dir=cfg.data_dir, work_dir=cfg.work_dir,
                               params=cfg.ingest, source=source_digest(Path(cfg.data_dir)), experiment=cfg.experiment,
                               parent=parent.run_id)
    hierarchy, c_hier = run_hierarchy_stage(cfg, ingest, parent.run_id, previous)
    feats, c_feats = run_cached(features_task, features_exist, data_dir=cfg.data_dir, ingest=ingest,
                             work_dir=cfg.work_dir, params=cfg.features, experiment=cfg.experiment, parent=parent.run_id)
    parent.tags({f"{name}_run_id": out["run_id"] for name, out in
                 (("ingest", ingest), ("hierarchy", hierarchy), ("features", feats))})
    parent.tags({"cached_stages": ",".join(n for n, c in (("ingest", c_ingest), ("hierarchy", c_hier),
                                                           ("features", c_feats)) if c) or "none"})
    result: dict = {"parent_run_id": parent.run_id, "ingest": ingest, "hierarchy": hierarchy, "features": feats}
    trained = None
    if cfg.evaluate.method != "retrieval":  # the retrieval baseline needs no training
        trained = train_task(cfg, ingest, hierarchy, feats, init, parent.run_id)
        parent.tags({"train_run_id": trained["run_id"], "model_uri": trained["model_uri"]})
    metrics = evaluate_task(cfg, ingest, hierarchy, feats, trained, parent.run_id)
    parent.metrics(metrics)
    parent.tags({"method": cfg.evaluate.method})
    result.update(metrics=metrics, train=trained, model_path=(trained or {}).get("model_path"),
                  bundle=(trained or {}).get("bundle"), model_uri=(trained or {}).get("model_uri"))
    if trained is not None and cfg.registry.enabled:
        gate = register_task(cfg, ingest, hierarchy, feats, trained, metrics, parent.run_id)
        parent.tags({"registered_version": gate["version"], "gate": "promoted" if gate["promoted"] else "rejected"})
        result["registry"] = gate
    return result


def _start(cfg: PipelineConfig) -> None:
    route_library_logs()  # hierloc's and geodata's lines (progress included) into this run's logs
    check_tracking()  # before any work: a dead server must not leave half a run behind


@flow(name="hierloc-pipeline", log_prints=True)
def pipeline(cfg: PipelineConfig = PipelineConfig()) -> dict:
    """The whole pipeline on one OSV-5M folder; returns the metrics, run ids and registry decision."""
    _start(cfg)
    with tracked_run(cfg.experiment, "pipeline", tags={"stage": "pipeline", "flow": "pipeline"}) as parent:
        parent.params(cfg.model_dump(mode="json"))
        parent.json(cfg.model_dump(mode="json"), "pipeline_config.json")
        return _stages(cfg, parent)


@flow(name="hierloc-retrain", log_prints=True)
def retrain(cfg: PipelineConfig = PipelineConfig(), retrain: RetrainParams = RetrainParams()) -> dict:
    """Scheduled retraining: the new rows and photos only (incremental ingest and features),
    the hierarchy updated with stable ids (old entities keep their ids, new ones are appended),
    a fine-tune from the champion, evaluation on the fixed test split, and the gate."""
    _start(cfg)
    client = MlflowClient()
    champion = registry.champion_version(client, cfg.registry.name) if retrain.from_champion else None
    init, previous = None, None
    if champion is not None:
        bundle = local_champion(cfg, champion.version)
        previous = bundle / "entities.parquet"
        init = {"model_path": str(bundle / "model.pt"), "entities": str(previous),
                "model_uri": f"models:/{cfg.registry.name}/{champion.version}"}
    elif retrain.from_champion:
        get_run_logger().warning("no champion registered under %r: training from scratch", cfg.registry.name)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": retrain.epochs})})
    with tracked_run(cfg.experiment, "retrain", tags={"stage": "pipeline", "flow": "retrain"}) as parent:
        parent.params(cfg.model_dump(mode="json"))
        parent.params({"retrain": retrain.model_dump()})
        parent.tags({"init_from": init["model_uri"] if init else "scratch"})
        return _stages(cfg, parent, previous=previous, init=init)



def _upstream(cfg: PipelineConfig, runs: UpstreamRuns, stage: str) -> dict:
    run_id = getattr(runs, stage) or latest_stage_run(cfg.experiment, stage)
    return load_outputs(run_id)


@flow(name="hierloc-ingest", log_prints=True)
def ingest_flow(cfg: PipelineConfig = PipelineConfig()) -> dict:
    """Ingest alone (builds the demo data first if configured)."""
    _start(cfg)
    demo_data_task(cfg)
    return run_cached(ingest_task, outputs_exist("manifest"), data_dir=cfg.data_dir, work_dir=cfg.work_dir,
                   params=cfg.ingest, source=source_digest(Path(cfg.data_dir)), experiment=cfg.experiment,
                   parent=None)[0]


@flow(name="hierloc-hierarchy", log_prints=True)
def hierarchy_flow(cfg: PipelineConfig = PipelineConfig(), upstream: UpstreamRuns = UpstreamRuns()) -> dict:
    """The entity hierarchy alone, from an ingest run (upstream.ingest, else the newest)."""
    _start(cfg)
    return run_hierarchy_stage(cfg, _upstream(cfg, upstream, "ingest"), None)[0]


@flow(name="hierloc-features", log_prints=True)
def features_flow(cfg: PipelineConfig = PipelineConfig(), upstream: UpstreamRuns = UpstreamRuns()) -> dict:
    """Backbone features alone, from an ingest run."""
    _start(cfg)
    ingest = _upstream(cfg, upstream, "ingest")
    return run_cached(features_task, features_exist, data_dir=ingest["data_dir"],
                   ingest=ingest, work_dir=cfg.work_dir, params=cfg.features, experiment=cfg.experiment, parent=None)[0]


@flow(name="hierloc-train", log_prints=True)
def train_flow(cfg: PipelineConfig = PipelineConfig(), upstream: UpstreamRuns = UpstreamRuns()) -> dict:
    """Training alone, from ingest, hierarchy and features runs; logs the model (not registered:
    registration follows evaluation, in hierloc-evaluate)."""
    _start(cfg)
    ups = {s: _upstream(cfg, upstream, s) for s in ("ingest", "hierarchy", "features")}
    return train_task(cfg, ups["ingest"], ups["hierarchy"], ups["features"], None, None)


@flow(name="hierloc-evaluate", log_prints=True)
def evaluate_flow(cfg: PipelineConfig = PipelineConfig(), upstream: UpstreamRuns = UpstreamRuns()) -> dict:
    """Evaluation alone, of a train run's model (then registration and the gate, if enabled)."""
    _start(cfg)
    ups = {s: _upstream(cfg, upstream, s) for s in ("ingest", "hierarchy", "features", "train")}
    metrics = evaluate_task(cfg, ups["ingest"], ups["hierarchy"], ups["features"], ups["train"], None)
    out = {"metrics": metrics}
    if cfg.registry.enabled and cfg.evaluate.method == "hierloc":
        out["registry"] = register_task(cfg, ups["ingest"], ups["hierarchy"], ups["features"], ups["train"], metrics, None)
    return out

