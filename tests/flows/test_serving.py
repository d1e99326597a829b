"""The pyfunc model served by the real `mlflow models serve` on loopback, queried over HTTP."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.flows.processes import free_port, stop


def _get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


def _refuse(constant: str):
    raise ValueError(f"not JSON: bare {constant}")


def strict_json(text: str | bytes):
    """json.loads that refuses NaN / Infinity (Python's json accepts them; JSON does not)."""
    return json.loads(text, parse_constant=_refuse)


def test_pyfunc_round_trip_in_process(demo_bundle, tmp_path):
    import mlflow

    from flows.serving.logged_model import save_pyfunc

    photos = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))[:3]
    # the path column reads only inside the folder set when the model is loaded (or served)
    model = mlflow.pyfunc.load_model(str(save_pyfunc(demo_bundle, tmp_path / "pyfunc")),
                                     model_config={"path_root": str(photos[0].parent)})
    out = model.predict(pd.DataFrame({"path": [str(p) for p in photos]}), params={"top_k": 2})
    assert (out["error"] == "").all() and out["latitude"].between(-90, 90).all()
    assert all(len(json.loads(c)) == 2 for c in out["candidates"])  # params reach the model
    with pytest.raises(Exception, match="path"):
        model.predict(pd.DataFrame({"url": ["http://example.com/x.jpg"]}))


def test_mlflow_models_serve_answers_over_http(demo_bundle, tmp_path):
    from flows.serving.logged_model import save_pyfunc

    model_dir = save_pyfunc(demo_bundle, tmp_path / "pyfunc")
    served = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images"
    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        # mlflow execs `uvicorn` by name: the venv's bin must be on PATH even when it is not activated (CI)
        # the folder whose photos the path column may read is set when the model is served
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
             "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"path_root": str(served)}),
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
            preds = strict_json(r.read())["predictions"]  # a failed row's fields are null, not a bare NaN
        assert len(preds) == 4
        for p in preds[:3]:
            assert p["error"] == "" and -90 <= p["latitude"] <= 90 and p["country_key"]
            assert 0 <= p["city_prob"] <= p["country_prob"] <= 1 + 1e-9
        assert "cannot decode" in preds[3]["error"]
        assert preds[3]["latitude"] is None and preds[3]["country_key"] is None and preds[3]["candidates"] is None
        rows = [[photos[0].name], [str(Path(__file__).resolve())], [str(served / "missing.jpg")]]
        body = json.dumps({"dataframe_split": {"columns": ["path"], "data": rows}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            by_path = strict_json(r.read())["predictions"]
        assert by_path[0]["error"] == "" and by_path[0]["country_key"] == preds[0]["country_key"]
        assert by_path[1]["error"] == by_path[2]["error"] != ""  # an existing file outside = a missing one
    finally:
        stop(proc, log)


def test_a_failed_row_scores_as_strict_json(demo_bundle, tmp_path):
    """What `mlflow models serve` writes (its own serializer, and pandas' to_json) parses with a
    parser that refuses NaN: a failed row's fields are None; a batch that all succeeded keeps
    its float columns."""
    import io

    import mlflow
    from mlflow.pyfunc.scoring_server import predictions_to_json

    from flows.serving.logged_model import save_pyfunc

    photo = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))[0].read_bytes()
    model = mlflow.pyfunc.load_model(str(save_pyfunc(demo_bundle, tmp_path / "pyfunc")))
    out = model.predict(pd.DataFrame({"image": [photo, b"not an image", photo[: len(photo) // 2]]}))
    buf = io.StringIO()
    predictions_to_json(out, buf)
    served = strict_json(buf.getvalue())["predictions"]
    assert served[0]["error"] == "" and -90 <= served[0]["latitude"] <= 90 and served[0]["city_key"]
    for row in served[1:]:
        assert "cannot decode" in row["error"]
        assert all(row[c] is None for c in row if c != "error"), row
    assert strict_json(out.to_json(orient="records"))[1]["latitude"] is None
    good = model.predict(pd.DataFrame({"image": [photo]}))
    assert good["latitude"].dtype == "float64" and good["city_prob"].dtype == "float64"


def test_bad_feature_rows_are_reported_per_row_and_columns_stay(demo_bundle, tmp_path):
    import mlflow
    import numpy as np

    from flows.serving.logged_model import save_pyfunc
    from flows.serving.pyfunc import OUTPUT_COLUMNS
    from hierloc.infer.predictor import Predictor

    dim = Predictor.load(demo_bundle, with_backbone=False).feature_dim
    model = mlflow.pyfunc.load_model(str(save_pyfunc(demo_bundle, tmp_path / "pyfunc")))
    good = np.random.default_rng(0).normal(size=dim).tolist()
    out = model.predict(pd.DataFrame({"features": [good, [float("nan")] * dim, good[:-1], good]}))
    assert list(out["error"] == "") == [True, False, False, True]
    assert "NaN" in out["error"][1] and f"(B, {dim})" in out["error"][2]
    assert out.loc[[0, 3], "latitude"].notna().all()
    none_ok = model.predict(pd.DataFrame({"features": [[float("inf")] * dim]}))
    assert set(OUTPUT_COLUMNS) <= set(none_ok.columns) and none_ok["latitude"].isna().all()


# --- no code from data, no file outside the served folder ----------------------------------
def test_the_pyfunc_is_a_model_from_code_with_plain_artifacts(demo_bundle, tmp_path, monkeypatch):
    """No pickle in the model folder; it loads with MLflow's pickle loading switched off."""
    import mlflow

    from flows.serving.logged_model import save_pyfunc

    model_dir = save_pyfunc(demo_bundle, tmp_path / "pyfunc")
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle")) or "python_model" in f], files
    assert {f.rsplit("/", 1)[-1] for f in files if f.startswith("artifacts/")} == {
        "bundle.json", "entities.parquet", "model.pt"}
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(str(model_dir))
    photo = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))[0]
    out = model.predict(pd.DataFrame({"image": [photo.read_bytes()]}))
    assert out["error"].tolist() == [""] and out["latitude"].between(-90, 90).all()


def test_the_path_column_reads_only_inside_the_served_folder(demo_bundle, tmp_path):
    """Off unless a folder is set; inside it, only regular files; every refusal reads the same,
    so a client cannot tell which files exist on the server."""
    import mlflow

    from flows.serving.logged_model import save_pyfunc

    sample = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images"
    photo = sorted(sample.glob("*.jpg"))[0]
    root = tmp_path / "served"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(photo.read_bytes())
    (root / "big.jpg").write_bytes(photo.read_bytes() + b"\0" * 5000)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for clients")
    (root / "link.jpg").symlink_to(secret)
    (root / "dev.jpg").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.jpg")
    model_dir = save_pyfunc(demo_bundle, tmp_path / "pyfunc")

    off = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"path": [str(photo)]}))
    assert off["latitude"].isna().all() and "path column is off" in off["error"][0]

    size = (root / "sub" / "a.jpg").stat().st_size
    model = mlflow.pyfunc.load_model(str(model_dir), model_config={"path_root": str(root), "max_image_bytes": size})
    asked = ["sub/a.jpg", str(root / "sub" / "a.jpg"), str(secret), str(tmp_path / "missing.txt"), "../secret.txt",
             "sub/../../secret.txt", "link.jpg", "dev.jpg", "fifo.jpg", "sub", "missing.jpg", "big.jpg"]
    out = model.predict(pd.DataFrame({"path": asked}))
    assert list(out["error"][:2]) == ["", ""] and out["latitude"][:2].notna().all()
    refused = out["error"][2:-1].tolist()
    assert len(set(refused)) == 1 and refused[0].startswith("PathRefused: path refused"), refused
    assert "exist" not in refused[0] and "No such file" not in refused[0]
    assert f"over the {size:,}-byte cap" in out["error"].iloc[-1]


def test_served_image_bytes_are_capped_before_decoding(demo_bundle, tmp_path):
    import base64

    import mlflow

    from flows.serving.logged_model import save_pyfunc
    from flows.serving.pyfunc import DEFAULT_MODEL_CONFIG, SERVED_MAX_IMAGE_BYTES

    assert DEFAULT_MODEL_CONFIG["max_image_bytes"] == SERVED_MAX_IMAGE_BYTES
    photo = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))[0].read_bytes()
    model = mlflow.pyfunc.load_model(str(save_pyfunc(demo_bundle, tmp_path / "pyfunc")),
                                     model_config={"max_image_bytes": len(photo)})
    big = photo + b"\0" * 10
    out = model.predict(pd.DataFrame({"image": [photo, big, base64.b64encode(big).decode(),
                                                base64.b64encode(photo).decode()]}))
    assert list(out["error"] == "") == [True, False, False, True]
    assert all(f"over the {len(photo):,}-byte cap" in e for e in out["error"][1:3])


def test_a_bundle_json_cannot_point_outside_its_bundle_or_be_huge(demo_bundle, tmp_path):
    import json
    import shutil

    import pytest

    from flows.stages.evaluate import same_backbone
    from hierloc.infer.predictor import Predictor

    outside = tmp_path / "weights.pt"
    outside.write_bytes(b"not ours")
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    for name in (str(outside), "../weights.pt"):
        (bundle / "bundle.json").write_text(json.dumps({**meta, "backbone_weights": name}))
        with pytest.raises(ValueError, match="backbone_weights .* points outside the bundle"):
            Predictor.load(bundle)
        with pytest.raises(ValueError, match="points outside the bundle"):
            same_backbone(bundle, meta["backbone"], str(outside))
    (bundle / "bundle.json").write_text(json.dumps(meta) + " " * (2 << 20))
    with pytest.raises(ValueError, match="bundle.json: .* bytes, over the"):
        Predictor.load(bundle, with_backbone=False)
