"""Partitioned runs: a real Dask LocalCluster gives the same rows, in order, as the in-process run."""

import numpy as np
import pandas as pd
import pytest

from geodata.labels.parallel import map_partitions


def add_sum(df: pd.DataFrame, payload) -> pd.DataFrame:
    return pd.DataFrame({"id": df["id"], "s": df["latitude"] + df["longitude"] + payload["offset"]})


def drop_one(df: pd.DataFrame, payload) -> pd.DataFrame:
    return df.iloc[1:]


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"id": np.arange(5_000, dtype=np.int64), "latitude": rng.uniform(-90, 90, 5_000),
                         "longitude": rng.uniform(-180, 180, 5_000)})


def test_sync_keeps_row_order_and_partitions_do_not_matter(points):
    a = map_partitions(points, add_sum, {"offset": 1.0}, scheduler="sync", n_partitions=1)
    b = map_partitions(points, add_sum, {"offset": 1.0}, scheduler="sync", n_partitions=7)
    pd.testing.assert_frame_equal(a, b)
    np.testing.assert_allclose(a["s"], points["latitude"] + points["longitude"] + 1.0)
    assert list(a["id"]) == list(points["id"])


def test_local_cluster_equals_in_process(points, tmp_path):
    """A real 2-process LocalCluster, the labeler broadcast once, workers reading their partitions."""
    from geodata.labels.geonames import GeoNamesLabeler
    from geodata.labels.label import geonames_partition

    labeler = GeoNamesLabeler()
    ref = map_partitions(points, geonames_partition, labeler, scheduler="sync")
    got = map_partitions(points, geonames_partition, labeler, scheduler="local", n_partitions=4, n_workers=2,
                         work_dir=tmp_path / "parts")
    pd.testing.assert_frame_equal(got, ref)
    assert list((tmp_path / "parts").iterdir()) == []  # the run's partitions and payload file are gone


def test_a_remote_scheduler_needs_a_shared_work_dir(points):
    with pytest.raises(ValueError, match="pass work_dir"):
        map_partitions(points, add_sum, {"offset": 0.0}, scheduler="tcp://10.0.0.1:8786")


def test_a_partition_function_that_loses_rows_is_an_error(points):
    with pytest.raises(ValueError, match=r"in-00000\.parquet: the partition function returned 4999 rows for 5000"):
        map_partitions(points, drop_one, scheduler="sync")


def test_small_inputs_skip_the_cluster(points, monkeypatch):
    import geodata.labels.parallel as par

    def boom(*a, **k):
        raise AssertionError("a cluster was started for 5,000 rows")

    monkeypatch.setattr(par, "_run_on_dask", boom)
    monkeypatch.delenv("HIERLOC_DASK_SCHEDULER", raising=False)
    out = map_partitions(points, add_sum, {"offset": 0.0})
    assert len(out) == len(points)


# --- the payload is data: nothing in the work folder is unpickled --------------------------
class Payload:
    """Unpickling this calls os.system(touch <marker>)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_planted_where_the_payload_goes_runs_no_code(points, tmp_path):
    """Someone with write access to a shared work folder replaces every payload file the
    workers read with a crafted pickle: the run fails, and no code runs."""
    import pickle
    from pathlib import Path

    marker = tmp_path / "pwned"
    crafted = pickle.dumps({"offset": Payload(marker)})
    seen = []

    def hostile_runner(call, arglist):
        payload_path = Path(arglist[0][4])
        seen.append(payload_path)
        for f in ([payload_path] if payload_path.is_file() else [p for p in payload_path.rglob("*") if p.is_file()]):
            f.write_bytes(crafted)
        for args in arglist:
            call(*args)

    with pytest.raises(Exception) as err:
        map_partitions(points, add_sum, {"offset": 1.0}, runner=hostile_runner, n_partitions=2, work_dir=tmp_path / "w")
    assert seen and not marker.exists(), err.value
    assert str(seen[0]) in str(err.value)  # the error names the payload folder


def test_a_runner_sees_the_same_rows_through_the_plain_payload(points, tmp_path):
    def runner(call, arglist):
        for args in arglist:
            call(*args)

    ref = map_partitions(points, add_sum, {"offset": 1.0}, scheduler="sync")
    got = map_partitions(points, add_sum, {"offset": 1.0}, runner=runner, n_partitions=3, work_dir=tmp_path / "w")
    pd.testing.assert_frame_equal(got, ref)


def test_payload_round_trip(tmp_path):
    from pathlib import Path

    from geodata.labels.payload import load_payload, save_payload

    frame = pd.DataFrame({"name": ["a", "é", ""], "x": [1.0, np.nan, 3.0]})
    obj = {"offset": 1.5, "n": 3, 7: (True, None, "s", Path("/x/y")), "nan": float("nan"),
           "ints": np.arange(6, dtype=np.int32).reshape(2, 3), "one": np.float32(2.5),
           "strs": np.array(["Île", "", None, "b"], dtype=object),
           "wkb": [np.array([b"\x00\x01\x00", b"", b"z\x00"], dtype=object)], "frame": frame}
    back = load_payload(save_payload(obj, tmp_path / "p"))
    assert back["offset"] == 1.5 and back["n"] == 3 and back[7] == (True, None, "s", Path("/x/y"))
    assert np.isnan(back["nan"]) and back["one"] == np.float32(2.5) and back["one"].dtype == np.float32
    assert back["ints"].dtype == np.int32 and np.array_equal(back["ints"], obj["ints"])
    assert back["strs"].tolist() == ["Île", "", None, "b"] and back["wkb"][0].tolist() == [b"\x00\x01\x00", b"", b"z\x00"]
    pd.testing.assert_frame_equal(back["frame"], frame)
    with pytest.raises(TypeError, match="cannot be stored as plain data"):
        save_payload({"f": object()}, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_a_payload_names_only_known_classes_and_loads_no_object_arrays(tmp_path):
    import json

    from geodata.labels.payload import load_payload, save_payload

    folder = save_payload({"a": np.arange(3)}, tmp_path / "p")
    doc = json.loads((folder / "payload.json").read_text())
    doc["root"] = {"t": "object", "type": "os:system", "state": "touch x"}
    (folder / "payload.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="names the class 'os:system'"):
        load_payload(folder)
    marker = tmp_path / "pwned"
    np.savez(folder / "arrays.npz", a0=np.array([Payload(marker)], dtype=object))  # an object array: a pickle inside
    (folder / "payload.json").write_text(json.dumps({"format": 1, "root": {"t": "array", "name": "a0"}}))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_payload(folder)
    assert not marker.exists()


def test_finished_partitions_report_their_rows(points, progress_lines):
    map_partitions(points, add_sum, {"offset": 0.0}, scheduler="sync", n_partitions=4)
    lines = progress_lines()
    assert [x.split(", ")[0] for x in lines if "ETA" in x] == [
        f"add_sum over 4 partitions: {n:,}/5,000 rows ({n // 50}%)" for n in (1_250, 2_500, 3_750, 5_000)]
    assert any(x.startswith("add_sum over 4 partitions: 5,000/5,000 rows in ") for x in lines), lines
