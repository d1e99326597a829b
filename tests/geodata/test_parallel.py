"""Partitioned runs: a real Dask LocalCluster gives the same rows, in order, as the in-process run."""

import numpy as np
import pandas as pd
import pytest

from geodata.parallel import map_partitions


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
    from geodata.geonames import GeoNamesLabeler
    from geodata.labeling import geonames_partition

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
    import geodata.parallel as par

    def boom(*a, **k):
        raise AssertionError("a cluster was started for 5,000 rows")

    monkeypatch.setattr(par, "_run_on_dask", boom)
    monkeypatch.delenv("HIERLOC_DASK_SCHEDULER", raising=False)
    out = map_partitions(points, add_sum, {"offset": 0.0})
    assert len(out) == len(points)
