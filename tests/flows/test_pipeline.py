"""End to end: the real Prefect flow on a tiny embedded dataset, tracked in a temp MLflow store."""

import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, tracking_store):
    root = tmp_path_factory.mktemp("mlflow")
    with tracking_store(f"sqlite:///{root / 'mlflow.db'}"):
        yield root


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, prefect_harness):
    with prefect_harness(tmp_path_factory.mktemp("results")):
        yield


@pytest.fixture(scope="module")
def pipeline_result(tmp_path_factory, tracking, prefect_server):
    from flows.params import PipelineConfig
    from flows.pipeline import pipeline

    from geodata.demo.build import build_demo_dataset

    work = tmp_path_factory.mktemp("pipeline")
    build_demo_dataset(work / "data", n_train=1500, n_test=200, seed=3)
    # One bad row (latitude out of range) must be quarantined, counted, and not stop the run.
    with open(work / "data" / "train.csv", "a") as f:
        f.write("123456789," + "95.5,10.0" + "," * 29 + "\n")
    cfg = PipelineConfig.model_validate({
        "data_dir": str(work / "data"), "work_dir": str(work / "work"), "experiment": "e2e",
        "demo_data": {"n_train": 1500, "n_test": 200, "seed": 3},
        "features": {"num_workers": 0},
        "model": {"dim": 16, "hidden": 64},
        "train": {"epochs": 3, "batch_size": 128, "warmup_steps": 5},
    })
    return cfg, pipeline(cfg)


def test_flow_completes_with_all_metrics(pipeline_result):
    cfg, result = pipeline_result
    m = result["metrics"]
    for name in ("geoscore", "mean_km", "median_km", "acc_country", "acc_region", "acc_subregion", "acc_city",
                 "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km",
                 "pick_acc_country", "pick_acc_region", "pick_acc_subregion", "pick_acc_city"):
        assert name in m and 0 <= m[name] <= (5000 if name == "geoscore" else 1e5), name
    assert m["n"] == 200
    saved = json.loads((Path(cfg.work_dir) / "evaluate" / "metrics.json").read_text())
    assert saved["geoscore"] == pytest.approx(m["geoscore"])


def test_mlflow_has_a_parent_run_and_one_nested_run_per_stage(pipeline_result, tracking):
    from mlflow.tracking import MlflowClient

    cfg, result = pipeline_result
    client = MlflowClient()
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and "geoscore" in parent.data.metrics
    children = {r.data.tags.get("stage"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == result["parent_run_id"]}
    assert set(children) == {"ingest", "hierarchy", "features", "train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert "train.lr" in children["train"].data.params and "epoch_loss" in children["train"].data.metrics
    arts = {a.path for a in client.list_artifacts(children["train"].info.run_id, "model")}
    assert {"model/MLmodel", "model/artifacts"} <= arts  # the pyfunc model, bundle included
    ingest = children["ingest"].data.metrics
    assert ingest["train_n_in"] == 1501 and ingest["train_n_kept"] == 1500 and ingest["train_n_quarantined"] == 1
    assert ingest["train_quarantined_latitude_out_of_range"] == 1
    figs = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "figures")}
    assert {f"figures/{n}.png" for n in ("error_map", "error_cdf", "level_accuracy", "country_confusion",
                                          "poincare_disk")} <= figs
    ev = children["evaluate"].data.metrics
    assert ev["search_queries_per_s"] > 0 and 0 < ev["mean_ball_radius_country"] < 1
    assert ev["search_beam_k"] == cfg.evaluate.beam_k  # read from the search's answer
    assert {"paper_table.json", "paper_table.md"} <= {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert children["evaluate"].data.tags["paper_comparable"].startswith("no: not OSV-5M")
    arts = {a.path for a in client.list_artifacts(children["ingest"].info.run_id)}
    assert {"quarantine.parquet", "ingest_report.json"} <= arts


def test_the_exported_bundle_records_how_the_features_stage_decoded(pipeline_result):
    """features.fast_decode (on by default) reaches the bundle, so serving decodes as the stage did."""
    cfg, result = pipeline_result
    assert result["features"]["fast_decode"] is cfg.features.fast_decode is True
    meta = json.loads((Path(result["train"]["bundle"]) / "bundle.json").read_text())
    assert meta["fast_decode"] is True


def test_bad_parameters_are_rejected_before_anything_runs():
    from pydantic import ValidationError

    from flows.params import PipelineConfig

    with pytest.raises(ValidationError, match="beam_k"):
        PipelineConfig.model_validate({"evaluate": {"beam_k": 0}})
    with pytest.raises(ValidationError, match="backbone"):
        PipelineConfig.model_validate({"features": {"backbone": "resnet"}})


def test_logged_pyfunc_model_answers_real_photos_paths_and_bytes(pipeline_result, tracking):
    """The model logged by the run, loaded back by URI, on the real OSV-5M sample photos."""
    import base64

    import mlflow
    import pandas as pd

    _, result = pipeline_result
    photos = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))[:6]
    assert photos, "the OSV-5M sample photos are missing"
    # the path column reads only inside the folder set when the model is loaded (or served), and a
    # missing file is refused like any other path it will not open (flows.serving.pyfunc.read_served_path)
    model = mlflow.pyfunc.load_model(result["model_uri"], model_config={"path_root": str(photos[0].parent)})
    by_path = model.predict(pd.DataFrame({"path": [str(p) for p in photos] + ["/no/such/photo.jpg"]}))
    assert len(by_path) == len(photos) + 1
    assert (by_path["error"].iloc[:-1] == "").all() and "path refused" in by_path["error"].iloc[-1]
    ok = by_path.iloc[:-1]
    assert ok["latitude"].between(-90, 90).all() and ok["longitude"].between(-180, 180).all()
    assert (ok["country_prob"] >= ok["city_prob"] - 1e-9).all() and ok["city_prob"].between(0, 1).all()
    cands = json.loads(ok["candidates"].iloc[0])
    assert 1 <= len(cands) <= 5 and abs(sum(c["prob"] for c in cands)) <= 1 + 1e-6
    # The same photos as base64 text (what a JSON request carries) give the same answers.
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in photos] + ["not base64!"]
    by_bytes = model.predict(pd.DataFrame({"image": b64}))
    pd.testing.assert_frame_equal(by_bytes.iloc[:-1].drop(columns="error"), ok.drop(columns="error"))
    assert "base64" in by_bytes["error"].iloc[-1]


@pytest.mark.slow
def test_flow_with_the_polygons_labeler_on_the_embedded_default(tmp_path, tracking, prefect_server):
    """labeler: polygons end to end: the embedded geoBoundaries polygons (built on the first run,
    ~1 min, then cached), Dask-parallel labelling, training and evaluation on the result."""
    from flows.params import PipelineConfig
    from flows.pipeline import pipeline
    from geodata.demo.build import build_demo_dataset

    build_demo_dataset(tmp_path / "data", n_train=1500, n_test=200, seed=4)
    cfg = PipelineConfig.model_validate({
        "data_dir": str(tmp_path / "data"), "work_dir": str(tmp_path / "work"), "experiment": "e2e-polygons",
        "hierarchy": {"labeler": "polygons", "coords": "representative", "dask_scheduler": "local"},
        "features": {"num_workers": 0}, "model": {"dim": 16, "hidden": 64},
        "train": {"epochs": 2, "batch_size": 128, "warmup_steps": 5},
    })
    result = pipeline(cfg)
    rep = json.loads((tmp_path / "work" / "hierarchy" / "hierarchy_report.json").read_text())
    import pandas as pd

    n_cc = pd.read_csv(tmp_path / "data" / "train.csv", usecols=["country"], keep_default_na=False)["country"].nunique()
    assert rep["labeler"] == "polygons" and rep["orphans"] == 0
    assert 0.8 * n_cc <= rep["entities"]["country"] <= n_cc + 2  # a border point may fall in a neighbour
    # geoBoundaries has no Greenland, Antarctica, ...: such points are counted, not given an entity.
    assert rep["train_points_without_country"] == rep["labels_train"]["unassigned_country"] < 0.1 * 1500
    assert 0 <= result["metrics"]["pick_acc_country"] <= 1 and (tmp_path / "work" / "hierarchy" / "entity_map.png").exists()


def test_retrieval_baseline_through_the_same_stages(pipeline_result, tmp_path):
    """The paper's retrieval baseline on the same ingest/hierarchy/features as the model run."""
    from flows.stages.data_dir import SPLITS
    from flows.stages.evaluate import run_retrieval

    cfg, result = pipeline_result
    work = Path(cfg.work_dir)
    dirs = {s: str(next((work / "features").glob(f"*/{s}"))) for s in SPLITS}  # the run's feature cache
    m = run_retrieval(work / "ingest", work / "hierarchy", dirs, tmp_path / "retrieval")
    for name in ("geoscore", "acc_country", "acc_1km", "pick_acc_city", "search_queries_per_s", "index_gb"):
        assert name in m
    assert m["n"] == result["metrics"]["n"] and 0 <= m["acc_country"] <= 1
    import pandas as pd

    preds = pd.read_parquet(tmp_path / "retrieval" / "predictions.parquet")
    assert preds["similarity"].between(-1.0001, 1.0001).all() and (preds["neighbour_row"] >= 0).all()
    assert (tmp_path / "retrieval" / "figures" / "error_map.png").exists()
