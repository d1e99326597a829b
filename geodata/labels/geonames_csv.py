"""OSV-5M label columns from the nearest GeoNames place, for a DataFrame (``label_frame``) or a
CSV file (``label_csv``, ``hierloc label``), with geodata.labels.geonames' labeler."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from geodata.atomic import atomic_write_path
from geodata.ingest.csv_lines import not_utf8_message
from geodata.labels.coordinates import parse_coordinates
from geodata.labels.geonames import PLACE_FIELDS, GeoNamesLabeler, default_labeler
from geodata.osv5m import LABEL_COLUMNS, UNIQUE_COLUMNS

#: Rows per chunk when labelling a CSV (bounds memory on the 4.9M-row train.csv).
LABEL_CSV_CHUNK_ROWS = 500_000


def label_frame(
    df: pd.DataFrame,
    lat_col: str = "latitude",
    lon_col: str = "longitude",
    labeler: GeoNamesLabeler | None = None,
) -> pd.DataFrame:
    """Copy of ``df`` with OSV-5M label columns from the nearest GeoNames place.

    Sets country, region, sub-region, city (cc, admin1, admin2, name; "" when empty)
    and unique_country, unique_region, unique_sub-region (None without admin2),
    unique_city, via geodata.osv5m.unique_keys. Existing columns of those names are
    overwritten in place; new ones are appended. (N, C) -> (N, C + up to 8).
    """
    labeler = labeler or default_labeler()
    lat_deg, lon_deg = parse_coordinates(df, lat_col, lon_col)
    place = labeler.nearest(lat_deg, lon_deg)
    keys = labeler.place_keys()  # unique_keys of each place, gathered: same values, no per-row concatenation
    out = df.copy()
    for col, src in zip(LABEL_COLUMNS, PLACE_FIELDS):
        out[col] = labeler.place_column(src)[place]
    for col in UNIQUE_COLUMNS:
        out[col] = keys[col][place]
    return out


def label_csv(
    in_csv: str | Path,
    out_csv: str | Path,
    lat_col: str = "latitude",
    lon_col: str = "longitude",
    labeler: GeoNamesLabeler | None = None,
) -> int:
    """Label every row of ``in_csv`` (``hierloc label IN_CSV OUT_CSV``); returns rows written.

    All input columns are read and written back as strings with NA parsing off, so
    nothing else changes; label columns are set as in ``label_frame``. Reads in chunks
    of LABEL_CSV_CHUNK_ROWS rows. Raises ValueError naming the file and line for a
    missing column or a bad coordinate; ``out_csv`` is written atomically (nothing is
    left behind on error).
    """
    in_csv, out_csv = Path(in_csv), Path(out_csv)
    labeler = labeler or default_labeler()
    read_kw = dict(dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    try:
        header = pd.read_csv(in_csv, nrows=0, **read_kw)
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{in_csv}: empty file, expected a CSV header with {lat_col!r}, {lon_col!r}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(not_utf8_message(in_csv)) from None
    parse_coordinates(header, lat_col, lon_col, source=str(in_csv))  # column check only

    n_rows, n_chunks = 0, 0
    try:
        with atomic_write_path(out_csv) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                for chunk in pd.read_csv(in_csv, chunksize=LABEL_CSV_CHUNK_ROWS, **read_kw):
                    chunk.index = pd.RangeIndex(n_rows, n_rows + len(chunk))
                    lat_deg, lon_deg = parse_coordinates(
                        chunk, lat_col, lon_col, source=str(in_csv), first_line=n_rows + 2
                    )
                    labelled = label_frame(
                        chunk.assign(**{lat_col: lat_deg, lon_col: lon_deg}), lat_col, lon_col, labeler
                    )
                    # write the original coordinate strings back, not their float repr
                    labelled[lat_col] = chunk[lat_col].to_numpy()
                    labelled[lon_col] = chunk[lon_col].to_numpy()
                    labelled.to_csv(fh, index=False, header=n_chunks == 0, lineterminator="\n")
                    n_rows += len(chunk)
                    n_chunks += 1
                if n_chunks == 0:  # header-only input may yield no chunk: write the header alone
                    label_frame(header, lat_col, lon_col, labeler).to_csv(
                        fh, index=False, lineterminator="\n"
                    )
    except UnicodeDecodeError:  # pandas names neither the file nor the line
        raise ValueError(not_utf8_message(in_csv)) from None
    return n_rows
