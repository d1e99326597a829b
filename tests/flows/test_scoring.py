"""flows.report.scoring: the metrics CLI on the real OSV-5M sample (baseline predictions)."""

from __future__ import annotations

from pathlib import Path

import os
import numpy as np
import pandas as pd
import pytest

from flows.report.scoring import format_metrics_table, score_prediction_csv
from geodata.labels.geonames import default_labeler
from geodata.osv5m import UNIQUE_COLUMNS, unique_keys
from hierloc.infer.metrics import per_row_hits, predicted_keys, truth_keys

SELECT_CSV = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "select.csv"


@pytest.fixture(scope="module")
def select() -> pd.DataFrame:
    return pd.read_csv(SELECT_CSV, dtype=str, keep_default_na=False, na_filter=False)


@pytest.fixture()
def csvs(tmp_path, select) -> tuple[Path, Path, Path]:
    """PRED (baseline, shuffled), TRUTH with raw labels, TRUTH with unique_* columns."""
    pred = pd.DataFrame(
        {"id": select["id"], "latitude": select["pred_lat_base"], "longitude": select["pred_lon_base"]}
    ).sample(frac=1.0, random_state=0)
    truth_raw = pd.DataFrame(
        {
            "id": select["id"], "latitude": select["true_lat"], "longitude": select["true_lon"],
            "country": select["country"], "region": select["region"],
            "sub-region": select["area"], "city": select["city"],
        }
    )
    keys = unique_keys(select["country"], select["region"], select["area"], select["city"])
    truth_unique = pd.concat([truth_raw[["id", "latitude", "longitude"]], keys], axis=1)
    paths = (tmp_path / "pred.csv", tmp_path / "truth_raw.csv", tmp_path / "truth_unique.csv")
    for frame, path in zip((pred, truth_raw, truth_unique), paths):
        frame.to_csv(path, index=False)
    return paths


def test_baseline_reverse_geocoded_hits_equal_the_samples(select):
    """Labelling the baseline's predicted point with geodata gives the sample's hit columns."""
    lab = default_labeler().label(select["pred_lat_base"].astype(float), select["pred_lon_base"].astype(float))
    pred = predicted_keys(lab["cc"], lab["admin1"], lab["admin2"], lab["name"])
    keys = unique_keys(select["country"], select["region"], select["area"], select["city"])
    hits = per_row_hits(pred, truth_keys(*(keys[c] for c in UNIQUE_COLUMNS)))
    assert hits["country"].tolist() == (select["country_hit_base"] == "True").tolist()
    assert hits["region"].tolist() == (select["region_hit_base"] == "True").tolist()


@pytest.mark.parametrize("truth_index", [1, 2], ids=["raw-labels", "unique-columns"])
def test_score_matches_sample_base_columns(tmp_path, csvs, select, truth_index):
    per_row = tmp_path / "rows.csv"
    metrics = score_prediction_csv(csvs[0], csvs[truth_index], per_row_out=per_row)
    rows = pd.read_csv(per_row, dtype={"id": str}, keep_default_na=False)
    ref = select.set_index("id").loc[rows["id"]]  # ids kept as exact strings
    np.testing.assert_allclose(rows["dist_km"], ref["distance_base"].astype(float), rtol=0, atol=1e-6)
    np.testing.assert_allclose(rows["geoscore"], ref["score_base"].astype(float), rtol=0, atol=1e-6)
    assert rows["hit_country"].tolist() == (ref["country_hit_base"] == "True").tolist()
    assert rows["hit_region"].tolist() == (ref["region_hit_base"] == "True").tolist()
    assert metrics["n"] == 50
    assert metrics["acc_country"] == pytest.approx((select["country_hit_base"] == "True").mean())
    assert metrics["geoscore"] == pytest.approx(select["score_base"].astype(float).mean(), abs=1e-6)
    assert rows["id"].tolist() == pd.read_csv(csvs[0], dtype=str)["id"].tolist()  # prediction order


def test_both_truth_formats_and_variants(csvs):
    official = score_prediction_csv(csvs[0], csvs[1])
    assert score_prediction_csv(csvs[0], csvs[2]) == official
    corrected = score_prediction_csv(csvs[0], csvs[2], variant="corrected")
    for key in ("geoscore", "acc_country", "acc_region", "acc_25km"):
        assert corrected[key] == official[key]
    assert corrected["acc_city"] >= official["acc_city"]
    inclusive = score_prediction_csv(csvs[0], csvs[1], inclusive=True)
    assert all(inclusive[f"acc_{r}km"] >= official[f"acc_{r}km"] for r in (1, 25, 200, 750, 2500))


def test_id_mismatch_is_a_clear_error(tmp_path, csvs):
    truth = pd.read_csv(csvs[1], dtype=str, keep_default_na=False)
    short = tmp_path / "short.csv"
    truth.iloc[3:].to_csv(short, index=False)
    with pytest.raises(ValueError, match=r"3 id\(s\) of .*pred\.csv are not in .*short\.csv, e\.g\. \['"):
        score_prediction_csv(csvs[0], short)
    pred = pd.read_csv(csvs[0], dtype=str, keep_default_na=False)
    few = tmp_path / "few.csv"
    pred.iloc[2:].to_csv(few, index=False)
    with pytest.raises(ValueError, match=r"2 id\(s\) of .*truth_raw\.csv are not in .*few\.csv"):
        score_prediction_csv(few, csvs[1])


def test_bad_inputs_name_file_and_line(tmp_path, csvs):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,latitude,longitude\n1,2,3\n1,2,3\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: id '1' appears more than once"):
        score_prediction_csv(bad, csvs[1])
    bad.write_text("id,lat,lon\n1,2,3\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 1: missing column"):
        score_prediction_csv(bad, csvs[1])
    no_labels = tmp_path / "truth.csv"
    pd.read_csv(csvs[1], dtype=str)[["id", "latitude", "longitude"]].to_csv(no_labels, index=False)
    with pytest.raises(ValueError, match=r"truth\.csv, line 1: needs either columns"):
        score_prediction_csv(csvs[0], no_labels)


def test_format_metrics_table(csvs):
    text = format_metrics_table(score_prediction_csv(csvs[0], csvs[1]))
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert any(line.startswith("acc_country") and line.endswith("%") for line in lines)
    assert any(line.startswith("mean_km") and line.endswith(" km") for line in lines)
    assert lines[-1].split() == ["n", "50"]
