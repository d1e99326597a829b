"""The paper's main table with this run's numbers beside it: the evaluate run's ``paper_table``.

The rows are the HierLoc paper's main table (arXiv 2601.23064; ``HIERLOC.md`` section 9: OSV-5M
test, 210,122 images, the official OSV-5M metric code). Each paper column is one of our metric
names (``METRIC_OF_COLUMN``): GeoScore is ``geoscore``, mean km ``mean_km`` and the four level
accuracies the official reverse-geocoded ``acc_<level>`` (not ``pick_acc_<level>``), in percent.

Our row is marked comparable only when the run could be: evaluated on OSV-5M's test split (not the
embedded demo data) with all 210,122 images scored and the official metric variant; otherwise the
reasons are written in its ``comparable`` cell, so a demo number never sits unmarked beside the
paper's.
"""

from __future__ import annotations

import math
from pathlib import Path

#: Where the rows come from.
SOURCE = "HierLoc (arXiv 2601.23064), main table: OSV-5M test, 210,122 images (HIERLOC.md section 9)"
#: Images in OSV-5M's test split (the paper's denominator).
OSV5M_TEST_IMAGES = 210_122

#: Paper column -> our metric (MLflow and metrics.json); fractions are shown in percent.
METRIC_OF_COLUMN: dict[str, str] = {
    "GeoScore": "geoscore", "mean km": "mean_km", "country %": "acc_country", "region %": "acc_region",
    "subregion %": "acc_subregion", "city %": "acc_city",
}
_PERCENT = {"country %", "region %", "subregion %", "city %"}
COLUMNS: tuple[str, ...] = ("method", *METRIC_OF_COLUMN, "source", "comparable")

#: method, GeoScore, mean km, country, region, subregion, city (None: not reported, "-" in the paper).
PAPER_ROWS: tuple[tuple[str, float, float, float, float, float | None, float], ...] = (
    ("StreetCLIP zero-shot", 2273, 2854, 38.4, 20.8, 9.9, 14.8),
    ("regression", 3028, 1481, 56.5, 16.3, 1.5, 0.7),
    ("ISNs", 3331, 2308, 66.8, 39.4, None, 4.2),
    ("OSV-5M hybrid baseline", 3361, 1814, 68.0, 39.4, 10.3, 5.9),
    ("retrieval (StreetCLIP)", 3597, 1386, 73.4, 45.8, 28.4, 19.9),
    ("RFM S2", 3767, 1069, 76.2, 44.2, None, 5.4),
    ("HierLoc, CLIP ViT-L/14", 3850, 1067, 80.1, 52.9, 39.0, 22.2),
    ("HierLoc, DINOv3", 3963, 861, 82.9, 55.0, 40.7, 23.3),
)


def not_comparable_reasons(*, on_demo: bool, n_scored: int, variant: str) -> list[str]:
    """Why this run's numbers cannot stand beside the paper's (empty: they can)."""
    reasons = []
    if on_demo:
        reasons.append("not OSV-5M: the embedded demo data")
    elif n_scored != OSV5M_TEST_IMAGES:
        reasons.append(f"{n_scored:,} test images scored, not OSV-5M's {OSV5M_TEST_IMAGES:,}")
    if variant != "official":
        reasons.append(f"metric variant {variant!r}, the paper used the official one")
    return reasons


def _ours(metrics: dict, column: str) -> float | None:
    value = metrics.get(METRIC_OF_COLUMN[column])
    if value is None or not math.isfinite(float(value)):
        return None
    value = float(value) * (100.0 if column in _PERCENT else 1.0)
    return round(value, 1 if column in _PERCENT else 0)


def paper_table(metrics: dict, *, label: str, reasons: list[str]) -> dict:
    """{"columns", "data"} (MLflow's ``log_table`` form): the paper's rows, then this run's."""
    data = [[name, *values, "paper", "published"] for name, *values in PAPER_ROWS]
    data.append([label, *(_ours(metrics, c) for c in METRIC_OF_COLUMN), "this run",
                 "yes" if not reasons else "no: " + "; ".join(reasons)])
    return {"columns": list(COLUMNS), "data": data}


def markdown(table: dict) -> str:
    """The table as Markdown, with where the rows come from and which metric each column is."""
    def cell(v) -> str:
        return "-" if v is None else (f"{v:,.0f}" if isinstance(v, (int, float)) and abs(v) >= 1000 else str(v))

    lines = [f"Rows: {SOURCE}.",
             "Columns: " + ", ".join(f"{c} = `{m}`" for c, m in METRIC_OF_COLUMN.items()) + " (official variant).", "",
             "| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table["data"]]
    return "\n".join(lines) + "\n"


def is_demo_data(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds the embedded demo data (the project's demo folder or a demo build)."""
    from flows import settings
    from geodata.demo.folder import owns_folder

    root = Path(data_dir)
    return owns_folder(root) or root.resolve() == Path(settings.DEMO_DATA_DIR).resolve()


def write_paper_table(out_dir: Path, metrics: dict, *, data_dir: str | Path, variant: str, label: str) -> dict:
    """Build the table for this run and write ``out_dir/paper_table.md`` (atomically); returns the table."""
    from geodata.atomic import write_text_atomic

    reasons = not_comparable_reasons(on_demo=is_demo_data(data_dir), n_scored=int(metrics.get("n", 0)), variant=variant)
    table = paper_table(metrics, label=label, reasons=reasons)
    write_text_atomic(markdown(table), Path(out_dir) / "paper_table.md")
    return table
