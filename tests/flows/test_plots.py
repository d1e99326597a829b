"""flows.report (maps, charts, embeddings): every figure is a real PNG, inputs are checked, the geometry helpers keep invariants."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from flows.report.charts import confusion_table, country_confusion, error_cdf, level_accuracy_bars
from flows.report.embeddings import lorentz_to_ball, poincare_disk, radial_pca_2d
from flows.report.maps import WORLD, candidates_map, error_map, map_extent, map_segments
from hierloc.geometry.geo import haversine_km

ROOT = Path(__file__).resolve().parents[2]


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _assert_png(path, *, min_w: int = 400, min_h: int = 300) -> None:
    w, h = _png_size(path)
    assert min_w <= w <= 4000 and min_h <= h <= 4000, (w, h)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


@pytest.fixture(scope="module")
def queries() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    n = 400
    t_lat, t_lon = rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)
    p_lat = np.clip(t_lat + rng.normal(0, 3, n), -90, 90)
    p_lon = (t_lon + rng.normal(0, 10, n) + 180) % 360 - 180
    return t_lat, t_lon, p_lat, p_lon


def _hyperboloid(v: np.ndarray, curvature: float) -> np.ndarray:
    """exp at the origin of geoopt's Lorentz(k=K): (N, d) tangent vectors -> (N, d+1)."""
    r, norm = np.sqrt(curvature), np.linalg.norm(v, axis=1, keepdims=True)
    return np.c_[r * np.cosh(norm / r), r * np.sinh(norm / r) * v / norm]


def _hierarchy(curvature: float, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four levels, each child a small step from its parent in the tangent space, further out."""
    rng = np.random.default_rng(seed)
    tangents, levels = [rng.normal(size=(6, d)) * 0.3], [np.zeros(6, int)]
    for level in range(1, 4):
        parents = np.repeat(tangents[-1], 4, axis=0)
        tangents.append(parents * 1.6 + rng.normal(size=parents.shape) * 0.1)
        levels.append(np.full(len(parents), level))
    v = np.concatenate(tangents)
    return _hyperboloid(v, curvature), np.concatenate(levels), np.linalg.norm(v, axis=1)


def test_error_map_writes_a_png(tmp_path, queries):
    path = error_map(*queries, tmp_path / "sub" / "error_map.png", max_lines=100, title="test")
    assert path == tmp_path / "sub" / "error_map.png"
    _assert_png(path, min_w=800)


def test_error_map_rejects_mismatched_or_invalid_input(tmp_path, queries):
    t_lat, t_lon, p_lat, p_lon = queries
    with pytest.raises(ValueError, match="pred_lat_deg: length 399 does not match the 400"):
        error_map(t_lat, t_lon, p_lat[:-1], p_lon, tmp_path / "m.png")
    with pytest.raises(ValueError, match="outside"):
        error_map(t_lat + 100, t_lon, p_lat, p_lon, tmp_path / "m.png")
    with pytest.raises(ValueError, match="non-finite"):
        error_map(t_lat, np.r_[np.nan, t_lon[1:]], p_lat, p_lon, tmp_path / "m.png")
    with pytest.raises(ValueError, match="no points"):
        error_map([], [], [], [], tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


def test_error_map_across_the_antimeridian(tmp_path):
    t_lat, t_lon = np.array([10.0, -40.0, 65.0]), np.array([179.5, -178.0, 180.0])
    p_lat, p_lon = np.array([12.0, -38.0, 64.0]), np.array([-179.0, 177.0, -170.0])
    _assert_png(error_map(t_lat, t_lon, p_lat, p_lon, tmp_path / "am.png"))


def test_map_segments_split_at_the_antimeridian():
    seg = map_segments(np.array([179.0, 10.0]), np.array([10.0, 0.0]), np.array([-179.0, 20.0]), np.array([20.0, 5.0]))
    assert seg.shape == (3, 2, 2)
    np.testing.assert_allclose(seg[0], [[10, 0], [20, 5]])  # an ordinary pair is kept as is
    np.testing.assert_allclose(seg[1], [[179, 10], [180, 15]])  # to the edge, latitude halfway
    np.testing.assert_allclose(seg[2], [[-180, 15], [-179, 20]])


def test_map_segments_never_span_more_than_half_the_world():
    rng = np.random.default_rng(1)
    lon1, lon2 = rng.uniform(-180, 180, (2, 1000))
    lat1, lat2 = rng.uniform(-89, 89, (2, 1000))
    seg = map_segments(lon1, lat1, lon2, lat2)
    assert len(seg) == 1000 + np.sum(np.abs(lon2 - lon1) > 180)
    assert np.all(np.abs(seg[:, 1, 0] - seg[:, 0, 0]) <= 180.0)
    assert np.all(np.abs(seg[..., 0]) <= 180.0) and np.all(np.abs(seg[..., 1]) <= 90.0)


def test_error_cdf_writes_a_png(tmp_path, queries):
    dist_km = haversine_km(*queries)
    _assert_png(error_cdf(np.r_[0.0, dist_km], tmp_path / "cdf.png"))


def test_error_cdf_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dist_km is empty"):
        error_cdf([], tmp_path / "cdf.png")
    with pytest.raises(ValueError, match="negative"):
        error_cdf([1.0, -2.0], tmp_path / "cdf.png")
    with pytest.raises(ValueError, match="thresholds_km"):
        error_cdf([1.0], tmp_path / "cdf.png", thresholds_km=(0, 10))


def test_level_accuracy_bars(tmp_path):
    metrics = {"acc_country": 0.8, "acc_region": 0.5, "acc_subregion": float("nan"), "acc_city": 0.1,
               "pick_acc_country": 0.78, "pick_acc_city": 0.05, "acc_1km": 0.01, "n": 10}
    _assert_png(level_accuracy_bars(metrics, tmp_path / "bars.png"))
    _assert_png(level_accuracy_bars({"pick_acc_city": 0.2}, tmp_path / "one.png"), min_w=200)


def test_level_accuracy_bars_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no acc_<level>"):
        level_accuracy_bars({"acc_1km": 0.3}, tmp_path / "bars.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        level_accuracy_bars({"acc_country": 80.0}, tmp_path / "bars.png")  # a percentage, not a fraction


def test_confusion_table_is_row_normalised_with_other_column():
    true_cc = ["FR"] * 5 + ["NA"] * 3 + ["DE"] * 2 + ["IT"]
    pred_cc = ["FR", "FR", "FR", "DE", "IT", "NA", "NA", None, "DE", "FR", "IT"]
    labels, frac, covered = confusion_table(true_cc, pred_cc, top=3)
    assert labels == ["FR", "NA", "DE"]  # by frequency; "NA" is Namibia, not missing
    assert frac.shape == (3, 4) and covered == 10
    np.testing.assert_allclose(frac.sum(axis=1), 1.0)
    np.testing.assert_allclose(frac[0], [3 / 5, 0, 1 / 5, 1 / 5])  # IT is "other"
    np.testing.assert_allclose(frac[1], [0, 2 / 3, 0, 1 / 3])  # None is "other"


def test_country_confusion_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    codes = np.array("FR US DE JP BR RU GB IT ES CA AU IN MX ZA AR CN SE".split())
    true_cc = codes[rng.integers(0, len(codes), 500)]
    pred_cc = np.where(rng.random(500) < 0.6, true_cc, codes[rng.integers(0, len(codes), 500)])
    _assert_png(country_confusion(true_cc, pred_cc, tmp_path / "conf.png"))
    with pytest.raises(ValueError, match="equal non-zero lengths"):
        country_confusion(true_cc, pred_cc[:-1], tmp_path / "conf.png")
    with pytest.raises(ValueError, match="top=0"):
        country_confusion(true_cc, pred_cc, tmp_path / "conf.png", top=0)


@pytest.mark.parametrize("curvature", [0.5, 1.0, 2.0])
def test_lorentz_to_ball_is_inside_the_unit_ball(curvature):
    points, _, tangent_norm = _hierarchy(curvature)
    ball = lorentz_to_ball(points, curvature)
    assert ball.shape == (len(points), points.shape[1] - 1)
    # |p| = tanh(d(o, x) / (2 sqrt K)), and d(o, x) is the tangent norm at the origin
    expected = np.tanh(tangent_norm / (2 * np.sqrt(curvature)))
    np.testing.assert_allclose(np.linalg.norm(ball, axis=1), expected, rtol=1e-9)


def test_lorentz_to_ball_matches_the_library_map():
    """Same map as hierloc.geometry.lorentz.to_poincare (radius sqrt(K) ball), divided by sqrt(K)."""
    torch = pytest.importorskip("torch")
    from hierloc.geometry.lorentz import to_poincare

    points, _, _ = _hierarchy(2.0)
    expected = to_poincare(torch.from_numpy(points), k=2.0).numpy() / np.sqrt(2.0)
    np.testing.assert_allclose(lorentz_to_ball(points, 2.0), expected, rtol=1e-12, atol=1e-15)


def test_lorentz_to_ball_accepts_float32_far_points():
    v = np.random.default_rng(0).normal(size=(50, 16))
    v *= 12.0 / np.linalg.norm(v, axis=1, keepdims=True)  # x0 ~ 8e4: float32 loses <x,x>_L = -1
    ball = lorentz_to_ball(_hyperboloid(v, 1.0).astype(np.float32), 1.0)
    assert np.all(np.linalg.norm(ball, axis=1) < 1.0)


def test_lorentz_to_ball_rejects_wrong_curvature_or_euclidean_points():
    points, _, _ = _hierarchy(1.0)
    with pytest.raises(ValueError, match="off the hyperboloid"):
        lorentz_to_ball(points, 2.0)
    with pytest.raises(ValueError, match="geometry='euclidean'"):
        lorentz_to_ball(points[:, 1:], 1.0)
    with pytest.raises(ValueError, match="K must be > 0"):
        lorentz_to_ball(points, 0.0)


def test_radial_pca_keeps_norms():
    coords = np.random.default_rng(0).normal(size=(200, 5)) * 0.2
    xy = radial_pca_2d(coords)
    assert xy.shape == (200, 2)
    np.testing.assert_allclose(np.linalg.norm(xy, axis=1), np.linalg.norm(coords, axis=1))
    np.testing.assert_allclose(radial_pca_2d(np.array([[0.5], [-0.25]])), [[0.5, 0.0], [-0.25, 0.0]])


@pytest.mark.parametrize("curvature", [1.0, 2.5])
def test_poincare_disk_radii_grow_with_depth(tmp_path, curvature):
    points, levels, _ = _hierarchy(curvature)
    path, stats = poincare_disk(points, levels, curvature, tmp_path / "disk.png", max_points_per_level=10)
    _assert_png(path)
    radii = [stats[f"mean_ball_radius_{name}"] for name in ("country", "region", "subregion", "city")]
    assert all(0 < r < 1 for r in radii)
    assert radii == sorted(radii) and len(set(radii)) == 4
    # computed on all points, not on the 10-per-level sample
    ball_norm = np.linalg.norm(lorentz_to_ball(points, curvature), axis=1)
    assert stats["mean_ball_radius_city"] == pytest.approx(ball_norm[levels == 3].mean())


def test_poincare_disk_euclidean_and_bad_levels(tmp_path):
    points, levels, _ = _hierarchy(1.0)
    _, stats = poincare_disk(points[:, 1:], levels, 1.0, tmp_path / "e.png", geometry="euclidean")
    assert set(stats) == {f"mean_scaled_norm_{n}" for n in ("country", "region", "subregion", "city")}
    assert max(stats.values()) <= 1.0
    with pytest.raises(ValueError, match="levels: need"):
        poincare_disk(points, levels + 1, 1.0, tmp_path / "d.png")
    with pytest.raises(ValueError, match="geometry="):
        poincare_disk(points, levels, 1.0, tmp_path / "d.png", geometry="spherical")


def test_candidates_map(tmp_path):
    candidates = [
        {"lat": 48.85, "lon": 2.35, "prob": 0.5, "label": "Paris"},
        {"lat": 45.76, "lon": 4.84, "prob": 0.3, "label": "Lyon"},
        {"lat": 43.30, "lon": 5.37, "prob": 0.2, "label": "Marseille"},
    ]
    _assert_png(candidates_map(candidates, tmp_path / "c.png", truth=(47.2, -1.55)))
    spread = [*candidates, {"lat": -33.87, "lon": 151.2, "prob": 0.01, "label": "Sydney"}]
    _assert_png(candidates_map(spread, tmp_path / "world.png", title="spread"))
    with pytest.raises(ValueError, match="empty"):
        candidates_map([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"candidates\[0\] lacks keys \['prob'\]"):
        candidates_map([{"lat": 1.0, "lon": 2.0, "label": "a"}], tmp_path / "x.png")


def test_map_extent_zooms_and_falls_back_to_the_world():
    lon0, lon1, lat0, lat1 = map_extent(np.array([2.0, 3.0]), np.array([48.0, 49.0]))
    assert lon1 - lon0 == pytest.approx(20.0) and lat1 - lat0 == pytest.approx(10.0)
    assert lon0 < 2.0 and lon1 > 3.0 and lat0 < 48.0 and lat1 > 49.0
    lon0, lon1, lat0, lat1 = map_extent(np.array([179.0]), np.array([89.0]))  # kept inside the world
    assert (lon1, lat1) == (180.0, 90.0) and lon1 - lon0 == pytest.approx(20.0)
    assert map_extent(np.array([-120.0, 150.0]), np.array([0.0, 10.0])) == WORLD


def test_failed_save_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = level_accuracy_bars({"acc_country": 0.5}, tmp_path / "bars.png")
    before = path.read_bytes()

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        level_accuracy_bars({"acc_country": 0.9}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png"]


def test_plots_never_import_pyplot(tmp_path):
    """No pyplot: no global figure manager or backend switch, safe in Prefect worker threads."""
    code = (
        "import sys\n"
        "from flows.report.charts import level_accuracy_bars\n"
        f"level_accuracy_bars({{'acc_country': 0.5}}, {str(tmp_path / 'b.png')!r})\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
    assert (tmp_path / "b.png").is_file()


def test_entity_map_writes_a_png_and_checks_levels(tmp_path):
    from PIL import Image

    from flows.report.maps import entity_map

    lat = np.array([48.85, 45.76, 45.75, 45.74])
    lon = np.array([2.35, 4.83, 4.85, 4.86])
    out = entity_map(lat, lon, np.array([0, 1, 2, 3]), tmp_path / "e.png", n_images=[10, 5, 5, 5])
    with Image.open(out) as im:
        assert im.width > 800
    with pytest.raises(ValueError, match="levels"):
        entity_map(lat, lon, np.array([0, 1, 2, 7]), tmp_path / "bad.png")
