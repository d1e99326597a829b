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


def test_the_samples_select_csv_is_a_truth_file_as_it_is(csvs):
    """select.csv names its truth true_lat / true_lon and its sub-region 'area': read as test.csv's names."""
    assert score_prediction_csv(csvs[0], SELECT_CSV) == score_prediction_csv(csvs[0], csvs[1])


def _namibia_files(tmp_path: Path) -> tuple[Path, Path]:
    """Two rows in test.csv layout (unique_* columns, Namibia's 'NA' as written), predictions on the truth."""
    truth = pd.DataFrame({"id": ["1", "2"], "latitude": ["-22.5609", "39.9"], "longitude": ["17.0658", "116.4"],
                          "country": ["NA", "CN"], "unique_country": ["NA", "CN"],
                          "unique_region": ["Khomas_NA", "Beijing_CN"], "unique_sub-region": ["", ""],
                          "unique_city": ["Windhoek_NaN_Khomas_NA", "Beijing_NaN_Beijing_CN"]})
    pred = truth[["id", "latitude", "longitude"]]
    paths = tmp_path / "truth.csv", tmp_path / "pred.csv"
    truth.to_csv(paths[0], index=False)
    pred.to_csv(paths[1], index=False)
    return paths


def test_official_reads_namibia_as_the_official_loader_does(tmp_path):
    """The official test loader parses test.csv with pandas' default NA values: Namibia's 'NA'
    becomes NaN, so a Namibian row never scores a country hit; corrected scores it."""
    truth_csv, pred_csv = _namibia_files(tmp_path)
    lab = default_labeler().label(np.array([-22.5609, 39.9]), np.array([17.0658, 116.4]))
    assert list(lab["cc"]) == ["NA", "CN"]  # the predicted key is the string "NA"
    per_row = tmp_path / "rows.csv"
    official = score_prediction_csv(pred_csv, truth_csv, per_row_out=per_row)
    hits = pd.read_csv(per_row, keep_default_na=False)
    assert hits["hit_country"].tolist() == [False, True] and hits["hit_region"].tolist() == [True, True]
    assert official["acc_country"] == 0.5
    assert score_prediction_csv(pred_csv, truth_csv, variant="corrected")["acc_country"] == 1.0
    # row for row what the official loader makes of the file: pandas' defaults, then NaN -> "NaN"
    loaded = pd.read_csv(truth_csv, dtype=str)[list(UNIQUE_COLUMNS)].fillna("NaN")
    ours = truth_keys(*(pd.read_csv(truth_csv, dtype=str, keep_default_na=False)[c] for c in UNIQUE_COLUMNS))
    for level, column in zip(("country", "region", "subregion", "city"), UNIQUE_COLUMNS):
        assert ours[level].tolist() == loaded[column].tolist()


def test_our_copy_of_pandas_na_strings_is_pandas_own():
    from pandas._libs.parsers import STR_NA_VALUES

    from hierloc.infer.metrics import PANDAS_DEFAULT_NA

    assert PANDAS_DEFAULT_NA == set(STR_NA_VALUES)


def test_totals_are_exact_sums_where_the_official_float32_sums_drift_and_antipodes_are_finite():
    """Documented differences from the official code (hierloc.infer.metrics): our totals are
    float64 (the official running sums are float32) and our haversine clips (official: NaN at
    exact antipodes). Per-row values are the same."""
    import math

    from hierloc.geometry.geo import geoscore, haversine_km
    from hierloc.infer.metrics import osv5m_metrics

    rng = np.random.default_rng(0)
    d = rng.uniform(0, 20_000, 300_000)
    keys = {lv: np.array(["x"] * len(d), dtype=object) for lv in ("country", "region", "subregion", "city")}
    m = osv5m_metrics(d, keys, keys)
    assert m["mean_km"] == pytest.approx(math.fsum(d) / len(d), rel=1e-12)
    assert m["geoscore"] == pytest.approx(math.fsum(geoscore(d)) / len(d), rel=1e-12)
    running = np.float32(0)
    for batch in np.array_split(d.astype(np.float32), len(d) // 256):  # the official accumulation, batch by batch
        running = np.float32(running + batch.sum(dtype=np.float32))
    assert abs(float(running) / len(d) / m["mean_km"] - 1) > 1e-7  # float32 totals drift from the exact mean
    assert haversine_km(np.array([0.0]), np.array([0.0]), np.array([0.0]), np.array([180.0]))[0] == \
        pytest.approx(math.pi * 6371.0)
