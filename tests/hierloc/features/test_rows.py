"""Features read from memory-mapped shards (hierloc.features.rows, npz_map): every gather equals
the in-memory features, whatever the shards' dtype, order, compression or failures."""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest

from geodata.labels.targets import split_targets
from geodata.osv5m import LEVELS
from hierloc.features.cache import scan_cache, write_shard
from hierloc.features.npz_map import map_npz_member
from hierloc.features.rows import TOUCH_BYTES, FeatureRows, ShardMaps
from hierloc.features.views import load_features, open_features, write_view

D = 12


def _cache(tmp_path, rng):
    """Three shards: float32, float16 (with a failed NaN row, id 203), then a float32 retry of two
    earlier ids (the newest shard wins). Returns the cache and {id: the float32 row a reader must give}."""
    cache = tmp_path / "cache"
    cache.mkdir()
    truth = {}
    ids32 = np.arange(100, 140)
    f32 = rng.normal(size=(40, D)).astype(np.float32)
    write_shard(cache / "shard-00000.npz", ids32, f32, [""] * 40)
    ids16 = np.arange(200, 230)
    f16 = rng.normal(size=(30, D)).astype(np.float16)
    f16[3] = np.nan
    write_shard(cache / "shard-00001.npz", ids16, f16, ["decode error" if i == 3 else "" for i in range(30)])
    retry = np.array([105, 207])
    f_retry = rng.normal(size=(2, D)).astype(np.float32)
    write_shard(cache / "shard-00002.npz", retry, f_retry, ["", ""])
    truth.update(zip(ids32.tolist(), f32))
    truth.update(zip(ids16.tolist(), f16.astype(np.float32)))
    truth.update(zip(retry.tolist(), f_retry))
    return cache, truth


def test_a_gathered_batch_equals_the_in_memory_features(tmp_path):
    rng = np.random.default_rng(0)
    cache, truth = _cache(tmp_path, rng)
    ids = rng.permutation(np.array(sorted(truth)))  # shuffled, across all three shards
    expected = np.stack([truth[int(i)] for i in ids])
    rows = open_features(cache, ids)
    assert isinstance(rows, FeatureRows) and rows.shape == (len(ids), D) and len(rows) == len(ids)
    batch = rng.integers(0, len(ids), 33)  # repeats allowed, any order
    got = rows.take(batch)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected[batch])  # NaN rows compare equal too
    np.testing.assert_array_equal(np.concatenate(list(rows.chunks(7))), expected)
    np.testing.assert_array_equal(rows.finite_mask(size=5), np.isfinite(expected).all(1))
    assert (~rows.finite_mask()).sum() == 1 and np.isnan(rows[int(np.flatnonzero(ids == 203)[0])]).all()
    sub = rows.subset(rows.finite_mask())
    np.testing.assert_array_equal(sub.take(np.arange(len(sub))), expected[np.isfinite(expected).all(1)])
    np.testing.assert_array_equal(rows.subset(np.array([5, 1])).take([1, 0]), expected[[1, 5]])
    np.testing.assert_array_equal(load_features(cache, ids), expected)  # the in-memory reader agrees
    # the shards are mapped, not read: a float16 shard stays float16 in its map
    maps = rows.maps
    assert all(isinstance(maps.get(s), np.memmap) for s in range(3))
    assert maps.get(1).dtype == np.float16 and maps.get(0).dtype == np.float32
    # through a view, as the stages read them
    view = tmp_path / "view"
    write_view(view, cache, ids, scan_cache(cache).failures, {})
    np.testing.assert_array_equal(open_features(view, ids[:9]).take(np.arange(9)), expected[:9])


def test_the_nan_row_of_a_failed_image_is_dropped_and_counted_without_a_copy(tmp_path):
    rng = np.random.default_rng(1)
    cache, truth = _cache(tmp_path, rng)
    ids = np.array(sorted(truth))
    rows = open_features(cache, ids)
    manifest = pd.DataFrame({"id": ids, "latitude": 1.0, "longitude": 2.0})
    assign = pd.DataFrame({f"{lvl}_index": np.zeros(len(ids), np.int64) for lvl in LEVELS})
    st = split_targets(manifest, assign, rows)
    assert st.n_dropped == 1 and 203 not in st.manifest["id"].tolist()
    assert isinstance(st.features, FeatureRows) and len(st.features) == len(ids) - 1
    np.testing.assert_array_equal(st.features.take(np.arange(len(st.features))),
                                  np.stack([truth[int(i)] for i in st.manifest["id"]]))
    dense = split_targets(manifest, assign, np.stack([truth[int(i)] for i in ids]))  # the array path is unchanged
    np.testing.assert_array_equal(dense.features, np.asarray(st.features))


def test_float16_is_stored_as_float16_at_half_the_size(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(500, 64)).astype(np.float16)
    ids = np.arange(500)
    write_shard(tmp_path / "half.npz", ids, feats, [""] * 500)
    write_shard(tmp_path / "full.npz", ids, feats.astype(np.float32), [""] * 500)
    with np.load(tmp_path / "half.npz") as z:
        assert z["feats"].dtype == np.float16
        np.testing.assert_array_equal(z["feats"], feats)
    half, full = (tmp_path / "half.npz").stat().st_size, (tmp_path / "full.npz").stat().st_size
    assert half < 0.55 * full  # the ids (8 bytes a row) are the rest
    with np.load(tmp_path / "full.npz") as z:
        assert z["feats"].dtype == np.float32  # anything else stays float32, as before


@pytest.mark.parametrize("how", ["compressed", "fortran"])
def test_a_member_that_cannot_be_mapped_is_read_whole(tmp_path, how):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(20, D)).astype(np.float32)
    ids = np.arange(1000, 1020)
    cache = tmp_path / "cache"
    cache.mkdir()
    if how == "compressed":
        np.savez_compressed(cache / "shard-00000.npz", ids=ids, feats=feats)
    else:
        np.savez(cache / "shard-00000.npz", ids=ids, feats=np.asfortranarray(feats))
    arr = map_npz_member(cache / "shard-00000.npz", "feats")
    assert not isinstance(arr, np.memmap)
    np.testing.assert_array_equal(arr, feats)
    perm = rng.permutation(ids)
    np.testing.assert_array_equal(open_features(cache, perm).take(np.arange(20)), feats[perm - 1000])


def test_mapping_reads_the_local_header_not_the_central_directory(tmp_path):
    """np.savez writes a 20-byte zip64 extra field into each member's local header that the
    central directory's entry lacks: the data offset must come from the local header."""
    feats = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = tmp_path / "shard-00000.npz"
    np.savez(path, ids=np.arange(4), feats=feats)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("feats.npy")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 28)
        local_extra = int.from_bytes(fh.read(2), "little")
    assert local_extra != len(info.extra)  # the two copies differ: the case this test is about
    arr = map_npz_member(path, "feats")
    assert isinstance(arr, np.memmap)
    np.testing.assert_array_equal(arr, feats)


def test_a_damaged_or_foreign_shard_is_refused_by_name(tmp_path):
    path = tmp_path / "shard-00000.npz"
    np.savez(path, ids=np.arange(3), feats=np.arange(6, dtype=np.int32).reshape(3, 2))
    with pytest.raises(ValueError, match=r"shard-00000\.npz: feats has dtype int32"):
        map_npz_member(path, "feats")
    with pytest.raises(KeyError, match=r"shard-00000\.npz: no array 'nope'"):
        map_npz_member(path, "nope")
    np.savez(path, ids=np.arange(3), feats=np.zeros((3, 2), np.float32))
    raw = bytearray(path.read_bytes())
    at = raw.index(b"'shape': (3, 2)")
    raw[at : at + 15] = b"'shape': (4, 2)"  # the header now claims more rows than the member holds
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shard-00000\.npz: feats\.npy holds .* the shard is damaged"):
        map_npz_member(path, "feats")


def test_few_open_maps_still_gather_every_shard(tmp_path):
    rng = np.random.default_rng(4)
    cache, truth = _cache(tmp_path, rng)
    index = scan_cache(cache)
    ids = rng.permutation(index.ids)
    pos = index.positions(ids)
    rows = FeatureRows(ShardMaps(index.paths, index.dim, max_open=1), index.shard[pos], index.row[pos])
    for _ in range(3):
        batch = rng.integers(0, len(ids), 16)
        np.testing.assert_array_equal(rows.take(batch), np.stack([truth[int(i)] for i in ids[batch]]))
    assert len(rows.maps._open) == 1


def test_maps_close_once_enough_pages_were_read(tmp_path):
    """Past max_resident bytes read, every map closes (its pages leave the RSS); gathers go on."""
    rng = np.random.default_rng(5)
    cache, truth = _cache(tmp_path, rng)
    index = scan_cache(cache)
    pos = index.positions(index.ids)
    maps = ShardMaps(index.paths, index.dim, max_resident=TOUCH_BYTES * 3 // 2)
    rows = FeatureRows(maps, index.shard[pos], index.row[pos])
    expected = np.stack([truth[int(i)] for i in index.ids])
    np.testing.assert_array_equal(rows.take([0, 1, 2]), expected[[0, 1, 2]])
    assert len(maps._open) == 1  # 3 rows: below the budget, the map stays
    np.testing.assert_array_equal(rows.take(np.arange(12)), expected[:12])
    assert len(maps._open) == 0  # two runs of rows, each mapping up to 64 KiB (fault-around): past the budget, closed
    np.testing.assert_array_equal(np.concatenate(list(rows.chunks(9))), expected)
