"""geodata.labels.check on the real OSV-5M sample: coordinates against their own country label."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from geodata.labels.check import check_labels, country_mismatch, unassign

SAMPLE = Path(os.environ["HIERLOC_OSV5M_SAMPLE"])


def sample_manifest() -> pd.DataFrame:
    """select.csv's 50 real rows as manifest columns (country read with NA parsing off)."""
    sel = pd.read_csv(SAMPLE / "select.csv", dtype=str, keep_default_na=False)
    return pd.DataFrame({"id": sel["id"].astype(np.int64), "latitude": sel["true_lat"].astype(float),
                         "longitude": sel["true_lon"].astype(float), "country": sel["country"],
                         "line": np.arange(2, len(sel) + 2, dtype=np.int64)})


def test_real_rows_agree_with_their_country_and_swapped_ones_do_not() -> None:
    m = sample_manifest()
    mask, _ = country_mismatch(m)
    assert len(m) == 50 and not mask.any()  # OSV-5M's labels are GeoNames' own
    swapped = m.assign(latitude=m["longitude"], longitude=m["latitude"])
    ok = swapped["latitude"].abs() <= 90  # a swap that stays a valid coordinate
    mask, _ = country_mismatch(swapped[ok])
    assert mask.mean() > 0.9  # almost every swap lands in another country


def test_swapped_rows_are_quarantined_with_file_line_and_both_countries() -> None:
    m = sample_manifest()
    swap = m.index[m["longitude"].abs() <= 90][:3]
    m.loc[swap, ["latitude", "longitude"]] = m.loc[swap, ["longitude", "latitude"]].to_numpy()
    namibia = pd.DataFrame({"id": [1], "latitude": [-22.5594], "longitude": [17.0832], "country": ["NA"], "line": [99]})
    no_label = pd.DataFrame({"id": [2], "latitude": [0.0], "longitude": [0.0], "country": [""], "line": [100]})
    m = pd.concat([m, namibia, no_label], ignore_index=True)
    check = check_labels(m, "test", "test.csv")
    mismatched = np.flatnonzero(check.mask)
    assert set(mismatched) <= set(swap) and check.n >= 2  # Namibia's "NA" and an empty label are fine
    q = check.quarantine
    assert list(q.columns) == ["split", "file", "line", "id", "field", "reason", "value"]
    assert (q["reason"] == "label_mismatch").all() and (q["field"] == "country").all() and (q["file"] == "test.csv").all()
    assert q["line"].tolist() == m.loc[mismatched, "line"].tolist()
    first = m.loc[mismatched[0]]
    assert q["value"].iloc[0].startswith(f"country {first['country']!r}, but ({first['latitude']}, {first['longitude']})")

    assigned = pd.DataFrame({"id": m["id"], **{f"{lvl}_{k}": np.arange(len(m)) for lvl in
                                               ("country", "region", "subregion", "city") for k in ("id", "index")}})
    out = unassign(assigned, check.mask)
    assert (out.loc[check.mask].drop(columns="id") == -1).all().all()
    assert (out.loc[~check.mask] == assigned.loc[~check.mask]).all().all()
