"""Reduced-scale JPEG decoding (decode_image / ImageStore.open ``min_side``) on the real OSV-5M sample
photos: never below the size asked for, the strongest reduction that allows, the photo's exact
extent recorded through every EXIF orientation, other formats and broken files as before."""

from __future__ import annotations

import io
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geodata.ingest.image_decode import ImageDecodeError, decode_image
from geodata.ingest.image_store import ImageStore

SAMPLE_IMAGES = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images"


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    found = {p.name: p.read_bytes() for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))}
    assert len(found) >= 20
    return found


@pytest.mark.parametrize("min_side", [64, 100, 224, 256, 300, 512, 2000])
def test_min_side_decodes_at_the_strongest_reduction_that_keeps_both_sides(photos, min_side):
    for name, data in photos.items():
        full = decode_image(data, name)
        img = decode_image(data, name, min_side=min_side)
        (w, h), (fw, fh) = img.size, full.size
        assert min(w, h) >= min(min_side, fw, fh), (name, img.size)  # never below what the resize needs
        scale = round(fw / w)
        assert scale in (1, 2, 4, 8) and (w, h) == (math.ceil(fw / scale), math.ceil(fh / scale))
        assert scale == 8 or min(fw, fh) // (2 * scale) < min_side  # no stronger reduction would have kept it
        if scale > 1:
            assert img.info["full_size"] == (fw, fh)
            assert img.info["draft_box"] == (0, 0, fw / scale, fh / scale)  # no EXIF orientation in the sample
        else:
            assert "draft_box" not in img.info and np.array_equal(np.asarray(img), np.asarray(full))
    one = photos["1113744692540897.jpg"]  # 909 x 512
    assert decode_image(one, "x", min_side=224).size == (455, 256)
    assert decode_image(one, "x", min_side=64).size == (114, 64)


def _oriented_jpeg(data: bytes, orientation: int) -> bytes:
    """A sample photo cut to 909 x 511 (both sides odd: the reduced image's last row and column are
    part padding), saved with an EXIF Orientation tag."""
    img = Image.open(io.BytesIO(data)).convert("RGB").crop((0, 0, 909, 511))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def _expected_box(orientation: int) -> tuple[float, ...]:
    """The photo's extent in the 1/2-scale image after orientation, found with PIL's own transpose on a
    mask at twice the reduced resolution (the photo's 909 x 511 pixels set, the padding clear)."""
    mask = np.zeros((512, 910), np.uint8)
    mask[:511, :909] = 255
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    m = Image.fromarray(mask)
    if method is not None:
        m = m.transpose(method)
    return tuple(v / 2 for v in m.getbbox())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_photo_extent_follows_the_exif_orientation(photos, orientation):
    data = _oriented_jpeg(photos["1113744692540897.jpg"], orientation)
    full = decode_image(data, "x")
    img = decode_image(data, "x", min_side=224)
    assert img.info["full_size"] == full.size == ((511, 909) if orientation >= 5 else (909, 511))
    assert img.info["draft_box"] == _expected_box(orientation)
    # Resized from that box, the reduced image matches the full one resized alike.
    size = (227, 128) if orientation < 5 else (128, 227)
    box_resized = np.asarray(img.resize(size, Image.Resampling.BICUBIC, box=img.info["draft_box"]), float)
    full_resized = np.asarray(full.resize(size, Image.Resampling.BICUBIC), float)
    # mean of 255, measured 0.70; the whole reduced image as the source: 2.4; the box mirrored: 4.6
    assert np.abs(box_resized - full_resized).mean() < 1.5


def test_formats_other_than_jpeg_ignore_min_side(photos):
    rgb = decode_image(photos["1113744692540897.jpg"], "x")
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    img = decode_image(buf.getvalue(), "x.png", min_side=64)
    assert img.size == (909, 512) and "draft_box" not in img.info
    assert np.array_equal(np.asarray(img), np.asarray(rgb))


def test_a_reduced_decode_still_refuses_a_truncated_photo(photos):
    data = photos["1113744692540897.jpg"]
    for cut in (5000, len(data) // 2, len(data) - 100):
        with pytest.raises(ImageDecodeError, match=r"x\.jpg: cannot decode image .*truncated"):
            decode_image(data[:cut], "x.jpg", min_side=224)
    with pytest.raises(ValueError, match="min_side=0: give a size of at least 1 pixel"):
        decode_image(data, "x.jpg", min_side=0)


def test_store_open_passes_min_side_for_zip_and_folder(tmp_path, photos):
    name = "1113744692540897.jpg"
    with zipfile.ZipFile(tmp_path / "00.zip", "w") as zf:
        zf.writestr(name, photos[name])
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / name).write_bytes(photos[name])
    store = ImageStore(tmp_path)
    for container in ("00.zip", "dir"):
        assert store.open(container, name).size == (909, 512)
        reduced = store.open(container, name, min_side=224)
        assert reduced.size == (455, 256) and reduced.info["full_size"] == (909, 512)
