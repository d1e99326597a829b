"""Commit an ingest run: counts, the bad-fraction check, then tables, parts, state and views.

`commit_run` counts each split (this run and all runs), checks max_bad_fraction, then
writes the run's tables under `.runs/run-N/`, moves the manifest parts into place, saves the
state (the commit point) and only then publishes quarantine.parquet and image_index/ and
removes what the state no longer lists (`publish`). A split over max_bad_fraction leaves no
manifest (`remove_outputs`): the next run starts from scratch. `finish_noop` ends a run with
nothing new: it publishes again (finishing a run killed after its state was saved) and
reports the totals.

`crash_point` lets tests kill the process after each step (`COMMIT_STEPS`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from geodata.atomic import atomic_write_path, write_parquet_atomic, write_text_atomic
from geodata.ingest.image_listing import LISTING_SCHEMA
from geodata.ingest.incremental import (
    IngestState,
    PartState,
    SplitState,
    drop_state,
    manifest_digest,
    orphan_parts,
    save_state,
)
from geodata.ingest.plan import RUNS_DIR, RunPlan, previous_index, run_dir
from geodata.ingest.quarantine import QUARANTINE_SCHEMA, empty_quarantine, sort_quarantine, summarise
from geodata.ingest.report import IngestReport, SplitReport, log_summary, too_bad_message
from geodata.ingest.split import SplitRun

__all__ = ["COMMIT_STEPS", "commit_run", "crash_point", "finish_noop", "publish", "remove_outputs"]

log = logging.getLogger(__name__)

COMMIT_STEPS = ("split", "run_tables", "parts", "state", "publish", "cleanup", "report")  # crash_point names
_ATOMIC_TMP = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # geodata.atomic's temp names


def crash_point(step: str) -> None:
    """Test hook: SIGKILL this process after commit step `step` when $HIERLOC_INGEST_CRASH_AFTER names it.

    Steps, in order (`COMMIT_STEPS`): split (a split's rows read, nothing committed), run_tables,
    parts, state, publish, cleanup, report.
    """
    if os.environ.get("HIERLOC_INGEST_CRASH_AFTER") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Publish `src` at `dst` atomically (a hard link when possible); nothing to do when it already is `src`."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    with atomic_write_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def commit_run(report: IngestReport, plan: RunPlan, runs: dict[str, SplitRun], t0: float) -> IngestReport:
    """Counts, the bad-fraction check, then publish: run tables, parts, state (the commit point), views.

    When a split exceeds max_bad_fraction, returns the report with ok = false and `error` set
    (written with quarantine.parquet; no manifest left).
    """
    quarantine_by_split = {s: _split_quarantine(plan.quarantine, runs[s], s) for s in plan.splits}
    new_state = IngestState(layout=plan.layout, verify_images=plan.verify_images, splits_order=list(plan.splits),
                            run=plan.run_no)
    parts_new: dict[str, PartState | None] = {}
    for split in plan.splits:
        prev = plan.state.splits.get(split) if plan.state is not None else None
        new_state.splits[split], parts_new[split] = _count_split(plan, runs[split], prev, quarantine_by_split[split])
        report.splits[split] = runs[split].report
    quarantine = pa.concat_tables([quarantine_by_split[s] for s in plan.splits]).cast(QUARANTINE_SCHEMA)
    log_summary(report)
    report.error = too_bad_message(report)
    if report.error is not None:
        report.ok = False
        for r in runs.values():
            r.writer.discard()
        remove_outputs(plan.out_dir, plan.splits)
        write_parquet_atomic(quarantine, Path(report.quarantine_path))
        report.elapsed_s = time.perf_counter() - t0
        write_text_atomic(report.to_json(), Path(report.report_path))
        return report

    this_run = _write_run_tables(plan, runs, quarantine)
    crash_point("run_tables")
    for split in plan.splits:
        if parts_new[split] is not None:
            runs[split].writer.commit()
    crash_point("parts")
    report.state_path = str(save_state(new_state, plan.out_dir))  # the commit point
    crash_point("state")
    publish(new_state, plan.out_dir, this_run, plan.splits)  # a re-run repeats it when killed before its end
    for split in plan.splits:
        report.splits[split].manifest_path = str(plan.out_dir / "manifest" / f"{split}.parquet")
    report.elapsed_s = time.perf_counter() - t0
    write_text_atomic(report.to_json(), Path(report.report_path))
    crash_point("report")
    log.info("ingest done in %.1f s; report %s", report.elapsed_s, report.report_path)
    return report


def _split_quarantine(old: pa.Table, run: SplitRun, split: str) -> pa.Table:
    """All quarantine rows of a split after this run: earlier ones (less re-judged rows) + new ones."""
    mine = old.filter(pc.equal(old["split"], split))
    if run.resolved is not None and run.resolved.num_rows:
        gone = pa.table({"line": run.resolved["line"], "reason": pa.array(["image_missing"] * run.resolved.num_rows)})
        mine = mine.join(gone, ["line", "reason"], join_type="left anti")
    new = [t for t in [*run.quarantine, run.rejudged] if t is not None and t.num_rows]
    return sort_quarantine(pa.concat_tables([mine, *new]).cast(QUARANTINE_SCHEMA))


def _count_split(
    plan: RunPlan, run: SplitRun, prev: SplitState | None, quarantine: pa.Table,
) -> tuple[SplitState, PartState | None]:
    """Close the split's part and count it into its report (this run, all runs); its new state
    and its new part (None when no row was kept). Raises AssertionError when counts do not add up."""
    srep = run.report
    part = run.writer.close()
    new_q = pa.concat_tables([*run.quarantine, empty_quarantine()]).cast(QUARANTINE_SCHEMA)
    srep.n_quarantined = new_q.num_rows
    srep.n_kept = (part.n_rows if part else 0) - srep.n_recovered
    srep.reasons, srep.examples = summarise(new_q)
    if srep.n_in != srep.n_kept + srep.n_quarantined:
        raise AssertionError(
            f"{srep.split}: counts do not add up: {srep.n_in} in != {srep.n_kept} kept + {srep.n_quarantined} quarantined"
        )
    _check_lines(srep, plan.layout, run.csv)
    srep.n_in_total = (prev.n_in_total if prev else 0) + srep.n_in
    srep.kept_total = (prev.kept_total if prev else 0) + srep.n_kept + srep.n_recovered
    srep.quarantined_total = quarantine.num_rows
    srep.reasons_total, _ = summarise(quarantine)
    srep.bad_fraction = srep.quarantined_total / max(srep.n_in_total, 1)
    srep.n_pending = run.pending_total.num_rows
    parts = list(prev.parts) if prev else []
    if part is not None:
        parts.append(part)
    srep.n_parts = len(parts)
    srep.manifest_digest = manifest_digest(srep.split, parts)
    containers = plan.images[srep.split].fingerprints if srep.split in plan.images else {}
    state = SplitState(
        csv=run.csv, shards=run.shards, containers=containers, parts=parts, n_in_total=srep.n_in_total,
        kept_total=srep.kept_total, quarantined_total=srep.quarantined_total, line_numbers=srep.line_numbers,
    )
    return state, part


def _check_lines(srep: SplitReport, layout: str, csv: Any) -> None:
    """Raise AssertionError unless the CSV's physical lines read add up to its rows' lines."""
    if layout != "csv" or srep.line_numbers != "physical" or srep.bytes_parsed == 0:
        return
    header = int(csv is not None and csv.n_bytes == srep.bytes_parsed)  # read from the start
    if srep.n_lines != header + srep.n_blank_lines + srep.n_lines_kept + srep.n_lines_quarantined:
        raise AssertionError(
            f"{srep.csv_path}: lines do not add up: {srep.n_lines} read != {header} header + {srep.n_blank_lines} "
            f"blank + {srep.n_lines_kept} kept + {srep.n_lines_quarantined} quarantined"
        )


def _write_run_tables(plan: RunPlan, runs: dict[str, SplitRun], quarantine: pa.Table) -> Path:
    """Write this run's quarantine, pending and image index tables to its run folder (returned)."""
    this_run = run_dir(plan.out_dir, plan.run_no)
    write_parquet_atomic(quarantine, this_run / "quarantine.parquet")
    for split in plan.splits:
        write_parquet_atomic(runs[split].pending_total, this_run / f"pending_{split}.parquet")
        if split in plan.images:
            index = plan.images[split].table
        else:
            old = (previous_index(plan.out_dir, plan.state, split) if plan.state is not None
                   else LISTING_SCHEMA.empty_table())
            index = pa.concat_tables([old, *runs[split].listings]).cast(LISTING_SCHEMA)
        write_parquet_atomic(index, this_run / f"image_index_{split}.parquet")
    return this_run


def publish(state: IngestState, out_dir: Path, run_folder: Path, splits: tuple[str, ...]) -> None:
    """After the commit: public quarantine / image index, and removal of what the state no longer lists.

    Idempotent: the no-op re-run calls it again, so a run killed after saving its state
    (before or during this) is finished by the next run.
    """
    _link_or_copy(run_folder / "quarantine.parquet", out_dir / "quarantine.parquet")
    for split in splits:
        _link_or_copy(run_folder / f"image_index_{split}.parquet", out_dir / "image_index" / f"{split}.parquet")
    crash_point("publish")
    for split in splits:
        part_dir = out_dir / "manifest" / f"{split}.parquet"
        part_dir.mkdir(parents=True, exist_ok=True)
        for orphan in orphan_parts(part_dir, state.splits[split].parts):
            orphan.unlink(missing_ok=True)
    for old in (out_dir / RUNS_DIR).iterdir():
        if old != run_folder:
            shutil.rmtree(old, ignore_errors=True)
    for folder in (out_dir, out_dir / "image_index"):  # temp files of writes a kill interrupted
        for tmp in folder.glob(".*.tmp"):
            if _ATOMIC_TMP.fullmatch(tmp.name):
                tmp.unlink(missing_ok=True)
    crash_point("cleanup")


def remove_outputs(out_dir: Path, splits: tuple[str, ...]) -> None:
    """Remove manifests, run tables and state: a failed validation leaves no manifest to trust."""
    drop_state(out_dir)
    shutil.rmtree(out_dir / RUNS_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / "image_index", ignore_errors=True)
    for split in splits:
        path = out_dir / "manifest" / f"{split}.parquet"
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def finish_noop(report: IngestReport, plan: RunPlan, t0: float) -> IngestReport:
    """A re-run with nothing new: finish publishing, report the totals (and re-check max_bad_fraction).

    When a split exceeds max_bad_fraction, returns the report with ok = false and `error` set
    (no manifest left).
    """
    state, out_dir, quarantine = plan.state, plan.out_dir, plan.quarantine
    report.noop = True
    publish(state, out_dir, run_dir(out_dir, state.run), tuple(state.splits_order))
    for split, s in state.splits.items():
        mine = quarantine.filter(pc.equal(quarantine["split"], split))
        srep = SplitReport(
            split=split, csv_path=str(plan.input_path(split)),
            mode="unchanged", n_in_total=s.n_in_total, kept_total=s.kept_total,
            quarantined_total=s.quarantined_total, bad_fraction=s.quarantined_total / max(s.n_in_total, 1),
            manifest_path=str(out_dir / "manifest" / f"{split}.parquet"), manifest_digest=manifest_digest(split, s.parts),
            n_parts=len(s.parts), line_numbers=s.line_numbers,  # type: ignore[arg-type]
            n_pending=plan.pending[split].num_rows,
        )
        srep.reasons_total, _ = summarise(mine)
        report.splits[split] = srep
    log_summary(report)
    report.error = too_bad_message(report)
    report.elapsed_s = time.perf_counter() - t0
    if report.error is not None:
        report.ok = False
        remove_outputs(out_dir, tuple(state.splits_order))
        write_text_atomic(report.to_json(), Path(report.report_path))
        return report
    log.info("ingest: nothing new in %s since run %d (%.1f s)", report.root, state.run, report.elapsed_s)
    write_text_atomic(report.to_json(), Path(report.report_path))
    return report
