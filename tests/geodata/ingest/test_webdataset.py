"""Tests for geodata.ingest.webdataset and the WebDataset path of geodata.ingest.run.

The shards are built by `geodata.ingest.webdataset.write_shard` in the documented layout
(<key>.jpg, <key>.json, <key>.<name>.npy) from the real osv5m-sample rows and photos.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geodata.ingest.archive_members import UnsafeMemberError
from geodata.ingest.image_decode import decode_image
from geodata.ingest.image_store import ImageStore
from geodata.ingest.run import IngestError, ingest_osv5m
from geodata.ingest.webdataset import feature_shard_path, json_to_raw, split_key, write_shard
from geodata.osv5m import OSV5M_COLUMNS

SAMPLE = Path(os.environ["HIERLOC_OSV5M_SAMPLE"])
DIMS = {"street_clip": 8, "dinov2_vitl14_registers": 12}


def sample_metadata() -> list[dict[str, object]]:
    """JSON metadata for every sample photo: select.csv's coordinates and labels, else synthetic ones."""
    select = pd.read_csv(SAMPLE / "select.csv", dtype={"id": str}, keep_default_na=False).set_index("id")
    rows = []
    for n, path in enumerate(sorted((SAMPLE / "images").glob("*.jpg"))):
        meta: dict[str, object] = {c: f"{c}-v" for c in OSV5M_COLUMNS}
        image_id = path.stem
        if image_id in select.index:
            r = select.loc[image_id]
            meta.update(latitude=float(r.true_lat), longitude=float(r.true_lon), country=r.country,
                        region=r.region, city=r.city, **{"sub-region": r.area})
        else:
            meta.update(latitude=-22.5 + n, longitude=17.25 + n, country="NA", region="Khomas",
                        **{"sub-region": None})
        meta["id"] = int(image_id)
        meta["unique_country"] = meta["country"]
        rows.append(meta)
    return rows


def vectors(image_id: int) -> dict[str, np.ndarray]:
    """Deterministic per-id feature vectors."""
    rng = np.random.default_rng(image_id % (2**32))
    return {name: rng.normal(size=d).astype(np.float32) for name, d in DIMS.items()}


def make_samples(metas: list[dict[str, object]]) -> list[dict[str, object]]:
    return [
        {"key": str(m["id"]), "json": m, "jpg": (SAMPLE / "images" / f"{m['id']}.jpg").read_bytes(),
         "npy": vectors(int(m["id"]))}  # type: ignore[arg-type]
        for m in metas
    ]


def make_wds(root: Path, per_shard: int = 8) -> list[dict[str, object]]:
    """root/train/0000k.tar shards of the sample photos; returns the metadata written."""
    metas = sample_metadata()
    samples = make_samples(metas)
    for k in range(0, len(samples), per_shard):
        write_shard(root / "train" / f"{k // per_shard:05d}.tar", samples[k : k + per_shard])
    return metas


def jpeg_bytes(size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (20, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def test_key_and_json_values_follow_the_release_spelling() -> None:
    assert split_key("a/b/123.street_clip.npy") == ("a/b/123", "street_clip.npy")
    assert split_key("123.jpg") == ("123", "jpg")
    assert json_to_raw(None) == "" and json_to_raw(float("nan")) == ""
    assert json_to_raw(4887875507910938) == "4887875507910938"
    assert float(json_to_raw(45.00536463123456)) == 45.00536463123456  # exact round trip
    assert json_to_raw("NA") == "NA"


def test_webdataset_ingest_rows_images_and_features(tmp_path: Path) -> None:
    metas = make_wds(tmp_path / "wds")
    out = tmp_path / "out"
    report = ingest_osv5m(tmp_path / "wds", out, splits=("train",))  # auto-detected, images decoded
    assert report.layout == "webdataset" and report.ok
    s = report.splits["train"]
    assert (s.n_in, s.n_kept, s.n_quarantined) == (22, 22, 0)
    assert s.features == DIMS

    m = pd.read_parquet(out / "manifest/train.parquet")
    assert m["id"].tolist() == [int(x["id"]) for x in metas]  # shard order, sample order
    assert m["id"].dtype == "int64" and m["latitude"].dtype == "float64"
    namibia = m.loc[m["country"] == "NA"]
    assert len(namibia) == 16 and (namibia["sub-region"] == "").all()  # "NA" stays a string, null -> ""
    select = pd.read_csv(SAMPLE / "select.csv", dtype={"id": "int64"})
    located = m.merge(select, on="id")
    assert len(located) == 6
    np.testing.assert_array_equal(located["latitude"], located["true_lat"])
    assert m["line"].tolist() == [*range(1, 9), *range(1, 9), *range(1, 7)]  # sample number in its shard

    # The image reference points straight at the jpg bytes inside the tar.
    store = ImageStore(tmp_path / "wds")
    for r in m.sample(5, random_state=0).itertuples():
        data = store.read_bytes(r.image_container, r.image_member, offset=r.image_offset, size=r.image_size)
        assert data == (SAMPLE / "images" / f"{r.id}.jpg").read_bytes()
        assert store.open(r.image_container, r.image_member).size == decode_image(data, "x").size  # lazy index
    with pytest.raises(KeyError, match="offset"):
        r = m.iloc[0]
        store.read_bytes(r.image_container, r.image_member, offset=int(r.image_offset) + 512, size=int(r.image_size))

    index = pd.read_parquet(out / "image_index/train.parquet")
    assert len(index) == 22 and index["offset"].notna().all()

    for name, dim in DIMS.items():
        paths = sorted((out / "features" / name).glob("shard-*.npz"))
        assert [p.name for p in paths] == [f"shard-train-0000{k}.npz" for k in range(3)]
        assert paths[0] == feature_shard_path(out, name, "train", "00000.tar")
        ids = np.concatenate([np.load(p)["ids"] for p in paths])
        feats = np.concatenate([np.load(p)["feats"] for p in paths])
        assert ids.dtype == np.int64 and feats.dtype == np.float32 and feats.shape == (22, dim)
        assert ids.tolist() == m["id"].tolist()
        np.testing.assert_array_equal(feats[3], vectors(int(ids[3]))[name])


def test_csv_and_webdataset_give_the_same_canonical_rows(tmp_path: Path) -> None:
    from tests.geodata.ingest.test_run import write_csv

    metas = make_wds(tmp_path / "wds")
    csv_root = tmp_path / "csv"
    csv_root.mkdir()
    write_csv(csv_root / "train.csv", [{c: json_to_raw(m.get(c)) for c in OSV5M_COLUMNS} for m in metas])
    ingest_osv5m(csv_root, tmp_path / "a", splits=("train",), verify_images="none")
    ingest_osv5m(tmp_path / "wds", tmp_path / "b", splits=("train",), verify_images="none")
    a = pd.read_parquet(tmp_path / "a/manifest/train.parquet")[list(OSV5M_COLUMNS)]
    b = pd.read_parquet(tmp_path / "b/manifest/train.parquet")[list(OSV5M_COLUMNS)]
    pd.testing.assert_frame_equal(a, b)


def test_each_webdataset_quarantine_reason(tmp_path: Path) -> None:
    metas = sample_metadata()[:9]
    good = make_samples(metas)
    bad_dim = dict(good[5], npy={**vectors(5), "street_clip": np.ones(3, np.float32)})
    samples = [
        good[0],
        {"key": "no_json", "json": None, "jpg": jpeg_bytes(), "npy": vectors(1)},  # metadata_invalid
        {"key": "broken", "json": b"{not json", "jpg": jpeg_bytes(), "npy": vectors(2)},  # metadata_invalid
        dict(good[1], jpg=None),  # image_missing
        dict(good[2], jpg=b"\xff\xd8 not a jpeg"),  # image_corrupt
        bad_dim,  # feature_invalid (wrong D)
        dict(good[6], npy={"street_clip": vectors(6)["street_clip"]}),  # feature_invalid (missing dinov2)
        dict(good[0], key="copy"),  # duplicate_id (json id of good[0])
        dict(good[7], json={**metas[7], "latitude": 95.0}),  # latitude_out_of_range
        good[8],
    ]
    write_shard(tmp_path / "wds/train/00000.tar", samples)
    report = ingest_osv5m(tmp_path / "wds", tmp_path / "out", splits=("train",), max_bad_fraction=1.0,
                          features=tuple(DIMS))
    q = pd.read_parquet(tmp_path / "out/quarantine.parquet")
    assert q[["line", "reason"]].values.tolist() == [
        [2, "metadata_invalid"], [3, "metadata_invalid"], [4, "image_missing"], [5, "image_corrupt"],
        [6, "feature_invalid"], [7, "feature_invalid"], [8, "duplicate_id"], [9, "latitude_out_of_range"],
    ]
    assert (q["file"] == "train/00000.tar").all()
    assert "no .json" in q["value"].iloc[0] and "3 values" in q["value"].iloc[4]
    assert "dinov2_vitl14_registers" in q["value"].iloc[5]
    s = report.splits["train"]
    assert (s.n_in, s.n_kept, s.n_quarantined) == (10, 2, 8)
    kept = pd.read_parquet(tmp_path / "out/manifest/train.parquet")["id"].tolist()
    assert kept == [int(metas[0]["id"]), int(metas[8]["id"])]
    ids = np.load(tmp_path / "out/features/street_clip/shard-train-00000.npz")["ids"]
    assert ids.tolist() == kept  # features only for kept rows: no duplicate ids in the cache


def _tar_with(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def test_link_and_device_members_are_quarantined_never_read(tmp_path: Path) -> None:
    meta = sample_metadata()[0]
    image_id = str(meta["id"])
    import json

    members = [tarfile.TarInfo(f"{image_id}.json"), tarfile.TarInfo(f"{image_id}.street_clip.npy")]
    link = tarfile.TarInfo(f"{image_id}.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("2.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, f"{image_id}.json"
    dev = tarfile.TarInfo("3.jpg")
    dev.type = tarfile.CHRTYPE
    from geodata.ingest.webdataset import npy_bytes

    data = {f"{image_id}.json": json.dumps(meta).encode(), f"{image_id}.street_clip.npy": npy_bytes(np.ones(4))}
    m2 = {**meta, "id": 2}
    m3 = {**meta, "id": 3}
    extra = [tarfile.TarInfo("2.json"), tarfile.TarInfo("3.json")]
    data.update({"2.json": json.dumps(m2).encode(), "3.json": json.dumps(m3).encode()})
    _tar_with(tmp_path / "wds/train/00000.tar", [members[0], members[1], link, hard, extra[0], dev, extra[1]], data)
    ingest_osv5m(tmp_path / "wds", tmp_path / "out", splits=("train",), max_bad_fraction=1.0, features=())
    q = pd.read_parquet(tmp_path / "out/quarantine.parquet")
    assert q["reason"].tolist() == ["image_unsafe"] * 3
    assert "symlink" in q["value"].iloc[0] and "hardlink" in q["value"].iloc[1] and "device" in q["value"].iloc[2]
    store = ImageStore(tmp_path / "wds")
    with pytest.raises(UnsafeMemberError, match="symlink"):
        store.read_bytes("train/00000.tar", f"{image_id}.jpg")


@pytest.mark.parametrize("bad_name", ["../evil.jpg", "/abs/evil.jpg", "C:/evil.jpg", "a/../../evil.json"])
def test_escaping_member_name_refuses_the_whole_shard(tmp_path: Path, bad_name: str) -> None:
    samples = make_samples(sample_metadata()[:2])
    write_shard(tmp_path / "wds/train/00000.tar", samples)
    with tarfile.open(tmp_path / "wds/train/00000.tar", "a") as tf:
        info = tarfile.TarInfo(bad_name)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    # The shard is refused whole: its 2 samples and the hostile member's own are quarantined (was:
    # the ingest stopped with UnsafeMemberError and no report); all rows are bad, so the run fails.
    with pytest.raises(IngestError, match=r"train: 3 of 3 rows quarantined.*image_unsafe"):
        ingest_osv5m(tmp_path / "wds", tmp_path / "out", splits=("train",))
    assert not (tmp_path / "out/manifest/train.parquet").exists()
    assert not any(tmp_path.glob("**/evil*"))  # nothing extracted anywhere
    q = pd.read_parquet(tmp_path / "out/quarantine.parquet")
    assert q["reason"].tolist() == ["image_unsafe"] * 3
    assert q["value"].str.contains(r"shard train/00000\.tar refused: member .*evil", regex=True).all()


def test_new_tar_shard_is_the_only_one_read(tmp_path: Path) -> None:
    metas = make_wds(tmp_path / "wds", per_shard=11)
    shard1 = tmp_path / "wds/train/00001.tar"
    held_back = shard1.read_bytes()
    shard1.unlink()
    first = ingest_osv5m(tmp_path / "wds", tmp_path / "out", splits=("train",), verify_images="exists")
    assert first.splits["train"].n_in == 11
    shard1.write_bytes(held_back)
    second = ingest_osv5m(tmp_path / "wds", tmp_path / "out", splits=("train",), verify_images="exists")
    s = second.splits["train"]
    assert (s.mode, s.n_in, s.n_kept, s.kept_total) == ("append", 11, 11, 22)
    assert s.manifest_digest != first.splits["train"].manifest_digest
    m = pd.read_parquet(tmp_path / "out/manifest/train.parquet")
    assert sorted(m["id"]) == sorted(int(x["id"]) for x in metas)
    assert len(list((tmp_path / "out/features/street_clip").glob("shard-*.npz"))) == 2
    assert ingest_osv5m(tmp_path / "wds", tmp_path / "out", splits=("train",), verify_images="exists").noop


def test_float16_vectors_are_stored_as_float16(tmp_path: Path) -> None:
    """OSV-5M's precomputed vectors are float16: their shard keeps them so (half the bytes);
    a shard holding one float32 vector keeps float32 (exact for both)."""
    samples = make_samples(sample_metadata())
    for s in samples:
        s["npy"] = {"street_clip": s["npy"]["street_clip"].astype(np.float16)}  # type: ignore[index]
    samples[12]["npy"]["street_clip"] = samples[12]["npy"]["street_clip"].astype(np.float32)  # type: ignore[index]
    write_shard(tmp_path / "wds/train/00000.tar", samples[:11])
    write_shard(tmp_path / "wds/train/00001.tar", samples[11:])
    report = ingest_osv5m(tmp_path / "wds", tmp_path / "out", splits=("train",), verify_images="none")
    assert report.ok and report.splits["train"].n_kept == 22
    half, mixed = sorted((tmp_path / "out/features/street_clip").glob("shard-*.npz"))
    for path, dtype, part in ((half, np.float16, samples[:11]), (mixed, np.float32, samples[11:])):
        with np.load(path) as z:
            assert z["feats"].dtype == dtype
            np.testing.assert_array_equal(z["feats"], np.stack([p["npy"]["street_clip"] for p in part]).astype(dtype))


def _npy_claiming(shape: tuple[int, ...], values: np.ndarray) -> bytes:
    """A .npy whose header declares `shape` but holds only `values`' bytes."""
    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(values)
    np.lib.format.write_array_header_1_0(buf, {**header, "shape": shape})
    return buf.getvalue() + values.tobytes()


def test_oversized_and_lying_members_are_quarantined_never_read(tmp_path: Path, sparse_tar, traced_peak) -> None:
    import json

    from geodata.ingest.webdataset import npy_bytes

    metas = sample_metadata()[:6]
    keys = [str(m["id"]) for m in metas]
    photo = (SAMPLE / "images" / f"{keys[0]}.jpg").read_bytes()

    def sample(i: int, jpg: bytes | int = photo, meta: bytes | int | None = None, npy: bytes | int | None = None):
        return [(f"{keys[i]}.jpg", jpg), (f"{keys[i]}.json", meta if meta is not None else json.dumps(metas[i]).encode()),
                (f"{keys[i]}.street_clip.npy", npy if npy is not None else npy_bytes(vectors(i)["street_clip"]))]

    sparse_tar(tmp_path / "wds/train/00000.tar", [
        *sample(0),
        *sample(1, jpg=300 * 2**20),  # a 300 MiB photo (a hole in the file)
        *sample(2, meta=10 * 2**20),  # 10 MiB of metadata
        *sample(3, npy=_npy_claiming((10**10,), np.ones(8, np.float32))),  # header claims 40 GB
        *sample(4, npy=2**30),  # a 1 GiB feature
        *sample(5, meta=b"[" * 50_000),  # nested past Python's recursion limit
    ])
    with traced_peak() as peak:
        report = ingest_osv5m(tmp_path / "wds", tmp_path / "out", splits=("train",), max_bad_fraction=1.0,
                              features=("street_clip",))
    assert peak[0] < 32 * 2**20, peak
    q = pd.read_parquet(tmp_path / "out/quarantine.parquet")
    assert q[["line", "id", "reason"]].values.tolist() == [
        [2, keys[1], "image_unsafe"], [3, keys[2], "metadata_invalid"], [4, keys[3], "feature_invalid"],
        [5, keys[4], "feature_invalid"], [6, keys[5], "metadata_invalid"],
    ]
    value = dict(zip(q["line"], q["value"]))
    assert value[2] == "image is 300 MiB (314,572,800 bytes), over the 64 MiB image cap; refused, not read"
    assert value[3].startswith(f"{keys[2]}.json: metadata is 10 MiB (10,485,760 bytes), over the 64 KiB metadata cap")
    assert value[4].startswith(f"{keys[3]}.street_clip.npy: not a .npy array (header declares shape (10000000000,)")
    assert value[5].startswith(f"{keys[4]}.street_clip.npy: feature is 1 GiB (1,073,741,824 bytes), over the")
    assert value[6].startswith(f"{keys[5]}.json: not valid UTF-8 JSON (")
    s = report.splits["train"]
    assert (s.n_in, s.n_kept, s.n_quarantined) == (6, 1, 5)
