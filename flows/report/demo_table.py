"""The README's results table, from a run's metrics: what `hierloc demo` prints and what
``python -m flows.report.demo_table`` writes into the README.

`hierloc demo` saves its metrics, timings, machine and date as ``<work>/demo-results.json``;
``python -m flows.report.demo_table [--results FILE]`` (``make readme-tables``) copies that file
to ``docs/results/demo.json`` with the answer of `hierloc predict` on a real OSV-5M photo by the
demo's model, and rewrites the README's block between the ``demo-table`` markers and
docs/tools.md's ``predict-example`` block from it, so every number there comes from a
rerunnable command (a test checks that both blocks are the rendering of the committed file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

from geodata.atomic import write_text_atomic
from geodata.progress import format_seconds

LEVELS = ("country", "region", "subregion", "city")
START = "<!-- demo-table: written by `make readme-tables` from docs/results/demo.json; do not edit by hand -->"
END = "<!-- /demo-table -->"
PREDICT_START = "<!-- predict-example: written by `make readme-tables`; do not edit by hand -->"
PREDICT_END = "<!-- /predict-example -->"
SAMPLE_PHOTO = "1113744692540897.jpg"  # a real OSV-5M test photo of shared/osv5m-sample
ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "results" / "demo.json"


def _pct(m: dict, keys: list[str]) -> str:
    return " / ".join(f"{100 * m[k]:.1f}" for k in keys) + " %"


def demo_table(m: dict) -> str:
    """The metrics of one evaluation (flows/stages/evaluate.py) as the README's markdown table."""
    rows = [
        ("geoscore", f"{m['geoscore']:.1f}"),
        ("mean / median km", f"{m['mean_km']:.1f} / {m['median_km']:.1f}"),
        ("acc_country / region / subregion / city (reverse-geocoded, official)", _pct(m, [f"acc_{lv}" for lv in LEVELS])),
        ("pick_acc_country / region / subregion / city (beam search picks)", _pct(m, [f"pick_acc_{lv}" for lv in LEVELS])),
        ("acc 1 / 25 / 200 / 750 / 2500 km", _pct(m, [f"acc_{r}km" for r in (1, 25, 200, 750, 2500)])),
        ("always the most frequent training country", _pct(m, ["baseline_majority_acc_country"])),
    ]
    if all(f"mean_prob_{lv}" in m for lv in LEVELS):
        rows.append(("mean beam probability of the pick / calibration error, country .. city",
                     _pct(m, [f"mean_prob_{lv}" for lv in LEVELS]) + "; " + _pct(m, [f"ece_{lv}" for lv in LEVELS])))
    lines = [f"| metric ({int(m['n']):,} test images) | value |", "|---|---|"]
    return "\n".join([*lines, *(f"| {name} | {value} |" for name, value in rows)])


def results_record(metrics: dict, seconds: float, stage_seconds: dict[str, float], config: dict) -> dict:
    """What `hierloc demo` saves: the metrics, the flow's wall time per stage, the machine and the date."""
    return {"date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine(), "flow_seconds": seconds,
            "load_average_15min": round(os.getloadavg()[2], 1),
            "stage_seconds": stage_seconds, "config": config,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def stage_seconds(parent_run_id: str) -> dict[str, float]:
    """Wall time of each stage of a pipeline run, from its MLflow child runs (in start order)."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs(
        [MlflowClient().get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=100)
    out = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        if r.info.end_time and r.data.tags.get("stage"):
            out[r.data.tags["stage"]] = (r.info.end_time - r.info.start_time) / 1000
    return out


def save_demo_results(cfg, result: dict, seconds: float) -> tuple[str, Path]:
    """Write ``<work>/demo-results.json`` for a finished `hierloc demo`; return the README block's
    text (without markers) and the file's path."""
    record = results_record(result["metrics"], seconds, stage_seconds(result["parent_run_id"]),
                            cfg.model_dump(mode="json"))
    path = Path(cfg.work_dir) / "demo-results.json"
    write_text_atomic(json.dumps(record, indent=2, sort_keys=True) + "\n", path)
    return "\n".join(block(record).splitlines()[1:-1]), path


def machine() -> str:
    """'2-core x86_64 CPU, 24 GiB, no GPU, Python 3.11' (what the numbers ran on)."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return (f"{os.cpu_count()}-core {platform.machine()} CPU, {mem:.0f} GiB, {gpu}, "
            f"Python {platform.python_version()}")


def block(record: dict) -> str:
    """The README block: a line saying where the numbers come from, then the table."""
    order = ("ingest", "hierarchy", "features", "train", "export", "evaluate", "register")
    timed = sorted(record.get("stage_seconds", {}).items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
    stages = ", ".join(f"{k} {format_seconds(v)}" for k, v in timed)
    head = (f"`make demo` on {record['date']}, {record['machine']}, default settings: the flow took "
            f"{format_seconds(record['flow_seconds'])}" + (f" ({stages})" if stages else "")
            + (f"; load average {record['load_average_15min']} over the last 15 minutes (other jobs shared the "
               "cores: times scale with it, the metrics do not)" if record.get("load_average_15min", 0) > 1.5 else "")
            + ".")
    return "\n".join([START, head, "", demo_table(record["metrics"]), END])


def replace_block(text: str, new_block: str, start: str = START, end: str = END) -> str:
    """``text`` with its block between ``start`` and ``end`` replaced; ValueError when the markers
    are not there once."""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"the file must hold one block between {start!r} and {end!r}")
    return pattern.sub(lambda _: new_block, text)


def predict_block(record: dict) -> str:
    """docs/tools.md's example answer of `hierloc predict` (what `make readme-tables` recorded)."""
    ex = record["predict_example"]
    return "\n".join([PREDICT_START, "```", f"$ {ex['command']}", ex["output"].rstrip("\n"), "```", PREDICT_END])


def predict_example(work_dir: Path) -> dict:
    """`hierloc predict` on a real OSV-5M photo of the sample with the last demo's bundle: the
    command (as run from the sample folder) and what it printed."""
    import subprocess
    import sys

    from flows.stages.export import latest_bundle

    bundle = latest_bundle(Path(work_dir))
    if bundle is None:
        raise FileNotFoundError(f"no exported bundle under {work_dir}: run `make demo` first")
    sample = Path(os.environ.get("HIERLOC_OSV5M_SAMPLE", ROOT.parent / "shared" / "osv5m-sample"))
    args = ["predict", f"images/{SAMPLE_PHOTO}", "--top-k", "3"]
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--model", str(bundle)],
                         cwd=sample, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return {"command": "hierloc " + " ".join(args), "output": out.stdout}


def main(argv: list[str] | None = None) -> None:
    from flows import settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path(settings.WORK_DIR) / "demo-results.json",
                    help="what `hierloc demo` saved (default: the last run's)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--check", action="store_true", help="only say whether the README matches docs/results/demo.json")
    args = ap.parse_args(argv)
    tools = ROOT / "docs" / "tools.md"
    if args.check:
        record = json.loads(COMMITTED.read_text())
        ok = block(record) in args.readme.read_text() and predict_block(record) in tools.read_text()
        print("README and docs/tools.md match docs/results/demo.json" if ok else "they differ from docs/results/demo.json")
        raise SystemExit(0 if ok else 1)
    record = json.loads(args.results.read_text())
    record["predict_example"] = predict_example(args.results.parent)
    COMMITTED.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(record, indent=2, sort_keys=True) + "\n", COMMITTED)
    write_text_atomic(replace_block(args.readme.read_text(), block(record)), args.readme)
    write_text_atomic(replace_block(tools.read_text(), predict_block(record), PREDICT_START, PREDICT_END), tools)
    print(f"wrote {COMMITTED}, the demo table of {args.readme} and the predict example of {tools}")


if __name__ == "__main__":
    main()
