"""The scale rehearsal end to end at a tiny size: its data, the real stage flows, its checks and last line."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def test_generated_data_is_osv5m_shaped_consistent_and_reused(tmp_path):
    from benchmarks.scale_data import DIM, generate
    from geodata.osv5m import OSV5M_COLUMNS

    first = generate(tmp_path / "d", 1200, 300, shard_size=500)
    assert not first["reused"] and first["rows_per_s"] > 0
    train = pd.read_csv(tmp_path / "d" / "train.csv", dtype=str, keep_default_na=False)
    assert list(train.columns) == list(OSV5M_COLUMNS) and len(train) == 1200
    test = pd.read_csv(tmp_path / "d" / "test.csv", dtype=str, keep_default_na=False)
    assert len(test) == 300 and not set(train["id"]) & set(test["id"])
    # real places: the keys are built from the labels, as the release's are
    assert (train["unique_country"] == train["country"]).all()
    assert (train["unique_region"] == train["region"] + "_" + train["country"]).all()
    assert train["country"].value_counts().iloc[0] > len(train) / train["country"].nunique()  # skewed
    shards = sorted((tmp_path / "d" / "train").glob("*.tar"))
    assert len(shards) == 3
    with tarfile.open(shards[0]) as tf:  # the standard reader agrees with the numpy-written headers
        members = tf.getmembers()
        assert [m.name for m in members[:2]] == [f"{train['id'][0]}.json", f"{train['id'][0]}.street_clip.npy"]
        meta = json.loads(tf.extractfile(members[0]).read())
        vec = np.load(io.BytesIO(tf.extractfile(members[1]).read()), allow_pickle=False)
    assert {k: str(v) for k, v in meta.items()}["unique_city"] == train["unique_city"][0]
    assert str(meta["id"]) == train["id"][0] and float(meta["latitude"]) == float(train["latitude"][0])
    assert vec.shape == (DIM,) and vec.dtype == np.float16
    again = generate(tmp_path / "d", 1200, 300, shard_size=500)
    assert again["reused"]
    with pytest.raises(SystemExit, match="other arguments"):
        generate(tmp_path / "d", 1201, 300, shard_size=500)


@pytest.mark.slow
def test_rehearsal_runs_every_stage_reconciles_and_prints_its_last_line(tmp_path, tracking_store):
    out = tmp_path / "scale"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline_scale.py"), "--rows", "3000",
                           "--test-rows", "400", "--shard-size", "1000", "--max-steps", "4", "--batch-size", "64",
                           "--out", str(out)], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (out / "stages.log").read_text()[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"pipeline_scale: rows=3000 test_rows=400 peak_rss_gb=\d+\.\d\d wall_s=\d+\.\d", lines[-1])
    for stage in ("ingest", "hierarchy", "features", "train", "evaluate + register"):
        assert any(l.startswith(f"| {stage} | ") for l in lines), stage
    recon = json.loads(next(l for l in lines if l.startswith("train: ")).split("reconciled: ", 1)[1])
    assert recon["train"]["n_in"] == 3000 and recon["test"]["n_in"] == 400
    assert recon["evaluate"]["predictions"] + recon["evaluate"]["dropped_no_features"] == recon["test"]["manifest"]

    from benchmarks.pipeline_scale import reconcile

    with pytest.raises(AssertionError, match="3001 rows written"):  # a lost row is loud
        reconcile(out / "work", 3001, 400)

    from mlflow.tracking import MlflowClient

    with tracking_store(f"sqlite:///{out / 'mlflow.db'}"):
        client = MlflowClient()
        exp = client.get_experiment_by_name("pipeline-scale")
        train = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "train"]
        assert len(train) == 1
        tags = train[0].data.tags
        assert tags["hierloc.budgeted"] == "true" and tags["hierloc.budget_steps"] == "4"
        assert train[0].data.metrics["steps"] == 4
        outputs = json.loads(Path(client.download_artifacts(train[0].info.run_id, "outputs.json", str(tmp_path)))
                             .read_text())
        assert outputs["budgeted"] is True and outputs["steps"] == 4
