"""Backbone features: the incremental cache by image id, resume after SIGKILL, image modes,
real photos through DataLoader workers, and backbone content keys.

Images are generated in each test (or are the real OSV-5M sample photos) and packed into zip
shards read by the real geodata.ingest.image_store.ImageStore; the models are weight-free (pixelstats)
or tiny random-init open_clip / timm towers.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from geodata.ingest.image_store import ImageStore
from hierloc.features.backbones import load_backbone, parse_spec
from hierloc.features.cache import scan_cache
from hierloc.features.extract import effective_precision, extract_features
from hierloc.features.views import features_digest, load_features, resolve_feature_dir, write_view

ROOT = Path(__file__).resolve().parents[3]
SAMPLE_PHOTOS = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images"
#: An open_clip ViT small enough for tests: 2 layers of width 64 on 64 px inputs (0.15M parameters,
#: ~18k images/s at batch 32 on 2 CPU threads; ViT-S-32 is 22.6M and ~70 images/s, RN50 ~13).
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _jpeg(seed: int, size=(48, 40), **save) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # coarse blocks survive JPEG compression
    img = Image.fromarray(base).resize(size, Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **save)
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _dataset(root: Path, n: int, shards: int = 2) -> tuple[np.ndarray, list[str], list[str]]:
    """n generated JPEGs over ``shards`` zips under root/images; (ids, containers, members)."""
    ids = np.arange(1_000_000_000_000, 1_000_000_000_000 + n, dtype=np.int64) * 7  # 16-digit, like Mapillary's
    containers = [f"images/train/{i % shards:02d}.zip" for i in range(n)]
    for s in range(shards):
        _zip(root / f"images/train/{s:02d}.zip", {f"{ids[i]}.jpg": _jpeg(i) for i in range(n) if i % shards == s})
    return ids, containers, [f"{i}.jpg" for i in ids]


def _direct(backbone, store: ImageStore, containers, members) -> np.ndarray:
    """Reference: decode (at the scale the backbone decodes at, hierloc.features.decode) and encode one
    image at a time, no DataLoader, no batches, no cache."""
    plan = backbone.decoding
    decode = {} if plan.min_side is None else {"min_side": plan.min_side}
    with torch.no_grad():
        return np.concatenate([backbone.encode(plan.to_model(plan.worker(store.open(c, m, **decode))[None])).numpy()
                               for c, m in zip(containers, members)])


@pytest.fixture(scope="module")
def pixelstats():
    return load_backbone("fixed:pixelstats")


@pytest.fixture(scope="module")
def tiny_clip_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clipcfg") / "hierloc-test-tiny-vit.json"
    path.write_text(json.dumps(TINY_CLIP))
    return f"open_clip:{path}"


def test_incremental_cache_encodes_only_new_ids_and_loads_in_request_order(tmp_path, pixelstats):
    ids, containers, members = _dataset(tmp_path, 30)
    store, cache = ImageStore(tmp_path), tmp_path / "cache"
    kw = dict(batch_size=4, shard_size=7, num_workers=0)
    first = extract_features(ids[:20], containers[:20], members[:20], store.open, pixelstats, cache, **kw).summary()
    assert (first["encoded"], first["cached"], first["shards"]) == (20, 0, 3)  # 7 + 7 + 6
    perm = np.random.default_rng(0).permutation(30)  # a later manifest: more rows, another order
    second = extract_features(ids[perm], [containers[i] for i in perm], [members[i] for i in perm], store.open,
                              pixelstats, cache, **kw).summary()
    assert (second["requested"], second["encoded"], second["cached"], second["shards"]) == (30, 10, 20, 2)
    assert len(list(cache.glob("shard-*.npz"))) == 5
    assert len(extract_features(ids, containers, members, store.open, pixelstats, cache, **kw).encoded_ids) == 0

    one_shot = tmp_path / "one_shot"
    extract_features(ids, containers, members, store.open, pixelstats, one_shot, batch_size=16, shard_size=100, num_workers=0)
    order = np.random.default_rng(1).permutation(30)
    got = load_features(cache, ids[order])
    np.testing.assert_array_equal(got, load_features(one_shot, ids[order]))
    ref = _direct(pixelstats, store, [containers[i] for i in order], [members[i] for i in order])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match=r"1 of 3 requested ids .*e\.g\. id 5\b"):
        load_features(cache, np.array([ids[0], 5, ids[1]]))


_KILL_SCRIPT = """
import os, signal, sys
import numpy as np
from geodata.ingest.image_store import ImageStore
from hierloc.features.backbones import load_backbone
from hierloc.features.extract import extract_features
root, kill_at = sys.argv[1], int(sys.argv[2])
ids = np.load(root + "/ids.npy")
containers = [f"images/train/{i % 2:02d}.zip" for i in range(len(ids))]
def progress(done, total, secs):
    if done >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
extract_features(ids, containers, [f"{i}.jpg" for i in ids], ImageStore(root).open, load_backbone("fixed:pixelstats"),
                 root + "/cache", batch_size=4, shard_size=8, num_workers=0, progress=progress)
"""


def test_sigkill_midway_resumes_where_it_stopped(tmp_path, pixelstats):
    ids, containers, members = _dataset(tmp_path, 30)
    np.save(tmp_path / "ids.npy", ids)
    cache = tmp_path / "cache"
    # Killed after 20 images: shards 0-1 (16 images) are written, the 4 after them are lost.
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), "20"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in cache.glob("shard-*.npz")) == ["shard-00000.npz", "shard-00001.npz"]
    assert len(scan_cache(cache).ids) == 16
    (cache / ".shard-00002.npz.deadbeef.tmp").write_bytes(b"half a shard")  # as a kill during a write leaves it
    resumed = extract_features(ids, containers, members, ImageStore(tmp_path).open, pixelstats, cache,
                               batch_size=4, shard_size=8, num_workers=0).summary()
    assert (resumed["encoded"], resumed["cached"]) == (14, 16)
    assert not list(cache.glob(".*.tmp"))
    one_shot = tmp_path / "one_shot"
    extract_features(ids, containers, members, ImageStore(tmp_path).open, pixelstats, one_shot, num_workers=0)
    np.testing.assert_array_equal(load_features(cache, ids), load_features(one_shot, ids))


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, quality=95)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _two_colour(size=(96, 64)) -> Image.Image:
    """Left half red, right half blue: rotating it moves the colours to top and bottom."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2, 0] = 255
    a[:, size[0] // 2 :, 2] = 255
    return Image.fromarray(a)


def test_every_image_mode_and_exif_orientation(tmp_path, pixelstats):
    rgb = Image.open(io.BytesIO(_jpeg(3, (64, 48)))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    _two_colour().save(buf, "JPEG", quality=95, exif=exif.tobytes())
    exif_jpeg = buf.getvalue()
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    modes = {
        "gray.jpg": _save(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "rgba.png": _png(rgb.convert("RGBA")),
        "la.png": _png(rgb.convert("LA")),
        "palette_transparent.png": _png(pal),
        "gray16.png": _png(Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257))),
        "exif_rotated.jpg": exif_jpeg,
        "rotated_by_hand.jpg": _save(ImageOps.exif_transpose(Image.open(io.BytesIO(exif_jpeg))), "JPEG"),
        "unrotated.jpg": _save(_two_colour(), "JPEG"),
        "truncated.jpg": _jpeg(4)[:300],
        "not_an_image.jpg": b"<html>404</html>",
    }
    _zip(tmp_path / "modes.zip", modes)
    ids = np.arange(len(modes), dtype=np.int64)
    stats = extract_features(ids, ["modes.zip"] * len(ids), list(modes), ImageStore(tmp_path).open, pixelstats,
                             tmp_path / "cache", batch_size=4, num_workers=2).summary()
    feats = load_features(tmp_path / "cache", ids)
    ok = np.isfinite(feats).all(axis=1)
    assert ok.tolist() == [True] * 9 + [False, False]  # the two broken files: NaN rows, the rest decoded
    assert stats["failures"] == 2
    reasons = json.loads((tmp_path / "cache" / "failures.json").read_text())
    assert set(reasons) == {"9", "10"} and "truncated.jpg" in reasons["9"] and "not_an_image.jpg" in reasons["10"]
    grid = feats[:, : 8 * 8 * 3]  # pixelstats' colour layout
    exif_row, by_hand, unrotated = grid[6], grid[7], grid[8]
    assert np.abs(exif_row - by_hand).max() < 0.05  # EXIF orientation applied before the transform
    assert np.abs(exif_row - unrotated).max() > 0.5


def test_retry_failed_reads_a_repaired_image_and_the_newest_shard_wins(tmp_path, pixelstats):
    ids = np.array([11, 12, 13], np.int64)
    members = [f"{i}.jpg" for i in ids]
    _zip(tmp_path / "s.zip", {"11.jpg": _jpeg(11), "12.jpg": b"broken", "13.jpg": _jpeg(13)})
    cache, run = tmp_path / "cache", lambda **kw: extract_features(ids, ["s.zip"] * 3, members, ImageStore(tmp_path).open,
                                                                   pixelstats, cache, num_workers=0, **kw).summary()
    assert run()["failures"] == 1 and np.isnan(load_features(cache, ids[1:2])).all()
    _zip(tmp_path / "s.zip", {"11.jpg": _jpeg(11), "12.jpg": _jpeg(12), "13.jpg": _jpeg(13)})  # repaired
    assert run()["encoded"] == 0 and scan_cache(cache).failures.keys() == {12}  # cached, failure kept
    again = run(retry_failed=True)
    assert (again["encoded"], again["failures"]) == (1, 0)
    assert np.isfinite(load_features(cache, ids)).all()
    assert json.loads((cache / "failures.json").read_text()) == {}


def test_tar_members_are_read_at_their_offsets(tmp_path, pixelstats):
    """WebDataset shards: the manifest's byte offset and size go to the reader, which seeks there."""
    ids = np.array([21, 22, 23], np.int64)
    with tarfile.open(tmp_path / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for i in ids:
            data = _jpeg(int(i))
            info = tarfile.TarInfo(f"{i}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "00000.tar") as tf:
        where = {int(m.name[:-4]): (m.offset_data, m.size) for m in tf.getmembers()}
    offsets = np.array([where[i][0] for i in ids])
    sizes = np.array([where[i][1] for i in ids])
    offsets[2] += 512  # a stale index entry: the reader must refuse it, not return other bytes
    run = extract_features(ids, ["00000.tar"] * 3, [f"{i}.jpg" for i in ids], ImageStore(tmp_path).open, pixelstats,
                           tmp_path / "cache", num_workers=0, offsets=offsets, sizes=sizes)
    assert run.failures == 1 and "offset" in run.index.failures[23]
    np.testing.assert_array_equal(load_features(tmp_path / "cache", ids[:2]),
                                  _direct(pixelstats, ImageStore(tmp_path), ["00000.tar"] * 2, ["21.jpg", "22.jpg"]))


def test_a_shard_of_another_dimension_is_refused_by_name(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    np.savez(cache / "shard-00000.npz", ids=np.array([1, 2]), feats=np.zeros((2, 8), np.float32))
    np.savez(cache / "shard-00001.npz", ids=np.array([3]), feats=np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"shard-00001\.npz: feats have D=4, earlier shards D=8"):
        scan_cache(cache)
    np.savez(cache / "shard-00001.npz", ids=np.array([3, 4]), feats=np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match=r"shard-00001\.npz: a feature shard needs ids \(n,\) and feats \(n, D\)"):
        scan_cache(cache)


@pytest.mark.parametrize("spec", ["tiny_clip", pytest.param("timm:test_vit", marks=pytest.mark.slow)])
def test_real_photos_through_dataloader_workers(tmp_path, spec, tiny_clip_spec):
    """The OSV-5M sample photos, zipped as a release shard, decoded by 2 workers in batches."""
    spec = tiny_clip_spec if spec == "tiny_clip" else spec
    photos = sorted(SAMPLE_PHOTOS.glob("*.jpg"))
    assert len(photos) >= 20
    _zip(tmp_path / "images/train/00.zip", {p.name: p.read_bytes() for p in photos})
    ids = np.array([int(p.stem) for p in photos], np.int64)
    containers, members = ["images/train/00.zip"] * len(ids), [p.name for p in photos]
    bb, store = load_backbone(spec), ImageStore(tmp_path)
    stats = extract_features(ids, containers, members, store.open, bb, tmp_path / "cache", batch_size=8, shard_size=10,
                             num_workers=2).summary()
    assert (stats["encoded"], stats["failures"], stats["shards"]) == (len(ids), 0, 3)
    feats = load_features(tmp_path / "cache", ids)
    assert feats.shape == (len(ids), bb.dim) and np.isfinite(feats).all()
    np.testing.assert_allclose(feats, _direct(bb, store, containers, members), rtol=1e-4, atol=1e-5)
    assert np.abs(feats[0] - feats[1]).max() > 1e-3  # different photos, different features


def test_weights_key_is_a_content_key(tmp_path, tiny_clip_spec):
    a, b = load_backbone(tiny_clip_spec), load_backbone(tiny_clip_spec)
    assert a.weights_key == b.weights_key  # random init from a fixed seed: the same model twice
    assert load_backbone(tiny_clip_spec, seed=1).weights_key != a.weights_key
    assert load_backbone("fixed:pixelstats").weights_key == load_backbone("fixed:pixelstats").weights_key

    import open_clip

    name = Path(tiny_clip_spec.split(":", 1)[1]).stem
    model = open_clip.create_model(name)
    with torch.no_grad():
        model.visual.proj.mul_(2.0)
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    c = load_backbone(tiny_clip_spec, str(tmp_path / "clip.pt"))
    assert c.weights_key != a.weights_key
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(c.encode(x).numpy(), model.encode_image(x).numpy(), rtol=1e-5, atol=1e-6)

    import timm

    src = timm.create_model("test_vit", num_classes=7)  # a classifier checkpoint: the head is dropped
    torch.save({"state_dict": src.state_dict()}, tmp_path / "vit.pt")
    t = load_backbone("timm:test_vit", str(tmp_path / "vit.pt"))
    assert t.weights_key != load_backbone("timm:test_vit").weights_key
    src.reset_classifier(0)
    with torch.no_grad():
        np.testing.assert_allclose(t.encode(x[:, :, :32, :32]).numpy(), src.eval()(x[:, :, :32, :32]).numpy(), rtol=1e-5)
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"resnet\.pt: does not fit timm:test_vit: \d+ missing keys"):
        load_backbone("timm:test_vit", str(tmp_path / "resnet.pt"))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_backbone("timm:test_vit", "augreg_in21k")


def test_spec_errors_name_the_accepted_forms():
    assert parse_spec("precomputed:street_clip") == ("precomputed", "street_clip")
    for bad in ("resnet", "fixed:other", "open_clip:", "hub:x"):
        with pytest.raises(ValueError, match="use 'fixed:pixelstats'"):
            parse_spec(bad)
    with pytest.raises(ValueError, match="precomputed features have no image encoder"):
        load_backbone("precomputed:street_clip")
    with pytest.raises(ValueError, match="unknown architecture"):
        load_backbone("open_clip:No-Such-Arch")
    with pytest.raises(ValueError, match="precision 'fp8'"):
        effective_precision("cpu", "fp8")
    assert effective_precision("cpu", "bf16") == "fp32"  # autocast is for CUDA; the CPU computes fp32
    assert effective_precision("cuda", "bf16") == "bf16"


def test_views_point_at_their_cache_and_digests_follow_the_ids(tmp_path):
    cache = tmp_path / "features" / "cache" / "x"
    cache.mkdir(parents=True)
    np.savez(cache / "shard-00000.npz", ids=np.array([5, 6, 7]), feats=np.arange(6, dtype=np.float32).reshape(3, 2))
    view = tmp_path / "features" / "v" / "train"
    doc = write_view(view, cache, np.array([7, 5]), {7: "bad", 6: "bad"}, {"digest": "d"})
    assert doc["n"] == 2 and doc["failures"] == 1
    assert json.loads((view / "failures.json").read_text()) == {"7": "bad"}
    assert resolve_feature_dir(view) == cache.resolve() and resolve_feature_dir(cache) == cache
    np.testing.assert_array_equal(load_features(view, np.array([7, 5])), [[4, 5], [0, 1]])
    d = features_digest("s", "w", "fp32", np.array([1, 2]))
    assert d == features_digest("s", "w", "fp32", np.array([1, 2]))
    assert len({d, features_digest("s", "w", "fp32", np.array([2, 1])), features_digest("s", "w2", "fp32", np.array([1, 2])),
                features_digest("s", "w", "bf16", np.array([1, 2]))}) == 4
