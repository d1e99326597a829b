"""What an ingest run reports: counts per split (`SplitReport`) and in all (`IngestReport`).

`IngestReport` is written as `out_dir/ingest_report.json` by every run, the failed ones
included (ok = false, `error` from `too_bad_message`). `log_summary` logs the counts of each
split and each quarantine reason with its count and examples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)


@dataclass
class SplitReport:
    """Counts and outputs of one split.

    This run: n_in = n_kept + n_quarantined (rows read this run); n_recovered rows
    quarantined earlier as image_missing were admitted because their image arrived.
    All runs: kept_total + quarantined_total = n_in_total; bad_fraction =
    quarantined_total / n_in_total (what max_bad_fraction is checked against, as for a
    one-shot ingest of the whole input). mode: "full", "append" or "unchanged".
    CSV lines read this run: n_lines = header (when read from the start) + n_blank_lines
    + n_lines_kept + n_lines_quarantined (a row spans one line, or two with a quoted line break).
    """

    split: str
    csv_path: str
    mode: str = "full"
    full_reason: str = ""
    n_in: int = 0
    n_kept: int = 0
    n_quarantined: int = 0
    n_recovered: int = 0
    n_in_total: int = 0
    kept_total: int = 0
    quarantined_total: int = 0
    bad_fraction: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    reasons_total: dict[str, int] = field(default_factory=dict)
    manifest_path: str | None = None
    manifest_digest: str = ""
    n_parts: int = 0
    bytes_parsed: int = 0
    line_numbers: Literal["physical", "record"] = "physical"
    n_lines: int = 0
    n_blank_lines: int = 0
    n_lines_kept: int = 0
    n_lines_quarantined: int = 0
    n_images_indexed: int = 0
    n_containers_listed: int = 0
    n_containers_reused: int = 0
    n_duplicate_images: int = 0
    duplicate_image_examples: list[str] = field(default_factory=list)
    n_pending: int = 0
    features: dict[str, int] = field(default_factory=dict)  # WebDataset: name -> D
    warning: str = ""  # e.g. the split has no rows at all (a header-only CSV)


@dataclass
class IngestReport:
    """What `ingest_osv5m` read, kept, quarantined and wrote. JSON-serialisable."""

    root: str
    out_dir: str
    verify_images: str
    max_bad_fraction: float
    layout: str = "csv"
    ok: bool = True
    error: str | None = None
    noop: bool = False
    splits: dict[str, SplitReport] = field(default_factory=dict)
    quarantine_path: str = ""
    report_path: str = ""
    state_path: str = ""
    image_index_dir: str = ""
    feature_dir: str = ""
    elapsed_s: float = 0.0

    @classmethod
    def for_ingest(
        cls, root: Path, out_dir: Path, verify_images: str, max_bad_fraction: float, layout: str,
    ) -> IngestReport:
        """The report of an ingest of `root` into `out_dir` before any split is read: where it writes."""
        return cls(
            root=str(root), out_dir=str(out_dir), verify_images=verify_images, max_bad_fraction=max_bad_fraction,
            layout=layout, quarantine_path=str(out_dir / "quarantine.parquet"),
            report_path=str(out_dir / "ingest_report.json"), state_path=str(out_dir / "ingest_state.json"),
            image_index_dir=str(out_dir / "image_index"), feature_dir=str(out_dir / "features"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (nested dataclasses expanded)."""
        return asdict(self)

    def to_json(self) -> str:
        """Indented JSON text of `to_dict()`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def too_bad_message(report: IngestReport) -> str | None:
    """The IngestError message when some split exceeds max_bad_fraction, else None."""
    too_bad = [s for s in report.splits.values() if s.bad_fraction > report.max_bad_fraction]
    if not too_bad:
        return None
    return "; ".join(
        f"{s.split}: {s.quarantined_total} of {s.n_in_total} rows quarantined "
        f"({s.bad_fraction:.2%} > max_bad_fraction {report.max_bad_fraction:.2%}), "
        f"reasons {s.reasons_total}"
        for s in too_bad
    ) + f". See {report.quarantine_path}."


def log_summary(report: IngestReport) -> None:
    """Log counts per split and each reason with its count and examples; note splits without rows."""
    for s in report.splits.values():
        if s.n_in_total == 0:
            s.warning = f"{s.csv_path}: no rows (a header only)" if report.layout == "csv" else f"{s.csv_path}: no samples"
            log.warning("%s", s.warning)
        log.info(
            "%s (%s): %d rows in, %d kept, %d quarantined this run; %d kept, %d quarantined (%.2f%%) in all",
            s.split, s.mode, s.n_in, s.n_kept, s.n_quarantined, s.kept_total, s.quarantined_total,
            100 * s.bad_fraction,
        )
        for reason, count in s.reasons.items():
            log.warning(
                "%s: %d rows quarantined as %s, e.g.\n  %s",
                s.split, count, reason, "\n  ".join(s.examples[reason]),
            )
