"""JPEGs decoded on the device (hierloc.features.device_decode, ``decoder="device"``): workers read bytes,
torchvision's decode_jpeg decodes the batch (libjpeg-turbo here on the CPU, nvjpeg on CUDA), then resize,
crop and normalise as tensors. Compared with the PIL full decode on the real OSV-5M sample photos in a
zip shard read by geodata's ImageStore, with a random-init open_clip ViT (open_clip's own preprocess:
Resize(224, bicubic), CenterCrop(224), ToTensor, Normalize)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from geodata.ingest.image_store import ImageStore
from hierloc.features.backbones import Backbone, load_backbone
from hierloc.features.dataset import compact_items
from hierloc.features.device_decode import ENCODED, EncodedDataset, as_lists, decode_batch, orient
from hierloc.features.extract import extract_features
from tests.hierloc.features.sample_shard import SHARD, extract_shard, zip_shard

def _device_pixels(root: Path, members: dict[str, bytes], backbone, device: str = "cpu",
                   store: ImageStore | None = None) -> tuple[torch.Tensor, list[str]]:
    """The device decoder's uint8 batch (after resize and crop) for ``members``, and the errors."""
    store = store or ImageStore(root)
    ids, containers, names = zip_shard(root, members)
    items = compact_items(ids, np.array(containers, object), np.array(names, object), None, None)
    dataset = EncodedDataset(items, store.open, backbone.decoding)
    chunk = as_lists([dataset[i] for i in range(len(names))])
    x, errors = decode_batch(chunk, items, store.open, backbone.device_decoding, torch.device(device))
    return x.cpu(), errors


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_device_decoding_gives_the_pil_full_decode_features_within_tolerance(tmp_path, photos, clip_spec):
    full, dev = load_backbone(clip_spec, fast_decode=False), load_backbone(clip_spec, decoder="device")
    x_dev, errors = _device_pixels(tmp_path, photos, dev)
    assert not any(errors)
    store = ImageStore(tmp_path)
    x_pil = torch.stack([full.decoding.worker(store.open(SHARD, n)) for n in photos])
    # pixels after resize + crop, in [0, 1]: measured max 1/255 (0.0039), mean 1e-5 on the 22 photos
    # (libjpeg-turbo decodes as PIL does; torch's uint8 antialiased bicubic is PIL's filter)
    diff = (x_dev.float() - x_pil.float()).abs() / 255
    assert diff.max() <= 2 / 255 and diff.mean() < 1e-4
    feats_dev = extract_shard(tmp_path, photos, dev, "dev")
    feats_pil = extract_shard(tmp_path, photos, full, "pil")
    assert np.isfinite(feats_dev).all()
    assert _cosine(feats_dev, feats_pil).min() > 0.99999  # measured >= 0.9999998


def test_exif_orientation_is_applied_as_pil_does(tmp_path, photos, clip_spec):
    """Every EXIF orientation 1-8 (a photo saved with the tag): the device decoder's pixels are the PIL
    path's (to_rgb's exif_transpose); ``orient`` is decode_jpeg's own apply_exif_orientation (CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    base = Image.open(io.BytesIO(next(iter(photos.values())))).crop((0, 0, 600, 400))
    members = {}
    for k in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = k
        buf = io.BytesIO()
        base.save(buf, "JPEG", quality=90, exif=exif.tobytes())
        members[f"o{k}.jpg"] = buf.getvalue()
        raw = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        plain = decode_jpeg(raw, mode=ImageReadMode.RGB)
        assert torch.equal(orient(plain, k), decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True))
        assert ImageOps.exif_transpose(Image.open(buf)).size == orient(plain, k).shape[:0:-1]
    full, dev = load_backbone(clip_spec, fast_decode=False), load_backbone(clip_spec, decoder="device")
    x_dev, errors = _device_pixels(tmp_path, members, dev)  # two sizes (600x400, 400x600): two resize groups
    store = ImageStore(tmp_path)
    x_pil = torch.stack([full.decoding.worker(store.open(SHARD, n)) for n in members])
    assert not any(errors)
    assert (x_dev.float() - x_pil.float()).abs().max() <= 2
    assert not torch.equal(x_dev[0], x_dev[5])  # the orientations differ indeed


def test_png_refused_and_corrupt_images_take_the_pil_path_or_give_nan_with_the_reason(tmp_path, photos, clip_spec):
    names = list(photos)[:4]
    members = {n: photos[n] for n in names}
    png = io.BytesIO()
    Image.open(io.BytesIO(photos[names[0]])).save(png, "PNG")
    members["photo.png"] = png.getvalue()
    members["truncated.jpg"] = photos[names[1]][: len(photos[names[1]]) // 2]
    members["not_an_image.jpg"] = b"<html>404</html>"
    dev, pil = load_backbone(clip_spec, decoder="device"), load_backbone(clip_spec)
    got = extract_shard(tmp_path, members, dev, "dev", num_workers=2)
    ref = extract_shard(tmp_path, members, pil, "pil")
    assert np.isfinite(got[:5]).all() and np.isnan(got[5:]).all()
    np.testing.assert_array_equal(got[4], ref[4])  # the PNG: the PIL path, the same features
    reasons = json.loads((tmp_path / "dev" / "failures.json").read_text())
    assert set(reasons) == {"6", "7"} and "truncated.jpg" in reasons["6"] and "not_an_image.jpg" in reasons["7"]
    assert "not a known image format" in reasons["7"]
    # A JPEG the decoder refuses (here: its bytes replaced by garbage after the worker read them) is
    # read again through the PIL path in the main process: the PIL path's pixels, no error.
    ids, containers, names_ = zip_shard(tmp_path, members)
    items = compact_items(ids, np.array(containers, object), np.array(names_, object), None, None)
    store = ImageStore(tmp_path)
    chunk = as_lists([EncodedDataset(items, store.open, dev.decoding)[i] for i in range(3)])
    assert chunk[1] == [ENCODED] * 3
    chunk[2][1] = torch.tensor([255, 216, 255, 0, 1, 2], dtype=torch.uint8)
    x, errors = decode_batch(chunk, items, store.open, dev.device_decoding, torch.device("cpu"))
    assert errors == ["", "", ""]
    assert torch.equal(x[1], pil.decoding.worker(store.open(SHARD, names_[1], min_side=224)))


def test_the_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path, photos, clip_spec):
    members = dict(list(photos.items())[:2])
    x, errors = _device_pixels(tmp_path, members, load_backbone(clip_spec, decoder="device"),
                               store=ImageStore(tmp_path, max_image_pixels=100_000))
    assert all("DecompressionBombError" in e and "max_image_pixels=100000" in e for e in errors)
    assert not x.any()
    enc = ImageStore(tmp_path).open(SHARD, next(iter(members)), raw=True)
    assert (enc.format, enc.size, enc.orientation, enc.data) == ("JPEG", (909, 512), 1, members[next(iter(members))])


def test_the_device_decoder_has_its_own_cache_key_and_refuses_what_it_cannot_run(tmp_path, photos, clip_spec):
    keys = {(fast, dec): load_backbone(clip_spec, fast_decode=fast, decoder=dec).weights_key
            for fast in (True, False) for dec in ("pil", "device")}
    assert len(set(keys.values())) == 4
    assert load_backbone("fixed:pixelstats", decoder="device").weights_key != load_backbone("fixed:pixelstats").weights_key
    bb = load_backbone(clip_spec)
    with pytest.raises(ValueError, match="decoder 'gpu': use one of pil, device"):
        Backbone(bb.spec, bb.module, bb.transform, bb.dim, decoder="gpu")
    from torchvision.transforms import v2

    odd = Backbone(bb.spec, bb.module, v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]), bb.dim,
                   decoder="device")
    with pytest.raises(ValueError, match="decoder 'device' needs a transform of Resize"):
        odd.device_decoding
    ids, containers, names = zip_shard(tmp_path, dict(list(photos.items())[:2]))
    store = ImageStore(tmp_path)
    with pytest.raises(TypeError, match="takes no raw= keyword"):
        extract_features(ids, containers, names, lambda c, m, min_side=None: store.open(c, m, min_side=min_side),
                         load_backbone(clip_spec, decoder="device"), tmp_path / "c")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_cuda_decoding_equals_the_cpu_decoding_within_tolerance(tmp_path, photos, clip_spec):
    dev = load_backbone(clip_spec, decoder="device")
    x_cpu, e_cpu = _device_pixels(tmp_path, photos, dev, "cpu")
    x_gpu, e_gpu = _device_pixels(tmp_path, photos, dev, "cuda")
    assert not any(e_cpu) and not any(e_gpu)
    diff = (x_gpu.float() - x_cpu.float()).abs() / 255  # nvjpeg's IDCT and float resize vs libjpeg-turbo
    assert diff.max() < 0.1 and diff.mean() < 0.005
    feats_gpu = extract_shard(tmp_path, photos, dev, "gpu", device="cuda", precision="fp32")
    feats_cpu = extract_shard(tmp_path, photos, dev, "cpu")
    assert _cosine(feats_gpu, feats_cpu).min() > 0.9995
