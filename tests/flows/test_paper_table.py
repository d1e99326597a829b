"""The paper_table of an evaluate run: the paper's rows, ours beside them, comparable only on OSV-5M."""

from __future__ import annotations

import pytest

from flows.report.paper_table import (COLUMNS, METRIC_OF_COLUMN, OSV5M_TEST_IMAGES, PAPER_ROWS, is_demo_data,
                                      markdown, not_comparable_reasons, paper_table, write_paper_table)

METRICS = {"geoscore": 3851.4, "mean_km": 1066.6, "acc_country": 0.8012, "acc_region": 0.529,
           "acc_subregion": float("nan"), "acc_city": 0.2222, "n": OSV5M_TEST_IMAGES}


def test_the_rows_are_hierlocs_main_table():
    """HIERLOC.md section 9, row by row (the numbers the paper publishes)."""
    rows = {r[0]: r[1:] for r in PAPER_ROWS}
    assert rows["HierLoc, DINOv3"] == (3963, 861, 82.9, 55.0, 40.7, 23.3)
    assert rows["HierLoc, CLIP ViT-L/14"] == (3850, 1067, 80.1, 52.9, 39.0, 22.2)
    assert rows["ISNs"][4] is None and rows["RFM S2"][4] is None  # "-" in the paper
    assert len(rows) == 8
    assert set(METRIC_OF_COLUMN.values()) == {"geoscore", "mean_km", "acc_country", "acc_region", "acc_subregion",
                                              "acc_city"}


@pytest.mark.parametrize("on_demo, n, variant, want", [
    (False, OSV5M_TEST_IMAGES, "official", []),
    (True, 60, "official", ["not OSV-5M: the embedded demo data"]),
    (False, 1_000, "official", ["1,000 test images scored, not OSV-5M's 210,122"]),
    (False, OSV5M_TEST_IMAGES, "corrected", ["metric variant 'corrected', the paper used the official one"]),
])
def test_our_row_is_comparable_only_on_all_of_osv5m_with_the_official_metrics(on_demo, n, variant, want):
    assert not_comparable_reasons(on_demo=on_demo, n_scored=n, variant=variant) == want


def test_our_row_sits_beside_the_papers_in_percent_and_km():
    table = paper_table(METRICS, label="this run", reasons=[])
    assert table["columns"] == list(COLUMNS)
    assert [r[0] for r in table["data"][:-1]] == [r[0] for r in PAPER_ROWS]
    ours = table["data"][-1]
    assert ours == ["this run", 3851, 1067, 80.1, 52.9, None, 22.2, "this run", "yes"]
    md = markdown(table)
    assert "| this run | 3,851 | 1,067 | 80.1 | 52.9 | - | 22.2 | this run | yes |" in md
    assert "country % = `acc_country`" in md


def test_a_demo_folder_is_never_comparable(tmp_path):
    from geodata.demo.folder import claim_folder

    claim_folder(tmp_path / "demo")
    assert is_demo_data(tmp_path / "demo") and not is_demo_data(tmp_path / "osv5m")
    table = write_paper_table(tmp_path, METRICS, data_dir=tmp_path / "demo", variant="official", label="x")
    assert table["data"][-1][-1] == "no: not OSV-5M: the embedded demo data"
    assert (tmp_path / "paper_table.md").read_text() == markdown(table)
