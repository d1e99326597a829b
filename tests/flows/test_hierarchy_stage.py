"""The hierarchy stage with each labeler, on the real demo data (GeoNames places, real polygons)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

from flows.stages.hierarchy import run_hierarchy


@pytest.fixture(scope="module")
def ingest_dir(demo_work) -> Path:
    return demo_work / "ingest"


@pytest.fixture(scope="module")
def admin_subset(ingest_dir, tmp_path_factory) -> Path:
    """The embedded geoBoundaries polygons of the demo's three largest countries (so the other
    countries' points have no polygon: the unassigned path is exercised too)."""
    from geodata.admin.schema import write_admin_parquet
    from geodata.admin.gazetteer import gazetteer_levels

    cc = pd.read_parquet(ingest_dir / "manifest" / "train.parquet", columns=["country"])["country"]
    top = cc.value_counts().index[:3].tolist()
    root = tmp_path_factory.mktemp("admin")
    table = gazetteer_levels(root / "cache", countries=top)
    return write_admin_parquet(table, root / "admin.parquet")


def test_geonames_labeler_rebuilds_the_osv5m_labels_exactly(ingest_dir, tmp_path):
    # The demo's labels were made with the GeoNames labeler: relabelling must change nothing.
    a = run_hierarchy(ingest_dir, tmp_path / "osv5m", labeler="osv5m")
    b = run_hierarchy(ingest_dir, tmp_path / "geonames", labeler="geonames", scheduler="sync")
    ea = pd.read_parquet(tmp_path / "osv5m" / "entities.parquet")
    eb = pd.read_parquet(tmp_path / "geonames" / "entities.parquet")
    pd.testing.assert_frame_equal(ea, eb)
    assert a["entities"] == b["entities"] and b["unassigned_test"] == a["unassigned_test"]
    assert (tmp_path / "geonames" / "entity_map.png").stat().st_size > 10_000


def test_polygons_labeler_builds_a_tree_and_counts_what_it_could_not_place(ingest_dir, admin_subset, tmp_path):
    out = tmp_path / "poly"
    rep = run_hierarchy(ingest_dir, out, labeler="polygons", admin_source="parquet", admin_path=str(admin_subset),
                        coords="representative", scheduler="sync")
    ents = pd.read_parquet(out / "entities.parquet")
    admin = pd.read_parquet(admin_subset)
    assert set(ents.loc[ents["level"] == 0, "key"]) <= set(admin["country"])  # only the three countries
    assert rep["orphans"] == 0 and rep["entities"]["country"] == 3
    train = pd.read_parquet(ingest_dir / "manifest" / "train.parquet", columns=["country"])
    outside = int((~train["country"].isin(ents.loc[ents["level"] == 0, "key"])).sum())
    # Points of the other countries: no polygon, counted, never given an entity.
    assert rep["train_points_without_country"] == pytest.approx(outside, abs=0.02 * len(train))
    assert rep["labels_train"]["unassigned_country"] == rep["train_points_without_country"]
    assign = pd.read_parquet(out / "assignments_train.parquet")
    assert (assign["country_id"] < 0).sum() == rep["unassigned_train"]["country"] >= rep["train_points_without_country"]
    # Representative coordinates: each country and region entity sits inside its own polygon.
    saved = json.loads((out / "hierarchy_report.json").read_text())
    assert saved["labeler"] == "polygons" and "country_differs_from_geonames" in saved["labels_train"]
    import geopandas as gpd

    geo = gpd.read_parquet(admin_subset).set_index("code")
    countries = ents[ents["level"] == 0]
    for _, e in countries.iterrows():
        polys = geo[(geo["level"] == 0) & (geo["country"] == e["key"])].geometry
        assert polys.covers(shapely.Point(e["lon"], e["lat"])).any(), e["key"]


def test_representative_coordinates_need_polygons(ingest_dir, tmp_path):
    with pytest.raises(ValueError, match="labeler='polygons'"):
        run_hierarchy(ingest_dir, tmp_path / "x", labeler="osv5m", coords="representative")


def test_medoid_coordinates_are_training_points(ingest_dir, tmp_path):
    run_hierarchy(ingest_dir, tmp_path / "med", coords="medoid")
    ents = pd.read_parquet(tmp_path / "med" / "entities.parquet")
    train = pd.read_parquet(ingest_dir / "manifest" / "train.parquet", columns=["latitude", "longitude"])
    pts = set(zip(train["latitude"].round(9), train["longitude"].round(9)))
    assert all((round(a, 9), round(b, 9)) in pts for a, b in zip(ents["lat"], ents["lon"]))


def test_rows_whose_coordinates_contradict_their_country_get_no_entity(ingest_dir, tmp_path):
    # The demo's labels are GeoNames': none contradicts its coordinates. Swap latitude and longitude
    # in a few training rows of a copy of the ingest folder: those rows are counted, quarantined
    # with their line, and given no entity.
    clean = run_hierarchy(ingest_dir, tmp_path / "clean")
    assert clean["label_mismatch"] == {"train": 0, "test": 0} and clean["labels_train"]["label_mismatch"] == 0
    import shutil

    from geodata.labels.check import country_mismatch

    bad_dir = tmp_path / "ingest"
    shutil.copytree(ingest_dir, bad_dir)
    part = next((bad_dir / "manifest" / "train.parquet").glob("part-*.parquet"))
    m = pd.read_parquet(part)
    swap = m.index[m["longitude"].abs() <= 90][:6]
    m.loc[swap, ["latitude", "longitude"]] = m.loc[swap, ["longitude", "latitude"]].to_numpy()
    m.to_parquet(part, index=False)
    expected = np.flatnonzero(country_mismatch(m)[0])
    assert 4 <= len(expected) and set(expected) <= set(swap)

    rep = run_hierarchy(bad_dir, tmp_path / "bad")
    assert rep["label_mismatch"] == {"train": len(expected), "test": 0}
    q = pd.read_parquet(tmp_path / "bad" / "quarantine.parquet")
    assert q["line"].tolist() == m.loc[expected, "line"].tolist() and (q["file"] == "train.csv").all()
    assert (q["reason"] == "label_mismatch").all()
    assign = pd.read_parquet(tmp_path / "bad" / "assignments_train.parquet")
    assert len(assign) == len(m) and (assign.loc[expected, "city_index"] == -1).all()
    ents = pd.read_parquet(tmp_path / "bad" / "entities.parquet")
    assert ents.loc[ents["level"] == 0, "n_images"].sum() == len(m) - len(expected) - rep["train_points_without_country"]
