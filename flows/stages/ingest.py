"""Stage 1, ingest: an OSV-5M folder into Parquet manifests and a quarantine."""

from __future__ import annotations

from pathlib import Path

from flows.stages.data_dir import SPLITS
from flows.stages.faults import check_splits_have_rows
from geodata.ingest.run import ingest_osv5m


def run_ingest(data_dir: Path, out_dir: Path, verify_images: str = "decode", max_bad_fraction: float = 0.05,
               layout: str = "auto", incremental: bool = True) -> dict:
    """Read an OSV-5M folder (CSV + zips, or the WebDataset copy) into Parquet manifests and a
    quarantine (geodata.ingest.run); incremental: only new CSV bytes and new shards on a re-run."""
    report = ingest_osv5m(Path(data_dir), Path(out_dir), SPLITS, verify_images, max_bad_fraction,
                          layout=layout, incremental=incremental).to_dict()
    check_splits_have_rows(report)  # EmptySplitError: a header-only CSV, or every row quarantined
    return report
