"""The features stage: one incremental cache per backbone, per-split views that the train /
evaluate / retrieval stages read through split_arrays, digests per split, precomputed features."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flows.stages.features import run_features
from flows.stages.files import split_arrays
from geodata.osv5m import LEVELS
from hierloc.features.views import load_features

ID0 = 4_000_000_000_000_000 // 1000  # 13-digit ids, like Mapillary's


def _jpeg(seed: int) -> bytes:
    block = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(block).resize((40, 32), Image.NEAREST).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write_split(ingest: Path, hierarchy: Path, split: str, ids: np.ndarray) -> None:
    """A manifest and an assignment table as the ingest and hierarchy stages write them (the columns read here)."""
    (ingest / "manifest").mkdir(parents=True, exist_ok=True)
    hierarchy.mkdir(parents=True, exist_ok=True)
    m = pd.DataFrame({"id": ids, "latitude": np.linspace(-40, 40, len(ids)), "longitude": np.linspace(-100, 100, len(ids)),
                      "image_container": [f"images/{split}/00.zip"] * len(ids), "image_member": [f"{i}.jpg" for i in ids]})
    m.to_parquet(ingest / "manifest" / f"{split}.parquet", index=False)
    a = pd.DataFrame({"id": ids, **{f"{lvl}_index": np.zeros(len(ids), np.int64) for lvl in LEVELS}})
    a.to_parquet(hierarchy / f"assignments_{split}.parquet", index=False)


def _data(root: Path, split: str, ids: np.ndarray, broken: set[int] = frozenset()) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "images" / split / "00.zip", "w") as zf:
        for i in ids:
            zf.writestr(f"{i}.jpg", b"not a jpeg" if i in broken else _jpeg(int(i)))


def _both_splits(tmp_path: Path, train: np.ndarray, test: np.ndarray,
                 broken: set[int] = frozenset()) -> tuple[Path, Path, Path]:
    """Images (train ids in ``broken`` unreadable) and the upstream tables of both splits under
    ``tmp_path``: (data, ingest, hierarchy)."""
    data, ingest, hier = tmp_path / "data", tmp_path / "ingest", tmp_path / "hierarchy"
    _data(data, "train", train, broken=broken)
    _data(data, "test", test)
    _write_split(ingest, hier, "train", train)
    _write_split(ingest, hier, "test", test)
    return data, ingest, hier


def test_a_grown_manifest_encodes_only_its_new_images(tmp_path):
    data, ingest, hier, feats_root = tmp_path / "data", tmp_path / "ingest", tmp_path / "hierarchy", tmp_path / "features"
    train, test = ID0 + np.arange(20), ID0 + 100 + np.arange(6)
    _data(data, "train", train, broken={int(train[3])})
    _data(data, "test", test)
    _write_split(ingest, hier, "train", train[:14])
    _write_split(ingest, hier, "test", test)
    first = run_features(data, ingest, feats_root, num_workers=0, shard_size=8, max_bad_fraction=1.0)  # 1 of 14 broken
    assert (first["train"]["encoded"], first["test"]["encoded"], first["train"]["failures"]) == (14, 6, 1)
    assert first["dirs"]["train"] != first["dirs"]["test"] and Path(first["cache"]).parent == feats_root / "cache"

    m, x, targets, latlon, dropped = split_arrays(ingest, hier, Path(first["dirs"]["train"]), "train")
    assert dropped == 1 and len(x) == 13 and int(train[3]) not in m["id"].tolist()  # the broken image: NaN, dropped
    np.testing.assert_array_equal(x, load_features(Path(first["cache"]), m["id"].to_numpy()))
    assert targets.shape == (13, len(LEVELS)) and latlon.shape == (13, 2)

    order = np.r_[train[14:], train[:14][::-1]]  # a scheduled re-run: 6 new rows, another order
    _write_split(ingest, hier, "train", order)
    second = run_features(data, ingest, feats_root, num_workers=0, shard_size=8, max_bad_fraction=1.0)
    assert (second["train"]["encoded"], second["train"]["cached"], second["test"]["encoded"]) == (6, 14, 0)
    assert second["cache"] == first["cache"]  # the same backbone: one cache
    assert second["digests"]["test"] == first["digests"]["test"] and second["dirs"]["test"] == first["dirs"]["test"]
    assert second["digests"]["train"] != first["digests"]["train"] and second["dirs"]["train"] != first["dirs"]["train"]
    m2, x2, *_ = split_arrays(ingest, hier, Path(second["dirs"]["train"]), "train")
    assert m2["id"].tolist() == [i for i in order.tolist() if i != train[3]]  # aligned with the manifest
    np.testing.assert_array_equal(x2[6:], x[::-1])  # the cached rows, unchanged

    _write_split(ingest, hier, "train", ID0 + np.arange(25))  # 5 ids the last features run never saw
    with pytest.raises(KeyError, match=r"5 of 25 requested ids have no cached features"):
        split_arrays(ingest, hier, Path(second["dirs"]["train"]), "train")


def test_precomputed_features_are_checked_not_computed(tmp_path):
    ingest, hier = tmp_path / "ingest", tmp_path / "hierarchy"
    train, test = ID0 + np.arange(10), ID0 + 50 + np.arange(4)
    _write_split(ingest, hier, "train", train)
    _write_split(ingest, hier, "test", test)
    every = np.r_[test, train][::-1]  # shards in another order than the manifests, as a WebDataset copy holds them
    vecs = np.random.default_rng(0).normal(size=(len(every), 12)).astype(np.float32)
    folder = ingest / "features" / "street_clip"
    folder.mkdir(parents=True)
    for s, sl in enumerate((slice(0, 5), slice(5, None))):
        np.savez(folder / f"shard-{s:05d}.npz", ids=every[sl], feats=vecs[sl])
    out = run_features(tmp_path / "no-images", ingest, tmp_path / "features", backbone="precomputed:street_clip")
    assert out["dim"] == 12 and out["train"]["encoded"] == 0 and Path(out["cache"]) == folder
    m, x, *_ = split_arrays(ingest, hier, Path(out["dirs"]["train"]), "train")
    np.testing.assert_array_equal(x, vecs[[int(np.flatnonzero(every == i)[0]) for i in m["id"]]])

    np.savez(folder / "shard-00001.npz", ids=every[5:-1], feats=vecs[5:-1])  # the ingest lost one sample
    with pytest.raises(ValueError, match=rf"1 of 4 test manifest ids have no features .*e\.g\. id {every[-1]}"):
        run_features(tmp_path / "no-images", ingest, tmp_path / "features", backbone="precomputed:street_clip")
    with pytest.raises(ValueError, match="plain folder name"):
        run_features(tmp_path, ingest, tmp_path / "features", backbone="precomputed:../manifest")
    with pytest.raises(FileNotFoundError, match=r"no feature shards in .*dinov2"):
        run_features(tmp_path, ingest, tmp_path / "features", backbone="precomputed:dinov2")


def test_tar_rows_pass_their_offsets_to_the_reader(tmp_path):
    """A WebDataset manifest's image_offset / image_size reach the reader (a wrong offset fails that image)."""
    data, ingest, hier = tmp_path / "data", tmp_path / "ingest", tmp_path / "hierarchy"
    ids = ID0 + np.arange(3)
    (data / "train").mkdir(parents=True)
    with tarfile.open(data / "train" / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for i in ids:
            info = tarfile.TarInfo(f"{i}.jpg")
            info.size = len(_jpeg(int(i)))
            tf.addfile(info, io.BytesIO(_jpeg(int(i))))
    with tarfile.open(data / "train" / "00000.tar") as tf:  # as the ingest's image index records them
        offsets = {int(m.name[:-4]): (m.offset_data, m.size) for m in tf.getmembers()}
    _write_split(ingest, hier, "test", ids[:0])
    _write_split(ingest, hier, "train", ids)
    m = pd.read_parquet(ingest / "manifest" / "train.parquet")
    m["image_container"] = "train/00000.tar"
    m["image_offset"] = [offsets[i][0] + (512 if k == 1 else 0) for k, i in enumerate(ids)]  # row 1: stale
    m["image_size"] = [offsets[i][1] for i in ids]
    m.to_parquet(ingest / "manifest" / "train.parquet", index=False)
    out = run_features(data, ingest, tmp_path / "features", num_workers=0, max_bad_fraction=1.0)  # 1 of 3 fails
    assert (out["train"]["encoded"], out["train"]["failures"], out["test"]["n"]) == (3, 1, 0)


def test_a_wrong_image_root_fails_the_stage_with_the_count_and_first_failures(tmp_path):
    """Every image unreadable (the images are read from the wrong folder): no NaN features for
    training to go on with, a clear error instead (flows.stages.faults.FeatureFailureError)."""
    train, test = ID0 + np.arange(12), ID0 + 100 + np.arange(4)
    data, ingest, hier = _both_splits(tmp_path, train, test)
    with pytest.raises(ValueError) as err:
        run_features(tmp_path / "elsewhere", ingest, tmp_path / "features", num_workers=0)
    msg = str(err.value)
    assert "12 of 12 images could not be read (100.00%" in msg and "max_bad_fraction=0.05" in msg
    assert f"id {train[0]}:" in msg and "elsewhere" in msg and "retry_failed" in msg


def test_a_few_failures_below_the_ceiling_pass_counted_and_logged(tmp_path, caplog):
    train, test = ID0 + np.arange(40), ID0 + 100 + np.arange(4)
    data, ingest, hier = _both_splits(tmp_path, train, test, broken={int(train[5])})  # 1 of 40: 2.5 %, under the default 5 %
    with caplog.at_level("WARNING", logger="flows.stages"):
        out = run_features(data, ingest, tmp_path / "features", num_workers=0)
    assert out["train"]["failures"] == 1 and out["test"]["failures"] == 0
    assert any("1 of 40 images could not be read (2.50%" in r.getMessage() and f"id {train[5]}" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match=r"1 of 40 images .*max_bad_fraction=0\.02"):  # the same, above a lower ceiling
        run_features(data, ingest, tmp_path / "features", num_workers=0, max_bad_fraction=0.02)


def test_the_ceiling_is_a_validated_parameter():
    from pydantic import ValidationError

    from flows.params import FeatureParams

    assert FeatureParams().max_bad_fraction == 0.05
    with pytest.raises(ValidationError, match="max_bad_fraction"):
        FeatureParams(max_bad_fraction=1.5)


def test_reduced_scale_and_full_decoding_keep_separate_caches(tmp_path):
    """features.fast_decode: reduced-scale JPEG decoding (the default) gives slightly other features, so
    its own cache and digests; the full decode keeps the cache it had before (its features are the same)."""
    from flows.params import FeatureParams

    train, test, feats_root = ID0 + np.arange(6), ID0 + 100 + np.arange(3), tmp_path / "features"
    data, ingest, hier = _both_splits(tmp_path, train, test)
    full = run_features(data, ingest, feats_root, num_workers=0, fast_decode=False)
    fast = run_features(data, ingest, feats_root, num_workers=0)
    assert FeatureParams().fast_decode is True
    assert fast["cache"] != full["cache"] and fast["weights"] != full["weights"]
    assert (fast["train"]["encoded"], fast["test"]["encoded"]) == (6, 3)  # nothing taken from the other cache
    assert fast["digests"]["train"] != full["digests"]["train"]
    again = run_features(data, ingest, feats_root, num_workers=0, fast_decode=False)
    assert again["cache"] == full["cache"] and again["train"]["encoded"] == 0


def test_the_device_decoder_is_a_setting_with_its_own_cache(tmp_path):
    """features.decoder: 'pil' by default; 'device' (decode_jpeg on the stage's device) encodes into its
    own cache, reaches the stage's outputs, and a wrong name is refused by the settings."""
    from pydantic import ValidationError

    from flows.params import FeatureParams

    train, test, feats_root = ID0 + np.arange(4), ID0 + 100 + np.arange(2), tmp_path / "features"
    data, ingest, hier = _both_splits(tmp_path, train, test)
    pil = run_features(data, ingest, feats_root, num_workers=0)
    dev = run_features(data, ingest, feats_root, num_workers=0, decoder="device")
    assert FeatureParams().decoder == "pil" and FeatureParams(decoder="device").decoder == "device"
    with pytest.raises(ValidationError, match="decoder"):
        FeatureParams(decoder="gpu")
    assert (pil["decoder"], dev["decoder"]) == ("pil", "device")
    # the device decoder decodes at full size: the bundle tells serving to decode at full size too
    assert (pil["fast_decode"], dev["fast_decode"]) == (True, False)
    assert dev["cache"] != pil["cache"] and dev["digests"]["train"] != pil["digests"]["train"]
    assert (dev["train"]["encoded"], dev["test"]["encoded"], dev["train"]["failures"]) == (4, 2, 0)
