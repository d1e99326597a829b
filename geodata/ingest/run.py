"""Ingest an OSV-5M release into typed Parquet manifests, quarantining bad rows; incremental.

Inputs (DATA.md), detected per root (`layout="auto"`):

- "csv": `root/{split}.csv` (32 columns, `OSV5M_COLUMNS` order) and the photos under
  `root/images/{split}/` (zip or tar shards, or unzipped folders, any depth);
- "webdataset": tar shards `root/{split}/**/*.tar` of jpg + json + *.npy samples
  (geodata.ingest.webdataset); the .npy features go to `out_dir/features/<name>/`.

Outputs:

- `out_dir/manifest/{split}.parquet/part-*.parquet`: the kept rows, one part per run
  (`pd.read_parquet(out_dir / "manifest" / f"{split}.parquet")` reads them all);
  `MANIFEST_SCHEMA` (geodata.ingest.validate): id int64, latitude/longitude float64, the other 29 columns as strings
  exactly as in the input (Namibia's "NA" and empty fields stay strings), plus split,
  line, image_container, image_member, image_offset, image_size.
- `out_dir/quarantine.parquet`: every rejected row of every run (`QUARANTINE_COLUMNS`),
  with the first reason that applies, in `REASONS` order (geodata.ingest.quarantine).
- `out_dir/image_index/{split}.parquet`: every listed image (id, container, member,
  size_bytes, offset, refused), from zip central directories / tar headers.
- `out_dir/ingest_report.json`: `IngestReport` (geodata.ingest.report);
  `out_dir/ingest_state.json`: what is ingested (geodata.ingest.incremental).

One streaming pass per CSV (geodata.ingest.split_csv): each pyarrow batch is judged
(geodata.ingest.validate: row checks, duplicate ids against all earlier rows as numpy, image
lookup in geodata.ingest.image_index and decoding) and its kept rows go straight to the manifest
part. Memory: one batch, the image index and a few int64 arrays per row; never a Python
object per row. `ingest_osv5m` plans a run (geodata.ingest.plan), runs each split's pass
(here) and commits the result (geodata.ingest.commit).

Incremental: a re-run parses only the CSV bytes appended since the last run (when the
earlier bytes still hash the same), lists only new or changed image shards, and re-checks
rows quarantined earlier as image_missing (kept aside in a pending table) against new
shards: found ones join the manifest. A CSV whose ingested bytes changed, a removed or
rewritten shard, or other settings make a full re-ingest of every split (the report says
why). A run with no new input is a no-op. Order guarantee: parts in run order, rows in
file order within a part, rows admitted late (their image came later) in the part of the
run that admitted them; sort by (split, line) for file order.

Crash safety: a run writes its tables under `.runs/run-N/`, moves its manifest parts into
place, then saves the state (the commit point) and only then publishes quarantine.parquet
and image_index/ and removes what the state no longer lists. A run killed before the
state is redone by the next run; one killed after it is finished by the next run (even a
no-op one publishes again). `crash_point` (geodata.ingest.commit) lets tests kill the
process at each step.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from geodata.ingest.commit import commit_run, crash_point, finish_noop
from geodata.ingest.image_index import decode_checker
from geodata.ingest.image_store import ImageStore
from geodata.ingest.plan import Layout, RunPlan, VerifyImages, check_args, plan_run
from geodata.ingest.report import IngestReport, SplitReport
from geodata.ingest.split import PartWriter, SplitRun
from geodata.ingest.split_csv import ingest_csv_split
from geodata.ingest.split_wds import ingest_wds_split

__all__ = ["IngestError", "ingest_osv5m", "run_splits"]

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """Too many rows of a split were quarantined (see the report and quarantine.parquet)."""


def ingest_osv5m(
    root: Path,
    out_dir: Path,
    splits: tuple[str, ...] = ("train", "test"),
    verify_images: VerifyImages = "decode",
    max_bad_fraction: float = 0.05,
    *,
    decode_workers: int | None = None,
    layout: Layout = "auto",
    incremental: bool = True,
    features: tuple[str, ...] | None = None,
) -> IngestReport:
    """Validate an OSV-5M release (or only what was added since the last run) into `out_dir`.

    verify_images: "none" skips image lookup (CSV: image_* columns null, no images/ folder
    needed); "exists" quarantines rows without an image (`<id>.jpg` under
    root/images/{split}, zips/tars/folders at any depth; WebDataset: the sample's jpg);
    "decode" also decodes each image fully (threads: `decode_workers`, default the CPU
    count) and quarantines failures.

    Duplicate ids: within and across splits and runs, the first occurrence in `splits`
    order, then file order, is kept. Duplicates are looked for among rows that passed the
    id/latitude/longitude checks; image checks run after, so a first occurrence with a
    missing image still makes later copies duplicates.

    layout: "auto" (CSV when root/{split}.csv exists, else WebDataset tars), "csv" or
    "webdataset". incremental=False ignores what out_dir holds. features (WebDataset):
    the .npy feature names every sample must have; None = those of the first sample.

    Raises OSV5MFormatError (bad header / unreadable CSV), FileNotFoundError (missing
    input), UnsafeMemberError (an archive with escaping member names), IngestError when a
    split's quarantined fraction (over all runs) exceeds `max_bad_fraction`: then
    quarantine.parquet and ingest_report.json (ok = false) are written, but no manifest
    (manifests and state of all splits are removed: the next run starts from scratch).
    """
    t0 = time.perf_counter()
    root, out_dir, splits = Path(root), Path(out_dir), tuple(splits)
    check_args(verify_images, max_bad_fraction, splits, layout)
    plan = plan_run(root, out_dir, splits, verify_images, layout, incremental)
    report = IngestReport.for_ingest(root, out_dir, verify_images, max_bad_fraction, plan.layout)
    if plan.nothing_new:
        finish_noop(report, plan, t0)
    else:
        runs = run_splits(plan, decode_workers or os.cpu_count() or 1, features)
        commit_run(report, plan, runs, t0)
    if not report.ok:
        raise IngestError(report.error)
    return report


def run_splits(plan: RunPlan, workers: int, features: tuple[str, ...] | None) -> dict[str, SplitRun]:
    """Each split's pass over what is new (geodata.ingest.split_csv / split_wds), into temp
    manifest parts; nothing is published. On any error the temp parts are removed."""
    store = ImageStore(plan.root)
    seen = plan.seen_ids()
    runs: dict[str, SplitRun] = {}
    dims: dict[str, int] = {}
    try:
        for split in plan.splits:
            t_split = time.perf_counter()
            run = runs[split] = _start_split(plan, split)
            if plan.layout == "csv":
                checker = decode_checker(store, workers) if plan.verify_images == "decode" else None
                ingest_csv_split(run, plan.root, plan.csv[split], seen, plan.images.get(split), checker,
                                 plan.pending[split])
            else:
                new, run.shards = plan.shards[split]
                ingest_wds_split(run, plan.root, plan.out_dir, new, seen, plan.verify_images, store, workers,
                                 features, dims)
            log.info("%s: %d rows read in %.1f s", split, run.report.n_in, time.perf_counter() - t_split)
            crash_point("split")
    except BaseException:
        for r in runs.values():
            r.writer.discard()
        raise
    finally:
        store.close()
    return runs


def _start_split(plan: RunPlan, split: str) -> SplitRun:
    """A split's SplitRun with its report and temp part writer; a full ingest removes an older
    single-file manifest."""
    part_dir = plan.out_dir / "manifest" / f"{split}.parquet"
    srep = SplitReport(split=split, csv_path=str(plan.input_path(split)))
    srep.mode = "full" if plan.state is None else "append"
    srep.full_reason = plan.why_full if plan.state is None else ""
    run = SplitRun(report=srep, writer=PartWriter(part_dir, f"part-{plan.run_no:05d}.parquet"))
    if plan.state is None and part_dir.is_file():  # an older single-file manifest: replaced by a folder of parts
        part_dir.unlink()
    return run
