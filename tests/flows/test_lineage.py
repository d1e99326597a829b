"""Content digests (the cache keys) and the tracking-server preflight."""

import socket
import time

import pytest

from flows.tracking.lineage import TrackingUnavailable, check_tracking, files_digest, source_digest
from hierloc.digest import digest_of


def _osv_folder(root):
    (root / "images" / "train").mkdir(parents=True)
    (root / "train.csv").write_text("id,latitude,longitude\n1,10.0,20.0\n")
    (root / "test.csv").write_text("id,latitude,longitude\n2,11.0,21.0\n")
    (root / "images" / "train" / "00.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    return root


def test_source_digest_sees_new_rows_and_new_shards_only(tmp_path):
    root = _osv_folder(tmp_path)
    d0 = source_digest(root)
    assert source_digest(root) == d0  # stable
    with open(root / "train.csv", "a") as fh:
        fh.write("3,12.0,22.0\n")
    d1 = source_digest(root)
    assert d1 != d0
    (root / "images" / "train" / "01.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    d2 = source_digest(root)
    assert d2 != d1
    (root / ".DS_Store").write_text("hidden files are not inputs")
    assert source_digest(root) == d2
    (root / "train").mkdir()  # the WebDataset layout: {split}/*.tar
    (root / "train" / "000.tar").write_bytes(b"\0" * 1024)
    assert source_digest(root) != d2


def test_files_digest_is_content_not_time(tmp_path):
    a = tmp_path / "a.parquet"
    a.write_bytes(b"abc")
    d = files_digest([a])
    time.sleep(0.01)
    a.write_bytes(b"abc")  # rewritten, same bytes
    assert files_digest([a]) == d
    a.write_bytes(b"abd")
    assert files_digest([a]) != d


def test_digest_of_ignores_key_order():
    assert digest_of({"a": 1, "b": [1, 2]}) == digest_of({"b": [1, 2], "a": 1})
    assert digest_of({"a": 1}) != digest_of({"a": 2})


def test_a_dead_tracking_server_is_reported_before_any_work(monkeypatch):
    import mlflow

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        t0 = time.monotonic()
        with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port} does not answer.*make up"):
            check_tracking()
        assert time.monotonic() - t0 < 10
    finally:
        mlflow.set_tracking_uri(None)


def test_a_features_runs_decoding_comes_from_its_outputs_else_its_logged_parameter(tmp_path, tracking_store):
    """What the export records as the bundle's fast_decode: the features outputs' field; outputs.json
    written before that field: the run's logged parameter (True for runs made with reduced-scale
    decoding on); a run from before reduced-scale decoding logged none: full decodes (False)."""
    from mlflow.tracking import MlflowClient

    from flows.tracking.lineage import features_fast_decode

    with tracking_store(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        client = MlflowClient()
        exp = client.create_experiment("lineage")
        runs = {}
        for name, logged in (("on", "True"), ("off", "False"), ("before", None), ("odd", "yes")):
            runs[name] = client.create_run(exp).info.run_id
            if logged is not None:
                client.log_param(runs[name], "fast_decode", logged)
        assert features_fast_decode({"run_id": runs["on"], "fast_decode": False}) is False  # the outputs say
        assert features_fast_decode({"run_id": runs["off"], "fast_decode": True}) is True
        assert features_fast_decode({"run_id": runs["on"]}) is True
        assert features_fast_decode({"run_id": runs["off"]}) is False
        assert features_fast_decode({"run_id": runs["before"]}) is False
        with pytest.raises(ValueError, match=f"features run {runs['odd']}: parameter fast_decode is 'yes'"):
            features_fast_decode({"run_id": runs["odd"]})
        with pytest.raises(ValueError, match="features run 0123456789abcdef: cannot read its parameters"):
            features_fast_decode({"run_id": "0123456789abcdef"})
