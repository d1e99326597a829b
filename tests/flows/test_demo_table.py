"""The README's demo table is the rendering of docs/results/demo.json (what `make demo` saved)."""

from __future__ import annotations

import json

import pytest

from flows.report import demo_table as dt


def test_the_readme_block_is_the_committed_results_rendered():
    record = json.loads(dt.COMMITTED.read_text())
    readme = (dt.ROOT / "README.md").read_text()
    assert dt.block(record) in readme, "run `make demo` then `make readme-tables` (never edit the block by hand)"
    assert dt.predict_block(record) in (dt.ROOT / "docs" / "tools.md").read_text()
    assert record["metrics"]["n"] > 0 and record["date"] and record["machine"]


def test_the_table_rows_and_the_block_replacement(tmp_path):
    m = {"geoscore": 4977.66, "mean_km": 23.24, "median_km": 1.46, "n": 2000, "baseline_majority_acc_country": 0.218,
         **{f"acc_{lv}": 0.5 for lv in dt.LEVELS}, **{f"pick_acc_{lv}": 0.9 for lv in dt.LEVELS},
         **{f"acc_{r}km": 0.25 for r in (1, 25, 200, 750, 2500)}}
    table = dt.demo_table(m)
    assert table.splitlines()[0] == "| metric (2,000 test images) | value |"
    assert "| geoscore | 4977.7 |" in table and "| mean / median km | 23.2 / 1.5 |" in table
    assert "calibration" not in table  # a retrieval run has no beam probabilities
    record = {"date": "2026-12-04", "machine": "m", "flow_seconds": 213.0, "stage_seconds": {"train": 175.2},
              "metrics": m}
    text = f"intro\n{dt.START}\nold\n{dt.END}\nafter\n"
    new = dt.replace_block(text, dt.block(record))
    assert new.startswith("intro\n") and new.endswith("\nafter\n") and "old" not in new
    assert "the flow took 3 min 33 s (train 2 min 55 s)" in new
    with pytest.raises(ValueError, match="one block"):
        dt.replace_block("no markers", dt.block(record))
