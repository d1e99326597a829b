"""Labeler dispatch: the dataset's labels, GeoNames, polygons; sibling names made unique."""

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from geodata.labels.label import country_disagreements, disambiguate_names, label_points


def _admin() -> gpd.GeoDataFrame:
    """Two countries; country A has two regions that share a name (a real thing in admin data)."""
    box = shapely.box
    rows = [
        (0, "A", "Aland", None, "AA", box(0, 0, 10, 10)),
        (0, "B", "Bland", None, "BB", box(10, 0, 20, 10)),
        (1, "A.1", "North", "A", "AA", box(0, 5, 10, 10)),
        (1, "A.2", "North", "A", "AA", box(0, 0, 10, 5)),
        (1, "B.1", "North", "B", "BB", box(10, 0, 20, 10)),
    ]
    return gpd.GeoDataFrame(
        {"level": [r[0] for r in rows], "code": [r[1] for r in rows], "name": [r[2] for r in rows],
         "parent_code": [r[3] for r in rows], "country": [r[4] for r in rows], "source": "test"},
        geometry=[r[5] for r in rows], crs="EPSG:4326")


def test_sibling_names_are_made_unique_and_others_kept():
    out = disambiguate_names(_admin()).set_index("code")["name"]
    assert out["A.1"] == "North (A.1)" and out["A.2"] == "North (A.2)"
    assert out["B.1"] == "North"  # same name, other parent: no clash
    assert out["A"] == "Aland"


def test_polygons_without_cities_and_the_report():
    pts = pd.DataFrame({"id": [1, 2, 3, 4], "latitude": [7.0, 2.0, 5.0, 50.0], "longitude": [5.0, 5.0, 15.0, 50.0]})
    from geodata.labels.polygons import PolygonLabeler

    lab = PolygonLabeler(disambiguate_names(_admin()), grid_deg=0, max_snap_km=0)
    res = label_points(pts, "polygons", labeler=lab, scheduler="sync")
    got = res.labels
    assert list(got["country"]) == ["AA", "AA", "BB", ""]
    assert list(got["region"]) == ["North (A.1)", "North (A.2)", "North", ""]
    assert res.report["unassigned_country"] == 1 and res.report["country"]["inside"] == 3
    assert country_disagreements(got, ["AA", "ZZ", "BB", "CC"]) == 1  # the unassigned point is not counted


def test_osv5m_labels_pass_through_and_need_their_columns():
    pts = pd.DataFrame({"id": [1], "latitude": [0.0], "longitude": [0.0], "country": ["NA"], "region": ["Khomas"],
                        "sub-region": [None], "city": ["Windhoek"]})
    got = label_points(pts, "osv5m").labels
    assert got.loc[0, "country"] == "NA" and got.loc[0, "sub-region"] == ""  # Namibia stays "NA"
    with pytest.raises(ValueError, match="label columns"):
        label_points(pts.drop(columns=["city"]), "osv5m")
    with pytest.raises(ValueError, match="unknown labeler"):
        label_points(pts, "voronoi")


def test_geonames_labels_match_the_labeler():
    from geodata.labels.geonames import default_labeler

    rng = np.random.default_rng(1)
    pts = pd.DataFrame({"id": np.arange(300), "latitude": rng.uniform(-60, 70, 300), "longitude": rng.uniform(-180, 180, 300)})
    got = label_points(pts, "geonames", scheduler="sync").labels
    ref = default_labeler().label(pts["latitude"].to_numpy(), pts["longitude"].to_numpy())
    assert (got["country"].to_numpy() == ref["cc"].astype(str).to_numpy()).all()
    assert (got["city"].to_numpy() == ref["name"].astype(str).to_numpy()).all()


def test_representative_point_comes_from_the_polygon_holding_most_images():
    # One country key (KZ) over two level-0 units, as Natural Earth's Kazakhstan and Baikonur.
    from geodata.labels.label import representative_coords

    admin = gpd.GeoDataFrame({"level": [0, 0], "code": ["KAB", "KAZ"], "name": ["Baikonur", "Kazakhstan"],
                              "parent_code": [None, None], "country": ["KZ", "KZ"], "source": "test"},
                             geometry=[shapely.box(63, 45, 64, 46), shapely.box(50, 40, 80, 55)], crs="EPSG:4326")
    labels = pd.DataFrame({"country": ["KZ"] * 5, "region": ["r"] * 5, "sub-region": [""] * 5, "city": ["c"] * 5,
                           "country_code": ["KAB", "KAZ", "KAZ", "KAZ", "KAZ"]})
    ents = pd.DataFrame({"level": [0], "key": ["KZ"], "lat": [0.0], "lon": [0.0]})
    out = representative_coords(ents, labels, admin)
    assert shapely.box(50, 40, 80, 55).covers(shapely.Point(out.loc[0, "lon"], out.loc[0, "lat"]))
    assert not shapely.box(63, 45, 64, 46).covers(shapely.Point(out.loc[0, "lon"], out.loc[0, "lat"]))
