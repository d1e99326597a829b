"""The place-level held-out split of the demo data (geodata.demo.heldout, issue 16 section 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import BallTree

from geodata.demo.build import build_demo_dataset
from geodata.demo.heldout import (
    HELDOUT_FILE, HELDOUT_PER_PLACE, heldout_split, nearest_km, recorded_heldout_km,
)

SMALL = dict(n_train=600, n_test=100, seed=3, images_per_city=12.0, image_px=16, shard_size=1000)
R_KM = 25.0
EARTH_KM = 6371.0


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)


def _nearest_train_km(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """An independent check: scikit-learn's BallTree with the haversine metric."""
    def rad(f):
        return np.radians(f[["latitude", "longitude"]].astype(float).to_numpy())

    dist, _ = BallTree(rad(train), metric="haversine").query(rad(test), k=1)
    return dist[:, 0] * EARTH_KM


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("heldout") / "data"
    return out, build_demo_dataset(out, **SMALL, heldout_km=R_KM)


def test_every_test_row_is_at_least_r_km_from_every_training_row(built):
    out, stats = built
    train, test = _read(out / "train.csv"), _read(out / "test.csv")
    assert len(train) == SMALL["n_train"] and len(test) == SMALL["n_test"]  # counts as asked
    assert stats["n_train"] == SMALL["n_train"] and stats["n_test"] == SMALL["n_test"]
    near = _nearest_train_km(train, test)
    assert near.min() >= R_KM
    assert stats["min_test_train_km"] == pytest.approx(near.min(), abs=1e-3)
    # place level: no test row's city is a training city, and no place gives more than the cap
    assert not set(test["unique_city"]) & set(train["unique_city"])
    assert stats["test_unseen_city_share"] == 1.0
    assert test["unique_city"].value_counts().max() <= HELDOUT_PER_PLACE
    assert stats["n_test_places"] >= SMALL["n_test"] / HELDOUT_PER_PLACE
    assert not set(train["id"]) & set(test["id"])


def test_the_split_is_recorded_and_deterministic(built, tmp_path):
    out, stats = built
    record = json.loads((out / HELDOUT_FILE).read_text())
    assert record["heldout_km"] == R_KM and record["n_test_places"] == stats["n_test_places"]
    assert recorded_heldout_km(out) == R_KM
    assert "- heldout_km: 25.0" in (out / "README.md").read_text()
    again = tmp_path / "again"
    build_demo_dataset(again, **SMALL, heldout_km=R_KM)
    for rel in ("train.csv", "test.csv", HELDOUT_FILE, "images/test/00.zip"):
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel
    # a random-split rebuild of the same folder removes the record: the folder no longer claims a hold-out
    build_demo_dataset(again, **SMALL)
    assert recorded_heldout_km(again) is None and not (again / HELDOUT_FILE).exists()


def test_a_larger_radius_holds_too(tmp_path):
    stats = build_demo_dataset(tmp_path / "d", **{**SMALL, "n_train": 300, "n_test": 40}, heldout_km=300.0)
    train, test = _read(tmp_path / "d" / "train.csv"), _read(tmp_path / "d" / "test.csv")
    assert (len(train), len(test)) == (300, 40)
    assert _nearest_train_km(train, test).min() >= 300.0 and stats["min_test_train_km"] >= 300.0


def test_an_impossible_radius_is_refused_with_the_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"heldout_km=15000.0: found no 60 training rows at least 15000.0 km"):
        build_demo_dataset(tmp_path / "d", **{**SMALL, "n_train": 60, "n_test": 10}, heldout_km=15000.0)
    with pytest.raises(ValueError, match="heldout_km must be a finite number >= 0"):
        build_demo_dataset(tmp_path / "e", **SMALL, heldout_km=-1.0)


def test_heldout_split_on_known_points():
    """Three places on the equator: 0 and 1 are 0.1 degree (11 km) apart, 2 is 10 degrees away.
    Four training rows 25 km from two test rows exist only when the test rows come from place 2."""
    lat = np.zeros(9)
    lon = np.array([0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 10.0, 10.0, 10.0])
    source = np.repeat([0, 1, 2], 3)
    got = [heldout_split(lat, lon, source, 4, 2, 25.0, np.random.default_rng(s), per_place=2) for s in range(12)]
    assert any(g is not None for g in got) and any(g is None for g in got)  # both orders were drawn
    for g in got:
        if g is not None:
            assert set(source[g["test"]]) == {2} and set(source[g["train"]]) <= {0, 1}
            assert len(g["train"]) == 4 and len(set(g["train"])) == 4 and len(g["test"]) == 2
            assert g["n_dropped_near_test"] == 1  # place 2's third point: beyond the cap, 0 km from the test rows
            assert g["min_test_train_km"] >= 25.0


def test_nearest_km_matches_haversine_across_the_antimeridian():
    km = nearest_km(np.array([0.0]), np.array([179.95]), np.array([0.0, 10.0]), np.array([-179.95, 0.0]))
    assert km[0] == pytest.approx(np.radians(0.1) * EARTH_KM, rel=1e-9)


def test_a_malformed_record_names_the_file_and_field(tmp_path):
    (tmp_path / HELDOUT_FILE).write_text('{"heldout_km": "far"}')
    with pytest.raises(ValueError, match=rf"{HELDOUT_FILE}: field heldout_km: expected a number"):
        recorded_heldout_km(tmp_path)
    (tmp_path / HELDOUT_FILE).write_text("[")
    with pytest.raises(ValueError, match="field heldout_km: unreadable"):
        recorded_heldout_km(tmp_path)
    (tmp_path / HELDOUT_FILE).write_text(" " * (64 * 1024 + 1))
    with pytest.raises(ValueError, match="regular file of at most 65536 bytes"):
        recorded_heldout_km(tmp_path)
