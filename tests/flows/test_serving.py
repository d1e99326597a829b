"""The pyfunc model served by the real `mlflow models serve` on loopback, queried over HTTP."""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


def test_pyfunc_round_trip_in_process(demo_bundle, tmp_path):
    import mlflow

    from flows.serving import save_pyfunc

    model = mlflow.pyfunc.load_model(str(save_pyfunc(demo_bundle, tmp_path / "pyfunc")))
    photos = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))[:3]
    out = model.predict(pd.DataFrame({"path": [str(p) for p in photos]}), params={"top_k": 2})
    assert (out["error"] == "").all() and out["latitude"].between(-90, 90).all()
    assert all(len(json.loads(c)) == 2 for c in out["candidates"])  # params reach the model
    with pytest.raises(Exception, match="path"):
        model.predict(pd.DataFrame({"url": ["http://example.com/x.jpg"]}))


def test_mlflow_models_serve_answers_over_http(demo_bundle, tmp_path):
    from flows.serving import save_pyfunc

    model_dir = save_pyfunc(demo_bundle, tmp_path / "pyfunc")
    port = _free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        # mlflow execs `uvicorn` by name: the venv's bin must be on PATH even when it is not activated (CI)
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
             "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if _get(f"{base}/ping") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow models serve did not come up:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        photos = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))[:3]
        rows = [[base64.b64encode(p.read_bytes()).decode()] for p in photos] + [["bm90IGFuIGltYWdl"]]  # "not an image"
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            preds = json.loads(r.read())["predictions"]
        assert len(preds) == 4
        for p in preds[:3]:
            assert p["error"] == "" and -90 <= p["latitude"] <= 90 and p["country_key"]
            assert 0 <= p["city_prob"] <= p["country_prob"] <= 1 + 1e-9
        assert "cannot decode" in preds[3]["error"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_bad_feature_rows_are_reported_per_row_and_columns_stay(demo_bundle, tmp_path):
    import mlflow
    import numpy as np

    from flows.serving import OUTPUT_COLUMNS, save_pyfunc
    from hierloc.predictor import Predictor

    dim = Predictor.load(demo_bundle, with_backbone=False).feature_dim
    model = mlflow.pyfunc.load_model(str(save_pyfunc(demo_bundle, tmp_path / "pyfunc")))
    good = np.random.default_rng(0).normal(size=dim).tolist()
    out = model.predict(pd.DataFrame({"features": [good, [float("nan")] * dim, good[:-1], good]}))
    assert list(out["error"] == "") == [True, False, False, True]
    assert "NaN" in out["error"][1] and f"(B, {dim})" in out["error"][2]
    assert out.loc[[0, 3], "latitude"].notna().all()
    none_ok = model.predict(pd.DataFrame({"features": [[float("inf")] * dim]}))
    assert set(OUTPUT_COLUMNS) <= set(none_ok.columns) and none_ok["latitude"].isna().all()
