"""A small trained model bundle, built once per session by the real stage functions.

No Prefect and no MLflow: the stages are called directly, as the CLI can. The embedded
"Earth tiles" demo data (real GeoNames places, Blue Marble crops) at a tiny size, the
weight-free backbone, a 2-epoch model: about 7 s on a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_work(tmp_path_factory) -> Path:
    """A work folder after ingest, hierarchy, features, train and export (export/latest.json set)."""
    from flows.stages.export import run_export
    from flows.stages.features import run_features
    from flows.stages.hierarchy import run_hierarchy
    from flows.stages.ingest import run_ingest
    from flows.stages.train import run_train
    from geodata.demo.build import build_demo_dataset
    from hierloc.model.model import ModelConfig
    from hierloc.train.loop import TrainConfig

    root = tmp_path_factory.mktemp("demo_bundle")
    data, work = root / "data", root / "work"
    build_demo_dataset(data, n_train=1200, n_test=150, seed=5)
    run_ingest(data, work / "ingest", verify_images="exists")
    run_hierarchy(work / "ingest", work / "hierarchy")
    feats = run_features(data, work / "ingest", work / "features", num_workers=0)
    trained = run_train(work / "ingest", work / "hierarchy", feats["dirs"], work / "train",
                        ModelConfig(dim=16, hidden=64), TrainConfig(epochs=2, batch_size=128, warmup_steps=5, device="cpu"))
    run_export(Path(trained["model_path"]), work / "hierarchy", feats["backbone"], None, work / "export" / "demo",
               fast_decode=feats["fast_decode"])
    return work


@pytest.fixture(scope="session")
def demo_bundle(demo_work) -> Path:
    """The bundle folder (bundle.json, model.pt, entities.parquet) of ``demo_work``."""
    bundle = demo_work / "export" / "demo"
    assert (bundle / "bundle.json").is_file()
    return bundle
