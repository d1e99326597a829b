"""Legible maps: candidate labels never collide and never hide the top answer's label
(flows.report.labels, maps.candidates_map), and error_map's points and lines scale with their number."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from matplotlib.text import Annotation
from PIL import Image
from typer.testing import CliRunner

from flows.cli.main import app
from flows.report import labels, maps

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))
RANK = re.compile(r"^(\d+)\. ")


def crowded(n: int, *, lat: float = 45.76, lon: float = 4.84, seed: int = 0) -> list[dict]:
    """``n`` candidates within ~1 km of (lat, lon), probabilities decreasing, long-ish names."""
    rng = np.random.default_rng(seed)
    prob = np.sort(rng.dirichlet(np.ones(n)))[::-1]
    return [{"lat": min(lat + rng.uniform(-0.004, 0.004), 90.0), "lon": min(lon + rng.uniform(-0.006, 0.006), 180.0),
             "prob": float(p), "label": f"Lyon quartier {i}, FR"} for i, p in enumerate(prob, start=1)]


@pytest.fixture()
def drawn(monkeypatch):
    """The figures maps.save_png writes (the real write still happens)."""
    figures: list[Figure] = []
    real = maps.save_png

    def keep(fig, path):
        figures.append(fig)
        return real(fig, path)

    monkeypatch.setattr(maps, "save_png", keep)
    return figures


def check_labels(fig: Figure, n_candidates: int, truth: tuple[float, float] | None = None) -> dict[int, object]:
    """Render ``fig`` and check, from the drawn artists' window extents: the top label is there, above
    everything, and overlapped by nothing; no two labels overlap; each candidate is labelled or listed.
    -> {rank: label box} of the labels drawn on the map."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    anns = [t for t in ax.texts if isinstance(t, Annotation) and RANK.match(t.get_text())]
    boxes = {int(RANK.match(a.get_text()).group(1)): a.get_bbox_patch().get_window_extent(renderer) for a in anns}
    assert len(boxes) == len(anns), "a rank is labelled twice"
    assert 1 in boxes, "the top answer's label is not drawn"
    top = next(a for a in anns if a.get_text().startswith("1. "))
    assert top.get_visible() and top.get_zorder() > max(c.get_zorder() for c in ax.get_children() if c is not top)
    assert ax.bbox.extents[0] <= boxes[1].x0 and boxes[1].x1 <= ax.bbox.extents[2]
    ranks = sorted(boxes)
    for i, a in enumerate(ranks):
        for b in ranks[i + 1:]:
            assert not boxes[a].overlaps(boxes[b]), f"labels {a} and {b} overlap"
    listed = [t for t in fig.findobj(lambda x: x.get_gid() == "candidate-list")]
    lines = listed[0].get_text().splitlines() if listed else []
    in_list = {int(m.group(1)) for line in lines if (m := RANK.match(line))}
    more = next((int(m.group(1)) for line in lines if (m := re.match(r"^\+ (\d+) more", line))), 0)
    assert not in_list & set(boxes), "a candidate is both labelled and listed"
    counted_only = set(range(n_candidates - more + 1, n_candidates + 1))  # the last ones, on the "+ N more" line
    assert set(range(1, n_candidates + 1)) - set(boxes) - in_list == counted_only
    for t in listed:
        extent = t.get_window_extent(renderer)
        assert not any(extent.overlaps(b) for b in boxes.values()), "the list covers a label"
    if truth is not None:  # no label but the top one covers the truth star's centre
        x, y = ax.transData.transform((truth[1], truth[0]))
        assert not any(b.contains(x, y) for r, b in boxes.items() if r != 1)
    return boxes


@pytest.mark.parametrize("n", [10, 14])
def test_crowded_candidates_get_labels_that_do_not_collide(tmp_path, drawn, n):
    cands = crowded(n)
    out = maps.candidates_map(cands, tmp_path / "c.png", title="crowded")
    assert Image.open(out).size[0] >= 1000
    boxes = check_labels(drawn[-1], n)
    assert len(boxes) == min(n, maps.MAX_LABELS)  # room for all the labels around one spot


def test_no_label_covers_the_top_marker_the_truth_or_the_legend(tmp_path, drawn):
    truth = (46.2, 6.1)
    maps.candidates_map(crowded(10), tmp_path / "t.png", truth=truth)
    fig = drawn[-1]
    boxes = check_labels(fig, 10, truth)
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert not any(b.overlaps(legend) for b in boxes.values())
    top = crowded(10)[0]  # sorted by prob: the top answer, the biggest marker (330 pt^2)
    x, y = ax.transData.transform((top["lon"], top["lat"]))
    r = np.sqrt(330.0) / 2 * fig.dpi / 72
    marker = Bbox([[x - r, y - r], [x + r, y + r]])
    assert not any(b.overlaps(marker) for rank, b in boxes.items() if rank != 1)


def test_labels_that_find_no_place_are_listed(tmp_path, drawn):
    """Crowded in the map's corner (the North-East end of the world): few slots are inside the axes."""
    cands = crowded(10, lat=89.999, lon=179.999)
    maps.candidates_map(cands, tmp_path / "corner.png")
    fig = drawn[-1]
    boxes = check_labels(fig, 10)
    assert len(boxes) < 10 and fig.findobj(lambda x: x.get_gid() == "candidate-list")


def test_candidates_past_max_labels_are_listed_then_counted(tmp_path):
    fig, where = maps.candidates_figure(crowded(60))
    boxes = check_labels(fig, 60)
    assert where.labelled == sorted(boxes) == list(range(1, maps.MAX_LABELS + 1))
    assert where.listed == list(range(maps.MAX_LABELS + 1, maps.MAX_LABELS + maps.MAX_LISTED + 1))
    assert where.unlisted == 60 - maps.MAX_LABELS - maps.MAX_LISTED
    fig, where = maps.candidates_figure(crowded(30), max_labels=30)  # more labels than room: some drop
    boxes = check_labels(fig, 30)
    assert sorted(boxes) == where.labelled and where.listed and len(where.labelled) + len(where.listed) == 30
    with pytest.raises(ValueError, match="max_labels=0"):
        maps.candidates_figure(crowded(3), max_labels=0)


def test_spread_candidates_are_all_labelled(tmp_path, drawn):
    cities = [(48.85, 2.35, "Paris"), (45.76, 4.84, "Lyon"), (-33.87, 151.2, "Sydney"), (40.7, -74.0, "New York"),
              (48.2, 16.37, "Vienna"), (50.85, 4.35, "Brussels")]
    cands = [{"lat": la, "lon": lo, "prob": p, "label": name}
             for (la, lo, name), p in zip(cities, [0.4, 0.2, 0.15, 0.1, 0.08, 0.07])]
    maps.candidates_map(cands, tmp_path / "w.png", truth=(52.5, 13.4))
    assert len(check_labels(drawn[-1], 6, (52.5, 13.4))) == 6


def test_predict_map_on_a_sample_photo(demo_bundle, tmp_path, drawn):
    png = tmp_path / "map.png"
    res = CliRunner().invoke(app, ["predict", str(PHOTOS[0]), "--model", str(demo_bundle), "--top-k", "12",
                                   "--beam-k", "12", "--json", "--map", str(png)], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr[-800:]
    (entry,) = json.loads(res.stdout)
    assert entry["map"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(entry["candidates"]) == 12
    boxes = check_labels(drawn[-1], 12)
    top = next(t for t in drawn[-1].axes[0].texts if t.get_text().startswith("1. "))
    assert entry["candidates"][0]["path"].rsplit(" > ", 1)[-1] in top.get_text()
    assert len(boxes) <= maps.MAX_LABELS


def test_maps_never_import_pyplot(tmp_path):
    code = ("import sys\nfrom flows.report.maps import candidates_map\n"
            f"candidates_map([{{'lat': 1.0, 'lon': 2.0, 'prob': 1.0, 'label': 'a'}}], {str(tmp_path / 'c.png')!r})\n"
            "print('matplotlib.pyplot' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False" and (tmp_path / "c.png").is_file()


# --- the placement itself ---------------------------------------------------------------
def test_place_keeps_the_first_label_and_drops_what_does_not_fit():
    slot_list = labels.slots(5.0, 14.0)
    anchors = np.full((30, 2), 100.0)
    sizes = np.tile([80.0, 12.0], (30, 1))
    markers = [(95.0, 95.0, 105.0, 105.0)] * 30
    frame = (0.0, 0.0, 400.0, 300.0)
    placed = labels.place(anchors, sizes, [2.0] * 30, [slot_list] * 30, markers, frame, [], 1.0)
    assert placed[0] is not None and any(p is None for p in placed)
    boxes = [p[1] for p in placed if p is not None]
    assert all(labels.inside(b, frame) for b in boxes)
    assert not any(labels.overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert not any(labels.overlaps(b, markers[0]) for b in boxes[1:])
    # the first label is placed even when nothing fits in the frame
    tiny = (99.0, 99.0, 101.0, 101.0)
    placed = labels.place(anchors[:3], sizes[:3], [2.0] * 3, [slot_list] * 3, markers[:3], tiny, [], 1.0)
    assert placed[0] is not None and placed[1:] == [None, None]


def test_place_avoids_obstacles_and_prefers_uncovered_markers():
    slot_list = labels.slots(5.0, 14.0)
    frame = (0.0, 0.0, 1000.0, 1000.0)
    right = labels.label_box((500.0, 500.0), (80.0, 12.0), slot_list[0], 1.0, 2.0)
    placed = labels.place(np.array([[500.0, 500.0]]), np.array([[80.0, 12.0]]), [2.0], [slot_list],
                          [(495.0, 495.0, 505.0, 505.0)], frame, [right], 1.0)
    assert placed[0][0] == slot_list[1]  # the right slot is taken by the obstacle: the left one
    # the second label's right slot would cover a third marker: it goes left
    anchors = np.array([[100.0, 100.0], [500.0, 500.0]])
    markers = [(95.0, 95.0, 105.0, 105.0), (495.0, 495.0, 505.0, 505.0), (540.0, 495.0, 550.0, 505.0)]
    placed = labels.place(anchors, np.tile([80.0, 12.0], (2, 1)), [2.0, 2.0], [slot_list] * 2, markers, frame, [], 1.0)
    assert placed[1][0] == slot_list[1]


def test_box_helpers():
    assert labels.overlaps((0, 0, 2, 2), (1, 1, 3, 3)) and not labels.overlaps((0, 0, 1, 1), (1, 0, 2, 1))
    assert labels.crosses((0, 0), (10, 10), (4, 4, 6, 6)) and not labels.crosses((0, 0), (10, 0), (4, 1, 6, 3))
    assert labels.crosses((5, 0), (5, 10), (4, 4, 6, 6)) and not labels.crosses((0, 0), (3, 3), (4, 4, 6, 6))
    s = labels.Slot(10.0, 0.0, "left", "center", False)
    assert labels.label_box((100.0, 50.0), (40.0, 10.0), s, 2.0, 1.0) == (119.0, 44.0, 161.0, 56.0)


# --- error_map: marker size and alpha from the number of points --------------------------
def test_point_and_line_style_shrink_smoothly_with_the_crowd():
    ns = [10, 1_000, 100_000]
    points = [maps.point_style(n) for n in ns]
    lines = [maps.line_style(n) for n in ns]
    for (s0, a0, e0), (s1, a1, e1) in zip(points, points[1:]):
        assert s0 > s1 and a0 > a1 and e0 > e1
    for (w0, a0), (w1, a1) in zip(lines, lines[1:]):
        assert w0 > w1 and a0 > a1
    assert 20.0 <= points[0][0] <= 60.0 and points[0][1] == 1.0  # tens of points: big (5-8 pt wide), opaque
    assert 1.0 <= points[-1][0] <= 4.0 and 0.2 <= points[-1][1] <= 0.4  # 100k: small, translucent
    assert all(0.2 <= w <= 2.0 and 0.15 <= a <= 1.0 for w, a in lines)
    assert maps.point_style(1) == points[0] and maps.point_style(10**7) == points[-1]  # clamped
    n = np.unique(np.logspace(0, 6, 200).astype(int))  # smooth: no jump between neighbours
    sizes = np.array([maps.point_style(int(k))[0] for k in n])
    assert np.all(np.diff(sizes) <= 0) and np.max(np.abs(np.diff(np.log(sizes)))) < 0.1


def _chromatic_pixels(path: Path) -> int:
    """Pixels of the map part (left of the colour bar) that are coloured, not grey or the sea's tint."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    rgb = rgb[:, : int(0.86 * rgb.shape[1])]
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 30).sum())


def test_error_map_points_and_lines_are_visible(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    n = 30
    t_lat, t_lon = rng.uniform(-50, 65, n), rng.uniform(-170, 170, n)
    p_lat, p_lon = np.clip(t_lat + rng.normal(0, 8, n), -90, 90), (t_lon + rng.normal(0, 20, n) + 180) % 360 - 180
    new = _chromatic_pixels(maps.error_map(t_lat, t_lon, p_lat, p_lon, tmp_path / "new.png"))
    monkeypatch.setattr(maps, "point_style", lambda n: (7.0, 1.0, 0.0))  # the settings before issue 17
    monkeypatch.setattr(maps, "line_style", lambda n: (0.3, 0.35))
    old = _chromatic_pixels(maps.error_map(t_lat, t_lon, p_lat, p_lon, tmp_path / "old.png"))
    assert new > 2.5 * old > 0, (new, old)
