"""Tests for geodata.demo.build: the "Earth tiles" demo dataset in OSV-5M release layout."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import reverse_geocoder as rg
from PIL import Image

from geodata.demo.build import build_demo_dataset
from geodata.demo.imagery import crop_tile, load_blue_marble, render_image
from geodata.demo.locations import draw_ids, images_per_place, offset_points, sample_places, wrap_lon_deg
from geodata.demo.release import release_frame, write_release_csv
from geodata.osv5m import OSV5M_COLUMNS

SMALL = dict(n_train=600, n_test=100, seed=3, images_per_city=12.0, image_px=32, shard_size=250)
LABEL_AND_KEYS = (
    "country", "region", "sub-region", "city",
    "unique_country", "unique_region", "unique_sub-region", "unique_city",
)
UNDERIVABLE = tuple(c for c in OSV5M_COLUMNS if c not in ("id", "latitude", "longitude", *LABEL_AND_KEYS))


def _read(path: Path) -> pd.DataFrame:
    """Read a release CSV as the pipeline should: every field as text, no NA guessing."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)


def _zip_members(split_dir: Path) -> dict[str, list[str]]:
    return {p.name: zipfile.ZipFile(p).namelist() for p in sorted(split_dir.glob("*.zip"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_dataset(out, **SMALL)


@pytest.fixture(scope="module")
def frames(built: tuple[Path, dict]) -> dict[str, pd.DataFrame]:
    out, _ = built
    return {split: _read(out / f"{split}.csv") for split in ("train", "test")}


def test_layout_and_schema(built, frames):
    out, stats = built
    assert (out / "README.md").read_text().startswith("# Earth tiles")
    for split, n in (("train", SMALL["n_train"]), ("test", SMALL["n_test"])):
        assert tuple(frames[split].columns) == OSV5M_COLUMNS
        assert len(frames[split]) == n
        first_line = (out / f"{split}.csv").read_text().split("\n", 1)[0]
        assert first_line == ",".join(OSV5M_COLUMNS)
    assert stats["n_train"] == SMALL["n_train"] and stats["n_test"] == SMALL["n_test"]


def test_ids_unique_int64_exact(frames):
    text = pd.concat([frames["train"]["id"], frames["test"]["id"]])
    assert text.str.fullmatch(r"[1-9]\d{0,15}").all()
    as_int = text.astype(np.int64)
    assert (as_int.astype(str) == text).all()  # no precision lost (never via float)
    assert as_int.is_unique and (as_int > 0).all()


def test_every_id_has_exactly_one_image(built, frames):
    out, _ = built
    for split in ("train", "test"):
        members = _zip_members(out / "images" / split)
        assert all(re.fullmatch(r"\d{2}\.zip", name) for name in members)
        assert list(members) == [f"{k:02d}.zip" for k in range(len(members))]
        assert all(len(m) <= SMALL["shard_size"] for m in members.values())
        names = [n for m in members.values() for n in m]
        assert len(names) == len(set(names))
        assert set(names) == {f"{i}.jpg" for i in frames[split]["id"]}
    assert len(_zip_members(out / "images" / "train")) == 3  # 600 rows / 250 per shard


def test_images_decode_to_square_rgb(built):
    out, _ = built
    for split in ("train", "test"):
        for path in sorted((out / "images" / split).glob("*.zip")):
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    with Image.open(io.BytesIO(zf.read(name))) as im:
                        assert im.format == "JPEG" and im.mode == "RGB"
                        assert im.size == (SMALL["image_px"], SMALL["image_px"])


def test_labels_equal_reverse_geocoder(frames):
    df = pd.concat([frames["train"], frames["test"]], ignore_index=True)
    coords = list(zip(df["latitude"].map(float), df["longitude"].map(float)))
    res = rg.search(coords, mode=1, verbose=False)
    cc = [r["cc"] for r in res]
    a1 = [r["admin1"] for r in res]
    a2 = [r["admin2"] for r in res]
    name = [r["name"] for r in res]
    assert df["country"].tolist() == cc
    assert df["region"].tolist() == a1
    assert df["sub-region"].tolist() == a2
    assert df["city"].tolist() == name
    assert df["unique_country"].tolist() == cc
    assert df["unique_region"].tolist() == [f"{r}_{c}" for r, c in zip(a1, cc)]
    assert df["unique_sub-region"].tolist() == [
        f"{s}_{r}_{c}" if s else "" for s, r, c in zip(a2, a1, cc)
    ]
    assert df["unique_city"].tolist() == [
        f"{n}_{s or 'NaN'}_{r}_{c}" for n, s, r, c in zip(name, a2, a1, cc)
    ]
    empty_sub = df["sub-region"] == ""
    assert empty_sub.any() and (~empty_sub).any()  # both branches of the rule exercised


def test_underivable_columns_empty(frames):
    for df in frames.values():
        for col in UNDERIVABLE:
            assert (df[col] == "").all(), col


def test_coordinates_valid_and_exact_text(frames):
    for df in frames.values():
        lat = df["latitude"].map(float)
        lon = df["longitude"].map(float)
        assert lat.between(-90, 90).all()
        assert ((lon >= -180) & (lon < 180)).all()
        for col in ("latitude", "longitude"):
            # Shortest exact text: re-printing the parsed float gives the same string.
            reprinted = df[col].map(lambda t: np.format_float_positional(float(t), unique=True, trim="-"))
            assert (reprinted == df[col]).all()
            assert not df[col].str.contains("e", case=False).any()


def test_namibia_round_trips(tmp_path):
    frame = release_frame(np.array([123456789012345]), np.array([-22.5594]), np.array([17.0832]))
    assert frame.loc[0, "country"] == "NA"
    write_release_csv(tmp_path / "t.csv", frame)
    back = pd.read_csv(tmp_path / "t.csv", keep_default_na=False)
    assert back.loc[0, "country"] == "NA" and back.loc[0, "unique_country"] == "NA"
    assert back.loc[0, "id"] == 123456789012345


def test_skewed_counts(built, frames):
    _, stats = built
    df = pd.concat([frames["train"], frames["test"]], ignore_index=True)
    per_city = df["unique_city"].value_counts()
    assert per_city.mean() > 2
    assert per_city.max() > 3 * per_city.median()
    per_country = df["country"].value_counts()
    assert per_country.size >= 10
    assert per_country.iloc[0] / len(df) > 5 * per_country.median() / len(df)
    assert stats["n_countries"] == per_country.size


def test_deterministic(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    build_demo_dataset(again, **SMALL)
    for rel in ("train.csv", "test.csv", "README.md", "images/train/00.zip", "images/test/00.zip"):
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel
    other = tmp_path / "other"
    build_demo_dataset(other, **{**SMALL, "seed": SMALL["seed"] + 1})
    assert (other / "train.csv").read_bytes() != (out / "train.csv").read_bytes()
    assert (other / "test.csv").read_bytes() != (out / "test.csv").read_bytes()


def test_rebuild_removes_stale_shards(tmp_path):
    small = {**SMALL, "n_train": 60, "n_test": 10}
    build_demo_dataset(tmp_path, **{**small, "shard_size": 20})
    assert len(list((tmp_path / "images" / "train").glob("*.zip"))) == 3
    build_demo_dataset(tmp_path, **{**small, "shard_size": 100})
    assert [p.name for p in (tmp_path / "images" / "train").glob("*.zip")] == ["00.zip"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_never_writes_into_or_deletes_from_a_folder_it_did_not_build_unless_claimed(tmp_path):
    """A user's release folder (no marker) is refused before anything is written; their shards stay."""
    user = tmp_path / "user"
    (user / "images" / "train").mkdir(parents=True)
    (user / "test.csv").write_text("id,latitude,longitude\n1,2,3\n")
    for name in ("00.zip", "05.zip"):
        (user / "images" / "train" / name).write_bytes(b"the user's shard " + name.encode())
    before = {p: p.read_bytes() for p in user.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"is not empty \(images, test.csv\) and holds no .hierloc-demo marker"):
        build_demo_dataset(user, n_train=20, n_test=10, seed=1)
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == before
    # claim=True: only the pipeline passes it, for the project's own demo folder (flows.settings.DEMO_DATA_DIR)
    build_demo_dataset(user, n_train=20, n_test=10, seed=1, claim=True)
    assert (user / ".hierloc-demo").is_file() and not (user / "images" / "train" / "05.zip").exists()


def test_crop_location_sahara_vs_pacific():
    sahara = render_image(24.0, 12.0, image_px=32, width_deg=4.0).reshape(-1, 3).mean(0)
    pacific = render_image(0.0, -150.0, image_px=32, width_deg=4.0).reshape(-1, 3).mean(0)
    assert sahara.sum() > 2 * pacific.sum()  # brighter
    assert sahara[0] > sahara[2] and pacific[2] > pacific[0]  # red desert, blue ocean


def test_crop_wraps_antimeridian_and_clamps_poles():
    world = load_blue_marble()
    assert world.shape == (2700, 5400, 3)
    tile = crop_tile(world, 0.0, 180.0 - 1 / 30, 2.0)  # 30 px wide, centred 0.5 px left of the seam
    assert tile.shape == (30, 30, 3)
    rows = slice(1350 - 15, 1350 + 15)
    expected = np.concatenate([world[rows, -15:], world[rows, :15]], axis=1)
    np.testing.assert_array_equal(tile, expected)
    polar = crop_tile(world, 90.0, 0.0, 4.0)
    assert polar.shape == (60, 60, 3)
    np.testing.assert_array_equal(polar[0], polar[29])  # rows above +90 repeat the top row


def test_relief_stacks_below():
    img = render_image(45.0, 7.0, image_px=16, width_deg=4.0, relief=True)
    assert img.shape == (32, 16, 3) and img.dtype == np.uint8


def test_wrap_lon_range():
    lon = wrap_lon_deg(np.array([-180.0, 180.0, 540.0, -1e-20, 179.9999999, -190.0]))
    assert ((lon >= -180) & (lon < 180)).all()
    np.testing.assert_allclose(lon[[0, 1, 2, 5]], [-180.0, -180.0, -180.0, 170.0])


def test_offset_points_stay_in_disc_and_cap():
    rng = np.random.default_rng(0)
    lat0 = np.full(2000, 60.0)
    lon0 = np.full(2000, 179.99)
    lat, lon = offset_points(lat0, lon0, rng, radius_km=3.0)
    dlon = (lon - lon0 + 180) % 360 - 180  # across the seam
    dist_km = np.hypot(lat - lat0, dlon * np.cos(np.radians(60.0))) * 111.195
    assert dist_km.max() <= 3.0 + 1e-3 and dist_km.mean() > 1.0
    assert ((lon >= -180) & (lon < 180)).all() and (lon < 0).any()
    cap = np.full(2000, 1e-3)
    lat, lon = offset_points(lat0, np.zeros(2000), rng, radius_km=3.0, max_offset_deg=cap)
    assert np.hypot(lat - lat0, lon).max() <= 1e-3 + 1e-7


def test_draw_ids_unique_under_collisions():
    ids = draw_ids(50, np.random.default_rng(1), id_range=(1, 60))
    assert len(set(ids.tolist())) == 50 and ids.dtype == np.int64 and ids.min() >= 1


def test_sampling_helpers():
    rng = np.random.default_rng(2)
    counts = images_per_place(100, 2200, rng)
    assert counts.sum() == 2200 and counts.min() >= 1 and counts.max() > 3 * np.median(counts)
    places = pd.DataFrame({"cc": ["A"] * 900 + ["B"] * 90 + ["C"] * 10})
    rows = sample_places(places, 50, rng)
    assert len(np.unique(rows)) == 50
    with pytest.raises(ValueError, match="n_cities"):
        sample_places(places, 2000, rng)


def test_rendering_the_images_reports_progress(tmp_path: Path, progress_lines) -> None:
    """The demo's ~22,000 images take a while on a loaded machine: images rendered, rate and ETA."""
    from geodata.demo.imagery import write_image_shards

    frame = pd.DataFrame({"id": [1, 2, 3], "latitude": [0.0, 10.0, -20.0], "longitude": [0.0, 20.0, 170.0]})
    write_image_shards(tmp_path / "images" / "train", frame, np.random.default_rng(0), image_px=8, crop_deg=4.0,
                       relief=False, shard_size=2)
    lines = progress_lines()
    assert [x.split(", ")[0] for x in lines if "ETA" in x] == [f"demo images (train): {n}/3 img ({100 * n / 3:.0f}%)"
                                                              for n in (1, 2, 3)]
