"""The pipeline's Prefect tasks: each calls one stage function (flows/stages/) inside its own
MLflow run, nested under the flow's parent run, and logs what it read (mlflow.log_input, with
digests) and what it wrote (artifacts, and outputs.json: the folders and digests a later stage
reads by run id; flows/tracking/lineage.py). The flows that wire them: flows/pipeline.py.

Ingest, hierarchy and features are cached by Prefect on the content digests of their
inputs and their parameters (results persisted as JSON): a re-run after a crash skips the
finished stages, a changed input re-runs what depends on it. Training is never cached;
it resumes from its checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from flows.params import FeatureParams, HierarchyParams, IngestParams, PipelineConfig
from flows.serving.logged_model import log_pyfunc
from flows.serving.resolve import resolve_bundle
from flows.stages.data_dir import SPLITS, check_heldout_data, check_heldout_target, demo_target
from flows.stages.evaluate import run_evaluate, run_retrieval, same_backbone, score_bundle
from flows.stages.export import run_export
from flows.stages.faults import retry_transient
from flows.stages.features import run_features
from flows.stages.hierarchy import run_hierarchy
from flows.stages.ingest import run_ingest
from flows.stages.train import budget_tags, run_train
from flows.tracking import registry
from flows.tracking.lineage import OUTPUTS, features_fast_decode, files_digest, log_dataset
from hierloc.digest import digest_of
from flows.tracking.result_cache import RESULT_SERIALIZER, JsonRecordsOnly
from flows.tracking.runs import Run, tracked_run

#: ingest / hierarchy / features: keyed on their inputs (digests, parameters) and their code;
#: the MLflow parent run id is not part of the key.
STAGE_CACHE = JsonRecordsOnly(policy=(INPUTS + TASK_SOURCE) - "parent")
#: cached results are written as JSON and only JSON is read back (flows.tracking.result_cache); retries only
#: for what a retry can cure (flows.stages.faults)
CACHED = dict(cache_policy=STAGE_CACHE, persist_result=True, result_serializer=RESULT_SERIALIZER, retry_condition_fn=retry_transient)


def _stage_tags(stage: str, upstream: dict[str, dict] | None = None) -> dict[str, str]:
    tags = {"stage": stage, "outputs": OUTPUTS}
    for name, out in (upstream or {}).items():
        if out:
            tags[f"upstream.{name}_run_id"] = out["run_id"]
    return tags


def _finish(run: Run, stage: str, outputs: dict) -> dict:
    """Log ``outputs`` as the run's outputs.json (what later stages read by run id)."""
    outputs = {"stage": stage, "run_id": run.run_id, **outputs}
    run.json(outputs, OUTPUTS)
    run.tags({"digest": outputs.get("digest", "")})
    return outputs


def run_cached(task_fn, still_valid, **kwargs) -> tuple[dict, bool]:
    """Run a cached stage task. A cache hit whose outputs are gone (work folder deleted,
    MLflow store reset) is refreshed. Returns (outputs, was_cached)."""
    state = task_fn(**kwargs, return_state=True)
    out = state.result()
    cached = state.name == "Cached"
    if cached and not still_valid(out):
        get_run_logger().warning("cached %s outputs are gone (%s): running it again", task_fn.name, out.get("dir"))
        out, cached = task_fn.with_options(refresh_cache=True)(**kwargs), False
    return out, cached


def run_exists(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
        return True
    except Exception:  # MlflowException: deleted or another store
        return False


def outputs_exist(*names: str):
    return lambda out: all((Path(out["dir"]) / n).exists() for n in names) and run_exists(out["run_id"])


def features_exist(out: dict) -> bool:
    """The split views and the cache they point at (a view outlives a deleted cache)."""
    from hierloc.features.views import resolve_feature_dir

    try:
        return all(resolve_feature_dir(Path(d)).exists() for d in out["dirs"].values()) and run_exists(out["run_id"])
    except (OSError, ValueError, KeyError):
        return False


# --- tasks ----------------------------------------------------------------------
@task(name="demo-data", retries=1, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def demo_data_task(cfg: PipelineConfig) -> str:
    """Check that data_dir holds a dataset; build the demo data only where flows.stages.data_dir allows it."""
    from geodata.demo.build import build_demo_dataset

    data_dir, heldout_km = Path(cfg.data_dir), cfg.demo_data.heldout_km
    check_heldout_target(data_dir, heldout_km)  # DataDirError: never into the default demo's folder
    claim = demo_target(data_dir, cfg.ingest.layout, cfg.demo_data.build_if_missing)  # DataDirError: neither layout
    if claim is not None:
        get_run_logger().info("building the embedded demo dataset in %s", data_dir)
        build_demo_dataset(data_dir, n_train=cfg.demo_data.n_train, n_test=cfg.demo_data.n_test, seed=cfg.demo_data.seed,
                           claim=claim, heldout_km=heldout_km)
    else:
        check_heldout_data(data_dir, heldout_km)  # the data there is the split asked for
    return str(data_dir)


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10], **CACHED)
def ingest_task(data_dir: str, work_dir: str, params: IngestParams, source: str, experiment: str,
                parent: str | None) -> dict:
    out = Path(work_dir) / "ingest"
    with tracked_run(experiment, "ingest", parent, tags=_stage_tags("ingest")) as run:
        run.params({"data_dir": data_dir, **params.model_dump()})
        log_dataset(run.client, run.run_id, "osv5m-source", source, data_dir, "source")
        report = run_ingest(Path(data_dir), out, params.verify_images, params.max_bad_fraction,
                                   layout=params.layout, incremental=params.incremental)
        _log_ingest(run, report)
        for name in ("ingest_report.json", "quarantine.parquet"):
            if (out / name).exists():
                run.artifact(out / name)
        # the manifests' content digests (geodata.ingest.incremental): no need to re-read gigabytes of Parquet
        digests = {split: rep["manifest_digest"] for split, rep in report["splits"].items()}
        return _finish(run, "ingest", {"dir": str(out), "data_dir": data_dir, "source_digest": source,
                                       "digest": digest_of(digests), "manifest_digests": digests})


def _log_ingest(run: Run, report: dict) -> None:
    for split, rep in (report.get("splits") or {}).items():
        counts = {k: v for k, v in rep.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.metrics({f"{split}_{k}": v for k, v in counts.items()})
        for reason, n in (rep.get("reasons") or {}).items():
            run.metrics({f"{split}_quarantined_{reason}": n})


@task(name="label-partition", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def partition_task(call, args: tuple) -> int:
    """One Parquet partition through the labeler, on a worker of the flow's Dask task runner."""
    return call(*args)


def prefect_partition_runner(call, arglist: list[tuple]) -> None:
    """geodata.labels.parallel's partition runner as Prefect tasks: each partition is a task run
    (visible in the UI, retried on failure) on the flow's DaskTaskRunner."""
    futures = [partition_task.submit(call, args) for args in arglist]
    for f in futures:
        f.result()


@task(name="hierarchy", retries=1, **CACHED)
def hierarchy_task(ingest: dict, work_dir: str, params: HierarchyParams, previous: str | None, previous_digest: str | None,
                   on_dask: bool, experiment: str, parent: str | None) -> dict:
    out = Path(work_dir) / "hierarchy"
    with tracked_run(experiment, "hierarchy", parent, tags=_stage_tags("hierarchy", {"ingest": ingest})) as run:
        run.params({**params.model_dump(), "previous_entities": previous, "dask_task_runner": on_dask})
        log_dataset(run.client, run.run_id, "manifest", ingest["digest"], ingest["dir"], "train")
        if previous:
            log_dataset(run.client, run.run_id, "previous-entities", previous_digest, previous, "previous")
        h = params
        report = run_hierarchy(Path(ingest["dir"]), out, h.coords, Path(previous) if previous else None,
                                      labeler=h.labeler, admin_source=h.admin_source, admin_path=h.admin_path,
                                      grid_deg=h.grid_deg, max_snap_km=h.max_snap_km,
                                      check_all_levels=h.check_all_levels, scheduler=h.dask_scheduler,
                                      runner=prefect_partition_runner if on_dask else None)
        run.metrics({f"n_{lvl}": n for lvl, n in report["entities"].items()})
        run.metrics({"n_placeholder_subregions": report["placeholder_subregions"], "n_orphans": report["orphans"],
                     "train_points_without_country": report["train_points_without_country"],
                     "n_new_entities": report.get("new_entities", 0)})
        for split in SPLITS:
            run.metrics({f"unassigned_{split}_{lvl}": n for lvl, n in report[f"unassigned_{split}"].items()})
            run.metrics({f"labels_{split}_{k}": v for k, v in report[f"labels_{split}"].items()})
        for name in ("entities.parquet", "hierarchy_report.json", "entity_map.png"):
            run.artifact(out / name)
        files = [out / "entities.parquet", *(out / f"assignments_{s}.parquet" for s in SPLITS)]
        return _finish(run, "hierarchy", {"dir": str(out), "digest": files_digest(files)})


@task(name="features", retries=1, **CACHED)
def features_task(data_dir: str, ingest: dict, work_dir: str, params: FeatureParams, experiment: str,
                  parent: str | None) -> dict:
    with tracked_run(experiment, "features", parent, tags=_stage_tags("features", {"ingest": ingest})) as run:
        run.params(params.model_dump())
        log_dataset(run.client, run.run_id, "manifest", ingest["digest"], ingest["dir"], "extract")
        f = params
        # progress: hierloc.features.extract logs it (hierloc.progress), into the run's logs (flows.run_logs)
        out = run_features(Path(data_dir), Path(ingest["dir"]), Path(work_dir) / "features", f.backbone,
                                  f.pretrained, f.batch_size, f.num_workers, f.device,
                                  precision=f.precision, shard_size=f.shard_size, retry_failed=f.retry_failed,
                                  fast_decode=f.fast_decode, decoder=f.decoder,
                                  max_bad_fraction=f.max_bad_fraction)
        for split in SPLITS:
            run.metrics({f"{split}_{k}": out[split][k] for k in ("n", "encoded", "cached", "failures", "images_per_s")})
        run.metrics({"dim": out["dim"]})
        run.json(out, "features.json")
        # digest: backbone spec + weights content + each split's ids (hierloc.features.views.features_digest)
        return _finish(run, "features", {"dirs": out["dirs"], "backbone": f.backbone, "pretrained": f.pretrained,
                                         "fast_decode": out["fast_decode"], "dim": out["dim"],
                                         "digests": out["digests"],
                                         "digest": digest_of([out["digests"][s] for s in SPLITS])})


@task(name="train", cache_policy=NO_CACHE)  # no cache, no retries: it resumes from its checkpoint
def train_task(cfg: PipelineConfig, ingest: dict, hierarchy: dict, feats: dict, init: dict | None,
               parent: str | None) -> dict:
    upstream = {"ingest": ingest, "hierarchy": hierarchy, "features": feats}
    with tracked_run(cfg.experiment, "train", parent, tags=_stage_tags("train", upstream)) as run:
        run.params({"model": cfg.model.to_dict(), "train": cfg.train.to_dict(), "text": cfg.text.model_dump(),
                    "init_from": (init or {}).get("model_uri", "scratch")})
        log_dataset(run.client, run.run_id, "manifest", ingest["digest"], ingest["dir"], "train")
        log_dataset(run.client, run.run_id, "entities", hierarchy["digest"], hierarchy["dir"], "train")
        log_dataset(run.client, run.run_id, "features", feats["digest"], feats["dirs"]["train"], "train")
        fast_decode = features_fast_decode(feats)  # before training: the bundle records it, serving decodes alike
        out = run_train(Path(ingest["dir"]), Path(hierarchy["dir"]), feats["dirs"], Path(cfg.work_dir) / "train",
                               cfg.model, cfg.train, log_fn=lambda m, step: run.metrics(m, step=step),
                               init_from=Path(init["model_path"]) if init else None,
                               init_entities=Path(init["entities"]) if init else None,
                               data_key={s: o["digest"] for s, o in upstream.items()},
                               text={k: v for k, v in cfg.text.model_dump().items() if k != "enabled"}
                               if cfg.text.enabled else None)
        run.metrics({k: v for k, v in out.items() if k not in ("model_path", "checkpoint", "run_dir")})
        run.tags(budget_tags(cfg.train))
        bundle = run_export(out["model_path"], Path(hierarchy["dir"]), feats["backbone"], feats["pretrained"],
                                   Path(cfg.work_dir) / "export" / Path(out["run_dir"]).name,
                                   source={"train_run_id": run.run_id, "parent_run_id": parent},
                                   fast_decode=fast_decode)
        model_uri = log_pyfunc(run.client, run.run_id, bundle)
        run.tags({"model_path": out["model_path"], "bundle_path": str(bundle), "model_uri": model_uri})
        return _finish(run, "train", {"model_path": out["model_path"], "bundle": str(bundle), "model_uri": model_uri,
                                      "run_dir": out["run_dir"], "steps": out["steps"], "budgeted": out["budgeted"]})


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, ingest: dict, hierarchy: dict, feats: dict, trained: dict | None,
                  parent: str | None) -> dict:
    """The trained model's beam search, or (evaluate.method=retrieval) the retrieval baseline."""
    e = cfg.evaluate
    upstream = {"ingest": ingest, "hierarchy": hierarchy, "features": feats, "train": trained}
    with tracked_run(cfg.experiment, "evaluate", parent, tags={**_stage_tags("evaluate", upstream), "method": e.method}) as run:
        run.params(e.model_dump())
        log_dataset(run.client, run.run_id, "manifest", ingest["digest"], ingest["dir"], "test")
        log_dataset(run.client, run.run_id, "features", feats["digest"], feats["dirs"]["test"], "test")
        out = Path(cfg.work_dir) / "evaluate"
        if e.method == "retrieval":
            metrics = run_retrieval(Path(ingest["dir"]), Path(hierarchy["dir"]), feats["dirs"], out, e.variant)
        else:
            metrics = run_evaluate(Path(trained["model_path"]), Path(ingest["dir"]), Path(hierarchy["dir"]),
                                          feats["dirs"], out, e.beam_k, e.variant)
        run.metrics(metrics)
        _log_paper_table(run, out, metrics, ingest["data_dir"], e, feats["backbone"])
        run.artifact(out / "metrics.json")
        run.artifact(out / "predictions.parquet")
        run.artifact_dir(out / "figures", "figures")
        _finish(run, "evaluate", {"dir": str(out), "metrics": metrics})
    return metrics


def _log_paper_table(run: Run, out: Path, metrics: dict, data_dir: str, e, backbone: str) -> None:
    """The paper's main table with this run's row (flows/report/paper_table.py), as an MLflow table."""
    import pandas as pd

    from flows.report.paper_table import write_paper_table

    label = f"this run: {'HierLoc' if e.method == 'hierloc' else 'retrieval'}, {backbone}"
    table = write_paper_table(out, metrics, data_dir=data_dir, variant=e.variant, label=label)
    run.client.log_table(run.run_id, pd.DataFrame(table["data"], columns=table["columns"]), "paper_table.json")
    run.artifact(out / "paper_table.md")
    run.tags({"paper_comparable": table["data"][-1][-1]})


@task(name="register", cache_policy=NO_CACHE)
def register_task(cfg: PipelineConfig, ingest: dict, hierarchy: dict, feats: dict, trained: dict, metrics: dict,
                  parent: str | None) -> dict:
    """Register the candidate; score it and the champion on the same test split with the same
    function; move the 'champion' alias if the rule says so; tag both versions."""
    r = cfg.registry
    client = MlflowClient()
    tags = {"geoscore": f"{metrics.get('geoscore', float('nan')):.6g}", "train_run_id": trained["run_id"],
            "parent_run_id": parent or "", "ingest_run_id": ingest["run_id"], "hierarchy_run_id": hierarchy["run_id"],
            "features_run_id": feats["run_id"], "manifest_digest": ingest["digest"],
            "entities_digest": hierarchy["digest"], "features_digest": feats["digest"], "backbone": feats["backbone"]}
    version = registry.register(client, r.name, trained["model_uri"], trained["run_id"], tags)
    champion = registry.champion_version(client, r.name)
    test = dict(ingest_dir=Path(ingest["dir"]), feature_dir=Path(feats["dirs"]["test"]),
                beam_k=cfg.evaluate.beam_k, variant=cfg.evaluate.variant)
    candidate_score = score_bundle(Path(trained["bundle"]), **test)[r.rule.metric]
    champion_score, comparable = None, True
    if champion is not None:
        champ_bundle = local_champion(cfg, champion.version)
        if not same_backbone(champ_bundle, feats["backbone"], feats["pretrained"]):
            comparable = False
        else:
            champion_score = score_bundle(champ_bundle, **test)[r.rule.metric]
    if comparable:
        decision = registry.decide(r.rule, candidate_score, champion_score)
    else:
        decision = registry.Decision(False, f"champion v{champion.version} uses another backbone than {feats['backbone']}: "
                                            "not comparable on these features; move the alias by hand if intended",
                                     candidate_score, None)
    registry.apply_decision(client, r.name, version, champion, decision)
    get_run_logger().info("model %s v%s: %s (%s)", r.name, version, "promoted" if decision.promote else "rejected",
                          decision.reason)
    return {"name": r.name, "version": version, "promoted": decision.promote, "reason": decision.reason,
            "candidate_score": candidate_score, "champion_score": champion_score,
            "champion_version": champion.version if champion is not None else None}


def local_champion(cfg: PipelineConfig, version: str) -> Path:
    """The champion's bundle, downloaded once to ``work_dir/retrain/<name>-v<version>``: a stable
    path, so the hierarchy's cache key and the training folder's key stay the same across runs."""
    import shutil
    import tempfile

    local = Path(cfg.work_dir) / "retrain" / f"{cfg.registry.name}-v{version}"
    if not (local / "bundle.json").is_file():
        bundle = resolve_bundle(f"models:/{cfg.registry.name}/{version}", Path(cfg.work_dir))
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".champion-", dir=local.parent))
        shutil.copytree(bundle, tmp / "bundle")
        shutil.rmtree(local, ignore_errors=True)
        (tmp / "bundle").rename(local)  # whole, or not at all
        shutil.rmtree(tmp, ignore_errors=True)
    return local

